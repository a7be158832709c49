"""sparse_paged_attention: compiled CPU kernel vs the pure-torch reference, exactness of the dense
case against SDPA, and agreement with vLLM's own CPU attention kernel on a cache vLLM wrote."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from strategies import reference
from tests.ops.conftest import TOLERANCE, make_paged_kv, random_indices, run_indices

SEQ_LENS = [1, 17, 300, 2500]


def compiled(*args):
    return torch.ops.attnserve.sparse_paged_attention(*args)


@pytest.mark.parametrize("dtype,head_size,group,page,layout", [
    (dtype, head_size, group, page, layout)
    for dtype, head_size, group, page in itertools.product(
        (torch.float32, torch.bfloat16), (64, 128), (1, 3, 8), (16, 128))
    for layout in (("vllm", "rows") if (head_size, group) == (64, 3) else ("vllm",))])
@pytest.mark.parametrize("budget", [64, 4096])
def test_matches_reference(dtype, head_size, group, page, layout, budget, cpu_isa):
    num_kv_heads = 2
    kv = make_paged_kv(SEQ_LENS, num_kv_heads, head_size, page, dtype, layout=layout)
    token_idx, num_idx = random_indices(SEQ_LENS, num_kv_heads, budget, seed=budget)
    query = torch.randn(len(SEQ_LENS), num_kv_heads * group, head_size).to(dtype)
    args = (query, kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx,
            head_size ** -0.5, True)
    out, mass = compiled(*args)
    ref_out, ref_mass = reference.sparse_paged_attention(*args)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), ref_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), group), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("run,shuffle_runs", [(16, False), (16, True), (5, False), (37, True), (300, False)])
@pytest.mark.parametrize("head_size,group", [(64, 3), (128, 8), (64, 5)])
def test_runs_of_consecutive_tokens_match_reference(dtype, run, shuffle_runs, head_size, group, cpu_isa):
    """Index lists made of runs (the kernels cut tiles into pieces of consecutive tokens of one page),
    with the query in the cache dtype (bf16: the bf16-dot variant where the CPU has it)."""
    seq_lens, num_kv_heads = [1, 130, 700, 2100], 2
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, 128, dtype, seed=run)
    token_idx, num_idx = run_indices(seq_lens, num_kv_heads, 600, run, shuffle_runs, seed=run + 1)
    query = (3 * torch.randn(len(seq_lens), num_kv_heads * group, head_size)).to(dtype)
    args = (query, kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx, head_size ** -0.5, True)
    out, mass = compiled(*args)
    ref_out, ref_mass = reference.sparse_paged_attention(*args)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)


def test_without_mass_and_empty_rows():
    kv = make_paged_kv([40, 40], 1, 64, 16, torch.float32)
    token_idx, num_idx = random_indices([40, 40], 1, 10)
    num_idx[1, 0] = 0  # a row with nothing selected attends to nothing: zeros
    query = torch.randn(2, 2, 64)
    out, mass = compiled(query, kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx,
                         0.125, False)
    assert mass.numel() == 0
    assert torch.equal(out[1], torch.zeros(2, 64))
    ref, _ = reference.sparse_paged_attention(query, kv.key_cache, kv.value_cache, kv.block_table,
                                              token_idx, num_idx, 0.125, False)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_equal_dense_sdpa(dtype):
    """Every token selected (in shuffled order) == plain SDPA over the gathered cache."""
    seq_lens, num_kv_heads, group, head_size = [1, 129, 3000], 3, 3, 64
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, 128, dtype, seed=3)
    token_idx, num_idx = random_indices(seq_lens, num_kv_heads, max(seq_lens), seed=4)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_size).to(dtype)
    out, _ = compiled(query, kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx,
                      head_size ** -0.5, False)
    for b, n in enumerate(seq_lens):
        positions = torch.arange(n)
        blocks = kv.block_table[b].long()[positions // 128]
        keys = kv.key_cache[blocks, :, positions % 128].float().transpose(0, 1)   # [Hkv, n, D]
        values = kv.value_cache[blocks, :, positions % 128].float().transpose(0, 1)
        q = query[b].float().view(num_kv_heads, group, 1, head_size)
        dense = F.scaled_dot_product_attention(q, keys.unsqueeze(1), values.unsqueeze(1))
        torch.testing.assert_close(out[b].float(), dense.view(-1, head_size), **TOLERANCE[dtype])


def test_same_as_vllm_cpu_attention_on_a_cache_vllm_wrote():
    """The cache layout we read is the one vLLM writes: vLLM's reshape_and_cache fills the cache in the
    layout the routing backend has it use on this CPU ('vec' where vLLM would pick 'amx'), vLLM's decode
    kernel and ours (all indices, views as strategies.engine.backend builds them) agree."""
    import vllm._custom_ops as vllm_ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from strategies.engine.backend import readable_cpu_attention_isa, strategy_cache_views

    dtype, page, num_kv_heads, num_heads, head_size = torch.bfloat16, 128, 3, 9, 64
    seq_lens = [5, 300, 1000]
    isa = readable_cpu_attention_isa(_get_attn_isa(dtype, page, head_size, "auto"), x86=True)
    num_blocks = sum(-(-n // page) for n in seq_lens) + 2
    kv_cache = torch.zeros(num_blocks, num_kv_heads, page, 2 * head_size, dtype=dtype)
    vllm_key, vllm_value = kv_cache.view(num_blocks, num_kv_heads, 2 * page, head_size).chunk(2, 2)
    physical = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    table = torch.zeros(len(seq_lens), max(-(-n // page) for n in seq_lens), dtype=torch.int32)
    slots = []
    for b, n in enumerate(seq_lens):
        blocks = physical[:-(-n // page)]
        physical = physical[-(-n // page):]
        table[b, :len(blocks)] = blocks.to(torch.int32)
        slots += [int(blocks[t // page]) * page + t % page for t in range(n)]
    keys = torch.randn(len(slots), num_kv_heads, head_size).to(dtype)
    values = torch.randn(len(slots), num_kv_heads, head_size).to(dtype)
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, vllm_key, vllm_value,
                                        torch.tensor(slots, dtype=torch.int64), isa)

    query = torch.randn(len(seq_lens), num_heads, head_size).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    query_start_loc = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    metadata = torch.ops._C.get_scheduler_metadata(
        len(seq_lens), num_heads, num_kv_heads, head_size, lens, dtype, query_start_loc, True, -1,
        isa, False, None, "auto")
    vllm_out = torch.empty_like(query)
    torch.ops._C.cpu_attention_with_kv_cache(
        query, vllm_key, vllm_value, vllm_out, query_start_loc, lens, head_size ** -0.5, True, None,
        -1, table, 0.0, metadata, None, None, 1.0, 1.0, "auto")

    class Layer:
        pass
    layer = Layer()
    layer.isa = isa
    key_cache, value_cache = strategy_cache_views(kv_cache, layer)
    token_idx = torch.zeros(len(seq_lens), num_kv_heads, max(seq_lens), dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        token_idx[b, :, :n] = torch.arange(n, dtype=torch.int32)
    num_idx = lens.view(-1, 1).expand(-1, num_kv_heads).contiguous()
    ours, _ = compiled(query, key_cache, value_cache, table, token_idx, num_idx, head_size ** -0.5,
                       False)
    torch.testing.assert_close(ours.float(), vllm_out.float(), **TOLERANCE[dtype])
    # and the reference reads the same views the same way
    ref, _ = reference.sparse_paged_attention(query, key_cache, value_cache, table, token_idx,
                                              num_idx, head_size ** -0.5, False)
    torch.testing.assert_close(ref.float(), vllm_out.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget,run", [(64, 1), (1024, 16), (4096, 1)])
def test_gemma3_shape_matches_reference(dtype, budget, run, cpu_isa):
    """Gemma 3 270M: head size 256 (no specialised kernel: the generic path), one KV head serving a
    group of 4 query heads, vLLM's CPU page of 128, the query in the cache dtype (bf16: the bf16-dot
    variant where the CPU has it) and Gemma's scale query_pre_attn_scalar ** -0.5."""
    seq_lens, num_kv_heads, group, head_size = [1, 130, 700, 2600], 1, 4, 256
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, 128, dtype, seed=budget)
    if run == 1:
        token_idx, num_idx = random_indices(seq_lens, num_kv_heads, budget, seed=budget)
    else:
        token_idx, num_idx = run_indices(seq_lens, num_kv_heads, budget, run, True, seed=budget)
    query = (3 * torch.randn(len(seq_lens), num_kv_heads * group, head_size)).to(dtype)
    args = (query, kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx, 256 ** -0.5, True)
    out, mass = compiled(*args)
    ref_out, ref_mass = reference.sparse_paged_attention(*args)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOLERANCE[dtype])
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
