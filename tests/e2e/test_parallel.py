"""Tensor parallelism on CPU: the embedded model on 3 ranks (9 query / 3 KV heads: 2 ranks cannot split
them), vLLM's multiprocessing executor, each rank's router holding its share of heads.

Pipeline parallelism is not tested here: vLLM 0.32's CPU model runner fails on the second stage with or
without attnserve (``sync_and_gather_intermediate_tensors``: ``assert self.intermediate_tensors is not
None``), so the stage logic is tested on vLLM's own configs in tests/strategies/test_backend_router.py."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from server.model import embedded_model_dir
from strategies.engine import stats as stats_io
from tests.e2e.conftest import PAGE, assert_same_greedy, built_engine, remove_files
from tests.e2e.test_routing import generate, sampling, strategies_small

pytestmark = pytest.mark.timeout(900)

TP = 3


@pytest.fixture(scope="module")
def tp_engine():
    """The shared engine's settings (tests/e2e/conftest.py) on TP ranks, in worker processes."""
    cores = sorted(os.sched_getaffinity(0))
    stats_dir = Path("/dev/shm") / f"attnserve-tp-{os.getpid()}"
    environment = {"ATTNSERVE_STATS_DIR": str(stats_dir),
                   # one NUMA node here: vLLM's automatic binding wants one per rank, so the ranks share cores
                   "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c, _ in zip(itertools.cycle(cores), range(TP)))}
    with built_engine(environment, model=str(embedded_model_dir()), enforce_eager=True, max_model_len=4096,
                      kv_cache_memory_bytes=1 << 28, max_num_seqs=16, max_num_batched_tokens=8192,
                      block_size=PAGE, seed=0, tensor_parallel_size=TP, distributed_executor_backend="mp") as llm:
        yield llm, stats_dir
    remove_files(stats_dir)


def test_every_strategy_runs_on_tensor_parallel_ranks(tp_engine, engine, text_tokens, seer_gates, monkeypatch):
    """One batch on 3 ranks: each request runs its own strategy on every rank (seer's gate file, written
    for the whole model, is sliced per rank: before, the ranks refused it and ran full); at a budget
    covering the context each strategy follows ``full`` in the batch (the ranks' heads attended right);
    ``full`` and the selection-free ``sink`` follow the same batch on one rank within the float spread of
    another reduction order (a top-k selection may flip on such a spread, so the others are not
    compared across rank counts)."""
    llm, stats_dir = tp_engine
    prompt = text_tokens[300:1300]
    small = list(strategies_small(seer_gates).values())
    whole = [{"strategy": "sink", "params": {"n_sink": 4, "window": 8192}},
             {"strategy": "recycled", "params": {"k": 1.0, "stride": 4}},
             {"strategy": "landmark", "params": {"k_blocks": 1.0, "dense_layers": 0}},
             {"strategy": "seer", "params": {"block_size": 32, "top_k": 1.0, "gates": seer_gates}}]
    choices = [{"strategy": "full", "params": {}}, *small, *whole]
    params = [sampling(c, 4, logprobs=2) for c in choices]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(choices), params, use_tqdm=False)
    monkeypatch.setenv(stats_io.ENV_DIR, str(stats_dir))
    for choice, out in zip(choices, outs):
        report = stats_io.read_stats(out.request_id)
        assert report is not None and report["strategy"] == choice["strategy"], (choice, report)
    for choice, out in zip(small, outs[1:]):
        assert stats_io.read_stats(out.request_id)["decode_attended_fraction"] < 0.5, choice
    full = outs[0].outputs[0]
    for choice, out in zip(whole, outs[1 + len(small):]):
        assert_same_greedy(out.outputs[0], full, f"TP={TP} {choice} vs full")
    single = generate(engine, [prompt] * len(choices), params)
    assert_same_greedy(full, single[0], f"TP={TP} full vs one rank")
    assert_same_greedy(outs[1].outputs[0], single[1], f"TP={TP} {small[0]} vs one rank")
