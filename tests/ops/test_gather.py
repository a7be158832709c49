"""gather_kv (Recycled Attention's KV copy): the compiled CPU kernel vs the reference twin,
bit-exact (a copy), over both source cache layouts (vLLM's token-contiguous K, dim-contiguous rows)
and both destination layouts, fp32 / bf16, empty lists, unsorted lists and dst_start > 0."""
import pytest
import torch

from strategies import ops, reference
from tests.ops.conftest import make_paged_kv

attn = torch.ops.attnserve


def dst_views(storage, head_size, dst_page, layout):
    """storage [P, Hkv, 2, dst_page * D] -> (storage, dst_key, dst_value) [P, Hkv, dst_page, D];
    layout "rows": dim-contiguous, "tokens": K token-contiguous per page (V rows)."""
    num_blocks, num_kv_heads = storage.shape[:2]
    if layout == "tokens":
        dst_key = storage[:, :, 0].view(num_blocks, num_kv_heads, head_size, dst_page)
        dst_key = dst_key.transpose(2, 3)
    else:
        dst_key = storage[:, :, 0].view(num_blocks, num_kv_heads, dst_page, head_size)
    dst_value = storage[:, :, 1].view(num_blocks, num_kv_heads, dst_page, head_size)
    return storage, dst_key, dst_value


def make_dst(num_blocks, num_kv_heads, dst_page, head_size, dtype, layout, seed=0):
    """Random destination buffers -> (storage, dst_key, dst_value), see dst_views."""
    generator = torch.Generator().manual_seed(seed + 100)
    storage = torch.randn(num_blocks, num_kv_heads, 2, dst_page * head_size,
                          generator=generator).to(dtype)
    return dst_views(storage, head_size, dst_page, layout)


