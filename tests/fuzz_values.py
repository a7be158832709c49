"""Hypothesis generators of what a client may send as ``attention``, ``vllm_xargs`` and
``vllm_xargs.attnserve_force_tokens``: every registered strategy's params with random types and edge
values, budgets, the shorthand and JSON-string forms, and anything JSON-like. Shared by the parse-level
fuzz (tests/strategies/test_attention_fuzz.py) and the HTTP fuzz (tests/production)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from strategies import registry

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


@st.composite
def force_tokens_values(draw):
    """``attnserve_force_tokens``: token id lists (in and out of the vocabulary), their JSON strings, or anything."""
    ids = st.lists(st.one_of(st.integers(0, 50000), edge_ints, st.booleans(), edge_floats), max_size=6)
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(ids)
    if kind == 1:
        return draw(st.sampled_from(["", "[", "[]", "null"])) if draw(st.booleans()) else to_json(draw(ids))
    return draw(param_value)
