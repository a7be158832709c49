"""One real vLLM engine (embedded model, our plugin) for the whole e2e folder.

The engine core and the worker run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set only
while the engine is built) so the tests can look at vLLM's own block pool and at the worker's router;
the multi-process path is covered through HTTP by tests/server.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.model import embedded_model_dir

TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")
PAGE = 32
# Two kernels computing the same attention (ours at a whole budget, vLLM's) differ by float rounding,
# and vLLM's CPU path by up to 0.12 nats between batch shapes (measured on an AVX-512 Intel CPU without
# bf16): chosen-token logprobs agree within this, and a greedy choice may only flip on such a near-tie.
NEAR_TIE_NATS = 0.15


@dataclass
class Engine:
    llm: object          # vllm.LLM
    stats_dir: Path

    @property
    def engine(self):
        return self.llm.llm_engine

    @property
    def block_pool(self):
        return self.engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool

    def used_blocks(self) -> int:
        """Blocks held by requests (the null block excluded), from vLLM's own pool."""
        pool = self.block_pool
        return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()

    def router(self):
        from strategies.engine.backend import ROUTER

        return ROUTER


def assert_same_greedy(out, reference, what: str, tolerance: float = NEAR_TIE_NATS) -> None:
    """``out`` (a vLLM CompletionOutput, greedy, logprobs >= 1) follows ``reference`` (logprobs >= 2): the
    same tokens with logprobs within ``tolerance``, or the same up to a token where ``reference``'s top
    two were within ``tolerance`` of each other and ``out`` took the other one (later tokens then
    continue a different text and are not compared)."""
    for i, (token, ref_token) in enumerate(zip(out.token_ids, reference.token_ids)):
        ref_top = reference.logprobs[i]
        if token != ref_token:
            assert token in ref_top and ref_top[ref_token].logprob - ref_top[token].logprob <= tolerance, (
                f"{what}: token {i} is {token}, the reference's {ref_token} "
                f"(reference logprobs {dict((t, round(x.logprob, 4)) for t, x in ref_top.items())})")
            return
        gap = abs(out.logprobs[i][token].logprob - ref_top[token].logprob)
        assert gap <= tolerance, f"{what}: token {i} ({token}) logprob differs by {gap:.4f} from the reference"


def fresh_prompts(prompts: list[list[int]], salt: str | None = None) -> list[dict]:
    """The prompts under a prefix-cache salt (a new one unless given): they share blocks with each other
    (one batch, one shape) and with calls given the same salt, never with other calls, whose KV may have
    been computed in another batch shape (vLLM's CPU path is not batch-invariant: reusing such KV moved a
    ``full`` row by 0.19 nats)."""
    salt = salt or uuid.uuid4().hex
    return [{"prompt_token_ids": p, "cache_salt": salt} for p in prompts]


def _text_tokens(tokenizer) -> list[int]:
    text = TEXT_FILE.read_text() if TEXT_FILE.exists() else (embedded_model_dir() / "tokenizer.json").read_text()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_KEPT_FOR_THE_SESSION: list[Any] = []


@contextmanager
def built_engine(environment: dict[str, str], shutdown: bool = True, **engine_args) -> Iterator[Any]:
    """A ``vllm.LLM`` built while ``environment`` is set (the engine's processes inherit it; then it is
    as it was), shut down on exit unless ``shutdown`` is false: shutting down an engine that runs in this
    process destroys vLLM's process-wide parallel state, which the shared engine still uses."""
    from vllm import LLM
    from vllm import envs as vllm_envs

    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    vllm_envs.disable_envs_cache()   # an engine built in this process before cached the environment
    try:
        llm = LLM(**engine_args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield llm
    finally:
        if shutdown:
            llm.llm_engine.engine_core.shutdown()
        else:
            _KEPT_FOR_THE_SESSION.append(llm)     # collecting it would tear that state down too
        del llm
        gc.collect()


def in_process(**environment: str) -> dict[str, str]:
    """The engine core and the worker in this process (the tests look at vLLM's block pool and our router)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **environment}


def remove_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            path.unlink()


@pytest.fixture(scope="package")
def engine(tmp_path_factory: pytest.TempPathFactory):
    stats_dir = Path("/dev/shm") / f"attnserve-e2e-{os.getpid()}"
    # Pages of 32 tokens (CPU pages are multiples of 32) keep sink's window test short; a token
    # budget that holds the mixed batch's prompts in one step (no chunked prefill in the comparison).
    with built_engine(in_process(ATTNSERVE_STATS_DIR=str(stats_dir)), model=str(embedded_model_dir()),
                      enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=1 << 30, max_num_seqs=16,
                      max_num_batched_tokens=8192, block_size=PAGE, seed=0, disable_log_stats=False) as llm:
        yield Engine(llm, stats_dir)
    remove_files(stats_dir)


@pytest.fixture(scope="package")
def text_tokens(engine) -> list[int]:
    return _text_tokens(engine.llm.get_tokenizer())


@pytest.fixture(scope="package")
def seer_gates(engine, tmp_path_factory) -> Iterator[str]:
    """A gate file written through strategies.seer's SeerGates API (identity gates, block 32), in a folder
    requests may name gate files in (as with `attnserve serve --allow-gate-paths DIR`; the engine runs in
    this process, so the worker sees the same environment)."""
    from strategies.seer import ALLOW_GATE_PATHS_ENV, SeerGates

    folder = tmp_path_factory.mktemp("gates").resolve()
    path = folder / "seer-identity.safetensors"
    SeerGates.identity(engine.router().model, block_size=PAGE).save(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ALLOW_GATE_PATHS_ENV, str(folder))
        yield str(path)
