"""``recycled``: Recycled Attention (Xu et al. 2024, carriex/recycled-attention).

Every ``stride`` decode steps of a request is a full step: dense attention that also returns, per KV
head, the attention mass of every token summed over the group's query heads; the top ``k`` tokens by
mass are kept per layer and KV head (``ops.topk_from_mass``). The steps in between attend to those plus
the tokens generated since that layer's last full step. The whole KV cache is kept (no memory saving).

As in the paper, the kept tokens' K and V are copied once per full step into a compact per-request
buffer (the "recycled" cache, ``ops.gather_kv``), and each step in between appends its new token there:
those steps read one contiguous buffer instead of scattered tokens of vLLM's paged cache (whose CPU K
layout is token-contiguous per page, so a lone token costs a cache line per head dim). The buffers are
pages of a per-layer pool owned by this strategy: about k + stride tokens per request, layer and KV
head (1/8 of the KV cache at k = 1/8), returned when the request ends. The server reserves a request's
pages before it runs, within its bound (``--strategy-memory-gib``, server/resources.py); the pool never grows
past that bound, shrinks when at most a quarter of it is in use and is freed when the worker has no request left.

``follow`` (beyond the paper; 0, the paper's top-k, by default): a head that copies an earlier passage
attends token p at the full step and p+1, p+2, ... at the steps after it, which a top-k of the full
step's mass does not hold. With ``follow`` f the k / (f + 1) heaviest tokens and the f tokens after
each are kept, the rest of k by mass. Gemma 3 270M, 8k, a 1/8 budget (stride 16), 12 natural texts
(docs/results-gemma3-fidelity.md): f = 15 took teacher-forced top-1 agreement with full from 0.761 to
0.845 and the mean KL from 0.57 to 0.18 nats; on the texts that copy, 0.64 -> 0.93; the prose was unchanged.

Dynamic refresh (the paper's dynamic variant): the query is per layer, so the decision is per layer
from that layer's query: when cosine(q, q at the layer's last full step) < ``refresh_threshold`` (the
query heads flattened into one vector), that layer does a full step now and re-selects; the request's
stride schedule is unchanged. It is off by default: on the embedded model a threshold of 0.8 refreshed
about half of all (layer, step) pairs, costing more than dense attention. Prefill is dense.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from strategies.base import (Budget, ModelFacts, ParamError, RowGroup, StepCount, StepRows, Strategy, StrategyParams,
                             budget_tokens, dense_indices, param, resolve_budget, split_rows, state_bytes_limit,
                             tensor_bytes)
from strategies.full import run_prefill
from strategies.registry import register


@dataclass(frozen=True)
class Params(StrategyParams):
    k: Budget = param(2048, doc="tokens kept per layer and KV head at each full step: a count, or a "
                                "fraction (0, 1] of the context")
    stride: int = param(16, minimum=1, maximum=4096, doc="a full-attention step every `stride` decode steps")
    follow: int = param(0, minimum=0, maximum=256,
                        doc="keep the `follow` tokens after each of the k / (follow + 1) heaviest tokens, "
                            "the rest of k by mass: a head copying from token p at the full step reads p+1, "
                            "p+2, ... at the steps after it; 0: the paper's top-k")
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
    pages: list[int] = field(default_factory=list)  # recycled-KV pool pages held (the same in every layer)
    buffer_len: dict[int, int] = field(default_factory=dict)   # layer -> tokens in its recycled buffer
    buffer_upto: dict[int, int] = field(default_factory=dict)  # layer -> KV length the buffer covers


@dataclass
class RecycledPlan:
    decode: Optional[RowGroup]
    prefill: Optional[RowGroup]
    states: list[RecycledState]     # per decode row
    scheduled_full: list[bool]      # per decode row
    k: list[int]                    # per decode row: resolved budget at this step's KV length
    follow: list[int]               # per decode row
    thresholds: list[float]         # per decode row; 0 = no refresh
    strides: list[int]              # per decode row
    count: StepCount
    pool_table: Optional[Tensor] = None             # int32 [n, pages]: each decode row's recycled-KV pages
    dense: Optional[tuple[Tensor, Tensor]] = None   # all tokens (token_idx, num_idx), built on first full step
    positions: dict[tuple[int, int], Tensor] = field(default_factory=dict)   # (rows, len) -> arange idx


KEPT_FIRST = 1e30       # above any attention mass (a sum of probabilities over a group's query heads)


def keep_followers(mass: Tensor, num_idx: Tensor, k: int, follow: int) -> Tensor:
    """``mass`` [B, Hkv, L] (token i at position i) with the k // (follow + 1) heaviest tokens of each row
    and KV head and the ``follow`` tokens after each (up to the row's last, ``num_idx`` - 1) raised above
    every mass, so that a top-k keeps them first and fills the rest of k by mass (``follow`` is capped at
    k - 1: at least the heaviest token and what follows it fit)."""
    follow = min(follow, k - 1)
    if follow <= 0:
        return mass
    anchors = min(max(1, k // (follow + 1)), mass.shape[-1])
    top = mass.topk(anchors, dim=-1).indices                                          # [B, Hkv, a]
    chosen = (top.unsqueeze(-1) + torch.arange(follow + 1, device=mass.device)).flatten(-2)
    chosen = torch.minimum(chosen, (num_idx.long() - 1).clamp(min=0).unsqueeze(-1))  # [B, Hkv, a * (f + 1)]
    return mass.scatter(-1, chosen, KEPT_FIRST)


@register
class RecycledStrategy(Strategy):
    name = "recycled"
    Params = Params
    description = ("Recycled Attention: every `stride` decode steps a full step picks the top-k tokens per "
                   "layer and KV head by attention mass; the steps between attend to those plus the new tokens.")
    dense_prefill = True
    budget_param = "k"

    @classmethod
    def check_budget(cls, params: Params, budget, model: ModelFacts) -> None:
        if isinstance(budget, float) and budget <= 1 / params.stride:
            raise ParamError("budget", f"recycled's full step every {params.stride} decode steps alone attends "
                                       f"1/{params.stride} of the context on average; allowed: a budget above "
                                       f"{1 / params.stride:.4g}, or a longer stride")

    @classmethod
    def params_for_budget(cls, params: Params, budget, context_len: int, model: ModelFacts) -> Params:
        """Over a cycle of ``stride`` decode steps: one full step (the context) and stride - 1 steps of k
        tokens plus those generated since the full step (stride / 2 on average) average to the budget.
        (``refresh_threshold`` adds data-dependent full steps on top.)"""
        context, stride = max(int(context_len), 1), params.stride
        if stride == 1:
            return dataclasses.replace(params, k=context)
        k = (budget_tokens(budget, context) - context / stride) / (1 - 1 / stride) - stride / 2
        return dataclasses.replace(params, k=max(1, int(k)))

    @classmethod
    def decode_share(cls, params: Params, context_len: int, model: ModelFacts) -> float:
        context, stride = max(int(context_len), 1), params.stride
        kept = min(1.0, (resolve_budget(params.k, context) + stride / 2) / context)
        return (1 + (stride - 1) * kept) / stride

    POOL_PAGE = 64      # tokens per page of the recycled-KV pool

    @classmethod
    def pool_page_bytes(cls, model: ModelFacts) -> int:
        """One pool page in every routed layer of ``model``: K and V of POOL_PAGE tokens per KV head."""
        return 2 * cls.POOL_PAGE * model.num_kv_heads * model.head_size * model.dtype.itemsize * model.routed_layers

    @classmethod
    def pool_pages_for(cls, params: Params, seq_len: int) -> int:
        """Pages a request holds at ``seq_len``: the selection plus the tokens until the next full step."""
        return -(-(resolve_budget(params.k, seq_len) + params.stride + 1) // cls.POOL_PAGE)

    @classmethod
    def request_state_bytes(cls, params: Params, context_len: int, model: ModelFacts) -> int:
        return cls.pool_pages_for(params, context_len) * cls.pool_page_bytes(model)

    def __init__(self, model):
        super().__init__(model)
        self.states: dict[str, RecycledState] = {}
        self.pool_pages = 0                                    # pages in every layer's pool
        self.free_pages: list[int] = []
        self.pools: dict[int, tuple[Tensor, Tensor]] = {}      # layer -> (K, V) [pages, Hkv, POOL_PAGE, D]
                                                               # views; K strided like the KV cache's K
        # the server's bound on the whole model's pool (pages are the same count in every rank and stage)
        limit = state_bytes_limit()
        self.max_pool_pages = limit // self.pool_page_bytes(model.whole_model()) if limit else None

    def held_bytes(self) -> int:
        return tensor_bytes(t for pool in self.pools.values() for t in pool)

    def _reserve(self, state: RecycledState, tokens: int) -> None:
        """Give ``state`` pool pages for ``tokens`` tokens per layer and KV head. The pool grows by doubling,
        up to the server's bound (beyond it only by what is needed: the server admits requests within it);
        each layer's tensors follow on their next use."""
        needed = -(-tokens // self.POOL_PAGE) - len(state.pages)
        if needed <= 0:
            return
        if len(self.free_pages) < needed:
            at_least = self.pool_pages + needed - len(self.free_pages)
            doubled = 2 * self.pool_pages
            if self.max_pool_pages is not None:
                doubled = min(doubled, self.max_pool_pages)
            grown = max(doubled, at_least)
            self.free_pages.extend(range(self.pool_pages, grown))
            self.pool_pages = grown
        state.pages.extend(self.free_pages[-needed:])
        del self.free_pages[-needed:]

    def _new_pool(self, pages: int, key_cache: Tensor) -> tuple[Tensor, Tensor]:
        shape = (pages, self.model.num_kv_heads, self.POOL_PAGE, key_cache.shape[3])
        options = dict(dtype=key_cache.dtype, device=key_cache.device)
        if key_cache.stride(2) == 1 and key_cache.stride(3) != 1:
            # K in the cache's own layout (vLLM CPU: token-contiguous per page), so that decode over the
            # pool reads whole runs of tokens with the kernel's vectorised-over-tokens path
            pool_key = torch.zeros(shape[0], shape[1], shape[3], shape[2], **options).transpose(2, 3)
        else:
            pool_key = torch.zeros(shape, **options)
        return pool_key, torch.zeros(shape, **options)

    def _pool(self, layer: int, key_cache: Tensor) -> tuple[Tensor, Tensor]:
        found = self.pools.get(layer)
        usable = found is not None and found[0].dtype == key_cache.dtype and found[0].device == key_cache.device
        if usable and found[0].shape[0] == self.pool_pages:
            return found
        pool = self._new_pool(self.pool_pages, key_cache)
        if usable:      # the pool grew: keep the buffers already filled
            kept = min(found[0].shape[0], self.pool_pages)
            pool[0][:kept] = found[0][:kept]
            pool[1][:kept] = found[1][:kept]
        self.pools[layer] = pool
        return pool

    def _shrink(self) -> None:
        """Between steps, after a request let its pages go: with at most a quarter in use (but some) the live
        pages move to the front and the pools shrink to twice that. (Emptied, the pools stay for the next
        request until the worker is idle: ``free_idle``.)"""
        live = sorted(p for state in self.states.values() for p in state.pages)
        if not live or len(live) * 4 > self.pool_pages:
            return
        size = 2 * len(live)
        for layer, (pool_k, pool_v) in list(self.pools.items()):
            # a layer that has not run since the pool last grew holds nothing yet in the pages past its size
            last = pool_k.shape[0] - 1
            source = torch.tensor([min(p, last) for p in live], dtype=torch.int64, device=pool_k.device)
            pool = self._new_pool(size, pool_k)
            pool[0][:len(live)] = pool_k.index_select(0, source)
            pool[1][:len(live)] = pool_v.index_select(0, source)
            self.pools[layer] = pool
        moved = {old: new for new, old in enumerate(live)}
        for state in self.states.values():
            state.pages = [moved[p] for p in state.pages]
        self.pool_pages, self.free_pages = size, list(range(len(live), size))

    def plan(self, rows: StepRows) -> RecycledPlan:
        decode, prefill = split_rows(rows)
        count = self.new_count(rows)
        states, scheduled, ks, follows, thresholds, strides = [], [], [], [], [], []
        pool_table = None
        if decode is not None:
            for i in decode.rows:
                state = self.states.setdefault(rows.request_ids[i], RecycledState())
                p = rows.params[i]
                states.append(state)
                scheduled.append(state.step == 0)
                ks.append(resolve_budget(p.k, rows.seq_lens_cpu[i]))
                follows.append(p.follow)
                thresholds.append(p.refresh_threshold or 0.0)
                strides.append(p.stride)
                self._reserve(state, ks[-1] + p.stride + 1)    # the selection + the tokens until the next
            width = max(len(state.pages) for state in states)
            pool_table = torch.tensor([state.pages + [0] * (width - len(state.pages)) for state in states],
                                      dtype=torch.int32, device=rows.device)
        if prefill is not None:
            count.attended.index_add_(0, prefill.rows_t, torch.tensor(
                [count.total[i] * self.model.routed_layers for i in prefill.rows], dtype=torch.float64,
                device=rows.device))
        return RecycledPlan(decode, prefill, states, scheduled, ks, follows, thresholds, strides, count,
                            pool_table)

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
        pool_k, pool_v = self._pool(layer, key_cache)
        # full steps: dense attention with mass, then re-select per distinct k and copy the selection
        # into the rows' recycled buffers
        if full:
            at = torch.tensor(full, dtype=torch.int64, device=q.device)
            bt = group.block_table.index_select(0, at)
            if plan.dense is None:
                plan.dense = dense_indices(group.seq_lens_cpu, self.model.num_kv_heads, q.device)
            idx, num = plan.dense[0].index_select(0, at), plan.dense[1].index_select(0, at)
            qf = q.index_select(0, at)
            o, mass = ops.sparse_paged_attention(qf, key_cache, value_cache, bt, idx, num, self.scale, True)
            result.index_copy_(0, at, o)
            for k, follow in sorted({(plan.k[j], plan.follow[j]) for j in full}):
                sub = [n for n, j in enumerate(full) if (plan.k[j], plan.follow[j]) == (k, follow)]
                sub_t = torch.tensor(sub, dtype=torch.int64, device=q.device)
                sub_mass, sub_num = mass.index_select(0, sub_t), num.index_select(0, sub_t)
                if follow:
                    sub_mass = keep_followers(sub_mass, sub_num, k, follow)
                sel_idx, sel_num = ops.topk_from_mass(sub_mass, idx.index_select(0, sub_t), sub_num, k)
                rows_t = at.index_select(0, sub_t)
                ops.gather_kv(key_cache, value_cache, bt.index_select(0, sub_t), sel_idx, sel_num,
                              plan.pool_table.index_select(0, rows_t),
                              torch.zeros(len(sub), dtype=torch.int32, device=q.device), pool_k, pool_v)
                n_sel = sel_num[:, 0].tolist()        # the same for every KV head: min(k, seq_len)
                for r, n in enumerate(sub):
                    j = full[n]
                    state = plan.states[j]
                    state.sel_idx[layer] = sel_idx[r, :, :n_sel[r]].clone()
                    state.full_len[layer] = state.buffer_upto[layer] = group.seq_lens_cpu[j]
                    state.buffer_len[layer] = n_sel[r]
                    if plan.thresholds[j] > 0:     # the dynamic refresh compares against it
                        state.q_full[layer] = qf[n].float().flatten().clone()
            for j in full:
                plan.count.add_host(group.rows[j], float(group.seq_lens_cpu[j]))

        # sparse steps: append the tokens since the buffer was last filled (this step's), then attend to
        # the whole buffer: the selection + tokens [full_len, seq_len)
        if sparse:
            hkv = self.model.num_kv_heads
            states = [plan.states[j] for j in sparse]
            seq = [group.seq_lens_cpu[j] for j in sparse]
            new = [list(range(state.buffer_upto[layer], n)) for state, n in zip(states, seq)]
            every = len(sparse) == len(plan.states)   # every row sparse (the usual case): no gathers
            at = None if every else torch.tensor(sparse, dtype=torch.int64, device=q.device)
            bt = group.block_table if every else group.block_table.index_select(0, at)
            table = plan.pool_table if every else plan.pool_table.index_select(0, at)
            width = max(len(tokens) for tokens in new)
            if width:
                fresh = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens in new], dtype=torch.int32,
                                     device=q.device)[:, None, :].expand(-1, hkv, -1).contiguous()
                fresh_num = torch.tensor([len(tokens) for tokens in new], dtype=torch.int32,
                                         device=q.device)[:, None].expand(-1, hkv).contiguous()
                starts = torch.tensor([state.buffer_len[layer] for state in states], dtype=torch.int32,
                                      device=q.device)
                ops.gather_kv(key_cache, value_cache, bt, fresh, fresh_num, table, starts, pool_k, pool_v)
            counts = []
            for state, n, tokens in zip(states, seq, new):
                state.buffer_len[layer] += len(tokens)
                state.buffer_upto[layer] = n
                counts.append(state.buffer_len[layer])
            longest = max(counts)
            positions = plan.positions.get((len(sparse), longest))
            if positions is None:
                positions = torch.arange(longest, dtype=torch.int32, device=q.device).expand(
                    len(sparse), hkv, -1).contiguous()
                plan.positions[(len(sparse), longest)] = positions
            num = torch.tensor(counts, dtype=torch.int32, device=q.device)[:, None].expand(-1, hkv).contiguous()
            o, _ = ops.sparse_paged_attention(q if every else q.index_select(0, at), pool_k, pool_v, table,
                                              positions, num, self.scale, False)
            if every:
                result = o
            else:
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
        state = self.states.pop(request_id, None)
        if state is not None:
            self.free_pages.extend(state.pages)
            self._shrink()

    def free_idle(self) -> None:
        if not self.states:
            self.pools.clear()
            self.pool_pages, self.free_pages = 0, []

    def state(self, request_id: str) -> Optional[RecycledState]:
        return self.states.get(request_id)
