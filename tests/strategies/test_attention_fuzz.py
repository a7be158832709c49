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
from tests.fuzz_values import (NAMES, attention_values, edge_floats, edge_ints, param_value,  # noqa: E402
                               strategy_params, to_json, xargs_values)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

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
