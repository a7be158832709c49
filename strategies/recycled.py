"""``recycled``: Recycled Attention (Xu et al. 2024, carriex/recycled-attention).

Every ``stride`` decode steps of a request is a full step: dense attention that also returns, per KV
head, the attention mass of every token summed over the group's query heads; the top ``k`` tokens by
mass are kept per layer and KV head (``ops.topk_from_mass``). The steps in between attend to those plus
the tokens generated since that layer's last full step. The whole KV cache is kept (no memory saving).

Dynamic refresh (the paper's dynamic variant): the query is per layer, so the decision is per layer
from that layer's query: when cosine(q, q at the layer's last full step) < ``refresh_threshold`` (the
query heads flattened into one vector), that layer does a full step now and re-selects; the request's
stride schedule is unchanged. It is off by default: on the embedded model a threshold of 0.8 refreshed
about half of all (layer, step) pairs, costing more than dense attention. Prefill is dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from strategies.base import (Budget, RowGroup, StepCount, StepRows, Strategy, StrategyParams, dense_indices,
                             param, resolve_budget, split_rows)
from strategies.full import run_prefill
from strategies.registry import register


@dataclass(frozen=True)
class Params(StrategyParams):
    k: Budget = param(2048, doc="tokens kept per layer and KV head at each full step: a count, or a "
                                "fraction (0, 1] of the context")
    stride: int = param(16, minimum=1, maximum=4096, doc="a full-attention step every `stride` decode steps")
    refresh_threshold: Optional[float] = param(
        None, minimum=0.0, maximum=1.0,
        doc="dynamic refresh (optional; the paper's dynamic variant uses 0.8): a layer does a full step "
            "when cosine(query, query at its last full step) falls below this; null or 0 disables")


@dataclass
class RecycledState:
    """Per request. Lists are per layer."""
    step: int = 0                                   # decode steps since the last scheduled full step
    sel_idx: dict[int, Tensor] = field(default_factory=dict)   # layer -> int32 [Hkv, n_sel] ascending
    full_len: dict[int, int] = field(default_factory=dict)     # layer -> KV length at its last full step
    q_full: dict[int, Tensor] = field(default_factory=dict)    # layer -> fp32 [Hq * D]
    full_steps: int = 0                             # scheduled full steps so far
    refreshes: int = 0                              # (layer, step) refreshes by the cosine rule


@dataclass
class RecycledPlan:
    decode: Optional[RowGroup]
    prefill: Optional[RowGroup]
    states: list[RecycledState]     # per decode row
    scheduled_full: list[bool]      # per decode row
    k: list[int]                    # per decode row: resolved budget at this step's KV length
    thresholds: list[float]         # per decode row; 0 = no refresh
    strides: list[int]              # per decode row
    count: StepCount
    dense: Optional[tuple[Tensor, Tensor]] = None   # all tokens (token_idx, num_idx), built on first full step


@register
class RecycledStrategy(Strategy):
    name = "recycled"
    Params = Params
    description = ("Recycled Attention: every `stride` decode steps a full step picks the top-k tokens per "
                   "layer and KV head by attention mass; the steps between attend to those plus the new tokens.")
    dense_prefill = True

    def __init__(self, model):
        super().__init__(model)
        self.states: dict[str, RecycledState] = {}

    def plan(self, rows: StepRows) -> RecycledPlan:
        decode, prefill = split_rows(rows)
        count = self.new_count(rows)
        states, scheduled, ks, thresholds, strides = [], [], [], [], []
        if decode is not None:
            for i in decode.rows:
                state = self.states.setdefault(rows.request_ids[i], RecycledState())
                p = rows.params[i]
                states.append(state)
                scheduled.append(state.step == 0)
                ks.append(resolve_budget(p.k, rows.seq_lens_cpu[i]))
                thresholds.append(p.refresh_threshold or 0.0)
                strides.append(p.stride)
        if prefill is not None:
            count.attended.index_add_(0, prefill.rows_t, torch.tensor(
                [count.total[i] * self.model.num_layers for i in prefill.rows], dtype=torch.float64,
                device=rows.device))
        return RecycledPlan(decode, prefill, states, scheduled, ks, thresholds, strides, count)

    def _refresh_rows(self, layer: int, q: Tensor, plan: RecycledPlan, candidates: list[int]) -> list[int]:
        """Rows (of the decode group) whose query drifted from the one at the layer's last full step."""
        if not candidates:
            return []
        at = torch.tensor(candidates, dtype=torch.int64, device=q.device)
        now = q.index_select(0, at).float().flatten(1)
        then = torch.stack([plan.states[j].q_full[layer] for j in candidates])
        cosine = F.cosine_similarity(now, then, dim=1).tolist()
        return [j for j, c in zip(candidates, cosine) if c < plan.thresholds[j]]

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: RecycledPlan,
            out: Tensor) -> None:
        from strategies import ops
        if plan.prefill is not None:
            run_prefill(self, plan.prefill, query, key_cache, value_cache, out)
        group = plan.decode
        if group is None:
            return
        q = group.gather(query)                       # [B, Hq, D]
        full = [j for j, s in enumerate(plan.states) if plan.scheduled_full[j] or layer not in s.sel_idx]
        scheduled = set(full)
        candidates = [j for j, s in enumerate(plan.states)
                      if j not in scheduled and plan.thresholds[j] > 0 and layer in s.q_full]
        refreshed = self._refresh_rows(layer, q, plan, candidates)
        for j in refreshed:
            plan.states[j].refreshes += 1
        full = sorted(full + refreshed)
        full_set = set(full)
        sparse = [j for j in range(len(plan.states)) if j not in full_set]

        result = torch.empty_like(q) if full else None
        # full steps: dense attention with mass, then re-select per distinct k
        if full:
            at = torch.tensor(full, dtype=torch.int64, device=q.device)
            bt = group.block_table.index_select(0, at)
            if plan.dense is None:
                plan.dense = dense_indices(group.seq_lens_cpu, self.model.num_kv_heads, q.device)
            idx, num = plan.dense[0].index_select(0, at), plan.dense[1].index_select(0, at)
            qf = q.index_select(0, at)
            o, mass = ops.sparse_paged_attention(qf, key_cache, value_cache, bt, idx, num, self.scale, True)
            result.index_copy_(0, at, o)
            for k in sorted({plan.k[j] for j in full}):
                sub = [n for n, j in enumerate(full) if plan.k[j] == k]
                sub_t = torch.tensor(sub, dtype=torch.int64, device=q.device)
                sel_idx, sel_num = ops.topk_from_mass(mass.index_select(0, sub_t), idx.index_select(0, sub_t),
                                                      num.index_select(0, sub_t), k)
                n_sel = sel_num[:, 0].tolist()        # the same for every KV head: min(k, seq_len)
                for r, n in enumerate(sub):
                    j = full[n]
                    state = plan.states[j]
                    state.sel_idx[layer] = sel_idx[r, :, :n_sel[r]].clone()
                    state.full_len[layer] = group.seq_lens_cpu[j]
                    state.q_full[layer] = qf[n].float().flatten().clone()
            for j in full:
                plan.count.add_host(group.rows[j], float(group.seq_lens_cpu[j]))

        # sparse steps: the selection + tokens [full_len, seq_len)
        if sparse:
            hkv = self.model.num_kv_heads
            parts = []
            for j in sparse:
                state = plan.states[j]
                fresh = torch.arange(state.full_len[layer], group.seq_lens_cpu[j], dtype=torch.int32,
                                     device=q.device).expand(hkv, -1)
                parts.append(torch.cat([state.sel_idx[layer], fresh], dim=1))      # [Hkv, n_sel + n_new]
            counts = [p.shape[1] for p in parts]
            if len(parts) == 1:
                idx = parts[0][None]
            else:
                idx = torch.zeros(len(sparse), hkv, max(counts), dtype=torch.int32, device=q.device)
                for r, p in enumerate(parts):
                    idx[r, :, :counts[r]] = p
            num = torch.tensor(counts, dtype=torch.int32, device=q.device)[:, None].expand(-1, hkv).contiguous()
            if len(sparse) == len(plan.states):       # every row sparse (the usual case): no gather
                o, _ = ops.sparse_paged_attention(q, key_cache, value_cache, group.block_table, idx, num,
                                                  self.scale, False)
                result = o
            else:
                at = torch.tensor(sparse, dtype=torch.int64, device=q.device)
                o, _ = ops.sparse_paged_attention(q.index_select(0, at), key_cache, value_cache,
                                                  group.block_table.index_select(0, at), idx, num, self.scale,
                                                  False)
                result.index_copy_(0, at, o)
            for r, j in enumerate(sparse):
                plan.count.add_host(group.rows[j], float(counts[r]))
        group.scatter(out, result)

    def finish_step(self, plan: RecycledPlan) -> None:
        for state, scheduled, stride in zip(plan.states, plan.scheduled_full, plan.strides):
            state.full_steps += int(scheduled)
            state.step = (state.step + 1) % stride
        super().finish_step(plan)

    def reset(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def state(self, request_id: str) -> Optional[RecycledState]:
        return self.states.get(request_id)
