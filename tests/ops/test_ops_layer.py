"""strategies.ops: on CPU every wrapper runs the compiled kernel (never silently the reference),
for both cache layouts, with the defaults of design.md section 4."""
import pytest
import torch

from strategies import ops, reference
from tests.ops.conftest import make_paged_kv, random_indices


@pytest.fixture
def reference_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("strategies.ops fell back to the reference on CPU")
    for name in ops.OP_NAMES:
        monkeypatch.setattr(reference, name, forbidden)


@pytest.mark.parametrize("layout", ["vllm", "rows"])
def test_wrappers_call_the_compiled_kernels(layout, reference_forbidden):
    seq_lens = [7, 200]
    kv = make_paged_kv(seq_lens, 2, 64, 16, torch.bfloat16, layout=layout)
    query = torch.randn(2, 6, 64).to(torch.bfloat16)
    token_idx, num_idx = random_indices(seq_lens, 2, 50)
    out, mass = ops.sparse_paged_attention(query, kv.key_cache, kv.value_cache, kv.block_table,
                                           token_idx, num_idx, 0.125, want_mass=True)
    assert out.shape == query.shape and mass.shape == token_idx.shape
    qsl = torch.tensor([0, 7, 57], dtype=torch.int32)
    prefill = ops.paged_prefill_attention(torch.randn(57, 6, 64).to(torch.bfloat16), kv.key_cache,
                                          kv.value_cache, kv.block_table, qsl, kv.seq_lens, 0.125,
                                          n_sink=4, window=32)
    assert prefill.shape == (57, 6, 64)
    zeros = torch.zeros(2, dtype=torch.int32)
    kmin = torch.zeros(kv.key_cache.shape[0], 2, 1, 64)
    kmax = torch.zeros_like(kmin)
    ops.landmark_update_summaries(kv.key_cache, kv.block_table, zeros, kv.seq_lens, 16, kmin, kmax)
    tokens, count = ops.landmark_select(query, kmin, kmax, kv.block_table, kv.seq_lens, 16, 2)
    assert count.tolist() == [[7, 7], [56, 56]]  # chunks 0, 12 (8 tokens) + 2 best
    pooled = torch.zeros(kv.key_cache.shape[0], 2, 1, 192)
    ops.seer_pool_keys(kv.key_cache, kv.block_table, zeros, kv.seq_lens, 16, pooled)
    nb = torch.tensor([1, 13], dtype=torch.int32)
    _, seer_count, probs = ops.seer_select(torch.randn(2, 2, 32), torch.randn(2, 2, 13, 32), nb, 16,
                                           kv.seq_lens, 0.0, 2)
    assert seer_count.tolist() == [[7, 7], [40, 40]] and probs.shape == (2, 2, 13)
    sel, sel_num = ops.topk_from_mass(mass, token_idx, num_idx, 5)
    assert sel_num.tolist() == [[5, 5], [5, 5]]
    dst_key = torch.zeros(4, 2, 32, 64).to(torch.bfloat16)
    dst_value = torch.zeros_like(dst_key)
    ops.gather_kv(kv.key_cache, kv.value_cache, kv.block_table, sel, sel_num,
                  torch.tensor([[0], [1]], dtype=torch.int32), torch.tensor([0, 27], dtype=torch.int32),
                  dst_key, dst_value)
    t, block = int(sel[1, 1, 4]), int(kv.block_table[1, int(sel[1, 1, 4]) // 16])
    assert torch.equal(dst_key[1, 1, 31], kv.key_cache[block, 1, t % 16])
    assert torch.equal(dst_value[1, 1, 31], kv.value_cache[block, 1, t % 16])


def test_has_compiled():
    for name in ops.OP_NAMES:
        assert ops.has_compiled(name, "cpu") and ops.has_compiled(name, torch.device("cpu"))
