"""``sink``: StreamingLLM (Xiao et al. 2023, mit-han-lab/streaming-llm): attend to the first ``n_sink``
tokens and the last ``window`` tokens (the current one included). Keys keep their original positions.

Re-assigning positions (StreamingLLM's "positions within the cache") is not supported: vLLM caches keys
*after* RoPE. Inside the window the relative distances are already those of re-assigned positions (the
window is contiguous), so re-assignment would change only the sink keys, which would need a rotation by
R(seq_len - n_sink - window) that varies per query and per step; with a post-RoPE cache that means a
second attention pass over the rotated sinks merged by log-sum-exp, which the ops do not expose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from strategies.base import (ModelFacts, ParamError, RowGroup, StepCount, StepRows, Strategy, StrategyParams,
                             budget_tokens, param, row_group, split_rows)
from strategies.full import run_prefill
from strategies.registry import register

REPOSITION_UNSUPPORTED = ("not supported: vLLM caches keys after RoPE; within the window relative "
                          "distances already equal StreamingLLM's re-assigned ones, and moving the sinks "
                          "would need a separately rotated attention pass merged by log-sum-exp, which the "
                          "ops do not provide; allowed: false")


@dataclass(frozen=True)
class Params(StrategyParams):
    n_sink: int = param(4, minimum=0, maximum=65536,
                        doc="initial tokens always attended (attention sinks; StreamingLLM: 4); covering the "
                            "system prompt (~50 tokens) kept far more answers on the embedded model")
    window: int = param(1020, minimum=1, maximum=1 << 20, doc="most recent tokens attended, the current one included")
    reposition: bool = param(False, doc="StreamingLLM position re-assignment inside the cache; "
                                         "unsupported with vLLM's post-RoPE cache (must be false)")

    def check(self) -> None:
        if self.reposition:
            raise ParamError("reposition", REPOSITION_UNSUPPORTED)


def sink_visible_pairs(context_len: int, seq_len: int, n_sink: int, window: int) -> int:
    """(query, key) pairs a sink+window causal prefill of tokens [context_len, seq_len) computes."""
    q = torch.arange(context_len, seq_len, dtype=torch.int64)
    in_window = torch.clamp(q + 1, max=window)
    sinks = torch.clamp(torch.clamp(q + 1 - window, min=0), max=n_sink)
    return int((in_window + sinks).sum())


@dataclass
class SinkPlan:
    decode: Optional[RowGroup]
    prefill: Optional[RowGroup]
    token_idx: Optional[Tensor]     # int32 [B_decode, Hkv, K]
    num_idx: Optional[Tensor]       # int32 [B_decode, Hkv]
    prefill_masks: list[tuple[RowGroup, int, int]]   # one (rows, n_sink, window) per distinct params
    count: StepCount


@register
class SinkStrategy(Strategy):
    name = "sink"
    Params = Params
    description = ("StreamingLLM: the first n_sink tokens plus a sliding window of the last `window` "
                   "tokens (keys keep their original positions).")
    dense_prefill = False
    releases_kv = True
    budget_param = "window"

    @classmethod
    def params_for_budget(cls, params: Params, budget, context_len: int, model: ModelFacts) -> Params:
        """n_sink + window tokens per decode step: the window is what the budget leaves after the sinks."""
        window = int(budget_tokens(budget, context_len)) - params.n_sink
        return dataclasses.replace(params, window=max(1, window))

    @classmethod
    def decode_share(cls, params: Params, context_len: int, model: ModelFacts) -> float:
        return min(1.0, (params.n_sink + params.window) / max(int(context_len), 1))

    @classmethod
    def kept_kv(cls, params: Params) -> tuple[int, int]:
        return int(params.n_sink), int(params.window)

    def plan(self, rows: StepRows) -> SinkPlan:
        decode, prefill = split_rows(rows)
        hkv = self.model.num_kv_heads
        count = self.new_count(rows)
        attended = [0.0] * rows.num_rows
        idx = num = None
        if decode is not None:
            seq = [rows.seq_lens_cpu[i] for i in decode.rows]
            start = [max(s - rows.params[i].window, 0) for s, i in zip(seq, decode.rows)]
            sinks = [min(rows.params[i].n_sink, b) for b, i in zip(start, decode.rows)]
            counts = [n + s - b for n, s, b in zip(sinks, seq, start)]
            for i, c in zip(decode.rows, counts):
                attended[i] = float(c)
            # row b attends [0, sinks_b) then [start_b, seq_b): column c -> c or start_b - sinks_b + c
            col = torch.arange(max(counts), dtype=torch.int32)[None, :]
            sinks_t = torch.tensor(sinks, dtype=torch.int32)[:, None]
            idx = torch.where(col < sinks_t, col, torch.tensor(start, dtype=torch.int32)[:, None] - sinks_t + col)
            idx = idx.masked_fill(col >= torch.tensor(counts, dtype=torch.int32)[:, None], 0)
            idx = idx[:, None, :].expand(-1, hkv, -1).contiguous().to(rows.device)
            num = torch.tensor(counts, dtype=torch.int32)[:, None].expand(-1, hkv).contiguous().to(rows.device)
        masks = []
        if prefill is not None:
            by_params: dict[tuple[int, int], list[int]] = {}
            for i in prefill.rows:
                p = rows.params[i]
                by_params.setdefault((p.n_sink, p.window), []).append(i)
                attended[i] = float(sink_visible_pairs(rows.seq_lens_cpu[i] - rows.query_lens_cpu[i],
                                                       rows.seq_lens_cpu[i], p.n_sink, p.window))
            if len(by_params) == 1:
                (n_sink, window), = by_params
                masks.append((prefill, n_sink, window))
            else:
                masks.extend((row_group(rows, sel), n_sink, window) for (n_sink, window), sel in by_params.items())
        count.attended += torch.tensor(attended, dtype=torch.float64, device=rows.device) * self.model.routed_layers
        return SinkPlan(decode, prefill, idx, num, masks, count)

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: SinkPlan,
            out: Tensor) -> None:
        from strategies import ops
        if plan.decode is not None:
            o, _ = ops.sparse_paged_attention(plan.decode.gather(query), key_cache, value_cache,
                                              plan.decode.block_table, plan.token_idx, plan.num_idx,
                                              self.scale, False)
            plan.decode.scatter(out, o)
        for group, n_sink, window in plan.prefill_masks:
            run_prefill(self, group, query, key_cache, value_cache, out, n_sink=n_sink, window=window)

