"""The routing backend on CUDA (strategies/engine/backend_cuda.py) in a real vLLM engine: needs a CUDA GPU and
vLLM's CUDA build (skipped otherwise). A mixed batch (full + sink + landmark rows) gives each request
what it gives alone, and an all-``full`` batch is FlashAttention's own result."""

from __future__ import annotations


import pytest
import torch

from server.model import embedded_model_dir
from tests.e2e.conftest import _text_tokens, built_engine, in_process


def _cuda_vllm() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from vllm.platforms import current_platform
    except Exception:
        return False
    return current_platform.is_cuda()


pytestmark = pytest.mark.skipif(not _cuda_vllm(),
                                reason="needs a CUDA GPU and vLLM's CUDA build (vllm==0.32.0)")


@pytest.fixture(scope="module")
def cuda_llm():
    with built_engine(in_process(), model=str(embedded_model_dir()), attention_backend="CUSTOM", enforce_eager=True,
                      max_model_len=4096, gpu_memory_utilization=0.3, max_num_seqs=16, max_num_batched_tokens=8192,
                      block_size=16, seed=0, dtype="bfloat16") as llm:
        yield llm


def _params(strategy: str | None, params: dict | None = None, max_tokens: int = 16):
    from vllm import SamplingParams

    extra = None if strategy is None else {"attention": {"strategy": strategy, "params": params or {}}}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)


def test_engine_uses_the_routing_backend(cuda_llm):
    from strategies.engine.backend import ROUTER

    cuda_llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], _params(None, max_tokens=2))
    assert ROUTER.model is not None and ROUTER.runner is not None


def test_mixed_batch_equals_each_request_alone_on_cuda(cuda_llm):
    tokens = _text_tokens(cuda_llm.get_tokenizer())
    prompts = [{"prompt_token_ids": tokens[i * 300: i * 300 + 700 + 50 * i]} for i in range(4)]
    choices = [_params("full"), _params("sink", {"n_sink": 4, "window": 128}),
               _params(None), _params("landmark")]
    together = cuda_llm.generate(prompts, choices)
    alone = [cuda_llm.generate([p], [c])[0] for p, c in zip(prompts, choices)]
    for t, a in zip(together, alone):
        assert t.outputs[0].token_ids == a.outputs[0].token_ids


def test_all_full_batch_is_flash_attention(cuda_llm):
    tokens = _text_tokens(cuda_llm.get_tokenizer())
    prompts = [{"prompt_token_ids": tokens[i * 100: i * 100 + 400]} for i in range(3)]
    routed = cuda_llm.generate(prompts, [_params("full")] * 3)
    default = cuda_llm.generate(prompts, [_params(None)] * 3)
    assert [o.outputs[0].token_ids for o in routed] == [o.outputs[0].token_ids for o in default]
