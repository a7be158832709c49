"""The strategy interface, the params base class and the per-step description of a strategy's rows.

Contracts: docs/design.md sections 2 and 3. A strategy file declares a frozen ``Params`` dataclass whose
fields are built with :func:`param`; the metadata drives validation (``__post_init__``), ``from_dict``
and ``describe``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor


class ParamError(ValueError):
    """A request field is invalid. ``field`` is the dotted path, ``message`` says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def under(self, prefix: str) -> "ParamError":
        """The same error with ``prefix.`` in front of the field path."""
        return ParamError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


class Budget:
    """Annotation marker for a budget field: a JSON integer >= 1 is a token (or block) count, a JSON
    float in (0, 1] is a fraction of the current context. Values stay plain ``int`` / ``float``."""


_UNSET = object()


def param(default: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
          choices: Optional[tuple] = None, doc: str = "") -> Any:
    """A params field with validation metadata (min/max are inclusive; for a Budget they bound the
    integer form)."""
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


def budget_tokens(budget: Union[int, float], context_len: int) -> float:
    """A request's ``attention.budget`` as KV tokens per decode step over a ``context_len``-token context."""
    return budget * max(int(context_len), 1) if isinstance(budget, float) else float(budget)


def resolve_budget(value: Union[int, float], context_len: int) -> int:
    """A budget as a count in [1, context_len]: an int is a count, a float in (0, 1] a fraction."""
    context_len = max(int(context_len), 1)
    if isinstance(value, float):
        count = math.ceil(value * context_len)
    else:
        count = int(value)
    return min(max(count, 1), context_len)


def _type_name(kind: Any) -> str:
    return {int: "integer", float: "number", bool: "boolean", str: "string", Budget: "budget"}[kind]


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, nullable) of ``X`` / ``Optional[X]`` / ``X | None``."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported params annotation {hint!r}")
        return args[0], True
    return hint, False


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: Any            # int | float | bool | str | Budget
    nullable: bool
    default: Any
    minimum: Optional[float]
    maximum: Optional[float]
    choices: Optional[tuple]
    doc: str

    def allowed(self) -> str:
        """What values are allowed, in words (used in error messages)."""
        if self.choices is not None:
            text = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        elif self.kind is Budget:
            lo = 1 if self.minimum is None else int(self.minimum)
            hi = "" if self.maximum is None else f" and <= {int(self.maximum)}"
            text = f"an integer count >= {lo}{hi}, or a fraction (a number in (0, 1])"
        else:
            text = "an " + _type_name(self.kind) if self.kind is int else "a " + _type_name(self.kind)
            if self.minimum is not None and self.maximum is not None:
                text += f" in [{self.minimum}, {self.maximum}]"
            elif self.minimum is not None:
                text += f" >= {self.minimum}"
            elif self.maximum is not None:
                text += f" <= {self.maximum}"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any) -> Any:
        """The validated (normalised) value; raises ParamError(self.name, ...)."""
        if value is None:
            if self.nullable:
                return None
            raise ParamError(self.name, f"must not be null; expected {self.allowed()}")
        kind = self.kind
        if kind is bool:
            if not isinstance(value, bool):
                raise ParamError(self.name, f"expected a boolean (true/false), got {_json_type(value)}")
        elif kind is str:
            if not isinstance(value, str):
                raise ParamError(self.name, f"expected a string, got {_json_type(value)}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(self.name, f"expected an integer, got {_json_type(value)}; allowed: {self.allowed()}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ParamError(self.name, f"expected a finite number, got {_json_type(value)}; allowed: {self.allowed()}")
            value = float(value)
        elif kind is Budget:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(self.name, f"expected {self.allowed()}, got {_json_type(value)}")
            if isinstance(value, float):
                if not (0.0 < value <= 1.0):
                    raise ParamError(self.name, f"a fractional budget must be in (0, 1], got {value}; "
                                                f"use an integer for a count; allowed: {self.allowed()}")
                return value
            lo = 1 if self.minimum is None else self.minimum
            if value < lo or (self.maximum is not None and value > self.maximum):
                raise ParamError(self.name, f"out of range: {value}; allowed: {self.allowed()}")
            return value
        if self.choices is not None and value not in self.choices:
            raise ParamError(self.name, f"{json.dumps(value)} is not allowed; allowed: {self.allowed()}")
        if kind in (int, float):
            if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
                raise ParamError(self.name, f"out of range: {value}; allowed: {self.allowed()}")
        return value

    def describe(self) -> dict:
        return {"name": self.name, "type": _type_name(self.kind), "nullable": self.nullable,
                "default": self.default, "minimum": self.minimum, "maximum": self.maximum,
                "choices": list(self.choices) if self.choices is not None else None,
                "description": self.doc}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True)
