"""Summary and selection ops (landmark, seer, top-k by mass): compiled CPU kernels vs the reference,
and landmark with every chunk selected == dense attention."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from strategies import reference
from tests.ops.conftest import TOLERANCE, make_paged_kv

SEQ_LENS = [1, 16, 300, 2100]
attn = torch.ops.attnserve


def fresh_summaries(kv, chunk, width_factor=1, sentinel=7.0, dtype=torch.float32):
    num_blocks, num_kv_heads, page, head_size = kv.key_cache.shape
    width = width_factor * head_size + (reference.Q8_SCALE_BYTES if dtype == torch.int8 else 0)
    return torch.full((num_blocks, num_kv_heads, page // chunk, width), sentinel, dtype=dtype)


SUMMARY_DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.mark.parametrize("summary_dtype", SUMMARY_DTYPES)
@pytest.mark.parametrize("dtype,page,chunk,layout", [
    (torch.float32, 16, 16, "vllm"), (torch.bfloat16, 128, 16, "vllm"),
    (torch.bfloat16, 128, 32, "rows"), (torch.float32, 128, 8, "vllm")])
@pytest.mark.parametrize("num_kv_heads,head_size", [(2, 64), (1, 256)])   # (1, 256): Gemma 3 270M
def test_landmark_summaries_match_reference(dtype, page, chunk, layout, summary_dtype, num_kv_heads, head_size):
    kv = make_paged_kv(SEQ_LENS, num_kv_heads, head_size, page, dtype, layout=layout)
    for start in ([0, 0, 0, 0], [0, 9, 290, 2000]):  # full prefill, then partial chunks only
        start_pos = torch.tensor(start, dtype=torch.int32)
        kmin = fresh_summaries(kv, chunk, dtype=summary_dtype)
        kmax = fresh_summaries(kv, chunk, dtype=summary_dtype)
        ref_min, ref_max = kmin.clone(), kmax.clone()
        attn.landmark_update_summaries(kv.key_cache, kv.block_table, start_pos, kv.seq_lens, chunk,
                                       kmin, kmax)
        reference.landmark_update_summaries(kv.key_cache, kv.block_table, start_pos, kv.seq_lens,
                                            chunk, ref_min, ref_max)
        assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)  # min / max are exact


def assert_same_selection(tokens, count, ref_tokens, ref_count):
    assert torch.equal(count, ref_count)
    for b, g in itertools.product(range(count.shape[0]), range(count.shape[1])):
        n = int(count[b, g])
        assert torch.equal(tokens[b, g, :n], ref_tokens[b, g, :n]), (b, g)
        assert bool((tokens[b, g, n:] == 0).all())
        assert bool((tokens[b, g, 1:n] > tokens[b, g, :n - 1]).all())  # ascending, distinct


@pytest.mark.parametrize("dtype,group,page,chunk", [
    (torch.float32, 3, 16, 16), (torch.bfloat16, 1, 128, 16), (torch.bfloat16, 8, 128, 32),
    (torch.float32, 3, 128, 64)])
@pytest.mark.parametrize("k_chunks", [0, 3, 40, 1000])
@pytest.mark.parametrize("summary_dtype", SUMMARY_DTYPES)
@pytest.mark.parametrize("group_max", [False, True], ids=["sum", "max"])
def test_landmark_select_matches_reference(dtype, group, page, chunk, k_chunks, summary_dtype, group_max, cpu_isa):
    num_kv_heads = 2
    kv = make_paged_kv(SEQ_LENS, num_kv_heads, 64, page, dtype, seed=k_chunks)
    kmin = fresh_summaries(kv, chunk, dtype=summary_dtype)
    kmax = fresh_summaries(kv, chunk, dtype=summary_dtype)
    attn.landmark_update_summaries(kv.key_cache, kv.block_table, torch.zeros(4, dtype=torch.int32),
                                   kv.seq_lens, chunk, kmin, kmax)
    query = torch.randn(len(SEQ_LENS), num_kv_heads * group, 64).to(dtype)
    args = (query, kmin, kmax, kv.block_table, kv.seq_lens, chunk, k_chunks, group_max)
    tokens, count = attn.landmark_select(*args)
    ref_tokens, ref_count = reference.landmark_select(*args)
    assert tokens.shape == ref_tokens.shape
    assert_same_selection(tokens, count, ref_tokens, ref_count)
    expected = [min(n, (min(k_chunks, max(0, -(-n // chunk) - 2)) + 2) * chunk) for n in SEQ_LENS]
    assert count[:, 0].tolist()[:2] == [1, 16]  # tiny sequences: everything
    assert all(c <= e for c, e in zip(count[:, 0].tolist(), expected))


def test_int8_summaries_bound_the_keys_and_keep_quests_upper_bound():
    """kmin rounded down, kmax up: every key lies inside the dequantised [kmin, kmax] of its chunk, so the
    score bounds q.k of every token of the chunk, as with exact summaries; the steps are within one
    scale of the exact min / max."""
    chunk = 16
    kv = make_paged_kv(SEQ_LENS, 2, 64, 128, torch.bfloat16, seed=3)
    zeros = torch.zeros(len(SEQ_LENS), dtype=torch.int32)
    exact = [fresh_summaries(kv, chunk) for _ in range(2)]
    rows = [fresh_summaries(kv, chunk, dtype=torch.int8) for _ in range(2)]
    attn.landmark_update_summaries(kv.key_cache, kv.block_table, zeros, kv.seq_lens, chunk, *exact)
    attn.landmark_update_summaries(kv.key_cache, kv.block_table, zeros, kv.seq_lens, chunk, *rows)
    low, high = (reference.summary_values(r, 64) for r in rows)
    scale = rows[1][..., 64:].contiguous().view(torch.float32)
    used = exact[0][..., 0] != 7.0                                       # slots holding a chunk
    assert bool(used.any())
    assert bool((low[used] <= exact[0][used]).all()) and bool((high[used] >= exact[1][used]).all())
    assert bool((high[used] - exact[1][used] <= scale[used] * 1.001).all())
    query = torch.randn(len(SEQ_LENS), 6, 64)
    positive = query.view(len(SEQ_LENS), 2, 3, 64).clamp(min=0).sum(dim=2)
    negative = query.view(len(SEQ_LENS), 2, 3, 64).clamp(max=0).sum(dim=2)
    for b, n in enumerate(SEQ_LENS):
        keys = torch.stack([kv.key_cache[kv.block_table[b, t // 128], :, t % 128].float() for t in range(n)])
        for t in range(0, n, 7):
            block, slot = int(kv.block_table[b, t // 128]), (t % 128) // chunk
            for g in range(2):
                bound = high[block, g, slot] @ positive[b, g] + low[block, g, slot] @ negative[b, g]
                group_dots = query[b].view(2, 3, 64)[g] @ keys[t, g]       # the group's 3 heads
                assert float(bound) >= float(group_dots.sum()) - 1e-4


@pytest.mark.parametrize("summary_dtype", SUMMARY_DTYPES)
def test_landmark_group_max_keeps_the_chunk_one_head_needs(summary_dtype, cpu_isa):
    """One KV head, four query heads: head 0 points hard at chunk 4, heads 1-3 mildly at chunk 10.
    Summed over the group, chunk 10 wins (3 x 4 > 10); with the group's max, head 0's chunk 4 does."""
    page, chunk, head_size, seq_len = 128, 16, 64, 400
    kv = make_paged_kv([seq_len], 1, head_size, page, torch.float32, seed=1)
    keys = kv.key_cache
    for t in range(seq_len):                       # quiet keys, two loud chunks
        block, slot = int(kv.block_table[0, t // page]), t % page
        keys[block, 0, slot] = 0.01 * keys[block, 0, slot]
        if t // chunk in (4, 10):
            keys[block, 0, slot, 4 if t // chunk == 4 else 5] = 1.0
    kmin = fresh_summaries(kv, chunk, dtype=summary_dtype)
    kmax = fresh_summaries(kv, chunk, dtype=summary_dtype)
    attn.landmark_update_summaries(keys, kv.block_table, torch.zeros(1, dtype=torch.int32), kv.seq_lens, chunk,
                                   kmin, kmax)
    query = torch.zeros(1, 4, head_size)
    query[0, 0, 4] = 10.0
    query[0, 1:, 5] = 4.0
    for group_max, wanted in ((False, 10), (True, 4)):
        tokens, count = attn.landmark_select(query, kmin, kmax, kv.block_table, kv.seq_lens, chunk, 1, group_max)
        chunks = sorted({int(t) // chunk for t in tokens[0, 0, :int(count[0, 0])]})
        assert chunks == [0, wanted, (seq_len - 1) // chunk], (group_max, chunks)    # first, best, newest


def test_landmark_with_every_chunk_equals_dense():
    """k_chunks covering all chunks: landmark_select + sparse attention == dense SDPA."""
    seq_lens, num_kv_heads, group, head_size, page, chunk = [70, 1500], 3, 3, 64, 128, 16
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, page, torch.bfloat16, seed=5)
    kmin, kmax = fresh_summaries(kv, chunk), fresh_summaries(kv, chunk)
    attn.landmark_update_summaries(kv.key_cache, kv.block_table, torch.zeros(2, dtype=torch.int32),
                                   kv.seq_lens, chunk, kmin, kmax)
    query = torch.randn(2, num_kv_heads * group, head_size).to(torch.bfloat16)
    tokens, count = attn.landmark_select(query, kmin, kmax, kv.block_table, kv.seq_lens, chunk, 10**4)
    assert count.tolist() == [[n] * num_kv_heads for n in seq_lens]
    out, _ = attn.sparse_paged_attention(query, kv.key_cache, kv.value_cache, kv.block_table,
                                         tokens, count, head_size ** -0.5, False)
    for b, n in enumerate(seq_lens):
        positions = torch.arange(n)
        blocks = kv.block_table[b].long()[positions // page]
        keys = kv.key_cache[blocks, :, positions % page].float().transpose(0, 1).unsqueeze(1)
        values = kv.value_cache[blocks, :, positions % page].float().transpose(0, 1).unsqueeze(1)
        dense = F.scaled_dot_product_attention(
            query[b].float().view(num_kv_heads, group, 1, head_size), keys, values)
        torch.testing.assert_close(out[b].float(), dense.view(-1, head_size),
                                   **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype,page,pool,layout", [
    (torch.float32, 128, 64, "vllm"), (torch.bfloat16, 128, 16, "vllm"),
    (torch.bfloat16, 16, 16, "rows")])
def test_seer_pool_keys_match_reference(dtype, page, pool, layout):
    kv = make_paged_kv(SEQ_LENS, 2, 64, page, dtype, layout=layout)
    for start in ([0, 0, 0, 0], [0, 5, 299, 2050]):
        start_pos = torch.tensor(start, dtype=torch.int32)
        pooled = fresh_summaries(kv, pool, width_factor=3)
        expected = pooled.clone()
        attn.seer_pool_keys(kv.key_cache, kv.block_table, start_pos, kv.seq_lens, pool, pooled)
        reference.seer_pool_keys(kv.key_cache, kv.block_table, start_pos, kv.seq_lens, pool,
                                 expected)
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold,top_k", [(2e-3, 0), (0.05, 0), (1.0, 0), (0.0, 3),
                                             (0.0, 1000)])
def test_seer_select_matches_reference(threshold, top_k):
    pool, gate_dim, num_kv_heads = 64, 128, 3
    seq_lens = torch.tensor([1, 64, 65, 3000, 8000], dtype=torch.int32)
    num_blocks = (seq_lens + pool - 1) // pool
    NB = int(num_blocks.max())
    generator = torch.Generator().manual_seed(top_k)
    q_gate = torch.randn(5, num_kv_heads, gate_dim, generator=generator)
    k_gate = torch.randn(5, num_kv_heads, NB, gate_dim, generator=generator) * 0.3
    args = (q_gate, k_gate, num_blocks.to(torch.int32), pool, seq_lens, threshold, top_k)
    tokens, count, probs = attn.seer_select(*args)
    ref_tokens, ref_count, ref_probs = reference.seer_select(*args)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    assert tokens.shape == ref_tokens.shape
    assert_same_selection(tokens, count, ref_tokens, ref_count)
    last = tokens[3, :, :int(count[3, 0])]
    assert int(last[0, -1]) == 2999  # the newest block is always kept


@pytest.mark.parametrize("positions", ["random", "ascending"])  # ascending: the dense lists of recycled
@pytest.mark.parametrize("k", [0, 1, 7, 100, 5000])
def test_topk_from_mass_matches_reference(k, positions):
    generator = torch.Generator().manual_seed(k)
    B, Hkv, K = 3, 2, 600
    token_idx = torch.stack([torch.stack([torch.randperm(4000, generator=generator)[:K]
                                          for _ in range(Hkv)]) for _ in range(B)]).to(torch.int32)
    if positions == "ascending":
        token_idx = token_idx.sort(dim=-1).values
    num_idx = torch.tensor([[600, 0], [50, 599], [1, 300]], dtype=torch.int32)
    mass = torch.rand(B, Hkv, K, generator=generator)
    mass[0, 0, ::3] = 0.5  # ties: the lower position wins
    mass[1, 1] = (mass[1, 1] * 4).floor()  # four values: the k-th heaviest is tied with many
    mass[2, 1] = torch.randn(K, generator=generator).round(decimals=1)  # negatives, -0.0 and 0.0, ties
    mass[2, 1, ::7] = -0.0
    sel, num = attn.topk_from_mass(mass, token_idx, num_idx, k)
    ref_sel, ref_num = reference.topk_from_mass(mass, token_idx, num_idx, k)
    assert sel.shape == (B, Hkv, k)
    assert torch.equal(sel, ref_sel) and torch.equal(num, ref_num)
    assert num.tolist() == [[min(k, n) for n in row] for row in num_idx.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_chunks", [0, 3, 40])
@pytest.mark.parametrize("summary_dtype", SUMMARY_DTYPES)
@pytest.mark.parametrize("group_max", [False, True], ids=["sum", "max"])
def test_landmark_select_gemma3_shape_matches_reference(dtype, k_chunks, summary_dtype, group_max, cpu_isa):
    """Gemma 3 270M: head size 256 (the generic scoring path), one KV head scoring a group of 4."""
    num_kv_heads, group, head_size, chunk = 1, 4, 256, 16
    kv = make_paged_kv(SEQ_LENS, num_kv_heads, head_size, 128, dtype, seed=k_chunks)
    kmin = fresh_summaries(kv, chunk, dtype=summary_dtype)
    kmax = fresh_summaries(kv, chunk, dtype=summary_dtype)
    attn.landmark_update_summaries(kv.key_cache, kv.block_table, torch.zeros(4, dtype=torch.int32),
                                   kv.seq_lens, chunk, kmin, kmax)
    ref_min, ref_max = fresh_summaries(kv, chunk, dtype=summary_dtype), fresh_summaries(kv, chunk, dtype=summary_dtype)
    reference.landmark_update_summaries(kv.key_cache, kv.block_table, torch.zeros(4, dtype=torch.int32),
                                        kv.seq_lens, chunk, ref_min, ref_max)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)
    query = torch.randn(len(SEQ_LENS), num_kv_heads * group, head_size).to(dtype)
    args = (query, kmin, kmax, kv.block_table, kv.seq_lens, chunk, k_chunks, group_max)
    tokens, count = attn.landmark_select(*args)
    ref_tokens, ref_count = reference.landmark_select(*args)
    assert tokens.shape == ref_tokens.shape
    assert_same_selection(tokens, count, ref_tokens, ref_count)


@pytest.mark.parametrize("dtype,pool", [(torch.float32, 64), (torch.bfloat16, 16)])
def test_seer_pool_keys_gemma3_shape_matches_reference(dtype, pool):
    """Gemma 3 270M: head size 256, one KV head."""
    kv = make_paged_kv(SEQ_LENS, 1, 256, 128, dtype)
    for start in ([0, 0, 0, 0], [0, 5, 299, 2050]):
        start_pos = torch.tensor(start, dtype=torch.int32)
        pooled = fresh_summaries(kv, pool, width_factor=3)
        expected = pooled.clone()
        attn.seer_pool_keys(kv.key_cache, kv.block_table, start_pos, kv.seq_lens, pool, pooled)
        reference.seer_pool_keys(kv.key_cache, kv.block_table, start_pos, kv.seq_lens, pool, expected)
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold,top_k", [(2e-3, 0), (0.0, 3)])
def test_seer_select_one_kv_head_matches_reference(threshold, top_k):
    """One KV head (Gemma 3 270M): seer_select over a single gate head."""
    pool, gate_dim = 64, 128
    seq_lens = torch.tensor([1, 65, 3000], dtype=torch.int32)
    num_blocks = (seq_lens + pool - 1) // pool
    NB = int(num_blocks.max())
    generator = torch.Generator().manual_seed(7)
    q_gate = torch.randn(3, 1, gate_dim, generator=generator)
    k_gate = torch.randn(3, 1, NB, gate_dim, generator=generator) * 0.3
    args = (q_gate, k_gate, num_blocks.to(torch.int32), pool, seq_lens, threshold, top_k)
    tokens, count, probs = attn.seer_select(*args)
    ref_tokens, ref_count, ref_probs = reference.seer_select(*args)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    assert_same_selection(tokens, count, ref_tokens, ref_count)
