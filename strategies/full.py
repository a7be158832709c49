"""``full``: dense attention, the control.

In vLLM the routing backend sends ``full`` rows to vLLM's own kernel; ``run`` here uses the dense path
of the ops (every index) so that it is the strategy-level reference for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from strategies.base import (RowGroup, StepCount, StepRows, Strategy, StrategyParams, dense_indices,
                             split_rows)
from strategies.registry import register


@dataclass(frozen=True)
class Params(StrategyParams):
    pass


@dataclass
class IndexedPlan:
    """Decode rows attend the KV tokens ``token_idx[b, h, :num_idx[b, h]]``; prefill rows are dense."""
    decode: Optional[RowGroup]
    prefill: Optional[RowGroup]
    token_idx: Optional[Tensor]      # int32 [B_decode, Hkv, K] (full: every token)
    num_idx: Optional[Tensor]        # int32 [B_decode, Hkv]
    count: StepCount


def plan_dense(strategy: Strategy, rows: StepRows) -> IndexedPlan:
    decode, prefill = split_rows(rows)
    idx = num = None
    if decode is not None:
        idx, num = dense_indices(decode.seq_lens_cpu, strategy.model.num_kv_heads, rows.device)
    count = strategy.new_count(rows)
    count.attended += count.attended.new_tensor(count.total) * strategy.model.routed_layers
    return IndexedPlan(decode, prefill, idx, num, count)


def run_indexed_decode(strategy: Strategy, group: RowGroup, query: Tensor, key_cache: Tensor,
                       value_cache: Tensor, token_idx: Tensor, num_idx: Tensor, out: Tensor) -> None:
    from strategies import ops
    o, _ = ops.sparse_paged_attention(group.gather(query), key_cache, value_cache, group.block_table,
                                      token_idx, num_idx, strategy.scale, False)
    group.scatter(out, o)


def run_prefill(strategy: Strategy, group: RowGroup, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                out: Tensor, n_sink: int = 0, window: int = -1, block_mask: Optional[Tensor] = None,
                mask_block: int = 1) -> None:
    from strategies import ops
    o = ops.paged_prefill_attention(group.gather(query), key_cache, value_cache, group.block_table,
                                    group.query_start_loc, group.seq_lens, strategy.scale, n_sink, window,
                                    block_mask, mask_block)
    group.scatter(out, o)


def run_indexed(strategy: Strategy, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: IndexedPlan,
                out: Tensor) -> None:
    """One layer of an IndexedPlan: the decode rows over their token indices, the prefill rows densely."""
    if plan.decode is not None:
        run_indexed_decode(strategy, plan.decode, query, key_cache, value_cache, plan.token_idx, plan.num_idx, out)
    if plan.prefill is not None:
        run_prefill(strategy, plan.prefill, query, key_cache, value_cache, out)


@register
class FullStrategy(Strategy):
    name = "full"
    Params = Params
    description = "Dense attention over the whole KV cache (the control)."
    dense_prefill = True

    @classmethod
    def decode_share(cls, params, context_len, model) -> float:
        return 1.0

    def plan(self, rows: StepRows) -> IndexedPlan:
        return plan_dense(self, rows)

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: IndexedPlan,
            out: Tensor) -> None:
        run_indexed(self, query, key_cache, value_cache, plan, out)