class StrategyParams:
    """Base of every strategy's ``Params``. Subclasses: ``@dataclass(frozen=True)`` with :func:`param`
    fields; cross-field rules go in ``check()`` (raise ParamError naming the field)."""

    def __post_init__(self) -> None:
        for spec in self.specs():
            object.__setattr__(self, spec.name, spec.check(getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Cross-field validation; override when needed."""

    @classmethod
    def specs(cls) -> tuple[ParamSpec, ...]:
        cached = cls.__dict__.get("_specs_cache")
        if cached is not None:
            return cached
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            kind, nullable = _split_optional(hints[f.name])
            specs.append(ParamSpec(name=f.name, kind=kind, nullable=nullable, default=f.default,
                                   minimum=f.metadata.get("minimum"), maximum=f.metadata.get("maximum"),
                                   choices=f.metadata.get("choices"), doc=f.metadata.get("doc", "")))
        specs = tuple(specs)
        type.__setattr__(cls, "_specs_cache", specs)
        return specs

    @classmethod
    def from_dict(cls, data: Any, field: str = "params") -> "StrategyParams":
        """Validated params from a JSON object; errors name ``field.<param>``."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ParamError(field, f"expected an object of params, got {_json_type(data)}")
        names = [s.name for s in cls.specs()]
        for key in data:
            if key not in names:
                valid = ", ".join(names) if names else "(none: this strategy takes no params)"
                raise ParamError(f"{field}.{key}" if field else str(key), f"unknown param; valid params: {valid}")
        try:
            return cls(**data)
        except ParamError as e:
            raise e.under(field) from None

    def to_dict(self) -> dict:
        """JSON-safe values (round-trips through from_dict)."""
        return {s.name: getattr(self, s.name) for s in self.specs()}

    @classmethod
    def describe(cls) -> list[dict]:
        """The params schema, for GET /v1/strategies."""
        return [s.describe() for s in cls.specs()]


@dataclass(frozen=True)
class ModelFacts:
    """From vLLM's config in the worker; from the model config in tests and in the API process.

    In a worker of a parallel engine the head counts are this tensor-parallel rank's share (heads
    ``[tp_rank * num_q_heads, (tp_rank + 1) * num_q_heads)`` of the model's) and ``layers`` is the
    pipeline stage's range of layer indices; ``num_layers`` is always the whole model's."""
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    kv_block_size: int          # vLLM page size (128 on CPU)
    max_model_len: int
    dtype: torch.dtype
    model_id: str
    tp_rank: int = 0
    tp_size: int = 1
    layers: Optional[tuple[int, int]] = None    # [first, end) run here; None: all of them
    # The softmax scale vLLM's attention layers use (Gemma: query_pre_attn_scalar ** -0.5); None: head_size ** -0.5
    scale: Optional[float] = None
    # Layers with a sliding window (Gemma 2/3, ...): the strategies leave them to vLLM's own kernel, which
    # applies the window (a query at position p sees keys p - sliding_window < pos <= p); indices of the model
    window_layers: tuple[int, ...] = ()
    sliding_window: int = -1

    @property
    def attention_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_size ** -0.5

    def is_window_layer(self, layer: int) -> bool:
        return layer in self.window_layers

    @property
    def local_window_layers(self) -> int:
        """Sliding-window layers this worker runs (vLLM's kernel runs them for every request)."""
        first, end = self.layer_range
        return sum(1 for layer in self.window_layers if first <= layer < end)

    @property
    def model_routed_layers(self) -> int:
        """Layers of the whole model without a window (those a request's strategy attends on)."""
        return self.routed_layers_below(self.num_layers)

    def routed_layers_below(self, end: int) -> int:
        """Layers without a window among the model's first ``end``."""
        return sum(1 for layer in range(min(end, self.num_layers)) if layer not in self.window_layers)

    @property
    def routed_layers(self) -> int:
        """Layers this worker runs where a request's strategy attends (the layers without a window)."""
        return self.local_layers - self.local_window_layers

    @property
    def last_routed_layer(self) -> Optional[int]:
        """The last layer of this worker's range without a window (None: every layer has one)."""
        first, end = self.layer_range
        routed = [layer for layer in range(first, end) if layer not in self.window_layers]
        return routed[-1] if routed else None

    def window_step_pairs(self, query_len: int, seq_len: int) -> float:
        """(query, key) pairs a sliding-window layer attends in a step of ``query_len`` new tokens
        ending at ``seq_len``: each query at position p sees min(p + 1, sliding_window) keys."""
        if self.sliding_window <= 0:
            return step_pairs(query_len, seq_len)
        return float(window_pairs(seq_len - query_len, seq_len, self.sliding_window))

    def dense_step_attended(self, query_len: int, seq_len: int) -> float:
        """Attended pairs of a dense step, a mean over this worker's layers: every pair on the layers
        without a window, the window's on the others."""
        pairs = step_pairs(query_len, seq_len)
        n_window = self.local_window_layers
        if not n_window:
            return pairs
        return (self.routed_layers * pairs + n_window * self.window_step_pairs(query_len, seq_len)) / self.local_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over this worker's layers and KV heads, in the model's dtype."""
        return 2 * self.num_kv_heads * self.head_size * self.dtype.itemsize * self.local_layers

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def layer_range(self) -> tuple[int, int]:
        return self.layers if self.layers is not None else (0, self.num_layers)

    def whole_model(self) -> "ModelFacts":
        """The same facts for the whole model (all heads, all layers), as a gate file describes it.
        Tensor parallelism splits the KV heads evenly (vLLM replicates them only when there are fewer
        KV heads than ranks, which strategies needing whole groups refuse)."""
        return dataclasses.replace(self, num_q_heads=self.num_q_heads * self.tp_size,
                                   num_kv_heads=self.num_kv_heads * self.tp_size, tp_rank=0, tp_size=1,
                                   layers=None)

    @property
    def local_layers(self) -> int:
        """Layers this worker runs: its per-request counts are means over these."""
        first, end = self.layer_range
        return end - first

    @classmethod
    def from_model_dir(cls, path: Union[str, Path], kv_block_size: int = 128,
                       dtype: torch.dtype = torch.bfloat16, model_id: Optional[str] = None) -> "ModelFacts":
        """From a Hugging Face model folder's config.json (Llama-style keys)."""
        path = Path(path).expanduser()
        cfg = json.loads((path / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        scale, window_layers, window = attention_facts_from_config(cfg)
        return cls(num_layers=cfg["num_hidden_layers"], num_q_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads", heads),
                   head_size=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   kv_block_size=kv_block_size, max_model_len=cfg.get("max_position_embeddings", 2048),
                   dtype=dtype, model_id=model_id or path.name,
                   scale=scale, window_layers=window_layers, sliding_window=window)


def attention_facts_from_config(cfg: dict) -> tuple[Optional[float], tuple[int, ...], int]:
    """(softmax scale or None for head_size ** -0.5, sliding-window layer indices, window or -1) from a
    Hugging Face config: Gemma's ``query_pre_attn_scalar``; ``layer_types`` (or Gemma's sliding-window
    pattern, or a window on every layer) for the windowed layers. In a worker vLLM's layers say it
    (``strategies.engine.backend.attention_layer_facts``)."""
    scalar = cfg.get("query_pre_attn_scalar")
    scale = None if scalar is None else float(scalar) ** -0.5
    window = cfg.get("sliding_window") or -1
    layers = cfg["num_hidden_layers"]
    window_layers: tuple[int, ...] = ()
    if window > 0:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
        if cfg.get("layer_types") is not None:
            window_layers = tuple(i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention")
        elif pattern:
            window_layers = tuple(i for i in range(layers) if (i + 1) % pattern)
        elif cfg.get("use_sliding_window", True):
            window_layers = tuple(range(layers))
    return scale, window_layers, window if window_layers else -1


@dataclass
class StepRows:
    """The rows of ONE strategy in this engine step; built once per step by the backend.

    Only the rows the strategy must compute (a backend may route dense prefill rows elsewhere when
    ``Strategy.dense_prefill``). ``query``/``out`` given to ``run`` are already gathered with
    ``token_index``: row ``i``'s tokens are ``query[query_start_loc[i]:query_start_loc[i+1]]``.
    """
    request_ids: list[str]
    params: list[StrategyParams]
    token_index: Tensor      # int64 [T_s]: which rows of the step's query tensor are these rows' tokens
    query_start_loc: Tensor  # int32 [n+1], into the gathered (token_index) query
    seq_lens: Tensor         # int32 [n]: KV length including this step's tokens
    context_lens: Tensor     # int32 [n]: KV length before this step (seq_lens - query lens)
    block_table: Tensor      # int32 [n, max_blocks]: vLLM physical block ids
    query_lens_cpu: list[int]   # python copies for planning without device syncs
    seq_lens_cpu: list[int]

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def device(self) -> torch.device:
        return self.block_table.device

    @classmethod
    def build(cls, request_ids: list[str], params: list[StrategyParams], query_lens: list[int],
              seq_lens: list[int], block_table: Tensor, token_index: Optional[Tensor] = None) -> "StepRows":
        """From python lengths; ``token_index`` defaults to the identity (rows already gathered)."""
        device = block_table.device
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        if token_index is None:
            token_index = torch.arange(starts[-1], dtype=torch.int64, device=device)
        seq = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        return cls(request_ids=list(request_ids), params=list(params), token_index=token_index,
                   query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
                   seq_lens=seq, context_lens=seq - torch.tensor(query_lens, dtype=torch.int32, device=device),
                   block_table=block_table.to(torch.int32), query_lens_cpu=list(query_lens),
                   seq_lens_cpu=list(seq_lens))


@dataclass
class RowGroup:
    """A subset of a step's rows handled by one op call (decode or prefill), layer-independent."""
    rows: list[int]            # indices into StepRows
    rows_t: Tensor             # int64 [n] same, on device
    tokens: Optional[Tensor]   # int64 [t]: positions in the gathered query; None = all of them, in order
    block_table: Tensor        # int32 [n, MB]
    seq_lens: Tensor           # int32 [n]
    seq_lens_cpu: list[int]
    query_start_loc: Tensor    # int32 [n+1] into the group's own gathered query
    context_lens_cpu: list[int]

    def gather(self, x: Tensor) -> Tensor:
        return x if self.tokens is None else x.index_select(0, self.tokens)

    def scatter(self, out: Tensor, values: Tensor) -> None:
        if self.tokens is None:
            out.copy_(values)
        else:
            out.index_copy_(0, self.tokens, values.to(out.dtype))


def row_group(rows: StepRows, sel: list[int]) -> Optional[RowGroup]:
    """A RowGroup for a subset of a step's rows (in the given order); None when empty."""
    if not sel:
        return None
    device = rows.device
    starts = [0]
    for q in rows.query_lens_cpu:
        starts.append(starts[-1] + q)
    everything = list(sel) == list(range(rows.num_rows))
    qsl = [0]
    for i in sel:
        qsl.append(qsl[-1] + rows.query_lens_cpu[i])
    rows_t = torch.tensor(sel, dtype=torch.int64, device=device)
    tokens = None
    if not everything:
        tokens = torch.cat([torch.arange(starts[i], starts[i + 1], dtype=torch.int64) for i in sel]).to(device)
    return RowGroup(
        rows=list(sel), rows_t=rows_t, tokens=tokens,
        block_table=rows.block_table if everything else rows.block_table.index_select(0, rows_t),
        seq_lens=rows.seq_lens if everything else rows.seq_lens.index_select(0, rows_t),
        seq_lens_cpu=[rows.seq_lens_cpu[i] for i in sel],
        query_start_loc=rows.query_start_loc if everything else torch.tensor(qsl, dtype=torch.int32, device=device),
        context_lens_cpu=[rows.seq_lens_cpu[i] - rows.query_lens_cpu[i] for i in sel])


def split_rows(rows: StepRows) -> tuple[Optional[RowGroup], Optional[RowGroup]]:
    """(decode rows: one query token each, prefill rows: several) of a step, built once per step."""
    decode = [i for i, q in enumerate(rows.query_lens_cpu) if q == 1]
    prefill = [i for i, q in enumerate(rows.query_lens_cpu) if q > 1]
    return row_group(rows, decode), row_group(rows, prefill)


def group_rows_by(rows: StepRows, group: RowGroup, key) -> list[tuple[object, RowGroup]]:
    """Split ``group`` by ``key(row index)`` (e.g. a resolved budget); one op call per distinct key."""
    by_key: dict = {}
    for i in group.rows:
        by_key.setdefault(key(i), []).append(i)
    if len(by_key) == 1:
        return [(next(iter(by_key)), group)]
    return [(k, row_group(rows, sel)) for k, sel in by_key.items()]


def dense_indices(seq_lens_cpu: list[int], num_kv_heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All logical tokens of each row: (token_idx int32 [B, Hkv, max_len], num_idx int32 [B, Hkv])."""
    longest = max(seq_lens_cpu) if seq_lens_cpu else 0
    idx = torch.arange(longest, dtype=torch.int32, device=device).expand(len(seq_lens_cpu), num_kv_heads, longest)
    num = torch.tensor(seq_lens_cpu, dtype=torch.int32, device=device)[:, None].expand(-1, num_kv_heads)
    return idx.contiguous(), num.contiguous()


def window_pairs(context_len: int, seq_len: int, window: int) -> int:
    """(query, key) pairs of a causal prefill of tokens [context_len, seq_len) under a sliding window:
    the query at position p sees min(p + 1, window) keys."""
    full_end = min(seq_len, max(context_len, window))          # queries p < window see p + 1 keys
    return causal_pairs(context_len, full_end) + (seq_len - full_end) * window


def causal_pairs(context_len: int, seq_len: int) -> int:
    """Number of (query, key) pairs of a causal prefill of tokens [context_len, seq_len)."""
    return sum(range(context_len + 1, seq_len + 1))


def step_pairs(query_len: int, seq_len: int) -> float:
    """(query, key) pairs of a dense step of ``query_len`` new tokens ending at ``seq_len``."""
    return float(seq_len) if query_len == 1 else float(causal_pairs(seq_len - query_len, seq_len))


def tensor_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# The server's bound on the strategies' own buffers (bytes, the whole model), for the workers: a buffer
# pool never grows past it (server/resources.py reserves the bytes of each request before it runs).
STATE_BYTES_LIMIT_ENV = "ATTNSERVE_STATE_BYTES_LIMIT"


def state_bytes_limit() -> Optional[int]:
    value = os.environ.get(STATE_BYTES_LIMIT_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass
class AttentionUsage:
    """Attended / total (query, key) pairs of one request, means over layers and KV heads: all its
    steps, and its decode steps alone (one query each) — the share a budget is about."""
    attended: float = 0.0
    total: float = 0.0
    decode_attended: float = 0.0
    decode_total: float = 0.0

    def add(self, attended: float, total: float, decode: bool) -> None:
        self.attended += attended
        self.total += total
        if decode:
            self.decode_attended += attended
            self.decode_total += total

    def __iadd__(self, other: "AttentionUsage") -> "AttentionUsage":
        for name in ("attended", "total", "decode_attended", "decode_total"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def attended_fraction(self) -> float:
        return self.attended / self.total if self.total else 1.0

    @property
    def decode_attended_fraction(self) -> Optional[float]:
        """None before the first decode step."""
        return self.decode_attended / self.decode_total if self.decode_total else None

    def to_dict(self) -> dict:
        return {"attended": self.attended, "total": self.total, "decode_attended": self.decode_attended,
                "decode_total": self.decode_total}


@dataclass
class StepCount:
    """Attended / total KV tokens of a step per row, summed into the strategy's stats at finish_step.

    ``attended`` accumulates per layer (a device tensor: no sync in the per-layer path); ``total`` is a
    per-row python number (the KV length for decode, the causal pairs for prefill)."""
    request_ids: list[str]
    total: list[float]
    attended: Tensor          # fp64 [n], summed over layers, mean over KV heads
    decode: list[bool] = field(default_factory=list)          # the row is a decode step (one query)
    attended_host: list[float] = field(default_factory=list)   # the same, for counts known in python

    def add_host(self, row: int, tokens: float) -> None:
        if not self.attended_host:
            self.attended_host = [0.0] * len(self.request_ids)
        self.attended_host[row] += tokens


class Strategy:
    """One attention strategy. One instance per worker (and per model); state keyed by request id."""

    name: ClassVar[str]
    Params: ClassVar[type[StrategyParams]]
    description: ClassVar[str]
    dense_prefill: ClassVar[bool] = True    # True: prefill rows may go to vLLM's own dense kernel
    releases_kv: ClassVar[bool] = False     # True: ``kept_kv`` says which KV it reads; the rest goes back to the pool
    budget_param: ClassVar[Optional[str]] = None   # the param a request's ``attention.budget`` sets; None: no budget

    def __init__(self, model: ModelFacts):
        self.model = model
        self.scale = model.attention_scale      # what vLLM's attention layers use (not always head_size ** -0.5)
        self.usage: dict[str, AttentionUsage] = {}

    # -- capability checks -------------------------------------------------------------------
    @classmethod
    def unsupported_reasons(cls, model: ModelFacts) -> list[str]:
        """Why this strategy cannot run on ``model`` ([] = it can)."""
        reasons = []
        if model.num_q_heads % model.num_kv_heads:
            reasons.append(f"{model.num_q_heads} query heads are not a multiple of {model.num_kv_heads} KV heads")
        return reasons

    @classmethod
    def check_budget(cls, params: StrategyParams, budget: Union[int, float], model: ModelFacts) -> None:
        """Request-time: raise ParamError("budget", ...) when ``params``' fixed parts alone attend more than a
        fractional ``budget`` (the prompt's length is not known yet: an integer budget below a strategy's
        minimum gets the minimum)."""

    @classmethod
    def params_for_budget(cls, params: StrategyParams, budget: Union[int, float], context_len: int,
                          model: Optional[ModelFacts]) -> StrategyParams:
        """``params`` with ``budget_param`` set so that a decode step over a ``context_len``-token context
        attends at most ``budget`` of it (a fraction) or ``budget`` tokens (an integer), counting every part
        the strategy attends (sinks, newest tokens, dense layers, full steps) and its block granularity;
        never below the strategy's minimum. Later steps see more context and the same count. ``model`` is
        None in vLLM's scheduler, where strategies that release KV (``releases_kv``) map their budget."""
        raise NotImplementedError(f"strategy {cls.name!r} takes no budget")

    @classmethod
    def decode_share(cls, params: StrategyParams, context_len: int, model: ModelFacts) -> float:
        """The share of a ``context_len``-token context one decode step attends under ``params``, averaged
        over the layers strategies route (a model's sliding-window layers attend their window for every
        strategy and are not counted) and over a cycle of steps: what ``params_for_budget`` inverts,
        counted from the params alone. NaN where it depends on the data (e.g. a threshold)."""
        return float("nan")

    @classmethod
    def prefills_densely(cls, params: StrategyParams) -> bool:
        """Whether a request with ``params`` has its prefill rows run by vLLM's own dense kernel (the
        strategy then acts at decode only); default: ``dense_prefill``."""
        return cls.dense_prefill

    @classmethod
    def kept_kv(cls, params: StrategyParams) -> Optional[tuple[int, int]]:
        """``(n_first, window)`` when a decode step reads only the first ``n_first`` tokens and the newest
        ``window`` ones, so the scheduler gives the blocks between them back to vLLM's pool (``releases_kv``;
        strategies/engine/kv_release.py); None (the default) when any token may be read again."""
        return None

    @classmethod
    def request_state_bytes(cls, params: StrategyParams, context_len: int, model: ModelFacts) -> int:
        """Bytes of this strategy's own buffers (outside vLLM's KV cache) that one request holds when its
        context reaches ``context_len`` tokens, over ``model``'s heads and layers: what the server reserves
        before the request runs (server/resources.py). 0 (the default): nothing that grows per request."""
        return 0

    def held_bytes(self) -> int:
        """Bytes of the tensors this strategy instance holds now (every request, this worker): /metrics."""
        return 0

    def free_idle(self) -> None:
        """No request of any strategy is left in this worker: free the buffers kept between requests (freeing
        them whenever this strategy alone has none would reallocate them all the time under a mixed load)."""

    @classmethod
    def validate_for_model(cls, params: StrategyParams, model: ModelFacts) -> None:
        """Request-time checks that need the model (e.g. seer's gates); raise ParamError
        with the field relative to the params object (the caller prefixes it)."""

    # -- per step ----------------------------------------------------------------------------
    def plan(self, rows: StepRows) -> object:
        raise NotImplementedError

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor,
            plan: object, out: Tensor) -> None:
        raise NotImplementedError

    def finish_step(self, plan: object) -> None:
        count: Optional[StepCount] = getattr(plan, "count", None)
        if count is None:
            return
        attended = count.attended.tolist()
        if count.attended_host:
            attended = [a + h for a, h in zip(attended, count.attended_host)]
        for rid, att, tot, decode in zip(count.request_ids, attended, count.total, count.decode):
            self.usage.setdefault(rid, AttentionUsage()).add(att / self.model.local_layers, tot, decode)

    def reset(self, request_id: str) -> None:
        """The request's KV was dropped and will be recomputed (vLLM preemption): forget state derived
        from it (selections, how far it was summarised), keep its stats."""

    def release(self, request_id: str) -> None:
        """Drop every piece of state of ``request_id`` (including its stats: read them first)."""
        self.reset(request_id)
        self.usage.pop(request_id, None)

    def stats(self, request_id: str) -> "AttentionUsage":
        """What this strategy attended for ``request_id`` so far (its own steps only)."""
        return self.usage.get(request_id, AttentionUsage())

    # -- helpers for subclasses --------------------------------------------------------------
    def new_count(self, rows: StepRows) -> StepCount:
        """A step's count. The sliding-window layers (vLLM's kernel, for every strategy) are counted here,
        in python: a strategy adds what it attends on the other layers (``routed_layers`` of them)."""
        total = [step_pairs(q, s) for q, s in zip(rows.query_lens_cpu, rows.seq_lens_cpu)]
        count = StepCount(request_ids=list(rows.request_ids), total=total,
                          attended=torch.zeros(rows.num_rows, dtype=torch.float64, device=rows.device),
                          decode=[q == 1 for q in rows.query_lens_cpu])
        n_window = self.model.local_window_layers
        if n_window:
            count.attended_host = [n_window * self.model.window_step_pairs(q, s)
                                   for q, s in zip(rows.query_lens_cpu, rows.seq_lens_cpu)]
        return count

    @staticmethod
    def count_attended(count: StepCount, group: RowGroup, num_idx: Tensor) -> None:
        """Add the mean over KV heads of ``num_idx`` [n, Hkv] of a group's rows."""
        count.attended.index_add_(0, group.rows_t, num_idx.to(torch.float64).mean(dim=1))
