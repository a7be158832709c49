"""Strategy name -> class, and the request field ``attention: {strategy, params}`` (design.md section 1).

The server knows strategies only through this module: ``parse_attention`` validates a request,
``AttentionChoice.to_extra_args`` carries the choice to the workers, ``describe_all`` lists them.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from strategies.base import ParamError, Strategy, StrategyParams

logger = logging.getLogger(__name__)

DEFAULT_STRATEGY = "full"
_BUILTIN_MODULES = ("full", "sink", "recycled", "landmark", "seer")
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


def names() -> list[str]:
    """Registered strategy names: the built-in ones in their fixed order, then others as registered."""
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


@dataclass(frozen=True)
class AttentionChoice:
    strategy: str
    params: StrategyParams

    def to_extra_args(self) -> dict:
        """JSON-safe, for ``SamplingParams.extra_args["attention"]``."""
        return {"strategy": self.strategy, "params": self.params.to_dict()}

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
        if key not in ("strategy", "params"):
            raise ParamError(f"{field}.{key}", "unknown key; allowed keys: strategy, params")
    if "strategy" not in obj or obj["strategy"] is None:
        raise ParamError(f"{field}.strategy", f"required; valid strategies: {', '.join(names())}")
    name = obj["strategy"]
    if not isinstance(name, str):
        raise ParamError(f"{field}.strategy", f"expected a string; valid strategies: {', '.join(names())}")
    cls = get(name, field=f"{field}.strategy")
    params = cls.Params.from_dict(obj.get("params"), field=f"{field}.params")
    return AttentionChoice(name, params)


def parse_vllm_xargs(xargs: Any, field: str = "vllm_xargs") -> Optional[AttentionChoice]:
    """The vLLM-style form: ``{"attention": "<JSON object>"}`` or
    ``{"attention_strategy": name, "attention_params": "<JSON object>"}``; ``None`` if neither is there."""
    if not isinstance(xargs, dict):
        return None
    if "attention" in xargs:
        return parse_attention(xargs["attention"], field=f"{field}.attention")
    if "attention_strategy" not in xargs:
        if "attention_params" in xargs:
            raise ParamError(f"{field}.attention_strategy", "required with attention_params; "
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
    return AttentionChoice(name, cls.Params.from_dict(params, field=f"{field}.attention_params"))


def describe_all() -> list[dict]:
    """For GET /v1/strategies: name, description, params schema."""
    return [{"name": cls.name, "description": cls.description, "dense_prefill": cls.dense_prefill,
             "params": cls.Params.describe()} for cls in (get(n) for n in names())]
