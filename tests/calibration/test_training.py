"""Real calibration on the real model (short windows, few steps): the held-out KL falls, trained gates
recall more attention mass than untrained ones at the same sparsity, training is deterministic and
resumable; the rotary gate's score depends on relative positions only."""

from __future__ import annotations

import pytest
import torch

from strategies.calibration import train as sc

BLOCK = 16  # the block size of the session features (conftest.BLOCK)

STEPS = 40


def _cfg(**kw) -> sc.CalibrationConfig:
    base = dict(block_size=BLOCK, init="random", param="rotary", gate_dim=64, steps=STEPS, batch=2, lr=1e-2, seed=0)
    return sc.CalibrationConfig(**{**base, **kw})


def _train(lm, feats, cfg, **kw):
    params = sc.gate_params(lm.facts, cfg)
    sc.train(params, feats, cfg, progress=False, **kw)
    return sc.to_gates(params, lm.facts, cfg)


def _recall(rows, setting, method):
    row = next(r for r in rows if r.setting == setting and r.method == method)
    return float(row.sparsity.mean()), float(row.recall.mean())


@pytest.mark.parametrize("param", ["rotary", "free"])
def test_training_reduces_heldout_kl_and_beats_untrained_gates(lm, train_features, heldout_features, param):
    cfg = _cfg(param=param, gate_dim=64 if param == "rotary" else 32)
    untrained = sc.to_gates(sc.gate_params(lm.facts, cfg), lm.facts, cfg)
    trained = _train(lm, train_features, cfg)
    before, after = sc.gate_losses(untrained, heldout_features), sc.gate_losses(trained, heldout_features)
    print("held-out KL before", before, "after", after)
    assert after["decode_kl"] < 0.7 * before["decode_kl"]
    assert after["prefill_kl"] < 0.7 * before["prefill_kl"]

    rows_u, rows_t = sc.decode_recall(untrained, heldout_features), sc.decode_recall(trained, heldout_features)
    s_u, r_u = _recall(rows_u, "budget 1/8", "seer")
    s_t, r_t = _recall(rows_t, "budget 1/8", "seer")
    _, r_o = _recall(rows_t, "budget 1/8", "oracle")
    print(f"recall at 1/8: untrained {r_u:.3f}, trained {r_t:.3f}, oracle {r_o:.3f} (sparsity {s_t:.3f})")
    assert abs(s_u - s_t) < 1e-9                  # same budget, same sparsity
    assert r_t > r_u + 0.05
    assert r_t <= r_o + 1e-6                      # the oracle is an upper bound at the same budget
    pre_u, pre_t = sc.prefill_recall(untrained, heldout_features), sc.prefill_recall(trained, heldout_features)
    assert float(pre_t["seer"].mean()) > float(pre_u["seer"].mean())


def test_training_is_deterministic_and_resumable(lm, train_features, tmp_path):
    cfg = _cfg(steps=6)
    a = _train(lm, train_features, cfg)
    b = _train(lm, train_features, cfg)
    for n in sc.SeerGates._TENSORS:
        assert torch.equal(getattr(a, n), getattr(b, n))
    ckpt = tmp_path / "gates.safetensors.ckpt"
    _train(lm, train_features, cfg, checkpoint=ckpt, stop_after=3)     # "interrupted" after 3 steps
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    resumed = _train(lm, train_features, cfg, checkpoint=ckpt, resume=True)
    for n in sc.SeerGates._TENSORS:
        torch.testing.assert_close(getattr(resumed, n), getattr(a, n), rtol=0, atol=1e-6)
    other = _train(lm, train_features, _cfg(steps=6, seed=1))
    assert not torch.equal(other.decode_q, a.decode_q)


def test_rotary_gate_scores_depend_on_relative_positions_only(lm):
    """RoPE shifts every post-RoPE query and key by the same rotation when the whole text moves by Δ tokens:
    a rotary gate's decode logits (mean-pooled keys: the equivariant pooling) do not change; a free gate's do."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    d, hq, hkv = lm.facts.head_size, lm.facts.num_q_heads, lm.facts.num_kv_heads
    g = torch.Generator().manual_seed(0)
    T, rows = 4 * BLOCK + 5, torch.tensor([3 * BLOCK + 2, 4 * BLOCK + 4])
    q, k = torch.randn(1, T, hq, d, generator=g), torch.randn(1, T, hkv, d, generator=g)

    def shift(x, delta):      # rotate by delta positions, exactly as the model's RoPE does
        inv = 1.0 / lm.rope_theta ** (torch.arange(0, d, 2).float() / d)
        emb = torch.cat([inv * delta, inv * delta])
        cos, sin = emb.cos().view(1, 1, d), emb.sin().view(1, 1, d)
        return apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)[0].transpose(1, 2)

    def logits(gates, q, k):
        pooled, newest = sc.pool_keys(k, BLOCK), sc.prefix_pooled_keys(k, rows, BLOCK)
        keep_mean = torch.zeros(3 * d)
        keep_mean[2 * d:] = 1      # max/min pooling is not rotation-equivariant; the mean is
        return sc.decode_logits(gates.decode_q, gates.decode_k * keep_mean[:, None], gates.rope_theta, q[:, rows],
                                rows, pooled, newest, BLOCK)

    for param, dg, same in (("rotary", d, True), ("free", d, False)):
        cfg = _cfg(param=param, gate_dim=dg)
        gates = sc.to_gates(sc.gate_params(lm.facts, cfg), lm.facts, cfg)
        a, b = logits(gates, q, k), logits(gates, shift(q, 3000.0), shift(k, 3000.0))
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-4) == same, param


def test_log_spaced_decode_rows_cover_every_octave():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    rows = sc.decode_rows(8192, 128, g(), "log")
    assert torch.equal(rows, sc.decode_rows(8192, 128, g(), "log"))
    assert rows.numel() == 128 and bool((rows[1:] > rows[:-1]).all()) and 512 <= int(rows[0]) and int(rows[-1]) < 8192
    for lo in (512, 1024, 2048, 4096):
        assert int(((rows >= lo) & (rows < 2 * lo)).sum()) == 32
    uniform = sc.decode_rows(8192, 128, g(), "uniform")
    assert int(uniform[0]) >= 2048 and uniform.numel() == 128
