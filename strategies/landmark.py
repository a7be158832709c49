"""``landmark``: query-aware chunk selection from per-chunk key summaries, training-free.

Landmark Attention (Mohtashami & Jaggi 2023) trains a landmark token per block; this is its
training-free relative Quest (Tang et al. 2024): every chunk of ``block_size`` tokens keeps the
per-channel min and max of its keys, and a decode query head scores chunk c by
sum_d max(q_d * max_d, q_d * min_d), an upper bound of q.k. Quest is per head (MHA); under GQA a KV head
keeps one set of chunks for its group of query heads, scored by the max of their bounds
(``group_score`` "max", the default) or their sum ("sum"). The max keeps the chunk one head needs: on
Gemma 3 270M (4 query heads per KV head), 8k, a true 1/8 budget, 12 natural texts, teacher-forced top-1
agreement with full went from 0.770 (sum; worst text 0.41) to 0.898 (max; worst 0.79) and the mean KL from
0.63 to 0.08 nats; the sum lost the texts that copy an earlier passage (docs/results-gemma3-fidelity.md).
Chunks of 8 tokens instead of 16 (the same budget in finer chunks, with tighter bounds) took it further on
the same texts: 2k / 4k / 8k top-1 0.837 / 0.816 / 0.896 -> 0.874 / 0.882 / 0.907, KL under 0.1 at each
(a request param; the default stays 16: at 8k batch 8 on the embedded model chunks of 8 decoded 2.45x
faster than full against 3.04x, docs/benchmarks.md). The top
``k_blocks`` chunks plus the first and the newest are attended; the first ``dense_layers`` layers
attend densely (Quest: 2). Default budget: 64 chunks x 16 tokens = 1024 tokens (+ first and newest
chunk), inside Quest's 512-4096 token budgets and sized for this project's 8k-position model.

Summaries live per *physical* KV block (``[num_blocks, Hkv, page // chunk, D]`` per layer; for a bf16 cache
on CPU int8 rows of D + 4 bytes, D steps of a per-row fp32 scale, kmin rounded down and kmax up so the
score stays an upper bound: ~1/30 of the KV cache at chunk 16; else fp32; allocated on first use), so they
stay right under prefix caching;
a request remembers only how far it has summarised, and each decode step summarises the tokens not
summarised yet (the whole prompt on its first decode step). Prefill is dense.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from strategies.base import (Budget, ModelFacts, ParamError, RowGroup, StepCount, StepRows, Strategy,
                             StrategyParams, budget_tokens, dense_indices, group_rows_by, param, resolve_budget,
                             split_rows, tensor_bytes)
from strategies.full import run_prefill
from strategies.reference import Q8_SCALE_BYTES
from strategies.registry import register


@dataclass(frozen=True)
class Params(StrategyParams):
    block_size: int = param(16, choices=(8, 16, 32, 64, 128), doc="tokens per chunk (Quest page: 16); "
                                                                  "capped at the KV page size")
    k_blocks: Budget = param(64, doc="chunks kept besides the first and the newest: a count, or a fraction "
                                     "(0, 1] of the context's chunks (64 x 16 = 1024 tokens, inside Quest's "
                                     "512-4096 token budgets)")
    dense_layers: int = param(2, minimum=0, maximum=1024, doc="the first layers attend densely (Quest: 2)")
    group_score: str = param("max", choices=("max", "sum"),
                             doc="a chunk's score for a KV head: the max of its query heads' bounds (one head's "
                                 "chunk is not outvoted) or their sum")


@dataclass
class LandmarkGroup:
    """Decode rows sharing (chunk, k_chunks, dense_layers, group_score)."""
    rows: RowGroup
    chunk: int
    k_chunks: int
    dense_layers: int
    group_max: bool
    start_pos: Tensor               # int32 [n]: first token not summarised yet
    dense_count: Tensor             # fp64 [n]: seq_len, what a dense layer attends
    dense_idx: Optional[Tensor]     # int32 [n, Hkv, max_len] when dense_layers > 0
    dense_num: Optional[Tensor]     # int32 [n, Hkv]


@dataclass
class LandmarkPlan:
    decode: list[LandmarkGroup]
    prefill: Optional[RowGroup]
    count: StepCount
    decode_rows: Optional[RowGroup]


def effective_chunk(block_size: int, page: int) -> int:
    """The chunk must divide the KV page: block_size capped to the page (both powers of two on vLLM)."""
    return math.gcd(block_size, page)


@register
class LandmarkStrategy(Strategy):
    name = "landmark"
    Params = Params
    description = ("Quest-style landmarks: per-chunk key min/max summaries bound q.k; the top k_blocks chunks "
                   "plus the first and newest are attended; the first dense_layers layers stay dense.")
    dense_prefill = True
    budget_param = "k_blocks"

    @staticmethod
    def dense_and_routed(params: Params, model: ModelFacts) -> tuple[int, int]:
        """(dense, all) layers landmark acts on: a model's sliding-window layers are vLLM's (Gemma 3's first
        layers are, so its ``dense_layers`` count only the routed layers among the first ones)."""
        return model.routed_layers_below(params.dense_layers), model.model_routed_layers

    @classmethod
    def check_budget(cls, params: Params, budget, model: ModelFacts) -> None:
        dense, layers = cls.dense_and_routed(params, model)
        if isinstance(budget, float) and budget * layers <= dense:
            raise ParamError("budget", f"landmark's {dense} dense layers of {layers} alone attend "
                                       f"{dense / layers:.4g} of the context; allowed: a larger budget "
                                       f"or fewer dense_layers")

    @classmethod
    def params_for_budget(cls, params: Params, budget, context_len: int, model: ModelFacts) -> Params:
        """Per decode step the first ``dense_layers`` layers attend the context and the others k_blocks
        chunks plus the first and the newest; averaged over layers that is at most the budget."""
        context = max(int(context_len), 1)
        dense, layers = cls.dense_and_routed(params, model)
        chunk = effective_chunk(params.block_size, model.kv_block_size)
        if dense >= layers:
            return params
        per_sparse_layer = (budget_tokens(budget, context) * layers - dense * context) / (layers - dense)
        return dataclasses.replace(params, k_blocks=max(1, int(per_sparse_layer // chunk) - 2))

    @classmethod
    def decode_share(cls, params: Params, context_len: int, model: ModelFacts) -> float:
        context = max(int(context_len), 1)
        dense, layers = cls.dense_and_routed(params, model)
        chunk = effective_chunk(params.block_size, model.kv_block_size)
        chunks = -(-context // chunk)
        newest = context - (chunks - 1) * chunk             # the newest chunk is partly filled
        kept = min(1.0, ((resolve_budget(params.k_blocks, chunks) + 1) * chunk + newest) / context)
        return (dense + (layers - dense) * kept) / layers

    def __init__(self, model):
        super().__init__(model)
        self.summarised: dict[str, int] = {}                      # request -> tokens summarised
        self.summaries: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}   # (chunk, layer) -> (kmin, kmax)

    def plan(self, rows: StepRows) -> LandmarkPlan:
        decode, prefill = split_rows(rows)
        count = self.new_count(rows)
        groups = []
        if prefill is not None:
            count.attended.index_add_(0, prefill.rows_t, torch.tensor(
                [count.total[i] * self.model.routed_layers for i in prefill.rows], dtype=torch.float64,
                device=rows.device))
            for i in prefill.rows:      # the KV may have been recomputed (preemption): re-summarise
                rid = rows.request_ids[i]
                if rid in self.summarised:
                    self.summarised[rid] = min(self.summarised[rid], rows.seq_lens_cpu[i] - rows.query_lens_cpu[i])
        if decode is not None:
            page = self.model.kv_block_size

            def key(i: int) -> tuple[int, int, int, bool]:
                p = rows.params[i]
                chunk = effective_chunk(p.block_size, page)
                n_chunks = -(-rows.seq_lens_cpu[i] // chunk)
                return chunk, resolve_budget(p.k_blocks, n_chunks), p.dense_layers, p.group_score == "max"

            for (chunk, k_chunks, dense_layers, group_max), group in group_rows_by(rows, decode, key):
                dense_idx, dense_num = (dense_indices(group.seq_lens_cpu, self.model.num_kv_heads, rows.device)
                                        if dense_layers > 0 else (None, None))
                start = [min(self.summarised.get(rows.request_ids[i], 0), rows.seq_lens_cpu[i] - 1)
                         for i in group.rows]
                groups.append(LandmarkGroup(
                    rows=group, chunk=chunk, k_chunks=k_chunks, dense_layers=dense_layers, group_max=group_max,
                    start_pos=torch.tensor(start, dtype=torch.int32, device=rows.device),
                    dense_count=torch.tensor(group.seq_lens_cpu, dtype=torch.float64, device=rows.device),
                    dense_idx=dense_idx, dense_num=dense_num))
        return LandmarkPlan(groups, prefill, count, decode)

    def _summaries(self, chunk: int, layer: int, key_cache: Tensor) -> tuple[Tensor, Tensor]:
        num_blocks, hkv, page, d = key_cache.shape
        # int8 summaries of a bf16 cache on CPU (rows of D int8 + an fp32 scale, ops.landmark_update_summaries):
        # each decode step reads every chunk's summary, a quarter of fp32's bytes is a faster step; fp32 elsewhere
        int8_rows = key_cache.dtype == torch.bfloat16 and key_cache.device.type == "cpu"
        dtype = torch.int8 if int8_rows else torch.float32
        found = self.summaries.get((chunk, layer))
        if found is None or found[0].shape[0] != num_blocks or found[0].device != key_cache.device \
                or found[0].dtype != dtype:
            shape = (num_blocks, hkv, page // chunk, d + Q8_SCALE_BYTES if int8_rows else d)
            found = (torch.zeros(shape, dtype=dtype, device=key_cache.device),
                     torch.zeros(shape, dtype=dtype, device=key_cache.device))
            self.summaries[(chunk, layer)] = found
        return found

    def select(self, layer: int, q: Tensor, key_cache: Tensor, group: LandmarkGroup) -> tuple[Tensor, Tensor]:
        """Summarise the new tokens and pick chunks: (token_idx [n, Hkv, K], num_idx [n, Hkv])."""
        from strategies import ops
        kmin, kmax = self._summaries(group.chunk, layer, key_cache)
        ops.landmark_update_summaries(key_cache, group.rows.block_table, group.start_pos, group.rows.seq_lens,
                                      group.chunk, kmin, kmax)
        return ops.landmark_select(q, kmin, kmax, group.rows.block_table, group.rows.seq_lens, group.chunk,
                                   group.k_chunks, group.group_max)

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: LandmarkPlan,
            out: Tensor) -> None:
        from strategies import ops
        if plan.prefill is not None:
            run_prefill(self, plan.prefill, query, key_cache, value_cache, out)
        for group in plan.decode:
            q = group.rows.gather(query)
            if layer < group.dense_layers:
                idx, num = group.dense_idx, group.dense_num
                plan.count.attended.index_add_(0, group.rows.rows_t, group.dense_count)
            else:
                idx, num = self.select(layer, q, key_cache, group)
                self.count_attended(plan.count, group.rows, num)
            o, _ = ops.sparse_paged_attention(q, key_cache, value_cache, group.rows.block_table, idx, num,
                                              self.scale, False)
            group.rows.scatter(out, o)

    def finish_step(self, plan: LandmarkPlan) -> None:
        if plan.decode_rows is not None:
            for group in plan.decode:
                for i, seq_len in zip(group.rows.rows, group.rows.seq_lens_cpu):
                    self.summarised[plan.count.request_ids[i]] = seq_len
        super().finish_step(plan)

    def held_bytes(self) -> int:
        return tensor_bytes(t for pair in self.summaries.values() for t in pair)

    def reset(self, request_id: str) -> None:
        self.summarised.pop(request_id, None)

    def free_idle(self) -> None:
        self.summaries.clear()      # sized by the KV cache; a new request summarises its tokens again
