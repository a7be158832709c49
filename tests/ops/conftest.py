"""Shared builders for the kernel tests: paged KV caches in vLLM's CPU layout
[num_blocks, Hkv, page, 2 * D] viewed as K / V halves, with shuffled block tables."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from strategies import ops

torch.set_num_threads(2)

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@dataclass(frozen=True)
class PagedKV:
    key_cache: torch.Tensor     # [num_blocks, Hkv, page, D] view into kv
    value_cache: torch.Tensor
    block_table: torch.Tensor   # int32 [B, MB], shuffled physical ids
    seq_lens: torch.Tensor      # int32 [B]
    page: int


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_size: int, page: int,
                  dtype: torch.dtype, seed: int = 0, spare_blocks: int = 3,
                  layout: str = "vllm") -> PagedKV:
    """layout "vllm": vLLM's CPU cache [num_blocks, Hkv, page, 2 * D] as cpu_attn_reshape_and_cache
    writes it (ISA vec/vec16): per (block, head) K transposed [D, page], then V [page, D].
    layout "rows": K and V both token-major rows (the CUDA-like, dim-contiguous case)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, -(-n // page)) for n in seq_lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + spare_blocks
    kv = torch.randn(num_blocks, num_kv_heads, page, 2 * head_size, generator=generator).to(dtype)
    physical = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = physical[used:used + n]
        table[b, n:] = physical[-1]  # unused tail entries point at a real (spare) block
        used += n
    halves = kv.view(num_blocks, num_kv_heads, 2, page * head_size)
    if layout == "vllm":
        key_cache = halves[:, :, 0].view(num_blocks, num_kv_heads, head_size, page).transpose(2, 3)
    else:
        key_cache = halves[:, :, 0].view(num_blocks, num_kv_heads, page, head_size)
    value_cache = halves[:, :, 1].view(num_blocks, num_kv_heads, page, head_size)
    return PagedKV(key_cache, value_cache, table, torch.tensor(seq_lens, dtype=torch.int32), page)


def random_indices(seq_lens: list[int], num_kv_heads: int, budget: int, seed: int = 0):
    """Per (b, g): min(budget, seq_len) distinct positions in random order -> (token_idx, num_idx)."""
    generator = torch.Generator().manual_seed(seed)
    K = max(1, min(budget, max(seq_lens)))
    token_idx = torch.zeros(len(seq_lens), num_kv_heads, K, dtype=torch.int32)
    num_idx = torch.zeros(len(seq_lens), num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for g in range(num_kv_heads):
            count = min(budget, n)
            token_idx[b, g, :count] = torch.randperm(n, generator=generator)[:count].to(torch.int32)
            num_idx[b, g] = count
    return token_idx, num_idx


@pytest.fixture(scope="session", autouse=True)
def compiled_extension_required():
    """The CPU kernels must be built: the tests never compare the reference with itself."""
    assert ops.extension_loaded(), f"strategies._C is not built: {ops.EXTENSION_ERROR}"
    for name in ops.OP_NAMES:
        assert ops.has_compiled(name, "cpu"), f"no CPU kernel for attnserve::{name}"
