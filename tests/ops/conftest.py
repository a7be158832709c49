"""Shared builders for the kernel tests: paged KV caches in vLLM's CPU layout
[num_blocks, Hkv, page, 2 * D] viewed as K / V halves, with shuffled block tables."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

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


def packed_indices(seq_lens: list[int], num_kv_heads: int, budget: int, seed: int,
                   positions: Callable[[int, torch.Generator], list[int] | torch.Tensor]):
    """`positions(seq_len, generator)` for every (b, g), packed -> (token_idx [B, G, K], num_idx
    [B, G]) with K = min(budget, longest sequence)."""
    generator = torch.Generator().manual_seed(seed)
    K = max(1, min(budget, max(seq_lens)))
    token_idx = torch.zeros(len(seq_lens), num_kv_heads, K, dtype=torch.int32)
    num_idx = torch.zeros(len(seq_lens), num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for g in range(num_kv_heads):
            chosen = torch.as_tensor(positions(n, generator), dtype=torch.int32)
            token_idx[b, g, :len(chosen)] = chosen
            num_idx[b, g] = len(chosen)
    return token_idx, num_idx


def run_indices(seq_lens: list[int], num_kv_heads: int, budget: int, run: int, shuffle_runs: bool,
                seed: int = 0):
    """Per (b, g): runs of up to `run` consecutive positions (anywhere, so they cross pages), distinct,
    up to `budget` positions: landmark's chunks, sink's window, recycled's buffer."""
    def positions(n: int, generator: torch.Generator) -> list[int]:
        starts = torch.randperm(n, generator=generator)[: max(1, budget // run)].sort().values.tolist()
        chosen: list[int] = []
        for start in starts:
            chosen.extend(t for t in range(start, min(n, start + run)) if not chosen or t > chosen[-1])
        chosen = chosen[:min(budget, n)]
        if shuffle_runs:    # the runs in random order, each run still ascending
            pieces = [chosen[i:i + run] for i in range(0, len(chosen), run)]
            order = torch.randperm(len(pieces), generator=generator).tolist()
            chosen = [t for i in order for t in pieces[i]]
        return chosen
    return packed_indices(seq_lens, num_kv_heads, budget, seed, positions)


def random_indices(seq_lens: list[int], num_kv_heads: int, budget: int, seed: int = 0):
    """Per (b, g): min(budget, seq_len) distinct positions in random order -> (token_idx, num_idx)."""
    return packed_indices(seq_lens, num_kv_heads, budget, seed,
                          lambda n, generator: torch.randperm(n, generator=generator)[:budget])


@cache
def cpu_isa_levels() -> tuple[str, ...]:
    """The ISA levels of the CPU kernels this CPU can run (each level includes the ones below)."""
    if not ops.extension_loaded():  # every test fails in compiled_extension_required; one level is enough
        return ops.CPU_ISA_LEVELS[:1]
    previous = ops.set_cpu_isa_cap(ops.CPU_ISA_LEVELS[-1])
    try:
        top = ops.cpu_isa()
    finally:
        ops.set_cpu_isa_cap(previous)
    return ops.CPU_ISA_LEVELS[:ops.CPU_ISA_LEVELS.index(top) + 1]


def pytest_generate_tests(metafunc):
    """A test that takes `cpu_isa` runs once per ISA level this CPU has (ids: the level names)."""
    if "cpu_isa" in metafunc.fixturenames:
        metafunc.parametrize("cpu_isa", cpu_isa_levels(), indirect=True)


@pytest.fixture
def cpu_isa(request):
    """Runs the test with the CPU kernels capped at one ISA level (parametrised by
    pytest_generate_tests: every compiled variant this CPU can run)."""
    previous = ops.set_cpu_isa_cap(request.param)
    assert ops.cpu_isa() == request.param
    yield request.param
    ops.set_cpu_isa_cap(previous)


@pytest.fixture(scope="session", autouse=True)
def compiled_extension_required():
    """The CPU kernels must be built: the tests never compare the reference with itself."""
    assert ops.extension_loaded(), f"strategies._C is not built: {ops.EXTENSION_ERROR}"
    for name in ops.OP_NAMES:
        assert ops.has_compiled(name, "cpu"), f"no CPU kernel for attnserve::{name}"
