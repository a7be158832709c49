"""Tensor parallelism on CPU: the embedded model on 3 ranks (9 query / 3 KV heads: 2 ranks cannot split
them), vLLM's multiprocessing executor, each rank's router holding its share of heads.

Pipeline parallelism is not tested here: vLLM 0.32's CPU model runner fails on the second stage with or
without attnserve (``sync_and_gather_intermediate_tensors``: ``assert self.intermediate_tensors is not
None``), so the stage logic is tested on vLLM's own configs in tests/strategies/test_backend_router.py."""

from __future__ import annotations

import gc
import itertools
import os
from pathlib import Path

import pytest

from server.model import embedded_model_dir
from strategies import stats as stats_io
from tests.e2e.conftest import PAGE, assert_same_greedy
from tests.e2e.test_routing import generate, sampling, strategies_small

pytestmark = pytest.mark.timeout(900)

TP = 3


@pytest.fixture(scope="module")
def tp_engine():
    """The shared engine's settings (tests/e2e/conftest.py) on TP ranks, in worker processes."""
    from vllm import LLM

    cores = sorted(os.sched_getaffinity(0))
    stats_dir = Path("/dev/shm") / f"attnserve-tp-{os.getpid()}"
    env = {"ATTNSERVE_STATS_DIR": str(stats_dir),
           # one NUMA node here: vLLM's automatic binding wants one per rank, so the ranks share the cores
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c, _ in zip(itertools.cycle(cores), range(TP)))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = LLM(model=str(embedded_model_dir()), enforce_eager=True, max_model_len=4096,
                  kv_cache_memory_bytes=1 << 28, max_num_seqs=16, max_num_batched_tokens=8192, block_size=PAGE,
                  seed=0, tensor_parallel_size=TP, distributed_executor_backend="mp")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield llm, stats_dir
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    for path in stats_dir.rglob("*"):
        if path.is_file():
            path.unlink()


def test_every_strategy_runs_on_tensor_parallel_ranks(tp_engine, engine, text_tokens, seer_gates, monkeypatch):
    """Each request runs its own strategy on every rank (seer's gate file, written for the whole model, is
    sliced per rank: before, the ranks refused it and ran full), and follows the same batch on one rank
    within the float spread of a different reduction order."""
    llm, stats_dir = tp_engine
    prompt = text_tokens[300:1300]
    choices = [{"strategy": "full", "params": {}}, *strategies_small(seer_gates).values()]
    params = [sampling(c, 4, logprobs=2) for c in choices]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(choices), params, use_tqdm=False)
    single = generate(engine, [prompt] * len(choices), params)
    monkeypatch.setenv(stats_io.ENV_DIR, str(stats_dir))
    for choice, out, reference in zip(choices, outs, single):
        report = stats_io.read_stats(out.request_id)
        assert report is not None and report["strategy"] == choice["strategy"], (choice, report)
        if choice["strategy"] != "full":
            assert report["decode_attended_fraction"] < 0.5, (choice, report)
        assert_same_greedy(out.outputs[0], reference, f"TP={TP} {choice}")
