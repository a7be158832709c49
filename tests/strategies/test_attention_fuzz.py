"""Fuzz of the attention request field (hypothesis): whatever JSON-like value a client sends as
``attention`` or ``vllm_xargs``, parsing either gives a valid AttentionChoice or raises a ParamError whose
``field`` lies under the given prefix and whose message is non-empty; never another exception."""

from __future__ import annotations

import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from strategies import registry  # noqa: E402
from strategies.base import ParamError, StrategyParams  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

NAMES = registry.names()
PARAM_NAMES = sorted({s.name for n in NAMES for s in registry.get(n).Params.specs()})

edge_ints = st.sampled_from([0, 1, -1, 2, 7, 8, 16, 31, 32, 64, 127, 128, 1020, 4096, 8192, 2**31 - 1, 2**31,
                             2**63, -(2**63), 10**30, -(10**30)])
edge_floats = st.sampled_from([0.0, -0.0, 1e-12, 0.001, 0.125, 0.5, 1.0, 1.0000001, 2.0, -0.5, 1e308,
                               float("nan"), float("inf"), float("-inf")])
edge_strings = st.sampled_from(["", " ", "identity", "seer", "full", "sink", "{", "{}", "null", "1", "0.5",
                                "../../etc/passwd", "/etc/passwd", "/nonexistent/x.safetensors", "~/x",
                                ".hidden", "a/b", "a\\b", "x.safetensors", "\x00", "é", "\ud800", "x" * 300])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), edge_ints, st.floats(allow_nan=True),
                    edge_floats, st.text(max_size=20), edge_strings)
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES + ["strategy", "params", "budget"]),
                              st.text(max_size=8)), inner, max_size=4)), max_leaves=12)
param_value = st.one_of(scalars, json_like)


def strategy_params(name: str):
    keys = [s.name for s in registry.get(name).Params.specs()] + ["unknown_param"]
    return st.dictionaries(st.sampled_from(keys), param_value, max_size=len(keys))


any_strategy_name = st.one_of(st.sampled_from(NAMES), edge_strings, st.text(max_size=10), scalars)


@st.composite
def attention_objects(draw):
    name = draw(st.sampled_from(NAMES))
    obj = {}
    if draw(st.booleans()):
        obj["strategy"] = draw(st.one_of(st.just(name), st.just(name), any_strategy_name))
    if draw(st.booleans()):
        obj["params"] = draw(st.one_of(strategy_params(name), strategy_params(name), param_value))
    if draw(st.booleans()):
        obj["budget"] = draw(st.one_of(edge_ints, edge_floats, param_value))
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=6))] = draw(scalars)
    return obj


def to_json(value) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def attention_values(draw):
    """An ``attention`` field: an object, a bare name, that object as a JSON string, or anything."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(attention_objects())
    if kind == 1:
        return draw(any_strategy_name)
    if kind == 2:
        text = to_json(draw(attention_objects()))
        return draw(st.sampled_from([text, " " + text, text[:-1], text + "x"]))
    if kind == 3:
        return draw(st.sampled_from(NAMES)) + draw(st.sampled_from(["", " ", "  "]))
    return draw(json_like)


@st.composite
def xargs_values(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return {"attention": draw(attention_values())}
    if kind == 1:
        name = draw(st.sampled_from(NAMES))
        out = {}
        if draw(st.integers(0, 5)):
            out["attention_strategy"] = draw(st.one_of(st.just(name), any_strategy_name))
        if draw(st.booleans()):
            params = draw(st.one_of(strategy_params(name), param_value))
            out["attention_params"] = draw(st.sampled_from([params, to_json(params), "", "  ", "{bad"]))
        if draw(st.booleans()):
            out["attention_budget"] = draw(st.one_of(edge_ints, edge_floats, param_value))
        return out
    if kind == 2:
        return draw(st.dictionaries(st.sampled_from(["attention", "attention_strategy", "attention_params",
                                                     "attention_budget", "other"]), param_value, max_size=4))
    return draw(json_like)


def check_outcome(parse, value, prefix: str) -> None:
    try:
        choice = parse(value)
    except ParamError as error:
        assert isinstance(error.field, str) and error.field.startswith(prefix), (value, error.field)
        assert isinstance(error.message, str) and error.message.strip(), (value, error)
        return
    if choice is None:
        return
    assert isinstance(choice, registry.AttentionChoice)
    assert choice.strategy in NAMES and isinstance(choice.params, registry.get(choice.strategy).Params)
    assert isinstance(choice.params, StrategyParams)
    for value_ in choice.params.to_dict().values():     # validated: no NaN/inf, JSON-safe
        assert not (isinstance(value_, float) and not math.isfinite(value_))
    if choice.budget is not None:
        assert not isinstance(choice.budget, bool)
        assert (isinstance(choice.budget, int) and choice.budget >= 1) or 0 < choice.budget <= 1
    stored = json.loads(json.dumps(choice.to_extra_args(), allow_nan=False))   # what reaches the worker
    assert registry.AttentionChoice.from_extra_args(stored) == choice


@FUZZ
@given(attention_values())
def test_parse_attention_only_raises_param_errors(value):
    check_outcome(lambda v: registry.parse_attention(v, "attention"), value, "attention")


@FUZZ
@given(attention_values(), st.sampled_from(["attention", "x.attention", ""]))
def test_parse_attention_names_fields_under_any_prefix(value, prefix):
    check_outcome(lambda v: registry.parse_attention(v, prefix), value, prefix)


@FUZZ
@given(xargs_values())
def test_parse_vllm_xargs_only_raises_param_errors(value):
    check_outcome(lambda v: registry.parse_vllm_xargs(v, "vllm_xargs"), value, "vllm_xargs")


@FUZZ
@given(st.sampled_from(NAMES).flatmap(lambda n: st.tuples(st.just(n), strategy_params(n))),
       st.one_of(st.none(), edge_ints, edge_floats, param_value))
def test_every_strategy_params_with_random_types(name_params, budget):
    name, params = name_params
    obj = {"strategy": name, "params": params}
    if budget is not None:
        obj["budget"] = budget
    check_outcome(lambda v: registry.parse_attention(v, "attention"), obj, "attention")
    check_outcome(lambda v: registry.parse_vllm_xargs(v, "vllm_xargs"),
                  {"attention_strategy": name, "attention_params": to_json(params),
                   **({"attention_budget": budget} if budget is not None else {})}, "vllm_xargs")
