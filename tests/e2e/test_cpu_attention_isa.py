"""On an AMX machine vLLM picks its 'amx' CPU attention for bf16, whose KV cache layout the strategies
cannot read; attnserve then runs vLLM's 'vec' kernels (every x86 CPU has them) and says so. Here vLLM's
choice is made 'amx' on any CPU: the engine starts, says it switched, and every strategy gives the tokens
it gives on the shared engine (same kernels, same batch)."""

from __future__ import annotations

import logging

import pytest

from server.model import embedded_model_dir
from tests.e2e.conftest import PAGE, built_engine, fresh_prompts, in_process
from tests.e2e.test_routing import generate, sampling, strategies_small

pytestmark = pytest.mark.timeout(600)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def amx_engine():
    """(an engine built while vLLM picks 'amx', what the routing backend warned while building it)"""
    from vllm.v1.attention.backends import cpu_attn

    records = _Records()
    backend_logger = logging.getLogger("strategies.engine.backend")
    backend_logger.addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_attn, "_get_attn_isa", lambda *args, **kwargs: "amx")
            # in this process (the warning is logged here), so not shut down: see built_engine
            with built_engine(in_process(), shutdown=False, model=str(embedded_model_dir()), enforce_eager=True,
                              max_model_len=4096,
                              kv_cache_memory_bytes=1 << 28, max_num_seqs=16, max_num_batched_tokens=8192,
                              block_size=PAGE, seed=0) as llm:
                backend_logger.removeHandler(records)
                yield llm, records.messages
    finally:
        backend_logger.removeHandler(records)


def test_an_amx_choice_runs_the_readable_vec_layout(amx_engine, engine, text_tokens, seer_gates):
    llm, warnings = amx_engine
    assert any("'vec' instead of 'amx'" in w for w in warnings), warnings
    prompt = text_tokens[1000:1700]
    choices = [{"strategy": "full", "params": {}}, *strategies_small(seer_gates).values()]
    params = [sampling(c, 4) for c in choices]
    outs = llm.generate(fresh_prompts([prompt] * len(choices)), params, use_tqdm=False)
    llm.llm_engine.step()   # delivers the finishes to the worker: the router (one per process) forgets them
    reference = generate(engine, [prompt] * len(choices), params)
    for choice, out, ref in zip(choices, outs, reference):
        assert list(out.outputs[0].token_ids) == list(ref.token_ids), choice
