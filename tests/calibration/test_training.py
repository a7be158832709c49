"""Real calibration on the real model (short windows, few steps): the held-out KL falls, trained gates
recall more attention mass than untrained ones at the same sparsity, training is deterministic and
resumable."""

from __future__ import annotations

import torch

from strategies import seer_calibration as sc

BLOCK = 16  # the block size of the session features (conftest.BLOCK)

STEPS = 40


def _cfg(**kw) -> sc.CalibrationConfig:
    base = dict(block_size=BLOCK, init="random", gate_dim=32, steps=STEPS, batch=2, lr=1e-2, seed=0)
    return sc.CalibrationConfig(**{**base, **kw})


def _train(lm, feats, cfg, **kw):
    params = sc.gate_params(lm.facts, cfg)
    sc.train(params, feats, cfg, progress=False, **kw)
    return sc.to_gates(params, lm.facts, cfg)


def _recall(rows, setting, method):
    row = next(r for r in rows if r.setting == setting and r.method == method)
    return float(row.sparsity.mean()), float(row.recall.mean())


def test_training_reduces_heldout_kl_and_beats_untrained_gates(lm, train_features, heldout_features):
    cfg = _cfg()
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
