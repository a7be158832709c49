"""``every_nth``: decode attends every ``stride``-th block of ``block_size`` tokens, counted from the first,
plus the newest block (the one holding the current token); prefill is dense. A toy that shows the whole
contract of a third-party strategy: params, a budget mapping and its inverse, plan once per step, ops per
layer. It uses attnserve's ops; a package may register its own torch ops instead."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from strategies.base import ModelFacts, StepRows, Strategy, StrategyParams, budget_tokens, param, split_rows
from strategies.full import IndexedPlan, run_indexed
from strategies.registry import register


@dataclass(frozen=True)
class Params(StrategyParams):
    stride: float = param(4.0, minimum=1.0, maximum=1 << 20,
                          doc="attend blocks ceil(j * stride), j = 0, 1, ... (1: every block; may be fractional)")
    block_size: int = param(64, minimum=1, maximum=4096, doc="tokens a block")

    def with_stride(self, stride: float) -> "Params":
        return dataclasses.replace(self, stride=stride)


def kept_tokens(seq_len: int, params: Params) -> Tensor:
    """int32 [n]: the positions a query at ``seq_len - 1`` reads, ascending: its strided blocks and the newest."""
    num_blocks = math.ceil(seq_len / params.block_size)
    kept = torch.zeros(num_blocks, dtype=torch.bool)
    strided = torch.arange(math.floor((num_blocks - 1) / params.stride) + 1, dtype=torch.float64) * params.stride
    kept[strided.ceil().long().clamp(max=num_blocks - 1)] = True
    kept[-1] = True
    position = torch.arange(seq_len, dtype=torch.int32)
    return position[kept[position // params.block_size]]


@register
class EveryNthStrategy(Strategy):
    name = "every_nth"
    Params = Params
    description = "Every stride-th KV block plus the newest one at decode; dense prefill (a plugin example)."
    dense_prefill = True
    budget_param = "stride"

    @classmethod
    def params_for_budget(cls, params: Params, budget, context_len: int, model: Optional[ModelFacts]) -> Params:
        """The densest stride (num_blocks - 1) / m whose tokens fit the budget: a binary search over m."""
        num_blocks = math.ceil((context_len + 1) / params.block_size)
        allowed = budget_tokens(budget, context_len)
        if num_blocks <= 1 or len(kept_tokens(context_len + 1, params.with_stride(1.0))) <= allowed:
            return params.with_stride(1.0)
        low, high = 0, num_blocks - 1       # m = 0: the first block and the newest only
        while low < high:
            m = (low + high + 1) // 2
            if len(kept_tokens(context_len + 1, params.with_stride((num_blocks - 1) / m))) <= allowed:
                low = m
            else:
                high = m - 1
        return params.with_stride((num_blocks - 1) / low if low else float(num_blocks))

    @classmethod
    def decode_share(cls, params: Params, context_len: int, model: ModelFacts) -> float:
        return min(1.0, len(kept_tokens(context_len + 1, params)) / max(int(context_len), 1))

    def plan(self, rows: StepRows) -> IndexedPlan:
        decode, prefill = split_rows(rows)
        count = self.new_count(rows)
        idx = num = None
        if decode is not None:
            kept = [kept_tokens(rows.seq_lens_cpu[i], rows.params[i]) for i in decode.rows]
            idx = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True)
            num = torch.tensor([len(k) for k in kept], dtype=torch.int32)
            hkv = self.model.num_kv_heads
            idx = idx[:, None, :].expand(-1, hkv, -1).contiguous().to(rows.device)
            num = num[:, None].expand(-1, hkv).contiguous().to(rows.device)
            self.count_attended(count, decode, num * self.model.routed_layers)
        if prefill is not None:     # only where vLLM does not run it densely (e.g. the strategy tests)
            dense = torch.tensor([count.total[i] for i in prefill.rows], dtype=torch.float64, device=rows.device)
            count.attended.index_add_(0, prefill.rows_t, dense * self.model.routed_layers)
        return IndexedPlan(decode, prefill, idx, num, count)

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: IndexedPlan,
            out: Tensor) -> None:
        run_indexed(self, query, key_cache, value_cache, plan, out)     # attnserve's ops, as `full` runs them
