"""The only caller of torch.ops.attnserve.* (docs/design.md section 4).

Loads the compiled extension (strategies._C), registers a fake (meta) kernel for every op so
tracing works, and exposes thin wrappers that run the compiled kernel for the tensors' device. An
op without a compiled kernel (the extension not built, or built without that device) raises a
RuntimeError, unless ATTNSERVE_ALLOW_REFERENCE=1 lets the pure-torch twin in strategies.reference
run instead.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from strategies import reference

try:
    import strategies._C  # noqa: F401  (registers torch.ops.attnserve.*)
    EXTENSION_ERROR: Optional[str] = None
except ImportError as error:
    EXTENSION_ERROR = str(error)

OP_NAMES = ("sparse_paged_attention", "paged_prefill_attention", "landmark_update_summaries",
            "landmark_select", "seer_pool_keys", "seer_select", "topk_from_mass", "gather_kv")


def extension_loaded() -> bool:
    return EXTENSION_ERROR is None


def set_parallel_grain(grain: int) -> int:
    """CPU ops whose work (~ multiply-adds) is below `grain` run on one thread; returns the previous
    grain; a negative `grain` only reads it. Process-wide; the default comes from csrc/cpu/common.h
    or ATTNSERVE_PARALLEL_GRAIN."""
    if not extension_loaded():
        raise RuntimeError(f"the compiled extension is not loaded: {EXTENSION_ERROR}")
    return strategies._C.set_parallel_grain(int(grain))


CPU_ISA_LEVELS = ("default", "avx2", "avx512", "avx512bf16")   # ascending; avx512bf16 = + AVX512_BF16, VBMI2


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels use now: the CPU's own, capped by ATTNSERVE_CPU_ISA or
    `set_cpu_isa_cap`."""
    if not extension_loaded():
        raise RuntimeError(f"the compiled extension is not loaded: {EXTENSION_ERROR}")
    return strategies._C.cpu_isa()


def set_cpu_isa_cap(level: str) -> str:
    """The CPU kernels use at most `level` (one of CPU_ISA_LEVELS) from now on; returns the previous cap.
    Process-wide; for tests and comparisons of the kernel variants."""
    if not extension_loaded():
        raise RuntimeError(f"the compiled extension is not loaded: {EXTENSION_ERROR}")
    if level not in CPU_ISA_LEVELS:
        raise ValueError(f"unknown ISA level {level!r}: one of {', '.join(CPU_ISA_LEVELS)}")
    return strategies._C.set_cpu_isa_cap(level)


def _dispatch_key(device: torch.device | str) -> str:
    device_type = torch.device(device).type
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type, device_type.upper())


_compiled_cache: dict[tuple[str, str], bool] = {}


def has_compiled(name: str, device: torch.device | str) -> bool:
    """True when torch.ops.attnserve.<name> has a kernel for `device` (cpu / cuda)."""
    key = (name, _dispatch_key(device))
    if key not in _compiled_cache:
        try:
            _compiled_cache[key] = extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"attnserve::{name}", key[1])
        except RuntimeError:  # a device type without a dispatch key of that name
            _compiled_cache[key] = False
    return _compiled_cache[key]


BUILD_COMMAND = "make setup (or: python setup.py build_ext --inplace)"

_log = logging.getLogger(__name__)
_reference_warned = False


def reference_allowed() -> bool:
    """ATTNSERVE_ALLOW_REFERENCE=1: ops without a compiled kernel run the pure-torch reference."""
    return os.environ.get("ATTNSERVE_ALLOW_REFERENCE") == "1"


def _missing_kernel(name: str, device: torch.device | str) -> str:
    if not extension_loaded():
        return (f"the compiled extension strategies._C is not built or does not load ({EXTENSION_ERROR}); "
                f"build it with {BUILD_COMMAND}")
    key = _dispatch_key(device)
    how = " (where torch has CUDA and ATTNSERVE_SKIP_CUDA is unset)" if key == "CUDA" else ""
    return f"strategies._C has no {key} kernel for attnserve::{name}; rebuild it{how} with {BUILD_COMMAND}"


