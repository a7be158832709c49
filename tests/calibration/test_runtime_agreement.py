"""The calibration's pure-torch gate math equals what the seer strategy computes at run time (its
select / prefill_mask, over a paged KV cache holding the real model's post-RoPE keys)."""

from __future__ import annotations

import dataclasses

import torch

from strategies.calibration import train as sc
from strategies.base import StepRows
from strategies.seer import Params, SeerGates, SeerStrategy

BLOCK = 16  # the block size of the session features (conftest.BLOCK)

PAGE = 64
LAYER = 7


def _paged(k: torch.Tensor, rows: int = 1, num_blocks: int = 32, seed: int = 0):
    """Keys [T, Hkv, D] copied into a shuffled paged cache [num_blocks, Hkv, PAGE, D] once per request
    (each request owns its physical blocks, as in vLLM: pooled keys live per physical block);
    table int32 [rows, MB]."""
    T, hkv, d = k.shape
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, hkv, PAGE, d, generator=g)
    width = -(-T // PAGE)
    table = torch.randperm(num_blocks, generator=g)[:width * rows].to(torch.int32).view(rows, width)
    for r in range(rows):
        for t in range(T):
            cache[table[r, t // PAGE], :, t % PAGE] = k[t]
    return cache, table


def _random_gates(facts, rope_theta: float) -> SeerGates:
    cfg = sc.CalibrationConfig(block_size=BLOCK, init="random", param="free", gate_dim=32,
                                 rope_theta=rope_theta, seed=3)
    return sc.to_gates(sc.gate_params(facts, cfg), facts, cfg)


def _strategy(lm, tmp_path, gates: SeerGates, **params):
    facts = dataclasses.replace(lm.facts, kv_block_size=PAGE, dtype=torch.float32)
    path = tmp_path / "gates.safetensors"
    gates.save(path)
    return SeerStrategy(facts), Params(block_size=BLOCK, gates=str(path), **params)


def test_decode_scores_match_runtime(lm, raw_qk, tmp_path):
    q, k = raw_qk[0][LAYER], raw_qk[1][LAYER]                       # [T, Hq, D], [T, Hkv, D]
    gates = _random_gates(lm.facts, rope_theta=1e4)
    strategy, params = _strategy(lm, tmp_path, gates)
    positions = [5, 16, 47, 100, 169]                                # inside, on and past block edges
    cache, table = _paged(k, rows=len(positions))
    rows = StepRows.build([f"r{i}" for i in positions], [params] * len(positions), [1] * len(positions),
                          [t + 1 for t in positions], table)
    plan = strategy.plan(rows)
    _, _, probs = strategy.select(LAYER, q[positions], cache, plan.decode[0])

    t = torch.tensor(positions)
    mine = sc.decode_logits(gates.decode_q[LAYER], gates.decode_k[LAYER], gates.rope_theta, q[t], t,
                            sc.pool_keys(k, BLOCK), sc.prefix_pooled_keys(k, t, BLOCK), BLOCK).softmax(-1)
    for r, pos in enumerate(positions):
        nb = pos // BLOCK + 1
        torch.testing.assert_close(mine[r, :, :nb], probs[r, :, :nb], rtol=1e-4, atol=1e-6)
        assert float(mine[r, :, nb:].abs().sum()) == 0.0


def test_prefill_mask_matches_runtime(lm, raw_qk, tmp_path):
    q, k = raw_qk[0][LAYER], raw_qk[1][LAYER]
    T = q.shape[0]
    gates = _random_gates(lm.facts, rope_theta=1e4)
    threshold = 0.02
    strategy, params = _strategy(lm, tmp_path, gates, threshold=threshold)
    cache, table = _paged(k)
    rows = StepRows.build(["p"], [params], [T], [T], table)
    plan = strategy.plan(rows)
    runtime = strategy.prefill_mask(LAYER, q, cache, plan.prefill[0])[0]         # [Hkv, QB, KB]

    nb = -(-T // BLOCK)
    blocks = torch.arange(nb)
    logits = sc.prefill_logits(gates.prefill_q[LAYER], gates.prefill_k[LAYER], gates.rope_theta,
                               sc.block_mean_queries(q, BLOCK), blocks, sc.pool_keys(k, BLOCK))
    probs = logits.softmax(-1)
    causal = blocks[None, :] <= blocks[:, None]
    mine = ((probs >= threshold) | torch.eye(nb, dtype=torch.bool)) & causal
    assert runtime.shape == mine.shape
    # no probability sits within float noise of the threshold, so the masks must be identical
    assert float(((probs - threshold).abs() < 1e-6).sum()) == 0
    assert torch.equal(runtime, mine)
    assert 0 < int(mine.sum()) < int(causal.sum()) * lm.facts.num_kv_heads       # a real selection
