"""Strategy name -> class, and the request field ``attention: {strategy, params}`` (design.md section 1).

The server knows strategies only through this module: ``parse_attention`` validates a request,
``AttentionChoice.to_extra_args`` carries the choice to the workers, ``describe_all`` lists them.

Strategies come from this package (``_BUILTIN_MODULES``) and from any installed distribution that declares
an entry point in the group ``attnserve.strategies`` (``name = "module:Class"`` or ``name = "module"``):
they are loaded in every process that asks the registry (API, scheduler, workers) and served like the
built-in ones. A plugin that fails to load is logged and left out; it cannot take a built-in's name.
"""

from __future__ import annotations

import importlib
import json
import logging
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from strategies.base import Budget, ModelFacts, ParamError, ParamSpec, Strategy, StrategyParams

logger = logging.getLogger(__name__)

FULL = "full"     # vLLM's own dense attention: the control, and what every request runs by default
DEFAULT_STRATEGY = FULL
_BUILTIN_MODULES = ("full", "sink", "recycled", "landmark", "seer")
ENTRY_POINT_GROUP = "attnserve.strategies"
_STRATEGIES: dict[str, type[Strategy]] = {}
_loaded = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a Strategy available under ``cls.name``."""
    for attr in ("name", "Params", "description"):
        if not hasattr(cls, attr):
            raise TypeError(f"strategy {cls.__name__} lacks the class attribute {attr!r}")
    existing = _STRATEGIES.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"strategy name {cls.name!r} is already registered by {existing.__module__}")
    _STRATEGIES[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"strategies.{module}")
        load_entry_points()


def load_entry_points() -> list[str]:
    """Import the ``attnserve.strategies`` entry points; returns the names they added. An entry point that
    names a Strategy class is registered; one that names a module registers its classes by importing it."""
    from importlib.metadata import entry_points

    added = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        before = set(_STRATEGIES)
        try:
            loaded = point.load()
            if isinstance(loaded, type):
                if not issubclass(loaded, Strategy):
                    raise TypeError(f"{point.value} is not a subclass of strategies.base.Strategy")
                register(loaded)
        except Exception as error:      # a broken plugin must not take the server down
            logger.error("attnserve: strategy entry point %r (%s) not loaded: %s: %s",
                         point.name, point.value, type(error).__name__, error)
            continue
        added.extend(n for n in _STRATEGIES if n not in before)
    return added


def names() -> list[str]:
    """Registered strategy names: the built-in ones in their fixed order (``full`` first), then the others
    (entry points, by name)."""
    _ensure_loaded()
    builtin = [n for n in _BUILTIN_MODULES if n in _STRATEGIES]
    return builtin + [n for n in _STRATEGIES if n not in builtin]


def get(name: str, field: str = "attention.strategy") -> type[Strategy]:
    _ensure_loaded()
    try:
        return _STRATEGIES[name]
    except (KeyError, TypeError):
        raise ParamError(field, f"unknown strategy {json.dumps(name) if isinstance(name, str) else repr(name)}; "
                                f"valid strategies: {', '.join(names())}") from None


BUDGET_SPEC = ParamSpec(
    name="budget", kind=Budget, nullable=True, default=None, minimum=1, maximum=None, choices=None,
    doc="KV attended per decode step: a fraction (0, 1] of the context or a token count; the strategy sets "
        "its own budget param from it (an explicit value of that param wins)")


@dataclass(frozen=True)
class AttentionChoice:
    strategy: str
    params: StrategyParams
    budget: Union[int, float, None] = None     # ``attention.budget``, not yet turned into params

    def to_extra_args(self) -> dict:
        """JSON-safe, for ``SamplingParams.extra_args["attention"]``."""
        out = {"strategy": self.strategy, "params": self.params.to_dict()}
        if self.budget is not None:     # the param it sets is not the request's own (it would win)
            out["params"].pop(get(self.strategy).budget_param)
            out["budget"] = self.budget
        return out

    def for_context(self, context_len: int, model: Optional[ModelFacts]) -> "AttentionChoice":
        """The budget turned into the strategy's params for a ``context_len``-token prompt (in the workers and
        the scheduler, which know the prompt's length; the scheduler has no model facts: strategies that
        release KV map their budget without them)."""
        if self.budget is None:
            return self
        params = get(self.strategy).params_for_budget(self.params, self.budget, context_len, model)
        return dataclasses.replace(self, params=params, budget=None)

    @classmethod
    def default(cls) -> "AttentionChoice":
        return cls(DEFAULT_STRATEGY, get(DEFAULT_STRATEGY).Params())

    @classmethod
    def from_extra_args(cls, data: Any) -> "AttentionChoice":
        """In the worker. Accepts the stored ``{"strategy", "params"}`` object (or its JSON string), a
        whole ``extra_args`` dict holding it under ``"attention"`` or in the vllm_xargs form
        (``attention_strategy`` / ``attention_params``). Absent -> ``full``; invalid -> ``full``
        with a warning (the server validated already; the worker must not crash)."""
        if data is None:
            return cls.default()
        try:
            if isinstance(data, dict) and "strategy" not in data:
                if "attention" in data:
                    return cls.from_extra_args(data["attention"])
                if "attention_strategy" in data:
                    return parse_vllm_xargs(data) or cls.default()
                return cls.default()
            return parse_attention(data) or cls.default()
        except ParamError as e:
            logger.warning("invalid attention choice reached the worker (%s); using full attention", e)
            return cls.default()


def parse_attention(obj: Any, field: str = "attention") -> Optional[AttentionChoice]:
    """Validate the request field. ``None`` -> ``None`` (the server default). Accepts
    ``{"strategy": name, "params": {...}}``, a bare strategy name, or that object as a JSON string.
    Raises ParamError naming the dotted field and what is allowed."""
    if obj is None:
        return None
    if isinstance(obj, str):
        text = obj.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ParamError(field, f"invalid JSON ({e.msg}); expected an object "
                                        '{"strategy": ..., "params": {...}}') from None
        else:
            obj = {"strategy": text}
    if not isinstance(obj, dict):
        raise ParamError(field, 'expected an object {"strategy": <name>, "params": {...}} or a strategy name; '
                                f"valid strategies: {', '.join(names())}")
    for key in obj:
        if key not in ("strategy", "params", "budget"):
            raise ParamError(f"{field}.{key}", "unknown key; allowed keys: strategy, params, budget")
    if "strategy" not in obj or obj["strategy"] is None:
        raise ParamError(f"{field}.strategy", f"required; valid strategies: {', '.join(names())}")
    name = obj["strategy"]
    if not isinstance(name, str):
        raise ParamError(f"{field}.strategy", f"expected a string; valid strategies: {', '.join(names())}")
    cls = get(name, field=f"{field}.strategy")
    params = cls.Params.from_dict(obj.get("params"), field=f"{field}.params")
    return with_budget(cls, params, obj.get("params"), obj.get("budget"), f"{field}.budget")


def with_budget(cls: type[Strategy], params: StrategyParams, given_params: Any, budget: Any,
                field: str) -> AttentionChoice:
    """The choice with its validated ``budget``; dropped when the request sets the param it would set."""
    try:
        budget = BUDGET_SPEC.check(budget)
        if budget is None:
            return AttentionChoice(cls.name, params)
        if cls.budget_param is None:
            raise ParamError("budget", f"strategy {cls.name!r} attends the whole context and takes no budget")
    except ParamError as error:
        raise ParamError(field, error.message) from None
    if isinstance(given_params, dict) and cls.budget_param in given_params:
        return AttentionChoice(cls.name, params)
    return AttentionChoice(cls.name, params, budget)


def parse_vllm_xargs(xargs: Any, field: str = "vllm_xargs") -> Optional[AttentionChoice]:
    """The vLLM-style form: ``{"attention": "<JSON object>"}`` or
    ``{"attention_strategy": name, "attention_params": "<JSON object>", "attention_budget": number}``;
    ``None`` if neither is there."""
    if not isinstance(xargs, dict):
        return None
    if "attention" in xargs:
        return parse_attention(xargs["attention"], field=f"{field}.attention")
    if "attention_strategy" not in xargs:
        if "attention_params" in xargs or "attention_budget" in xargs:
            raise ParamError(f"{field}.attention_strategy", "required with attention_params and attention_budget; "
                                                            f"valid strategies: {', '.join(names())}")
        return None
    name = xargs["attention_strategy"]
    if not isinstance(name, str):
        raise ParamError(f"{field}.attention_strategy", f"expected a string; valid strategies: {', '.join(names())}")
    params = xargs.get("attention_params")
    if isinstance(params, str):
        try:
            params = json.loads(params) if params.strip() else {}
        except json.JSONDecodeError as e:
            raise ParamError(f"{field}.attention_params", f"invalid JSON ({e.msg}); expected an object") from None
    cls = get(name, field=f"{field}.attention_strategy")
    return with_budget(cls, cls.Params.from_dict(params, field=f"{field}.attention_params"), params,
                       xargs.get("attention_budget"), f"{field}.attention_budget")


def describe_all() -> list[dict]:
    """For GET /v1/strategies: name, description, params schema."""
    return [{"name": cls.name, "description": cls.description, "dense_prefill": cls.dense_prefill,
             "params": cls.Params.describe()} for cls in (get(n) for n in names())]
