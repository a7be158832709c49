"""Per-request attention stats from the workers to the API process (design.md section 5).

The server sets ``ATTNSERVE_STATS_DIR`` (a folder under /dev/shm) before the engine starts; workers
inherit it. Tensor-parallel rank 0 of each pipeline stage writes one tiny JSON file per active request
after each step (stage ``s > 0`` in the subfolder ``stage<s>``: each stage counts its own layers),
named by vLLM's *internal* request id, which is the id given to ``AsyncLLM.generate`` plus
``-<8 random chars>`` (``InputProcessor.assign_request_id``), with ``<i>_`` in front for the children
of an ``n > 1`` request (``ParentRequest.get_child_info``). ``read_stats(request_id)`` takes the id
the API process used, sums every internal id derived from it and averages the pipeline stages;
``discard`` removes their files.
Without ``ATTNSERVE_STATS_DIR`` nothing is written.

The workers also write ``_live/<pid>.json`` (requests they track, per-request state left behind by
released requests) whenever that changes, for leak checks: ``read_live_state()``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from strategies.base import AttentionUsage

ENV_DIR = "ATTNSERVE_STATS_DIR"
LIVE_DIR = "_live"
STAGE_DIR = "stage"     # + the pipeline stage (> 0)
# Files of finished requests that nobody discarded are removed by the worker after this long.
FINISHED_TTL_S = 120.0


def stats_dir() -> Optional[Path]:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


def _file_name(request_id: str) -> str:
    return quote(request_id, safe="") + ".json"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class StatsWriter:
    """Worker side (tensor-parallel rank 0 of each pipeline stage)."""
    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / LIVE_DIR).mkdir(exist_ok=True)
        self._finished: deque[tuple[float, str]] = deque()

    @classmethod
    def for_this_worker(cls) -> Optional["StatsWriter"]:
        directory = stats_dir()
        if directory is None:
            return None
        try:
            from vllm.distributed import get_pipeline_model_parallel_rank, get_tensor_model_parallel_rank

            if get_tensor_model_parallel_rank() != 0:
                return None
            stage = get_pipeline_model_parallel_rank()
        except AssertionError:   # not initialised: a single process
            stage = 0
        return cls(directory if stage == 0 else directory / f"{STAGE_DIR}{stage}")

    def write(self, request_id: str, strategy: str, params: dict, usage: AttentionUsage) -> None:
        record = {"request_id": request_id, "strategy": strategy, "params": params, **usage.to_dict()}
        _atomic_write(self.directory / _file_name(request_id), json.dumps(record))

    def finished(self, request_id: str) -> None:
        """The request left the batch; its file stays for the API process until discarded or stale."""
        now = time.monotonic()
        self._finished.append((now, request_id))
        while self._finished and now - self._finished[0][0] > FINISHED_TTL_S:
            _, old = self._finished.popleft()
            (self.directory / _file_name(old)).unlink(missing_ok=True)

    def write_live(self, state: dict) -> None:
        _atomic_write(self.directory / LIVE_DIR / f"{os.getpid()}.json", json.dumps(state))


def _stage_dirs(directory: Path) -> list[Path]:
    """The stats folder of every pipeline stage (the first is ``directory`` itself)."""
    return [directory, *sorted(directory.glob(f"{STAGE_DIR}[0-9]*"))]


def _matching_files(directory: Path, request_id: str) -> list[Path]:
    """Files of the internal ids derived from ``request_id`` (itself, ``-xxxxxxxx``, ``<i>_`` children)."""
    pattern = re.compile(r"(?:\d+_)?" + re.escape(quote(request_id, safe="")) + r"(?:-[0-9A-Za-z]{8})?\.json")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in names if pattern.fullmatch(n)]


def read_stats(request_id: str) -> Optional[dict]:
    """``{"strategy", "params", "attended", "total", "decode_attended", "decode_total",
    "attended_fraction", "decode_attended_fraction"}`` summed over the internal requests of
    ``request_id`` (n > 1 children) and averaged over pipeline stages, or None when no worker
    reported it (yet). ``decode_attended_fraction`` is None before the first decode step."""
    directory = stats_dir()
    if directory is None:
        return None
    stages: list[AttentionUsage] = []
    first = None
    for stage_dir in _stage_dirs(directory):
        usage, found = AttentionUsage(), False
        for path in _matching_files(stage_dir, request_id):
            try:
                record = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            usage += AttentionUsage(**{k: float(record.get(k, 0.0)) for k in AttentionUsage().to_dict()})
            first = first or record
            found = True
        if found:
            stages.append(usage)
    if first is None:
        return None
    usage = AttentionUsage(**{k: sum(getattr(s, k) for s in stages) / len(stages)
                              for k in AttentionUsage().to_dict()})
    return {"strategy": first["strategy"], "params": first["params"], **usage.to_dict(),
            "attended_fraction": usage.attended_fraction,
            "decode_attended_fraction": usage.decode_attended_fraction}


def discard(request_id: str) -> None:
    directory = stats_dir()
    if directory is None:
        return
    for stage_dir in _stage_dirs(directory):
        for path in _matching_files(stage_dir, request_id):
            path.unlink(missing_ok=True)


def read_live_state() -> list[dict]:
    """The latest live-state record of each worker process (debug: leak checks)."""
    directory = stats_dir()
    if directory is None:
        return []
    out = []
    for path in sorted(p for stage_dir in _stage_dirs(directory) for p in (stage_dir / LIVE_DIR).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return out
