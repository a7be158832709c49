"""The per-request `attention` field: where it is read from the request body, how it is validated
(through `strategies.registry` only, docs/design.md section 1), what reaches the engine, and what
the response reports about it (section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strategies.base import ParamError

# The key of `SamplingParams.extra_args` that belongs to attnserve.
EXTRA_ARGS_ATTENTION = "attention"

# The vLLM-style spellings inside `vllm_xargs` (design.md section 1).
XARGS_ATTENTION = "attention"
XARGS_STRATEGY = "attention_strategy"
XARGS_PARAMS = "attention_params"
XARGS_BUDGET = "attention_budget"


@dataclass(frozen=True)
class AttentionRequest:
    """The attention choice as found in the body, before validation."""

    top_level: Any = None  # the `attention` field (None: absent)
    xargs: dict[str, Any] | None = None  # our keys of `vllm_xargs`, if any

    def field(self, key: str) -> str:
        """How this request spells ``attention.<key>`` (strategy, params or budget)."""
        if self.xargs is None:
            return f"attention.{key}"
        if XARGS_ATTENTION in self.xargs:
            return f"vllm_xargs.{XARGS_ATTENTION}.{key}"
        return f"vllm_xargs.{XARGS_ATTENTION}_{key}"     # XARGS_STRATEGY, XARGS_PARAMS, XARGS_BUDGET


XARGS_KEYS = (XARGS_ATTENTION, XARGS_STRATEGY, XARGS_PARAMS, XARGS_BUDGET)


def pop_attention_request(body: dict[str, Any], xargs: dict[str, Any]) -> AttentionRequest:
    """Remove the `attention` field from `body`; with the attention keys already taken out of its
    `vllm_xargs` (``xargs``, routes.take_our_xargs), the request's attention choice."""
    top_level = body.pop("attention", None)
    ours = {k: xargs[k] for k in XARGS_KEYS if k in xargs}
    if top_level is not None and ours:
        raise ParamError(
            "attention",
            "the attention choice was given twice (the `attention` field and `vllm_xargs`); "
            "use one of them",
        )
    return AttentionRequest(top_level=top_level, xargs=ours or None)


@dataclass(frozen=True)
class AttentionPolicy:
    """What this server accepts: the registry's strategies, the default, the model's facts."""

    default_strategy: str
    model_facts: Any = None  # strategies.base.ModelFacts, for capability checks

    def resolve(self, requested: AttentionRequest) -> Any:
        """Validate a request's choice → `strategies.registry.AttentionChoice`, or raise
        ParamError naming the (dotted) field and what is allowed."""
        from strategies.registry import get, parse_attention, parse_vllm_xargs

        if requested.xargs is not None:
            choice = parse_vllm_xargs(requested.xargs)
        else:
            choice = parse_attention(requested.top_level, "attention")
        if choice is None:
            choice = parse_attention({"strategy": self.default_strategy}, "attention")
        reasons = self.unsupported_reasons(choice.strategy)
        if reasons:
            raise ParamError(
                requested.field("strategy"),
                f"strategy {choice.strategy!r} cannot run on this server: " + "; ".join(reasons),
            )
        if self.model_facts is not None:
            try:
                get(choice.strategy).validate_for_model(choice.params, self.model_facts)
            except ParamError as err:
                raise err.under(requested.field("params")) from None
            if choice.budget is not None:
                try:
                    get(choice.strategy).check_budget(choice.params, choice.budget, self.model_facts)
                except ParamError as err:
                    raise ParamError(requested.field("budget"), err.message) from None
        return choice

    def unsupported_reasons(self, strategy: str) -> list[str]:
        if self.model_facts is None:
            return []
        from strategies.registry import get

        return list(get(strategy).unsupported_reasons(self.model_facts))


def model_facts_from_vllm_config(vllm_config: Any) -> Any:
    """strategies.base.ModelFacts of the served model (whole-model head counts, not per rank)."""
    from strategies.base import ModelFacts, attention_facts_from_config

    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    scale, window_layers, sliding_window = attention_facts_from_config(text_config.to_dict())
    return ModelFacts(
        num_layers=text_config.num_hidden_layers,
        num_q_heads=text_config.num_attention_heads,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_size=model_config.get_head_size(),
        kv_block_size=vllm_config.cache_config.block_size,
        max_model_len=model_config.max_model_len,
        dtype=model_config.dtype,
        model_id=str(model_config.model),
        scale=scale,
        window_layers=window_layers,
        sliding_window=sliding_window,
    )


def extra_args_for(choice: Any) -> dict[str, Any]:
    """What attnserve adds to `SamplingParams.extra_args` (via the request's `vllm_xargs`)."""
    return {EXTRA_ARGS_ATTENTION: choice.to_extra_args()}


def read_attended_fractions(engine_ids: list[str], strategy: str) -> tuple[float | None, float | None]:
    """(attended / total (query, key) pairs of all steps, the same of the decode steps alone) over the
    request's engine requests (the ids given to `AsyncLLM.generate`), from the workers' stats; None
    while unknown (1.0 for `full`)."""
    from strategies.engine import stats
    from strategies.base import AttentionUsage
    from strategies.full import FullStrategy

    usage = AttentionUsage()
    for engine_id in engine_ids:
        try:
            record = stats.read_stats(engine_id)
            stats.discard(engine_id)  # the request is over: its files are no longer needed
        except OSError:
            record = None
        if record:
            usage += AttentionUsage(**{k: float(record[k]) for k in usage.to_dict()})
    if usage.total > 0:
        return usage.attended_fraction, usage.decode_attended_fraction
    return (1.0, 1.0) if strategy == FullStrategy.name else (None, None)


def attention_report(choice: Any, engine_ids: list[str]) -> dict[str, Any]:
    """The `attention` object returned next to `usage`."""
    extra = choice.to_extra_args()
    overall, decode = read_attended_fractions(engine_ids, extra["strategy"])
    report = {"strategy": extra["strategy"], "params": extra.get("params", {})}
    if "budget" in extra:
        report["budget"] = extra["budget"]
    return report | {"attended_fraction": overall, "decode_attended_fraction": decode}
