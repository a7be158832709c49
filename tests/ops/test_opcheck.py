"""torch.library.opcheck on every op: schema (mutations declared), fake kernels (shapes of the
data-dependent outputs), autograd registration and AOT dispatch."""
import pytest
import torch

from tests.ops.conftest import make_paged_kv, random_indices

attn = torch.ops.attnserve
SEQ_LENS = [5, 150]


def cases():
    kv = make_paged_kv(SEQ_LENS, 2, 64, 16, torch.bfloat16)
    token_idx, num_idx = random_indices(SEQ_LENS, 2, 40)
    query = torch.randn(2, 6, 64).to(torch.bfloat16)
    zeros = torch.zeros(2, dtype=torch.int32)
    kmin = torch.zeros(kv.key_cache.shape[0], 2, 1, 64)
    kmax = torch.zeros_like(kmin)
    pooled = torch.zeros(kv.key_cache.shape[0], 2, 1, 192)
    qsl = torch.tensor([0, 5, 25], dtype=torch.int32)
    prefill_query = torch.randn(25, 6, 64).to(torch.bfloat16)
    mask = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    nb = torch.tensor([1, 3], dtype=torch.int32)
    yield attn.sparse_paged_attention, (query, kv.key_cache, kv.value_cache, kv.block_table,
                                        token_idx, num_idx, 0.125, True)
    yield attn.sparse_paged_attention, (query, kv.key_cache, kv.value_cache, kv.block_table,
                                        token_idx, num_idx, 0.125, False)
    yield attn.paged_prefill_attention, (prefill_query, kv.key_cache, kv.value_cache,
                                         kv.block_table, qsl, kv.seq_lens, 0.125, 4, 32, None, 1)
    yield attn.paged_prefill_attention, (prefill_query, kv.key_cache, kv.value_cache,
                                         kv.block_table, qsl, kv.seq_lens, 0.125, 0, -1, mask, 64)
    yield attn.landmark_update_summaries, (kv.key_cache, kv.block_table, zeros, kv.seq_lens, 16,
                                           kmin, kmax)
    yield attn.landmark_select, (query, kmin, kmax, kv.block_table, kv.seq_lens, 16, 2)
    yield attn.landmark_select, (query, kmin, kmax, kv.block_table, kv.seq_lens, 16, 2, True)
    yield attn.seer_pool_keys, (kv.key_cache, kv.block_table, zeros, kv.seq_lens, 16, pooled)
    yield attn.seer_select, (torch.randn(2, 2, 32), torch.randn(2, 2, 3, 32), nb, 64,
                             kv.seq_lens, 0.1, 0)
    yield attn.seer_select, (torch.randn(2, 2, 32), torch.randn(2, 2, 3, 32), nb, 64,
                             kv.seq_lens, 0.0, 1)
    yield attn.topk_from_mass, (torch.rand(2, 2, 40), token_idx, num_idx, 8)
    dst_key = torch.zeros(6, 2, 32, 64).to(torch.bfloat16)
    dst_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    yield attn.gather_kv, (kv.key_cache, kv.value_cache, kv.block_table, token_idx, num_idx,
                           dst_table, torch.tensor([3, 20], dtype=torch.int32), dst_key,
                           torch.zeros_like(dst_key))


@pytest.mark.parametrize("op,args", list(cases()),
                         ids=lambda v: getattr(v, "_opname", None) if callable(v) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