def make_selection(seq_lens, num_kv_heads, budget, dst_page, seed=0, ordered=True,
                   max_start=40):
    """Per (b, g): n in [0, min(budget, seq_len)] distinct positions (some n = 0), ascending or
    shuffled, garbage past n; dst_start per sequence; a shuffled dst block table with disjoint
    blocks per sequence. -> (token_idx, num_idx, dst_block_table, dst_start, num_dst_blocks)."""
    generator = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    K = max(1, budget)
    token_idx = torch.full((B, num_kv_heads, K), 10 ** 7, dtype=torch.int32)  # never read
    num_idx = torch.zeros(B, num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for g in range(num_kv_heads):
            most = min(budget, n)
            count = 0 if (b + g) % 3 == 1 else int(torch.randint(most // 2, most + 1, (1,),
                                                                 generator=generator))
            chosen = torch.randperm(n, generator=generator)[:count]
            if ordered:
                chosen = chosen.sort().values
            token_idx[b, g, :count] = chosen.to(torch.int32)
            num_idx[b, g] = count
    dst_start = torch.randint(0, max_start + 1, (B,), generator=generator).to(torch.int32)
    blocks = [-(-(int(dst_start[b]) + K) // dst_page) for b in range(B)]
    num_dst_blocks = sum(blocks) + 2
    physical = torch.randperm(num_dst_blocks, generator=generator).to(torch.int32)
    dst_table = torch.full((B, max(blocks)), int(physical[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        dst_table[b, :n] = physical[used:used + n]
        used += n
    return token_idx, num_idx, dst_table, dst_start, num_dst_blocks


def run_both(kv, token_idx, num_idx, dst_table, dst_start, num_dst_blocks, dst_page, dst_layout,
             seed=0):
    num_kv_heads, head_size = kv.key_cache.shape[1], kv.key_cache.shape[3]
    storage, dst_key, dst_value = make_dst(num_dst_blocks, num_kv_heads, dst_page, head_size,
                                           kv.key_cache.dtype, dst_layout, seed)
    ref_storage, ref_key, ref_value = make_dst(num_dst_blocks, num_kv_heads, dst_page, head_size,
                                               kv.key_cache.dtype, dst_layout, seed)
    args = (kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx, dst_table, dst_start)
    attn.gather_kv(*args, dst_key, dst_value)
    reference.gather_kv(*args, ref_key, ref_value)
    return storage, ref_storage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_layout", ["vllm", "rows"])
@pytest.mark.parametrize("dst_layout", ["rows", "tokens"])
@pytest.mark.parametrize("seq_lens,num_kv_heads,head_size,page,dst_page,budget", [
    ([1, 300, 2100, 17], 2, 64, 16, 16, 260),
    ([40, 1000], 3, 128, 128, 32, 130),
    ([5, 700, 130], 1, 64, 32, 128, 90),
    ([260], 4, 80, 128, 8, 256),
    ([3, 900, 2100], 1, 256, 128, 128, 600),     # Gemma 3 270M: one KV head, head size 256
])
@pytest.mark.parametrize("ordered", [True, False])
def test_gather_kv_matches_reference(cpu_isa, dtype, src_layout, dst_layout, seq_lens, num_kv_heads,
                                     head_size, page, dst_page, budget, ordered):
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, page, dtype, layout=src_layout)
    token_idx, num_idx, dst_table, dst_start, num_dst = make_selection(
        seq_lens, num_kv_heads, budget, dst_page, seed=page + dst_page, ordered=ordered)
    assert int(num_idx.min()) == 0 or len(seq_lens) * num_kv_heads < 2
    storage, ref_storage = run_both(kv, token_idx, num_idx, dst_table, dst_start, num_dst,
                                    dst_page, dst_layout)
    assert torch.equal(storage, ref_storage)  # the copied rows, and nothing else touched
    # The copy itself, independently of the twin: slot dst_start + i holds token token_idx[i].
    _, dst_key, dst_value = dst_views(storage, head_size, dst_page, dst_layout)
    for b, g in [(0, 0), (len(seq_lens) - 1, num_kv_heads - 1)]:
        for i in range(int(num_idx[b, g])):
            t, s = int(token_idx[b, g, i]), int(dst_start[b]) + i
            src, dst = int(kv.block_table[b, t // page]), int(dst_table[b, s // dst_page])
            assert torch.equal(dst_key[dst, g, s % dst_page], kv.key_cache[src, g, t % page])
            assert torch.equal(dst_value[dst, g, s % dst_page], kv.value_cache[src, g, t % page])


@pytest.mark.parametrize("src_layout", ["vllm", "rows"])
def test_gather_kv_append_one_token(src_layout):
    """The decode step: one new token per (sequence, KV head) appended after the kept ones."""
    seq_lens, num_kv_heads, head_size, page, dst_page = [33, 129, 600], 2, 64, 16, 16
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, page, torch.bfloat16, layout=src_layout)
    token_idx = torch.tensor([[[n - 1]] * num_kv_heads for n in seq_lens], dtype=torch.int32)
    num_idx = torch.ones(len(seq_lens), num_kv_heads, dtype=torch.int32)
    dst_start = torch.tensor([16, 31, 75], dtype=torch.int32)  # a page boundary, mid-page
    dst_table = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]],
                             dtype=torch.int32)
    storage, ref_storage = run_both(kv, token_idx, num_idx, dst_table, dst_start, 18, dst_page,
                                    "rows")
    assert torch.equal(storage, ref_storage)


def test_gather_kv_parallel_path():
    """A call large enough for the OpenMP path (threads_for: >= 2^24 element copies)."""
    seq_lens, num_kv_heads, head_size, page, dst_page = [1100] * 8, 8, 128, 128, 64
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, page, torch.bfloat16, spare_blocks=1)
    token_idx, num_idx, dst_table, dst_start, num_dst = make_selection(
        seq_lens, num_kv_heads, 1040, dst_page, seed=3, ordered=False)
    num_idx.fill_(1040)
    generator = torch.Generator().manual_seed(4)
    for b in range(len(seq_lens)):
        for g in range(num_kv_heads):
            token_idx[b, g] = torch.randperm(1100, generator=generator)[:1040].to(torch.int32)
    assert int(num_idx.sum()) * head_size * 2 >= 2 ** 24
    storage, ref_storage = run_both(kv, token_idx, num_idx, dst_table, dst_start, num_dst,
                                    dst_page, "rows")
    assert torch.equal(storage, ref_storage)


def test_gather_kv_rejects_bad_inputs():
    kv = make_paged_kv([40], 2, 64, 16, torch.float32)
    token_idx = torch.tensor([[[3, 39], [0, 1]]], dtype=torch.int32)
    num_idx = torch.tensor([[2, 2]], dtype=torch.int32)
    dst_table = torch.tensor([[0, 1]], dtype=torch.int32)
    dst_start = torch.tensor([0], dtype=torch.int32)
    _, dst_key, dst_value = make_dst(2, 2, 16, 64, torch.float32, "rows")
    args = [kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx, dst_table,
            dst_start, dst_key, dst_value]
    attn.gather_kv(*args)
    with pytest.raises(RuntimeError, match="token_idx"):
        bad = token_idx.clone()
        bad[0, 1, 0] = 10 ** 6
        attn.gather_kv(*args[:3], bad, *args[4:])
    with pytest.raises(RuntimeError, match="writes slots"):
        attn.gather_kv(*args[:6], torch.tensor([31], dtype=torch.int32), *args[7:])
    with pytest.raises(RuntimeError, match="dtype"):
        attn.gather_kv(*args[:7], dst_key.to(torch.bfloat16), dst_value)
    with pytest.raises(RuntimeError, match="int32"):
        attn.gather_kv(*args[:4], num_idx.long(), *args[5:])


def test_gather_kv_wrapper_runs_the_kernel(monkeypatch):
    monkeypatch.setattr(reference, "gather_kv", None)  # the wrapper must not fall back
    kv = make_paged_kv([20], 1, 64, 16, torch.bfloat16)
    _, dst_key, dst_value = make_dst(2, 1, 16, 64, torch.bfloat16, "rows")
    token_idx = torch.tensor([[[19, 2]]], dtype=torch.int32)
    ops.gather_kv(kv.key_cache, kv.value_cache, kv.block_table, token_idx,
                  torch.tensor([[2]], dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32),
                  torch.tensor([15], dtype=torch.int32), dst_key, dst_value)
    block = int(kv.block_table[0, 1])
    assert torch.equal(dst_key[1, 0, 15], kv.key_cache[block, 0, 3])
    assert torch.equal(dst_value[0, 0, 0], kv.value_cache[int(kv.block_table[0, 0]), 0, 2])