def _op(name: str, device: torch.device):
    """The compiled op for this device. The compiled CPU kernels read both cache layouts (head dim
    or token dim of stride 1: vLLM's CPU K is transposed per block)."""
    if has_compiled(name, device):
        return getattr(torch.ops.attnserve, name)
    if not reference_allowed():
        raise RuntimeError(f"{_missing_kernel(name, device)}, or set ATTNSERVE_ALLOW_REFERENCE=1 to run the "
                           f"pure-torch reference (slow)")
    global _reference_warned
    if not _reference_warned:
        _reference_warned = True
        _log.warning("ATTNSERVE_ALLOW_REFERENCE=1: the pure-torch reference runs (slow) where there is no "
                     "compiled kernel: %s", _missing_kernel(name, device))
    return getattr(reference, name)


# ---- fake kernels (shapes only) -------------------------------------------------------------

def _landmark_k(block_table: Tensor, kmin: Tensor, chunk: int, k_chunks: int) -> int:
    return min((k_chunks + 2) * chunk, block_table.shape[1] * kmin.shape[2] * chunk)


def _seer_k(nb: int, pool: int, top_k: int) -> int:
    return nb * pool if top_k <= 0 else min(top_k + 1, nb) * pool


if extension_loaded():
    @torch.library.register_fake("attnserve::sparse_paged_attention")
    def _(query, key_cache, value_cache, block_table, token_idx, num_idx, scale, want_mass):
        mass_shape = tuple(token_idx.shape) if want_mass else (0,)
        return torch.empty_like(query), query.new_empty(mass_shape, dtype=torch.float32)

    @torch.library.register_fake("attnserve::paged_prefill_attention")
    def _(query, key_cache, value_cache, block_table, query_start_loc, seq_lens, scale, n_sink,
          window, block_mask, mask_block):
        return torch.empty_like(query)

    @torch.library.register_fake("attnserve::landmark_update_summaries")
    def _(key_cache, block_table, start_pos, seq_lens, chunk, kmin, kmax):
        return None

    @torch.library.register_fake("attnserve::landmark_select")
    def _(query, kmin, kmax, block_table, seq_lens, chunk, k_chunks, group_max=False):
        B, Hkv = query.shape[0], kmin.shape[1]
        K = _landmark_k(block_table, kmin, chunk, k_chunks)
        return (query.new_empty((B, Hkv, K), dtype=torch.int32),
                query.new_empty((B, Hkv), dtype=torch.int32))

    @torch.library.register_fake("attnserve::seer_pool_keys")
    def _(key_cache, block_table, start_pos, seq_lens, pool, pooled):
        return None

    @torch.library.register_fake("attnserve::seer_select")
    def _(q_gate, k_gate, num_blocks, pool, seq_lens, threshold, top_k):
        B, Hkv, NB = k_gate.shape[:3]
        K = _seer_k(NB, pool, top_k)
        return (q_gate.new_empty((B, Hkv, K), dtype=torch.int32),
                q_gate.new_empty((B, Hkv), dtype=torch.int32),
                q_gate.new_empty((B, Hkv, NB), dtype=torch.float32))

    @torch.library.register_fake("attnserve::topk_from_mass")
    def _(mass, token_idx, num_idx, k):
        B, Hkv = token_idx.shape[:2]
        return (token_idx.new_empty((B, Hkv, k), dtype=torch.int32),
                token_idx.new_empty((B, Hkv), dtype=torch.int32))

    @torch.library.register_fake("attnserve::gather_kv")
    def _(key_cache, value_cache, block_table, token_idx, num_idx, dst_block_table, dst_start,
          dst_key, dst_value):
        return None


# ---- wrappers (signatures of design.md section 4) -------------------------------------------

def sparse_paged_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_table: Tensor, token_idx: Tensor, num_idx: Tensor,
                           scale: float, want_mass: bool = False) -> tuple[Tensor, Tensor]:
    """query [B, Hq, D]; token_idx [B, Hkv, K], num_idx [B, Hkv] int32
    -> (out [B, Hq, D], mass [B, Hkv, K] fp32 or empty)."""
    return _op("sparse_paged_attention", query.device)(
        query, key_cache, value_cache, block_table, token_idx, num_idx, float(scale),
        bool(want_mass))


