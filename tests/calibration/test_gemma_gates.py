"""Seer gates for Gemma 3 270M (issue 22, item 3): the calibration sees what vLLM caches on a model with
per-head q/k norms, its own softmax scale and sliding-window layers, calibrates the global layers only
(vLLM's windowed kernel runs the others for every request), and the shipped gates fit the model and
find more of the attention mass than the training-free identity gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strategies.base import ModelFacts

BLOCK = 16
GLOBAL_LAYERS = [5, 11, 17]       # Gemma 3 270M: a global layer after every 5 sliding-window layers


@pytest.fixture(scope="module")
def gemma_lm(gemma_model_dir):
    from strategies.calibration.train import load_model
    return load_model(gemma_model_dir)          # fp32, eager attention (its maps are compared below)


@pytest.fixture(scope="module")
def gemma_ids(gemma_lm):
    from strategies.calibration.train import calibration_text, tokenize_prefix
    return tokenize_prefix(gemma_lm.tokenizer, calibration_text("eval"), 300)


def test_only_the_global_layers_are_calibrated(gemma_model_dir):
    from strategies.calibration.train import gated_layers
    facts = ModelFacts.from_model_dir(gemma_model_dir)
    assert gated_layers(facts) == GLOBAL_LAYERS


def test_captured_keys_are_the_keys_the_model_caches(gemma_lm, gemma_ids):
    """q_norm/k_norm then RoPE, as Gemma's attention does: the keys equal its own KV cache's."""
    from strategies.calibration.train import capture_qk
    q, k = capture_qk(gemma_lm, gemma_ids, GLOBAL_LAYERS)
    assert q.shape == (3, gemma_ids.numel(), 4, 256) and k.shape == (3, gemma_ids.numel(), 1, 256)
    with torch.no_grad():
        out = gemma_lm.model(input_ids=gemma_ids.view(1, -1), use_cache=True)
    for i, layer in enumerate(GLOBAL_LAYERS):
        cached = out.past_key_values.layers[layer].keys[0].transpose(0, 1).float()    # [T, Hkv, D]
        torch.testing.assert_close(k[i], cached, atol=1e-4, rtol=1e-4)


def test_decode_targets_are_the_models_attention(gemma_lm, gemma_ids):
    """The decode target of a global layer is the model's own attention map (eager, Gemma's scale
    query_pre_attn_scalar ** -0.5) max-pooled into key blocks and row-normalised."""
    from strategies.calibration.train import features
    f = features(gemma_lm, gemma_ids.view(1, -1), block=BLOCK, rows_per_window=16, prefill_blocks=2, seed=0)
    assert f.layers.tolist() == GLOBAL_LAYERS
    assert f.q.shape[1] == len(GLOBAL_LAYERS) and f.target.shape[1] == len(GLOBAL_LAYERS)
    with torch.no_grad():
        maps = gemma_lm.model(input_ids=gemma_ids.view(1, -1), output_attentions=True).attentions
    T = gemma_ids.numel()
    nb = -(-T // BLOCK)
    for i, layer in enumerate(GLOBAL_LAYERS):
        att = maps[layer][0][:, f.rows].float()                                      # [Hq, R, T]
        pooled = torch.nn.functional.pad(att, (0, nb * BLOCK - T)).view(*att.shape[:2], nb, BLOCK).amax(-1)
        want = pooled.sum(0)                                                         # one KV head
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(f.target[0, i, :, 0], want, atol=2e-4, rtol=1e-3)


def test_shipped_gemma_gates_fit_and_beat_the_identity_gate(gemma_model_dir, gemma_lm, tmp_path, monkeypatch):
    """The default gates of Gemma 3 are the shipped ones; on held-out text their KL to the attention is
    well under the identity gate's, and at a 1/8 block budget they keep more of the global layers'
    attention mass (on Gemma the identity gate is already close to the oracle: docs/seer.md)."""
    from strategies.seer import SHIPPED_GATES_DIR, Params, SeerGates, SeerStrategy, resolve_gates
    from strategies.calibration.train import calibration_text, decode_recall, features, gate_losses, token_windows

    monkeypatch.setenv("ATTNSERVE_GATES_DIR", str(tmp_path))      # no calibrated gates in the cache
    facts = ModelFacts.from_model_dir(gemma_model_dir)
    path = resolve_gates(None, facts)
    assert path == SHIPPED_GATES_DIR / Path(facts.model_id).name / "seer.safetensors"
    SeerStrategy.validate_for_model(Params(), facts)
    shipped = SeerGates.load(path)
    assert "calibration_command" in SeerGates.read_metadata(path)
    ids = token_windows(gemma_lm.tokenizer, calibration_text("eval"), 2048, 1)
    f = features(gemma_lm, ids, block=shipped.block_size, rows_per_window=128, prefill_blocks=8, seed=3)

    def recall_at_an_eighth(gates) -> float:
        row = next(r for r in decode_recall(gates, f, fractions=(1 / 8,), thresholds=(), quest=False)
                   if r.method == "seer")
        return float(row.recall.mean())

    identity_gates = SeerGates.identity(facts, shipped.block_size)
    kl_trained, kl_identity = gate_losses(shipped, f), gate_losses(identity_gates, f)
    assert kl_trained["decode_kl"] < 0.7 * kl_identity["decode_kl"], (kl_trained, kl_identity)
    assert kl_trained["prefill_kl"] < 0.7 * kl_identity["prefill_kl"], (kl_trained, kl_identity)
    trained, identity = recall_at_an_eighth(shipped), recall_at_an_eighth(identity_gates)
    print(f"held-out 2k: KL {kl_trained} vs identity {kl_identity}; recall at 1/8 {trained:.3f} vs {identity:.3f}")
    assert trained > identity + 0.005, (trained, identity)


def test_seer_report_of_the_identity_gate_lists_the_global_layers(gemma_model_dir):
    """``attnserve seer-report --gates identity``: the training-free gate, on the layers seer runs on,
    under their model indices."""
    from strategies.calibration.train import seer_report
    text = seer_report(gemma_model_dir, "identity", seq_len=512, windows=1, rows_per_window=16, progress=False)
    assert "| budget 1/8 | seer |" in text and "| budget 1/8 | oracle |" in text
    layer_rows = [line.split("|")[1].strip() for line in text.splitlines()
                  if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert layer_rows == [str(i) for i in GLOBAL_LAYERS], text
