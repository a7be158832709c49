"""Synthetic paged KV caches in vLLM's CPU layout and a pure-torch dense attention to check against."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from strategies.base import ModelFacts, StepRows, Strategy

PAGE = 64
MODEL = ModelFacts(num_layers=3, num_q_heads=4, num_kv_heads=2, head_size=16, kv_block_size=PAGE,
                   max_model_len=4096, dtype=torch.float32, model_id="tiny-test-model")


@dataclass
class PagedKV:
    """vLLM's CPU layout: kv [num_blocks, Hkv, page, 2*D] holds, per (block, head), page K rows then
    page V rows (as cpu_attn.py views it); key/value caches are the two halves of that view."""
    kv: torch.Tensor

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        nb, hkv, page, _ = self.kv.shape
        return self.kv.view(nb, hkv, 2 * page, MODEL.head_size).chunk(2, dim=2)

    @property
    def key_cache(self) -> torch.Tensor:
        return self._halves()[0]

    @property
    def value_cache(self) -> torch.Tensor:
        return self._halves()[1]


def make_kv(num_blocks: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0) -> PagedKV:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, MODEL.num_kv_heads, PAGE, 2 * MODEL.head_size, generator=g)
    return PagedKV(kv.to(dtype))


def block_table(max_lens: list[int], num_blocks: int = 64, seed: int = 0) -> torch.Tensor:
    """Disjoint, shuffled physical blocks per row: int32 [B, max_blocks]."""
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(num_blocks, generator=g)
    width = max(-(-n // PAGE) for n in max_lens)
    table = torch.zeros(len(max_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(max_lens):
        k = -(-n // PAGE)
        table[b, :k] = perm[used:used + k].to(torch.int32)
        used += k
    assert used <= num_blocks
    return table


def step_rows(params: list, query_lens: list[int], seq_lens: list[int], table: torch.Tensor,
              request_ids: list[str] | None = None) -> StepRows:
    ids = request_ids or [f"req-{i}" for i in range(len(params))]
    return StepRows.build(ids, params, query_lens, seq_lens, table)


def logical_kv(cache: torch.Tensor, table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, Hkv, D] fp32 of one sequence."""
    t = torch.arange(seq_len)
    return cache[table_row.long()[t // PAGE], :, t % PAGE].float()


def attention_reference(query: torch.Tensor, kv: PagedKV, rows: StepRows, visible=None,
                        scale: float | None = None) -> torch.Tensor:
    """Pure torch. query [T, Hq, D]; ``visible(row, q_pos, head_kv) -> bool mask [seq_len]`` (default:
    causal); ``scale`` of the scores (default head_size ** -0.5). Returns fp32 [T, Hq, D]."""
    scale = MODEL.head_size ** -0.5 if scale is None else scale
    g = MODEL.group_size
    out = torch.zeros(query.shape, dtype=torch.float32)
    qsl = rows.query_start_loc.tolist()
    for b in range(rows.num_rows):
        seq = rows.seq_lens_cpu[b]
        k = logical_kv(kv.key_cache, rows.block_table[b], seq)
        v = logical_kv(kv.value_cache, rows.block_table[b], seq)
        for t in range(qsl[b], qsl[b + 1]):
            q_pos = seq - (qsl[b + 1] - t)
            for h in range(MODEL.num_q_heads):
                hk = h // g
                mask = torch.arange(seq) <= q_pos
                if visible is not None:
                    mask = mask & visible(b, q_pos, hk)
                s = (k[:, hk] @ query[t, h].float()) * scale
                p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=0)
                out[t, h] = p @ v[:, hk]
    return out


def run_step(strategy: Strategy, rows: StepRows, query: torch.Tensor, kv: PagedKV,
             layers: range | None = None) -> list[torch.Tensor]:
    """plan once, run every layer (the same cache for each layer), finish. Returns each layer's out."""
    plan = strategy.plan(rows)
    outs = []
    for layer in layers or range(MODEL.num_layers):
        out = torch.full(query.shape, float("nan"), dtype=query.dtype)
        strategy.run(layer, query, kv.key_cache, kv.value_cache, plan, out)
        outs.append(out)
    strategy.finish_step(plan)
    return outs


def random_query(tokens: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(tokens, MODEL.num_q_heads, MODEL.head_size, generator=g).to(dtype)
