"""What the strategies take from the model's attention layers, on synthetic KV: the softmax scale vLLM's
layers use (Gemma: ``query_pre_attn_scalar ** -0.5``, not ``head_size ** -0.5``) and the sliding-window
layers, which vLLM's own kernel runs for every request (the strategies run on the other layers and count
the window's pairs on those)."""

import dataclasses
import json

import pytest
import torch

from strategies import registry
from strategies.base import ModelFacts, window_pairs

from synthetic_kv import MODEL, attention_reference, block_table, make_kv, random_query, run_step, step_rows
from test_strategies import FULL_BUDGET

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_strategies_use_the_scale_of_the_models_attention(name):
    """A model whose layers scale by 0.7 (head size 16 would give 0.25): at a whole-context budget every
    strategy equals dense attention at that scale, in prefill and in decode."""
    model = dataclasses.replace(MODEL, scale=0.7)
    strategy = registry.get(name)(model)
    assert strategy.scale == 0.7
    params = registry.get(name).Params.from_dict(FULL_BUDGET[name])
    kv = make_kv()
    prompt = [120, 90]
    table = block_table([p + 3 for p in prompt])
    rows = step_rows([params] * 2, prompt, prompt, table)
    query = random_query(sum(prompt), 1)
    for out in run_step(strategy, rows, query, kv):
        torch.testing.assert_close(out, attention_reference(query, kv, rows, scale=0.7), **TOL)
    for step in range(3):
        rows = step_rows([params] * 2, [1, 1], [p + 1 + step for p in prompt], table)
        query = random_query(2, 10 + step)
        expected = attention_reference(query, kv, rows, scale=0.7)
        assert not torch.allclose(expected, attention_reference(query, kv, rows), **TOL)   # the scale matters
        for out in run_step(strategy, rows, query, kv):
            torch.testing.assert_close(out, expected, **TOL)


def test_gemma3_config_gives_its_scale_and_window_layers(tmp_path):
    cfg = {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
           "hidden_size": 640, "query_pre_attn_scalar": 64, "sliding_window": 512,
           "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = ModelFacts.from_model_dir(tmp_path)
    assert model.attention_scale == pytest.approx(1 / 8)        # 64 ** -0.5, not 256 ** -0.5
    assert model.window_layers == tuple(i for i in range(18) if i not in (5, 11, 17))
    assert model.sliding_window == 512 and model.routed_layers == 3 and model.last_routed_layer == 17
    del cfg["query_pre_attn_scalar"], cfg["sliding_window"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = ModelFacts.from_model_dir(tmp_path)
    assert plain.attention_scale == 256 ** -0.5 and plain.window_layers == () and plain.routed_layers == 18


def test_window_pairs():
    for context, seq, window in [(0, 1, 4), (0, 10, 4), (3, 10, 4), (8, 10, 4), (9, 10, 4), (0, 3, 10), (5, 6, 10)]:
        expected = sum(min(p + 1, window) for p in range(context, seq))
        assert window_pairs(context, seq, window) == expected


WINDOWED = dataclasses.replace(MODEL, num_layers=3, window_layers=(0, 1), sliding_window=50)


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_the_count_has_the_windows_pairs_on_sliding_window_layers(name):
    """Layers 0 and 1 have a window of 50 (vLLM's kernel runs them); the strategy runs layer 2 alone. At a
    whole-context budget a decode step of a 300-token row attends (50 + 50 + 300) / 3 keys per layer on
    average, a prefill of 120 tokens the windowed pairs on two layers and the causal pairs on one."""
    strategy = registry.get(name)(WINDOWED)
    params = registry.get(name).Params.from_dict(FULL_BUDGET[name])
    if name == "sink":
        params = dataclasses.replace(params, window=1000)
    kv = make_kv()
    table = block_table([120, 300])
    rows = step_rows([params] * 2, [120, 1], [120, 300], table)
    query = random_query(121, 2)
    run_step(strategy, rows, query, kv, layers=range(2, 3))
    prefill, decode = strategy.stats("req-0"), strategy.stats("req-1")
    causal = 120 * 121 / 2
    assert prefill.total == pytest.approx(causal)
    assert prefill.attended == pytest.approx((2 * window_pairs(0, 120, 50) + causal) / 3)
    assert decode.total == pytest.approx(300)
    assert decode.attended == pytest.approx((50 + 50 + 300) / 3)
    assert decode.decode_attended_fraction == pytest.approx(400 / 900)


def test_a_model_whose_every_layer_has_a_window_has_no_routed_layer():
    model = dataclasses.replace(MODEL, window_layers=tuple(range(MODEL.num_layers)), sliding_window=8)
    assert model.routed_layers == 0 and model.last_routed_layer is None
    assert model.dense_step_attended(1, 100) == 8