def paged_prefill_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                            block_table: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                            scale: float, n_sink: int = 0, window: int = -1,
                            block_mask: Optional[Tensor] = None, mask_block: int = 1) -> Tensor:
    """query [T, Hq, D] (the last positions of each sequence) -> out [T, Hq, D]."""
    return _op("paged_prefill_attention", query.device)(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, float(scale),
        int(n_sink), int(window), block_mask, int(mask_block))


def landmark_update_summaries(key_cache: Tensor, block_table: Tensor, start_pos: Tensor,
                              seq_lens: Tensor, chunk: int, kmin: Tensor, kmax: Tensor) -> None:
    """Refresh kmin/kmax [num_blocks, Hkv, page // chunk, D] (fp32; on CPU also bf16, or int8 rows
    [..., D + 4]: D steps of an fp32 scale stored after them, ``reference.q8_rows``) for tokens
    [start_pos, seq_len)."""
    _op("landmark_update_summaries", key_cache.device)(
        key_cache, block_table, start_pos, seq_lens, int(chunk), kmin, kmax)


def landmark_select(query: Tensor, kmin: Tensor, kmax: Tensor, block_table: Tensor,
                    seq_lens: Tensor, chunk: int, k_chunks: int, group_max: bool = False) -> tuple[Tensor, Tensor]:
    """-> (token_idx [B, Hkv, min((k_chunks + 2) * chunk, MB * page)], num_idx [B, Hkv]); ``group_max``: a
    chunk's score is the max of the group's query heads' bounds, else their sum."""
    return _op("landmark_select", query.device)(
        query, kmin, kmax, block_table, seq_lens, int(chunk), int(k_chunks), bool(group_max))


def seer_pool_keys(key_cache: Tensor, block_table: Tensor, start_pos: Tensor, seq_lens: Tensor,
                   pool: int, pooled: Tensor) -> None:
    """Refresh pooled [num_blocks, Hkv, page // pool, 3 * D] fp32 = (max, min, mean)."""
    _op("seer_pool_keys", key_cache.device)(key_cache, block_table, start_pos, seq_lens,
                                            int(pool), pooled)


def seer_select(q_gate: Tensor, k_gate: Tensor, num_blocks: Tensor, pool: int, seq_lens: Tensor,
                threshold: float, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (token_idx [B, Hkv, K], num_idx [B, Hkv], probs [B, Hkv, NB] fp32)."""
    return _op("seer_select", q_gate.device)(
        q_gate, k_gate, num_blocks, int(pool), seq_lens, float(threshold), int(top_k))


def topk_from_mass(mass: Tensor, token_idx: Tensor, num_idx: Tensor,
                   k: int) -> tuple[Tensor, Tensor]:
    """-> (sel_idx [B, Hkv, k], sel_num [B, Hkv]): the k heaviest tokens, ascending."""
    return _op("topk_from_mass", mass.device)(mass, token_idx, num_idx, int(k))


def gather_kv(key_cache: Tensor, value_cache: Tensor, block_table: Tensor, token_idx: Tensor,
              num_idx: Tensor, dst_block_table: Tensor, dst_start: Tensor, dst_key: Tensor,
              dst_value: Tensor) -> None:
    """Copy selected tokens of the paged caches into a second paged buffer (in place, bit-exact):
    for i < num_idx[b, g], token t = token_idx[b, g, i] of KV head g goes to slot
    s = dst_start[b] + i, i.e. dst_key[dst_block_table[b, s // dpage], g, s % dpage] =
    key_cache[block_table[b, t // page], g, t % page] (same for value). dst_key / dst_value
    [P, Hkv, dpage, D] have the cache dtype; block_table / dst_block_table [B, MB] / [B, MP],
    token_idx [B, Hkv, K], num_idx [B, Hkv], dst_start [B] are int32."""
    _op("gather_kv", key_cache.device)(key_cache, value_cache, block_table, token_idx, num_idx,
                                       dst_block_table, dst_start, dst_key, dst_value)
