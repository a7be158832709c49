"""paged_prefill_attention: compiled CPU kernel vs the reference (causal, sinks + window, block
mask) and exactness against dense causal SDPA."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from strategies import reference
from tests.ops.conftest import TOLERANCE, make_paged_kv

# (seq_len, query_len): a 1-token prompt, a whole prompt, chunked-prefill continuations
SEQUENCES = [(1, 1), (40, 40), (300, 77), (1100, 150)]


def make_batch(dtype, head_size, group, page, layout="vllm", num_kv_heads=2, seed=0):
    seq_lens = [s for s, _ in SEQUENCES]
    kv = make_paged_kv(seq_lens, num_kv_heads, head_size, page, dtype, seed=seed, layout=layout)
    query_lens = [q for _, q in SEQUENCES]
    query_start_loc = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32)
    query = torch.randn(sum(query_lens), num_kv_heads * group, head_size,
                        generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return kv, query, query_start_loc


def run_both(kv, query, query_start_loc, n_sink=0, window=-1, block_mask=None, mask_block=1):
    args = (query, kv.key_cache, kv.value_cache, kv.block_table, query_start_loc, kv.seq_lens,
            query.shape[-1] ** -0.5, n_sink, window, block_mask, mask_block)
    return torch.ops.attnserve.paged_prefill_attention(*args), reference.paged_prefill_attention(*args)


@pytest.mark.parametrize("dtype,head_size,group,page", list(itertools.product(
    (torch.float32, torch.bfloat16), (64, 128), (1, 3, 8), (16, 128))))
def test_causal_matches_reference(dtype, head_size, group, page):
    kv, query, qsl = make_batch(dtype, head_size, group, page)
    out, ref = run_both(kv, query, qsl)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "vllm"), (torch.bfloat16, "vllm"),
                                          (torch.float32, "rows")])
@pytest.mark.parametrize("n_sink,window", [(4, 64), (0, 1), (16, 200), (3, 0)])
def test_sink_window_matches_reference(dtype, layout, n_sink, window):
    kv, query, qsl = make_batch(dtype, 64, 3, 16, layout=layout)
    out, ref = run_both(kv, query, qsl, n_sink=n_sink, window=window)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_block,window", [(64, -1), (16, 300), (128, -1)])
def test_block_mask_matches_reference(dtype, mask_block, window):
    kv, query, qsl = make_batch(dtype, 64, 3, 128)
    blocks = -(-max(s for s, _ in SEQUENCES) // mask_block)
    generator = torch.Generator().manual_seed(mask_block)
    block_mask = torch.rand(len(SEQUENCES), 2, blocks, blocks, generator=generator) < 0.5
    block_mask[:, 1, :, :] = False  # a KV head that sees nothing: its rows are zeros
    out, ref = run_both(kv, query, qsl, n_sink=4, window=window, block_mask=block_mask,
                        mask_block=mask_block)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
    assert torch.equal(out.view(out.shape[0], 2, 3, 64)[:, 1], torch.zeros(out.shape[0], 3, 64,
                                                                           dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_covering_everything_equals_dense_causal(dtype):
    """Sinks + a window longer than every sequence, and an all-true block mask == dense causal SDPA."""
    num_kv_heads, group, head_size, page = 3, 3, 64, 128
    kv, query, qsl = make_batch(dtype, head_size, group, page, num_kv_heads=num_kv_heads)
    seqs = len(SEQUENCES)
    everything = torch.ones(seqs, num_kv_heads, 2, 2, dtype=torch.bool)
    out, _ = run_both(kv, query, qsl, n_sink=4, window=4096, block_mask=everything,
                      mask_block=1024)
    for b, (seq_len, qlen) in enumerate(SEQUENCES):
        positions = torch.arange(seq_len)
        blocks = kv.block_table[b].long()[positions // page]
        keys = kv.key_cache[blocks, :, positions % page].float().transpose(0, 1)  # [Hkv, S, D]
        values = kv.value_cache[blocks, :, positions % page].float().transpose(0, 1)
        q = query[qsl[b]:qsl[b + 1]].float().view(qlen, num_kv_heads, group, head_size)
        q = q.permute(1, 2, 0, 3)                                                 # [Hkv, G, q, D]
        causal = torch.arange(seq_len).view(1, -1) <= torch.arange(seq_len - qlen, seq_len).view(-1, 1)
        dense = F.scaled_dot_product_attention(q, keys.unsqueeze(1), values.unsqueeze(1),
                                               attn_mask=causal)
        expected = dense.permute(2, 0, 1, 3).reshape(qlen, -1, head_size)
        torch.testing.assert_close(out[qsl[b]:qsl[b + 1]].float(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_sink,window", [(0, -1), (4, 512), (0, 512)])
def test_gemma3_shape_matches_reference(dtype, n_sink, window):
    """Gemma 3 270M: head size 256, one KV head for 4 query heads, page 128; causal, and Gemma's
    sliding window of 512 (n_sink 0) as well as sink + window."""
    kv, query, qsl = make_batch(dtype, 256, 4, 128, num_kv_heads=1)
    out, ref = run_both(kv, query, qsl, n_sink=n_sink, window=window)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])
