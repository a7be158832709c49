"""The request field and params: validation, errors naming the field and what is allowed."""

import json

import pytest

from strategies import registry
from strategies.base import ParamError, resolve_budget

BUILTIN = ["full", "sink", "recycled", "landmark", "seer"]


def error_of(obj) -> ParamError:
    with pytest.raises(ParamError) as info:
        registry.parse_attention(obj)
    return info.value


def test_builtin_strategies_registered():
    assert registry.names()[:5] == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_default_params_round_trip(name):
    cls = registry.get(name)
    params = cls.Params()
    assert cls.Params.from_dict(params.to_dict()) == params
    assert cls.Params.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    described = {p["name"]: p for p in cls.Params.describe()}
    assert list(described) == list(params.to_dict())
    for key, value in params.to_dict().items():
        assert described[key]["default"] == value
        assert described[key]["type"] in ("integer", "number", "boolean", "string", "budget")
    choice = registry.parse_attention({"strategy": name, "params": params.to_dict()})
    assert registry.AttentionChoice.from_extra_args(json.loads(json.dumps(choice.to_extra_args()))) == choice


def test_describe_all_is_json_and_complete():
    listed = json.loads(json.dumps(registry.describe_all()))
    assert [s["name"] for s in listed][:5] == BUILTIN
    sink = next(s for s in listed if s["name"] == "sink")
    window = next(p for p in sink["params"] if p["name"] == "window")
    assert window["default"] == 1020 and window["minimum"] == 1 and window["type"] == "integer"
    assert all(s["description"] for s in listed)


def test_none_is_server_default_and_absence_is_full_in_worker():
    assert registry.parse_attention(None) is None
    assert registry.AttentionChoice.from_extra_args(None).strategy == "full"
    assert registry.AttentionChoice.from_extra_args({}).strategy == "full"
    assert registry.AttentionChoice.from_extra_args({"attention": {"strategy": "sink"}}).strategy == "sink"


def test_unknown_strategy_lists_valid_names():
    e = error_of({"strategy": "dense"})
    assert e.field == "attention.strategy"
    for name in BUILTIN:
        assert name in e.message


def test_missing_and_non_string_strategy():
    assert error_of({"params": {}}).field == "attention.strategy"
    assert error_of({"strategy": 3}).field == "attention.strategy"
    e = error_of({"strategy": "sink", "extra": 1})
    assert e.field == "attention.extra" and "strategy, params" in e.message
    assert error_of([1]).field == "attention"


def test_unknown_param_lists_valid_params():
    e = error_of({"strategy": "sink", "params": {"windw": 8}})
    assert e.field == "attention.params.windw"
    assert "n_sink" in e.message and "window" in e.message


def test_out_of_range_names_the_range():
    e = error_of({"strategy": "sink", "params": {"window": 0}})
    assert e.field == "attention.params.window" and "[1," in e.message
    e = error_of({"strategy": "recycled", "params": {"refresh_threshold": 1.5}})
    assert e.field == "attention.params.refresh_threshold" and "[0.0, 1.0]" in e.message
    e = error_of({"strategy": "landmark", "params": {"block_size": 12}})
    assert e.field == "attention.params.block_size" and "16" in e.message


def test_wrong_types():
    e = error_of({"strategy": "sink", "params": {"window": True}})   # bool is not an int
    assert e.field == "attention.params.window" and "integer" in e.message
    e = error_of({"strategy": "sink", "params": {"window": "64"}})
    assert "integer" in e.message
    e = error_of({"strategy": "sink", "params": {"reposition": 1}})
    assert e.field == "attention.params.reposition" and "boolean" in e.message
    e = error_of({"strategy": "sink", "params": [1]})
    assert e.field == "attention.params"
    e = error_of({"strategy": "seer", "params": {"gates": 5}})
    assert e.field == "attention.params.gates" and "string" in e.message
    e = error_of({"strategy": "recycled", "params": {"stride": None}})
    assert e.field == "attention.params.stride" and "null" in e.message


def test_budget_int_is_count_float_is_fraction():
    parse = lambda k: registry.parse_attention({"strategy": "recycled", "params": {"k": k}}).params.k
    assert parse(512) == 512 and isinstance(parse(512), int)
    assert parse(0.25) == 0.25 and isinstance(parse(0.25), float)
    assert parse(1.0) == 1.0
    for bad in (0, -3, 1.5, 0.0, True, "10"):
        e = error_of({"strategy": "recycled", "params": {"k": bad}})
        assert e.field == "attention.params.k" and "fraction" in e.message
    assert resolve_budget(512, 100) == 100
    assert resolve_budget(512, 1000) == 512
    assert resolve_budget(0.25, 1000) == 250
    assert resolve_budget(0.001, 10) == 1
    assert resolve_budget(1.0, 77) == 77


def test_float_params_accept_integers_and_nulls():
    choice = registry.parse_attention({"strategy": "recycled", "params": {"refresh_threshold": None}})
    assert choice.params.refresh_threshold is None
    choice = registry.parse_attention({"strategy": "seer", "params": {"threshold": 0, "top_k": 0.5}})
    assert choice.params.threshold == 0.0 and isinstance(choice.params.threshold, float)


def test_sink_reposition_is_refused_with_the_reason():
    e = error_of({"strategy": "sink", "params": {"reposition": True}})
    assert e.field == "attention.params.reposition" and "RoPE" in e.message


def test_vllm_xargs_forms():
    one = registry.parse_vllm_xargs({"attention": json.dumps({"strategy": "sink", "params": {"window": 64}})})
    two = registry.parse_vllm_xargs({"attention_strategy": "sink", "attention_params": '{"window": 64}'})
    assert one == two and one.params.window == 64
    assert registry.parse_vllm_xargs({"other": 1}) is None
    with pytest.raises(ParamError) as info:
        registry.parse_vllm_xargs({"attention_strategy": "sink", "attention_params": '{"window": -1}'})
    assert info.value.field == "vllm_xargs.attention_params.window"
    with pytest.raises(ParamError) as info:
        registry.parse_vllm_xargs({"attention_strategy": "nope"})
    assert info.value.field == "vllm_xargs.attention_strategy" and "sink" in info.value.message
    with pytest.raises(ParamError) as info:
        registry.parse_attention("{not json")
    assert info.value.field == "attention"


def test_bare_name_and_direct_construction_errors():
    assert registry.parse_attention("landmark").strategy == "landmark"
    with pytest.raises(ParamError) as info:
        registry.get("sink").Params(window=-5)
    assert info.value.field == "window"
