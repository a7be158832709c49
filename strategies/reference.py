"""Pure-torch twins of the attnserve ops (docs/design.md section 4): the test oracle and the
fallback where no compiled kernel exists for a device. Clarity over speed; all math in fp32.

Shapes: B sequences, Hq query heads, Hkv KV heads, G = Hq // Hkv, D head size.
key_cache / value_cache: [num_blocks, Hkv, page, D] (last dim contiguous, other strides free).
Logical token t of sequence b lives at block_table[b, t // page], offset t % page.
Index outputs are int32 and padded with 0 past their count.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _gather_tokens(cache: Tensor, block_table: Tensor, positions: Tensor) -> Tensor:
    """cache [NB, Hkv, page, D], block_table [B, MB], positions int [B, Hkv, K] -> [B, Hkv, K, D] fp32
    (the row of KV head g for logical position positions[b, g, k])."""
    B, Hkv, K = positions.shape
    page = cache.shape[2]
    positions = positions.long()
    blocks = block_table.long().gather(1, (positions // page).reshape(B, Hkv * K)).view(B, Hkv, K)
    heads = torch.arange(Hkv, device=cache.device).view(1, Hkv, 1).expand(B, Hkv, K)
    return cache[blocks, heads, positions % page].float()


def _sequence_kv(cache: Tensor, block_table_row: Tensor, seq_len: int) -> Tensor:
    """The first seq_len tokens of one sequence: [seq_len, Hkv, D] fp32."""
    page = cache.shape[2]
    positions = torch.arange(seq_len, device=cache.device)
    blocks = block_table_row.long()[positions // page]
    return cache[blocks, :, positions % page].float()


def sparse_paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_table: Tensor, token_idx: Tensor, num_idx: Tensor,
                           scale: float, want_mass: bool) -> tuple[Tensor, Tensor]:
    """Decode attention of query [B, Hq, D] over tokens token_idx[b, g, :num_idx[b, g]].
    Returns out [B, Hq, D] (query dtype) and mass [B, Hkv, K] fp32 (sum over the group's heads of
    each token's softmax probability; 0 past num_idx) or an empty tensor."""
    B, Hq, D = query.shape
    Hkv, K = token_idx.shape[1], token_idx.shape[2]
    G = Hq // Hkv
    keys = _gather_tokens(key_cache, block_table, token_idx)        # [B, Hkv, K, D]
    values = _gather_tokens(value_cache, block_table, token_idx)
    q = query.float().view(B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhkd->bhgk", q, keys) * scale          # [B, Hkv, G, K]
    valid = (torch.arange(K, device=query.device).view(1, 1, K) < num_idx.view(B, Hkv, 1).long())
    valid = valid.unsqueeze(2)                                          # [B, Hkv, 1, K]
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    probs = torch.where(valid, probs, torch.zeros((), device=query.device))  # num_idx 0: no NaN
    out = torch.einsum("bhgk,bhkd->bhgd", probs, values).reshape(B, Hq, D).to(query.dtype)
    mass = probs.sum(dim=2) if want_mass else torch.empty(0, dtype=torch.float32,
                                                           device=query.device)
    return out, mass


def paged_prefill_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                            block_table: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                            scale: float, n_sink: int, window: int,
                            block_mask: Optional[Tensor], mask_block: int) -> Tensor:
    """Causal prefill: the queries query[qsl[b]:qsl[b+1]] are the last positions of sequence b.
    A key at pos is visible from q_pos if pos <= q_pos and (window < 0 or pos < n_sink or
    q_pos - pos < window) and (block_mask is None or block_mask[b, g, q_pos // mask_block,
    pos // mask_block]). Rows with no visible key are 0. Returns out [T, Hq, D] (query dtype)."""
    T, Hq, D = query.shape
    Hkv = key_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(T, Hq, D, dtype=torch.float32, device=query.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_begin, q_end = starts[b], starts[b + 1]
        qlen = q_end - q_begin
        if qlen == 0:
            continue
        keys = _sequence_kv(key_cache, block_table[b], seq_len).transpose(0, 1)     # [Hkv, S, D]
        values = _sequence_kv(value_cache, block_table[b], seq_len).transpose(0, 1)
        q = query[q_begin:q_end].float().view(qlen, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv,G,q,D]
        q_pos = torch.arange(seq_len - qlen, seq_len, device=query.device).view(qlen, 1)
        k_pos = torch.arange(seq_len, device=query.device).view(1, seq_len)
        visible = k_pos <= q_pos
        if window >= 0:
            visible &= (k_pos < n_sink) | (q_pos - k_pos < window)
        visible = visible.view(1, qlen, seq_len).expand(Hkv, qlen, seq_len)
        if block_mask is not None:
            blocks = block_mask[b][:, q_pos.view(-1) // mask_block][:, :, k_pos.view(-1) // mask_block]
            visible = visible & blocks.bool()
        visible = visible.unsqueeze(1)                                          # [Hkv, 1, q, S]
        scores = torch.einsum("hgqd,hsd->hgqs", q, keys) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        probs = torch.where(visible, probs, torch.zeros((), device=query.device))
        rows = torch.einsum("hgqs,hsd->hgqd", probs, values)                   # [Hkv, G, q, D]
        out[q_begin:q_end] = rows.permute(2, 0, 1, 3).reshape(qlen, Hq, D)
    return out.to(query.dtype)


def _chunk_slots(block_table_row: Tensor, chunks: Tensor, chunk: int, page: int):
    """Physical (block, slot-in-page) of logical chunks of one sequence."""
    first_token = chunks * chunk
    return block_table_row.long()[first_token // page], (first_token % page) // chunk


Q8_SCALE_BYTES = 4


def q8_rows(x: Tensor, round_up: bool) -> Tensor:
    """[..., D] fp32 -> int8 summary rows [..., D + 4]: D steps of scale = max |x| / 127, rounded down
    (kmin) or up (kmax) so that Quest's score stays an upper bound, then scale's fp32 bytes."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    steps = torch.ceil(x / safe) if round_up else torch.floor(x / safe)
    steps = torch.where(scale > 0, steps, torch.zeros_like(steps)).clamp(-128, 127).to(torch.int8)
    return torch.cat([steps, scale.contiguous().view(torch.int8)], dim=-1)


def summary_values(rows: Tensor, head_size: int) -> Tensor:
    """Summary rows (fp32, bf16, or int8 rows of ``q8_rows``) -> fp32 [..., head_size]."""
    if rows.dtype != torch.int8:
        return rows.float()
    return rows[..., :head_size].float() * rows[..., head_size:].contiguous().view(torch.float32)


def landmark_update_summaries(key_cache: Tensor, block_table: Tensor, start_pos: Tensor,
                              seq_lens: Tensor, chunk: int, kmin: Tensor, kmax: Tensor) -> None:
    """Recompute kmin/kmax [num_blocks, Hkv, page // chunk, D] (fp32 or bf16; int8 rows [.., D + 4] of
    ``q8_rows``; in place) of every chunk touching tokens [start_pos[b], seq_lens[b]); a partial chunk
    over its filled tokens only."""
    page = key_cache.shape[2]
    for b, (start, seq_len) in enumerate(zip(start_pos.tolist(), seq_lens.tolist())):
        if start >= seq_len:
            continue
        first_chunk, end_chunk = start // chunk, (seq_len + chunk - 1) // chunk
        keys = _sequence_kv(key_cache, block_table[b], seq_len)[first_chunk * chunk:]  # [n,Hkv,D]
        n_chunks = end_chunk - first_chunk
        pad = n_chunks * chunk - keys.shape[0]
        shape = (n_chunks, chunk, keys.shape[1], keys.shape[2])
        lo = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=float("inf")).view(shape)
        hi = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=float("-inf")).view(shape)
        blocks, slots = _chunk_slots(block_table[b], torch.arange(first_chunk, end_chunk,
                                                                  device=keys.device), chunk, page)
        low, high = lo.amin(dim=1), hi.amax(dim=1)
        if kmin.dtype == torch.int8:
            low, high = q8_rows(low.float(), round_up=False), q8_rows(high.float(), round_up=True)
        kmin[blocks, :, slots] = low.to(kmin.dtype)
        kmax[blocks, :, slots] = high.to(kmax.dtype)


def _expand_chunks(chosen: list[Tensor], chunk: int, seq_lens: list[int], K: int,
                   device) -> tuple[Tensor, Tensor]:
    """chosen[b * Hkv + g]: ascending chunk ids -> (token_idx [B, Hkv, K], num_idx [B, Hkv])."""
    B = len(seq_lens)
    Hkv = len(chosen) // B
    token_idx = torch.zeros(B, Hkv, K, dtype=torch.int32, device=device)
    num_idx = torch.zeros(B, Hkv, dtype=torch.int32, device=device)
    for i, chunks in enumerate(chosen):
        b, g = divmod(i, Hkv)
        tokens = (chunks.view(-1, 1) * chunk + torch.arange(chunk, device=device)).view(-1)
        tokens = tokens[tokens < seq_lens[b]]
        token_idx[b, g, :tokens.numel()] = tokens.to(torch.int32)
        num_idx[b, g] = tokens.numel()
    return token_idx, num_idx


def _top_with_forced(scores: Tensor, k: int, forced: list[int]) -> Tensor:
    """Ascending ids: forced ids + the k best of the others (score desc, ties: lower id)."""
    n = scores.numel()
    others = torch.ones(n, dtype=torch.bool, device=scores.device)
    others[forced] = False
    candidates = others.nonzero().view(-1)
    order = torch.sort(scores[candidates], descending=True, stable=True).indices[:max(k, 0)]
    chosen = torch.cat([candidates[order], torch.tensor(forced, device=scores.device).long()])
    return torch.sort(torch.unique(chosen)).values


def landmark_select(query: Tensor, kmin: Tensor, kmax: Tensor, block_table: Tensor,
                    seq_lens: Tensor, chunk: int, k_chunks: int, group_max: bool = False) -> tuple[Tensor, Tensor]:
    """Quest selection: score chunk c of KV head g by sum over the group's heads and d of
    max(q_d * kmax_d, q_d * kmin_d), computed folded over the group (as the kernels do; equal
    since kmax >= kmin): kmax . P + kmin . N with P = sum_h max(q_h, 0), N = sum_h min(q_h, 0);
    with ``group_max``, the max over the group's heads h of that bound for h alone;
    keep the first and the newest chunk plus the k_chunks best of the others. Returns their tokens
    (< seq_len, ascending) as (token_idx [B, Hkv, K], num_idx [B, Hkv]) with
    K = min((k_chunks + 2) * chunk, MB * page)."""
    B, Hq, D = query.shape
    Hkv = kmin.shape[1]
    page = kmin.shape[2] * chunk
    K = min((k_chunks + 2) * chunk, block_table.shape[1] * page)
    lens = seq_lens.tolist()
    chosen = []
    for b in range(B):
        n_chunks = (lens[b] + chunk - 1) // chunk
        blocks, slots = _chunk_slots(block_table[b], torch.arange(n_chunks, device=query.device),
                                     chunk, page)
        lo = summary_values(kmin[blocks, :, slots], D)                               # [n, Hkv, D]
        hi = summary_values(kmax[blocks, :, slots], D)
        q = query[b].float().view(Hkv, -1, D)                                     # [Hkv, G, D]
        if group_max:
            scores = (torch.einsum("nhd,hgd->hgn", hi, q.clamp(min=0))
                      + torch.einsum("nhd,hgd->hgn", lo, q.clamp(max=0))).amax(dim=1)   # [Hkv, n]
        else:
            positive, negative = q.clamp(min=0).sum(dim=1), q.clamp(max=0).sum(dim=1)  # [Hkv, D]
            scores = (torch.einsum("nhd,hd->hn", hi, positive)
                      + torch.einsum("nhd,hd->hn", lo, negative))                     # [Hkv, n]
        for g in range(Hkv):
            forced = [0, n_chunks - 1] if n_chunks > 0 else []
            chosen.append(_top_with_forced(scores[g], k_chunks, forced) if n_chunks > 0
                          else torch.zeros(0, dtype=torch.long, device=query.device))
    return _expand_chunks(chosen, chunk, lens, K, query.device)


def seer_pool_keys(key_cache: Tensor, block_table: Tensor, start_pos: Tensor, seq_lens: Tensor,
                   pool: int, pooled: Tensor) -> None:
    """Recompute pooled [num_blocks, Hkv, page // pool, 3 * D] (fp32, in place) = (max, min, mean)
    over the filled tokens of every pool block touching [start_pos[b], seq_lens[b])."""
    page = key_cache.shape[2]
    D = key_cache.shape[3]
    for b, (start, seq_len) in enumerate(zip(start_pos.tolist(), seq_lens.tolist())):
        if start >= seq_len:
            continue
        first, end = start // pool, (seq_len + pool - 1) // pool
        keys = _sequence_kv(key_cache, block_table[b], seq_len)[first * pool:]
        n = end - first
        pad = n * pool - keys.shape[0]
        shape = (n, pool, keys.shape[1], D)
        hi = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=float("-inf")).view(shape)
        lo = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad), value=float("inf")).view(shape)
        total = torch.nn.functional.pad(keys, (0, 0, 0, 0, 0, pad)).view(shape).sum(dim=1)
        counts = (torch.clamp(seq_len - torch.arange(first, end, device=keys.device) * pool,
                              max=pool)).float().view(n, 1, 1)
        blocks, slots = _chunk_slots(block_table[b], torch.arange(first, end, device=keys.device),
                                     pool, page)
        pooled[blocks, :, slots] = torch.cat([hi.amax(dim=1), lo.amin(dim=1), total / counts], -1)


def seer_select(q_gate: Tensor, k_gate: Tensor, num_blocks: Tensor, pool: int, seq_lens: Tensor,
                threshold: float, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """SeerAttention block gate: probs = softmax over j < num_blocks[b] of q·k_j / sqrt(Dg).
    Keep the newest block plus, if top_k <= 0, every block with prob >= threshold, else the top_k
    best of the other blocks (ties: lower block). Returns (token_idx [B, Hkv, K], num_idx,
    probs [B, Hkv, NB] fp32, 0 past num_blocks) with K = NB * pool if top_k <= 0 else
    min(top_k + 1, NB) * pool; tokens < seq_len, ascending."""
    B, Hkv, NB, Dg = k_gate.shape
    K = NB * pool if top_k <= 0 else min(top_k + 1, NB) * pool
    probs = torch.zeros(B, Hkv, NB, dtype=torch.float32, device=q_gate.device)
    lens, counts = seq_lens.tolist(), num_blocks.tolist()
    chosen = []
    for b in range(B):
        nb = counts[b]
        logits = torch.einsum("hd,hnd->hn", q_gate[b].float(), k_gate[b, :, :nb].float())
        p = torch.softmax(logits / math.sqrt(Dg), dim=-1) if nb > 0 else logits
        probs[b, :, :nb] = p
        for g in range(Hkv):
            if nb == 0:
                chosen.append(torch.zeros(0, dtype=torch.long, device=q_gate.device))
            elif top_k <= 0:
                keep = p[g] >= threshold
                keep[nb - 1] = True
                chosen.append(keep.nonzero().view(-1))
            else:
                chosen.append(_top_with_forced(p[g], top_k, [nb - 1]))
    token_idx, num_idx = _expand_chunks(chosen, pool, lens, K, q_gate.device)
    return token_idx, num_idx, probs


def topk_from_mass(mass: Tensor, token_idx: Tensor, num_idx: Tensor,
                   k: int) -> tuple[Tensor, Tensor]:
    """The min(k, num_idx) tokens of largest mass among token_idx[b, g, :num_idx[b, g]] (ties:
    lower position), ascending by position: (sel_idx [B, Hkv, k], sel_num [B, Hkv])."""
    B, Hkv, K = token_idx.shape
    sel_idx = torch.zeros(B, Hkv, k, dtype=torch.int32, device=token_idx.device)
    sel_num = torch.zeros(B, Hkv, dtype=torch.int32, device=token_idx.device)
    for b in range(B):
        for g in range(Hkv):
            n = int(num_idx[b, g])
            positions, weights = token_idx[b, g, :n].long(), mass[b, g, :n].float()
            by_position = torch.argsort(positions)
            order = by_position[torch.sort(weights[by_position], descending=True,
                                           stable=True).indices]
            chosen = torch.sort(positions[order[:k]]).values
            sel_idx[b, g, :chosen.numel()] = chosen.to(torch.int32)
            sel_num[b, g] = chosen.numel()
    return sel_idx, sel_num


def gather_kv(key_cache: Tensor, value_cache: Tensor, block_table: Tensor, token_idx: Tensor,
              num_idx: Tensor, dst_block_table: Tensor, dst_start: Tensor, dst_key: Tensor,
              dst_value: Tensor) -> None:
    """Recycled Attention's KV copy, in place: for i < num_idx[b, g] (clamped to [0, K]),
    t = token_idx[b, g, i], s = dst_start[b] + i:
    dst_key[dst_block_table[b, s // dpage], g, s % dpage] = key_cache[block_table[b, t // page],
    g, t % page], and the same for value. dst_* [P, Hkv, dpage, D] have the cache dtype."""
    B, Hkv, K = token_idx.shape
    page, dst_page = key_cache.shape[2], dst_key.shape[2]
    counts = num_idx.long().clamp(0, K).view(B, Hkv, 1)
    b, g, i = (torch.arange(K, device=token_idx.device).view(1, 1, K) < counts).nonzero(
        as_tuple=True)
    t = token_idx[b, g, i].long()
    s = dst_start.long()[b] + i
    src_blocks = block_table.long()[b, t // page]
    dst_blocks = dst_block_table.long()[b, s // dst_page]
    dst_key[dst_blocks, g, s % dst_page] = key_cache[src_blocks, g, t % page]
    dst_value[dst_blocks, g, s % dst_page] = value_cache[src_blocks, g, t % page]
