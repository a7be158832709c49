"""Per-request attention stats from the workers to the API process (design.md section 5).

The server sets ``ATTNSERVE_STATS_DIR`` (a folder under /dev/shm) before the engine starts; workers
inherit it. Rank 0 of the workers writes one tiny JSON file per active request after each step,
named by vLLM's *internal* request id, which is the id given to ``AsyncLLM.generate`` plus
``-<8 random chars>`` (``InputProcessor.assign_request_id``), with ``<i>_`` in front for the children
of an ``n > 1`` request (``ParentRequest.get_child_info``). ``read_stats(request_id)`` takes the id
the API process used and sums every internal id derived from it; ``discard`` removes their files.
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

ENV_DIR = "ATTNSERVE_STATS_DIR"
LIVE_DIR = "_live"
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
    """Worker side (rank 0 only)."""
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
            from vllm.distributed import get_tensor_model_parallel_rank

            if get_tensor_model_parallel_rank() != 0:
                return None
        except Exception:   # not initialised: a single process
            pass
        return cls(directory)

    def write(self, request_id: str, strategy: str, params: dict, attended: float, total: float) -> None:
        record = {"request_id": request_id, "strategy": strategy, "params": params,
                  "attended": attended, "total": total}
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


def _matching_files(directory: Path, request_id: str) -> list[Path]:
    """Files of the internal ids derived from ``request_id`` (itself, ``-xxxxxxxx``, ``<i>_`` children)."""
    pattern = re.compile(r"(?:\d+_)?" + re.escape(quote(request_id, safe="")) + r"(?:-[0-9A-Za-z]{8})?\.json")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in names if pattern.fullmatch(n)]


def read_stats(request_id: str) -> Optional[dict]:
    """``{"strategy", "params", "attended", "total", "attended_fraction"}`` summed over the internal
    requests of ``request_id`` (n > 1 children), or None when no worker reported it (yet)."""
    directory = stats_dir()
    if directory is None:
        return None
    records = []
    for path in _matching_files(directory, request_id):
        try:
            records.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    if not records:
        return None
    attended = sum(r["attended"] for r in records)
    total = sum(r["total"] for r in records)
    return {"strategy": records[0]["strategy"], "params": records[0]["params"],
            "attended": attended, "total": total,
            "attended_fraction": (attended / total) if total else 1.0}


def discard(request_id: str) -> None:
    directory = stats_dir()
    if directory is None:
        return
    for path in _matching_files(directory, request_id):
        path.unlink(missing_ok=True)


def read_live_state() -> list[dict]:
    """The latest live-state record of each worker process (debug: leak checks)."""
    directory = stats_dir()
    if directory is None:
        return []
    out = []
    for path in sorted((directory / LIVE_DIR).glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return out
