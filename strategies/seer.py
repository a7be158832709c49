"""``seer``: SeerAttention's AttnGate (Gao et al. 2024, microsoft/SeerAttention), decode gate after
SeerAttention-R.

Per layer and KV head, a learned gate scores key blocks of ``block_size`` tokens:
- decode (SeerAttention-R): no query pooling; the G query heads of a KV group are concatenated and
  folded by a learned projection ``decode_q [Hkv, G*D, Dg]``; the keys of a block are pooled
  (max, min, mean) and projected by ``decode_k [Hkv, 3*D, Dg]``; RoPE at block positions (gate RoPE,
  ``rope_theta`` > 0); softmax over the sequence's blocks; keep blocks with probability >= ``threshold``
  (or the ``top_k`` best) plus the newest block.
- prefill: the queries are average-pooled over the same blocks, then ``prefill_q`` / ``prefill_k`` as
  above; causal at block level, the diagonal block always kept; the result is a block mask for
  ``ops.paged_prefill_attention``. (The paper's per-query-head gate is folded per KV group here because
  the mask is per KV head.)

vLLM caches keys after the model's RoPE, so gates are calibrated on post-RoPE pooled keys
(``strategies/calibration/``, ``attnserve calibrate-seer``). Pooled keys live per *physical* KV block
(``[num_blocks, Hkv, page // block, 3*D]`` fp32 per layer); a request remembers up to which token it has
pooled.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from strategies.base import (Budget, ModelFacts, ParamError, RowGroup, StepCount, StepRows, Strategy,
                             StrategyParams, budget_tokens, group_rows_by, param, resolve_budget, split_rows,
                             tensor_bytes)
from strategies.full import run_prefill
from strategies.registry import register

IDENTITY = "identity"
CALIBRATE_HINT = ("calibrate SeerAttention gates for this model with `attnserve calibrate-seer --model <dir>` "
                  f"or use \"gates\": \"{IDENTITY}\" for the training-free identity gate")


SHIPPED_GATES_DIR = Path(__file__).parent / "data"   # gates calibrated for the embedded model (docs/seer.md)


def gates_dir() -> Path:
    if "ATTNSERVE_GATES_DIR" in os.environ:
        return Path(os.environ["ATTNSERVE_GATES_DIR"]).expanduser()
    return Path(os.environ.get("ATTNSERVE_CACHE", "~/.cache/attnserve")).expanduser() / "gates"


# -- trust boundary: which gate files a request may make the server open ------------------------------------
# A request names gates; it does not give paths. A name is looked up under the gates dir and the shipped gates.
# A path is refused (ParamError on ``gates``) unless the operator allowed directories with
# ``attnserve serve --allow-gate-paths DIR`` ($ATTNSERVE_ALLOW_GATE_PATHS, os.pathsep-separated, inherited by the
# workers, which validate again), and then only for files inside one after resolving symlinks. The refusal is
# the same whether or not the path exists, and no file outside the allowed set is opened or checked for
# existence (only symlinks along the path are read to resolve it).
ALLOW_GATE_PATHS_ENV = "ATTNSERVE_ALLOW_GATE_PATHS"
GATE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
GATE_NAME_RULE = "letters, digits, '.', '_', '-'; not starting with '.'; no '..'; at most 128 characters"
GATE_PATH_REFUSED = ("gate file paths are not accepted from requests: name server-side gates instead "
                     f"(\"{IDENTITY}\", null for the model's default, or a name under the gates dir); "
                     "the server operator can allow the files inside a directory with --allow-gate-paths DIR")
GATE_PATH_OUTSIDE = ("this gate path is not inside a directory the server allows (--allow-gate-paths); "
                     "give an absolute path to a file inside one, or name server-side gates instead")


def allowed_gate_dirs() -> list[Path]:
    """The directories whose gate files requests may name by path (resolved; [] = paths are refused)."""
    raw = os.environ.get(ALLOW_GATE_PATHS_ENV, "")
    out = []
    for part in raw.split(os.pathsep):
        if part.strip():
            try:
                out.append(Path(part.strip()).expanduser().resolve())
            except (OSError, RuntimeError):
                continue
    return out


def is_gate_name(gates: str) -> bool:
    """A name (no path separators, no '..', not hidden) rather than a path."""
    return bool(GATE_NAME.fullmatch(gates)) and ".." not in gates and not gates.endswith(".safetensors")


def allowed_gate_path(gates: str) -> Path:
    """The resolved file of a ``gates`` path, if inside an allowed directory; else ParamError("gates", ...)
    with a message that does not depend on whether the path exists."""
    dirs = allowed_gate_dirs()
    if not dirs:
        raise ParamError("gates", GATE_PATH_REFUSED)
    path = Path(gates)
    if "\0" in gates or not path.is_absolute():
        raise ParamError("gates", GATE_PATH_OUTSIDE)
    try:   # Path.resolve() without its final stat(): symlinks followed, a link out of an allowed dir is outside
        resolved = Path(os.path.realpath(path))
    except (OSError, RuntimeError, ValueError):
        raise ParamError("gates", GATE_PATH_OUTSIDE) from None
    if not any(resolved.is_relative_to(d) for d in dirs):
        raise ParamError("gates", GATE_PATH_OUTSIDE)
    return resolved


def check_gates_param(gates: Optional[str]) -> None:
    """Syntax of a request's ``gates`` (no file is opened): a name, or a path inside an allowed directory."""
    if gates is None or gates == IDENTITY or is_gate_name(gates):
        return
    if "/" in gates or "\\" in gates or gates.endswith(".safetensors"):
        allowed_gate_path(gates)
        return
    raise ParamError("gates", f"invalid gate name {json.dumps(gates[:64])}{'...' if len(gates) > 64 else ''}; "
                              f"a name has {GATE_NAME_RULE}")


def model_name(model_id: str) -> str:
    return Path(model_id.rstrip("/")).name or model_id


@dataclass(frozen=True)
class Params(StrategyParams):
    block_size: int = param(64, choices=(16, 32, 64, 128), doc="tokens per gated key block (paper: 64); "
                                                              "must divide the KV page size; under a budget "
                                                              "that leaves fewer than 8 blocks of 64, 64 "
                                                              "becomes 32 where the model has gates at 32")
    threshold: float = param(2e-3, minimum=0.0, maximum=1.0,
                             doc="keep blocks whose gate probability is >= threshold (paper: 2e-3, 5e-4..5e-3); "
                                 "used when top_k is 0")
    top_k: Budget = param(0, minimum=0, doc="0: use threshold; else blocks kept besides the newest: a count, "
                                            "or a fraction (0, 1] of the context's blocks")
    gates: Optional[str] = param(None, doc="gate weights by name: 'identity' (training-free), null for the model's "
                                           "default at block_size (<gates dir>/<model>/seer.safetensors at 64, seer-b<block>.safetensors "
                                           "at others; else the gates shipped in "
                                           "strategies/data/<model>/), or a name N for <gates dir>/<model>/N.safetensors "
                                           "(else the shipped N.safetensors); names: " + GATE_NAME_RULE + ". "
                                           "A path is refused unless the server allows its directory "
                                           "(--allow-gate-paths DIR): then an absolute path to a .safetensors file "
                                           "inside it (symlinks resolved)")

    prefill: str = param("gated", choices=("gated", "dense"),
                         doc="gated: the prefill gate picks each query block's key blocks (SeerAttention); "
                             "dense: vLLM's dense prefill, the gate acts at decode only (SeerAttention-R), "
                             "so the prompt's last token, which writes the first output token, sees it all")

    def check(self) -> None:
        check_gates_param(self.gates)


@dataclass(frozen=True)
class SeerGates:
    """Gate weights of one model, all layers stacked (fp32)."""
    model_id: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    gate_dim: int
    rope_theta: float           # gate RoPE at block positions; 0 = none
    decode_q: Tensor            # [L, Hkv, G*D, Dg]
    decode_k: Tensor            # [L, Hkv, 3*D, Dg]
    prefill_q: Tensor           # [L, Hkv, G*D, Dg] (applied to block-averaged queries)
    prefill_k: Tensor           # [L, Hkv, 3*D, Dg]

    _TENSORS = ("decode_q", "decode_k", "prefill_q", "prefill_k")
    _META = ("model_id", "num_layers", "num_q_heads", "num_kv_heads", "head_size", "block_size", "gate_dim",
             "rope_theta")

    @classmethod
    def identity(cls, model: ModelFacts, block_size: int = 64) -> "SeerGates":
        """Training-free gate: the mean query of the group against the mean key of each block, no gate
        RoPE (the cached keys are already rotated); Dg = D."""
        L, hkv, d, g = model.num_layers, model.num_kv_heads, model.head_size, model.group_size
        eye = torch.eye(d)
        q = (eye / g).repeat(g, 1)                                     # [G*D, D]: mean over the group
        k = torch.cat([torch.zeros(2 * d, d), eye])                    # [3*D, D]: the mean-pooled key
        q = q.expand(L, hkv, g * d, d).contiguous()
        k = k.expand(L, hkv, 3 * d, d).contiguous()
        return cls(model_id=model.model_id, num_layers=L, num_q_heads=model.num_q_heads, num_kv_heads=hkv,
                   head_size=d, block_size=block_size, gate_dim=d, rope_theta=0.0,
                   decode_q=q, decode_k=k, prefill_q=q.clone(), prefill_k=k.clone())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).contiguous().float() for n in self._TENSORS}, str(path),
                  metadata={"format": "attnserve-seer-gates", **{n: str(getattr(self, n)) for n in self._META}})

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    @classmethod
    def load(cls, path: str | Path) -> "SeerGates":
        from safetensors.torch import load_file
        meta = cls.read_metadata(path)
        tensors = load_file(str(path))
        missing = [n for n in cls._META if n not in meta] + [n for n in cls._TENSORS if n not in tensors]
        if missing:
            raise ParamError("gates", f"{path} is not an attnserve SeerAttention gate file (missing {missing}); "
                                      + CALIBRATE_HINT)
        kinds = {"model_id": str, "rope_theta": float}
        values = {n: kinds.get(n, int)(meta[n]) for n in cls._META}
        return cls(**values, **{n: tensors[n].float() for n in cls._TENSORS})

    def for_rank(self, model: ModelFacts) -> "SeerGates":
        """The gates of the KV heads this tensor-parallel rank holds (whole gates: as they are)."""
        if model.tp_size == 1:
            return self
        first = model.tp_rank * model.num_kv_heads
        heads = slice(first, first + model.num_kv_heads)
        return dataclasses.replace(self, num_q_heads=model.num_q_heads, num_kv_heads=model.num_kv_heads,
                                   **{n: getattr(self, n)[:, heads].contiguous() for n in self._TENSORS})

    def problems(self, model: ModelFacts, block_size: int) -> list[str]:
        """Why these gates do not fit ``model`` / ``block_size`` ([] = they fit)."""
        return check_gate_metadata({n: str(getattr(self, n)) for n in self._META}, model, block_size)


def check_gate_metadata(meta: dict, model: ModelFacts, block_size: int) -> list[str]:
    out = []
    if model_name(meta.get("model_id", "")) != model_name(model.model_id):
        out.append(f"the gates belong to model {meta.get('model_id')!r}, not {model.model_id!r}")
    for name, want in (("num_layers", model.num_layers), ("num_q_heads", model.num_q_heads),
                       ("num_kv_heads", model.num_kv_heads), ("head_size", model.head_size),
                       ("block_size", block_size)):
        if str(meta.get(name)) != str(want):
            out.append(f"{name} is {meta.get(name)} in the gates, {want} here")
    return out


PAPER_BLOCK = 64       # SeerAttention's block size, the default
FINE_BLOCK = 32        # where a budget leaves fewer than MIN_BUDGET_BLOCKS blocks of PAPER_BLOCK (docs/seer.md)
MIN_BUDGET_BLOCKS = 8


def default_gate_name(block_size: int) -> str:
    """The model's default gates at ``block_size``: ``seer`` at the paper's 64, else ``seer-b<block>``."""
    return "seer" if block_size == PAPER_BLOCK else f"seer-b{block_size}"


def resolve_gates(gates: Optional[str], model: ModelFacts, block_size: int = PAPER_BLOCK) -> Optional[Path]:
    """The gate file of a ``gates`` param (None for the identity gate); null names the model's default
    gates at ``block_size``."""
    if gates == IDENTITY:
        return None
    if gates is None or is_gate_name(gates):
        name = default_gate_name(block_size) if gates is None else gates
        calibrated = gates_dir() / model_name(model.model_id) / f"{name}.safetensors"
        shipped = SHIPPED_GATES_DIR / model_name(model.model_id) / f"{name}.safetensors"
        return shipped if not calibrated.exists() and shipped.exists() else calibrated
    check_gates_param(gates)            # a bad name or a path outside the allowed directories: ParamError
    return allowed_gate_path(gates)


@functools.lru_cache(maxsize=64)
def _default_gates_exist(model: ModelFacts, block_size: int, gates_root: str) -> bool:
    return resolve_gates(None, model, block_size).is_file()     # gates_root: the cache key of gates_dir()


def has_default_gates(model: ModelFacts, block_size: int) -> bool:
    """Whether the model has default gates at ``block_size`` (calibrated or shipped; cached: the budget
    mapping runs per request and step)."""
    return _default_gates_exist(model, block_size, str(gates_dir()))


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Neox-style rotary embedding of x [..., n, Dg] at positions [n] (or broadcastable [..., n])."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None] * inv
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class SeerGroup:
    """Rows sharing (block, threshold, top_k, gates): one gate + select call per layer."""
    rows: RowGroup
    pool: int
    threshold: float
    top_k: int                      # blocks besides the newest; 0 = threshold
    gates: SeerGates                # on the rows' device
    start_pos: Tensor               # int32 [n]: first token not pooled yet
    block_phys: Tensor              # int64 [n, NB]: physical KV block of each logical pool block
    block_slot: Tensor              # int64 [n, NB]: pool block inside that page
    num_blocks: Tensor              # int32 [n]
    num_blocks_cpu: list[int]
    query_start_cpu: list[int]      # the group's query_start_loc
    gates_key: tuple = ()           # which gate-key cache (decode): (file or identity, block)
    dirty_phys: Optional[Tensor] = None   # int64 [M]: physical page of each block whose gate key is stale
    dirty_slot: Optional[Tensor] = None   # int64 [M]: pool block inside that page
    dirty_pos: Optional[Tensor] = None    # int64 [M]: its logical block index (gate RoPE position)


@dataclass
class SeerPlan:
    decode: list[SeerGroup]
    prefill: list[SeerGroup]
    count: StepCount


@register
class SeerStrategy(Strategy):
    name = "seer"
    Params = Params
    description = ("SeerAttention: a learned per-layer gate scores pooled key blocks; blocks above threshold "
                   "(or the top_k) plus the newest are attended. Needs calibrated gates for the model "
                   "(or gates='identity').")
    dense_prefill = False
    budget_param = "top_k"

    @classmethod
    def prefills_densely(cls, params: Params) -> bool:
        return params.prefill == "dense"

    @classmethod
    def params_for_budget(cls, params: Params, budget, context_len: int, model: ModelFacts) -> Params:
        """top_k blocks plus the newest per decode step (the budget replaces the threshold). Where the budget
        leaves fewer than MIN_BUDGET_BLOCKS blocks of the paper's 64 tokens and the model's default gates
        exist at FINE_BLOCK too, the budget takes 32-token blocks: at 2k tokens and 1/8, 4 blocks of 64 (one
        the newest) miss a pass key that straddles blocks or ranks 4th-5th at the first digit's step, 8 of
        32 keep it (docs/seer.md, "Block size under a budget")."""
        tokens = budget_tokens(budget, context_len)
        block = params.block_size
        if (block == PAPER_BLOCK and params.gates is None and tokens < MIN_BUDGET_BLOCKS * block
                and model is not None and has_default_gates(model, FINE_BLOCK)):
            block = FINE_BLOCK
        return dataclasses.replace(params, block_size=block, top_k=max(1, int(tokens // block) - 1))

    @classmethod
    def decode_share(cls, params: Params, context_len: int, model: ModelFacts) -> float:
        if not params.top_k:
            return float("nan")     # threshold: as many blocks as the gate's probabilities pass
        context, block = max(int(context_len), 1), params.block_size
        blocks = -(-context // block)
        newest = context - (blocks - 1) * block             # the newest block is partly filled
        return min(1.0, (min(resolve_budget(params.top_k, blocks), blocks - 1) * block + newest) / context)

    def __init__(self, model: ModelFacts):
        super().__init__(model)
        self.pooled_upto: dict[str, int] = {}
        self.pooled: dict[tuple[int, int], Tensor] = {}          # (pool, layer) -> [NB, Hkv, page/pool, 3D]
        # decode gate keys (projected + gate RoPE), per physical page like the pooled keys; only the blocks
        # touched since a request's last decode step are recomputed (SeerAttention-R's K cache)
        self.projected_upto: dict[str, int] = {}
        self.gate_keys: dict[tuple, Tensor] = {}                 # (gates key, layer) -> [NB, page/pool, Hkv, Dg]
        self._gates: dict[tuple[str, int, str], SeerGates] = {}  # (file or identity, block, device)

    @classmethod
    def validate_for_model(cls, params: Params, model: ModelFacts) -> None:
        if model.kv_block_size % params.block_size:
            raise ParamError("block_size", f"must divide the KV page size {model.kv_block_size}; allowed: "
                                           f"{[b for b in (16, 32, 64, 128) if model.kv_block_size % b == 0]}")
        path = resolve_gates(params.gates, model, params.block_size)
        if path is None:
            return
        if not path.is_file():
            raise ParamError("gates", f"no SeerAttention gates for model {model_name(model.model_id)!r} at "
                                      f"{path}; " + CALIBRATE_HINT)
        try:
            meta = SeerGates.read_metadata(path)
        except Exception as error:      # not a safetensors file (SafetensorError), unreadable (OSError)
            raise ParamError("gates", f"{path} is not a readable SeerAttention gate file "
                                      f"({type(error).__name__}); " + CALIBRATE_HINT) from None
        problems = check_gate_metadata(meta, model.whole_model(), params.block_size)
        if problems:
            raise ParamError("gates", f"{path} does not fit this model: {'; '.join(problems)}; " + CALIBRATE_HINT)

    def gates_for(self, params: Params, device: torch.device) -> SeerGates:
        path = resolve_gates(params.gates, self.model, params.block_size)
        key = (str(path) if path else IDENTITY, params.block_size, str(device))
        found = self._gates.get(key)
        if found is None:
            self.validate_for_model(params, self.model)
            gates = (SeerGates.identity(self.model, params.block_size) if path is None
                     else SeerGates.load(path).for_rank(self.model))
            found = SeerGates(**{n: getattr(gates, n) for n in SeerGates._META},
                              **{n: getattr(gates, n).to(device) for n in SeerGates._TENSORS})
            self._gates[key] = found
        return found

    def _groups(self, rows: StepRows, group: Optional[RowGroup], decode: bool = False) -> list[SeerGroup]:
        if group is None:
            return []
        page = self.model.kv_block_size

        def key(i: int):
            p = rows.params[i]
            n_blocks = -(-rows.seq_lens_cpu[i] // p.block_size)
            top_k = 0 if p.top_k == 0 else resolve_budget(p.top_k, n_blocks)
            return p.block_size, p.threshold, top_k, resolve_gates(p.gates, self.model, p.block_size)

        out = []
        for (pool, threshold, top_k, gate_file), sub in group_rows_by(rows, group, key):
            gates = self.gates_for(rows.params[sub.rows[0]], rows.device)
            nb = [-(-s // pool) for s in sub.seq_lens_cpu]
            j = torch.arange(max(nb), device=rows.device)
            col = torch.clamp(j * pool // page, max=sub.block_table.shape[1] - 1)
            start = [min(self.pooled_upto.get(rows.request_ids[i], 0), c)
                     for i, c in zip(sub.rows, sub.context_lens_cpu)]
            block_phys = sub.block_table.long()[:, col]
            block_slot = ((j * pool % page) // pool).expand(len(nb), -1)
            seer_group = SeerGroup(
                rows=sub, pool=pool, threshold=threshold, top_k=top_k, gates=gates,
                start_pos=torch.tensor(start, dtype=torch.int32, device=rows.device),
                block_phys=block_phys, block_slot=block_slot,
                num_blocks=torch.tensor(nb, dtype=torch.int32, device=rows.device), num_blocks_cpu=nb,
                query_start_cpu=[0] + list(itertools.accumulate(rows.query_lens_cpu[i] for i in sub.rows)))
            if decode:
                # stale gate keys: from the block holding the first token not projected yet to the last
                first = [min(self.projected_upto.get(rows.request_ids[i], 0), c) // pool
                         for i, c in zip(sub.rows, sub.context_lens_cpu)]
                r_idx = torch.cat([torch.full((b - f,), r, dtype=torch.int64)
                                   for r, (f, b) in enumerate(zip(first, nb))]).to(rows.device)
                j_idx = torch.cat([torch.arange(f, b, dtype=torch.int64) for f, b in zip(first, nb)]).to(rows.device)
                seer_group.gates_key = (str(gate_file) if gate_file else IDENTITY, pool)
                seer_group.dirty_phys = block_phys[r_idx, j_idx]
                seer_group.dirty_slot = block_slot[r_idx, j_idx]
                seer_group.dirty_pos = j_idx
            out.append(seer_group)
        return out

    def plan(self, rows: StepRows) -> SeerPlan:
        decode, prefill = split_rows(rows)
        if prefill is not None:     # the KV may have been recomputed (preemption): re-project from there
            for i, context in zip(prefill.rows, prefill.context_lens_cpu):
                rid = rows.request_ids[i]
                if rid in self.projected_upto:
                    self.projected_upto[rid] = min(self.projected_upto[rid], context)
        return SeerPlan(self._groups(rows, decode, decode=True), self._groups(rows, prefill), self.new_count(rows))

    def _pooled_cache(self, layer: int, key_cache: Tensor, pool: int) -> Tensor:
        num_blocks, hkv, page, d = key_cache.shape
        pooled = self.pooled.get((pool, layer))
        if pooled is None or pooled.shape[0] != num_blocks or pooled.device != key_cache.device:
            pooled = torch.zeros(num_blocks, hkv, page // pool, 3 * d, dtype=torch.float32, device=key_cache.device)
            self.pooled[(pool, layer)] = pooled
        return pooled

    @staticmethod
    def _blocks_of(cache: Tensor, group: SeerGroup) -> Tensor:
        """The group's rows of a per-physical-page block cache [num_blocks, Hkv, page / pool, W] as
        [n, NB, Hkv, W] (garbage past num_blocks)."""
        n, nb_max = group.block_phys.shape
        _, hkv, slots, width = cache.shape
        pages = -(-nb_max // slots)
        if pages > group.rows.block_table.shape[1]:
            return cache[group.block_phys, :, group.block_slot]
        # The same gather as cache[block_phys, :, block_slot], as whole pages (one index_select, a
        # cheap copy) instead of advanced indexing on two dims (several times slower per layer).
        phys = group.rows.block_table[:, :pages].reshape(-1).long()
        whole = cache.index_select(0, phys).view(n, pages, hkv, slots, width).transpose(2, 3)
        return whole.reshape(n, pages * slots, hkv, width)[:, :nb_max]

    def _pool_new_tokens(self, layer: int, key_cache: Tensor, group: SeerGroup) -> Tensor:
        """Pool the group's tokens not pooled yet; the layer's pooled-key cache [num_blocks, Hkv, slots, 3D]."""
        from strategies import ops
        pooled = self._pooled_cache(layer, key_cache, group.pool)
        ops.seer_pool_keys(key_cache, group.rows.block_table, group.start_pos, group.rows.seq_lens, group.pool,
                           pooled)
        return pooled

    def _pooled_keys(self, layer: int, key_cache: Tensor, group: SeerGroup) -> Tensor:
        """Pool the new tokens; the group's pooled keys [n, NB, Hkv, 3D] (garbage past num_blocks)."""
        return self._blocks_of(self._pool_new_tokens(layer, key_cache, group), group)

    def _decode_gate_keys(self, layer: int, key_cache: Tensor, group: SeerGroup) -> Tensor:
        """Pool the new tokens, re-project the stale blocks; the group's gate keys [n, Hkv, NB, Dg]."""
        num_blocks, hkv, page, _ = key_cache.shape
        gates, slots = group.gates, page // group.pool
        pooled = self._pool_new_tokens(layer, key_cache, group)
        cache = self.gate_keys.get((group.gates_key, layer))
        if cache is None or cache.shape[0] != num_blocks or cache.device != key_cache.device:
            cache = torch.zeros(num_blocks, slots, hkv, gates.gate_dim, dtype=torch.float32, device=key_cache.device)
            self.gate_keys[(group.gates_key, layer)] = cache
        if group.dirty_phys.numel():
            stale = pooled[group.dirty_phys, :, group.dirty_slot]                     # [M, Hkv, 3D]
            fresh = torch.einsum("mhc,hcd->hmd", stale, gates.decode_k[layer])        # [Hkv, M, Dg]
            if gates.rope_theta > 0:
                fresh = rope(fresh, group.dirty_pos, gates.rope_theta)
            cache[group.dirty_phys, group.dirty_slot] = fresh.transpose(0, 1)
        # [num_blocks, slots, Hkv, Dg] gathered by whole pages is [n, NB, Hkv, Dg] without a copy; the op
        # reads the [n, Hkv, NB, Dg] view by its strides
        n, nb_max = group.block_phys.shape
        pages = -(-nb_max // slots)
        if pages > group.rows.block_table.shape[1]:
            return cache[group.block_phys, group.block_slot].transpose(1, 2)
        phys = group.rows.block_table[:, :pages].reshape(-1).long()
        whole = cache.index_select(0, phys).view(n, pages * slots, hkv, gates.gate_dim)
        return whole[:, :nb_max].transpose(1, 2)

    def select(self, layer: int, q: Tensor, key_cache: Tensor, group: SeerGroup) -> tuple[Tensor, Tensor, Tensor]:
        """Decode selection: (token_idx [n, Hkv, K], num_idx [n, Hkv], probs [n, Hkv, NB])."""
        from strategies import ops
        n, hkv = q.shape[0], self.model.num_kv_heads
        gates = group.gates
        k_gate = self._decode_gate_keys(layer, key_cache, group)                    # [n, Hkv, NB, Dg]
        q_gate = torch.einsum("bhc,hcd->bhd", q.float().reshape(n, hkv, -1), gates.decode_q[layer])
        if gates.rope_theta > 0:
            q_gate = rope(q_gate, (group.num_blocks - 1)[:, None].expand(-1, hkv), gates.rope_theta)
        return ops.seer_select(q_gate.contiguous(), k_gate, group.num_blocks, group.pool,
                               group.rows.seq_lens, group.threshold, group.top_k)

    def prefill_mask(self, layer: int, query: Tensor, key_cache: Tensor, group: SeerGroup,
                     count: Optional[StepCount] = None) -> Tensor:
        """Block mask bool [n, Hkv, QB, KB] (absolute blocks) of the group's prefill rows."""
        hkv = self.model.num_kv_heads
        gates, pool = group.gates, group.pool
        k_in = self._pooled_keys(layer, key_cache, group)                            # [n, NB, Hkv, 3D]
        nb_max = k_in.shape[1]
        mask = torch.zeros(len(group.rows.rows), hkv, nb_max, nb_max, dtype=torch.bool, device=query.device)
        qsl = group.query_start_cpu
        q_all = group.rows.gather(query)
        attended = []
        for r, (ctx, seq, kb) in enumerate(zip(group.rows.context_lens_cpu, group.rows.seq_lens_cpu,
                                               group.num_blocks_cpu)):
            q = q_all[qsl[r]:qsl[r + 1]].float()                                     # [qlen, Hq, D]
            pos = torch.arange(ctx, seq, device=query.device)
            first = ctx // pool
            nq = (seq - 1) // pool - first + 1
            which = pos // pool - first
            q_pool = torch.zeros(nq, *q.shape[1:], device=query.device).index_add_(0, which, q)
            per_block = torch.bincount(which, minlength=nq).float()
            q_pool = q_pool / per_block[:, None, None]
            q_gate = torch.einsum("nhc,hcd->hnd", q_pool.reshape(nq, hkv, -1), gates.prefill_q[layer])
            k_gate = torch.einsum("nhc,hcd->hnd", k_in[r, :kb], gates.prefill_k[layer])      # [Hkv, KB, Dg]
            q_blocks = torch.arange(first, first + nq, device=query.device)
            k_blocks = torch.arange(kb, device=query.device)
            if gates.rope_theta > 0:
                q_gate = rope(q_gate, q_blocks, gates.rope_theta)
                k_gate = rope(k_gate, k_blocks, gates.rope_theta)
            causal = k_blocks[None, :] <= q_blocks[:, None]                          # [nq, KB]
            logits = torch.einsum("hqd,hkd->hqk", q_gate, k_gate) / math.sqrt(gates.gate_dim)
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            diagonal = k_blocks[None, :] == q_blocks[:, None]
            if group.top_k <= 0:
                keep = probs >= group.threshold
            else:
                ranked = probs.masked_fill(diagonal | ~causal, -1.0)
                top = ranked.topk(min(group.top_k, kb), dim=-1).indices
                keep = torch.zeros_like(causal).expand_as(probs).clone().scatter_(-1, top, True)
            keep = (keep | diagonal) & causal
            mask[r, :, first:first + nq, :kb] = keep
            if count is not None:
                earlier = (keep & ~diagonal).sum(-1).float().mean(0) * pool            # [nq]
                attended.append((earlier * per_block).sum() + (pos - (pos // pool) * pool + 1).sum())
        if count is not None:
            count.attended.index_add_(0, group.rows.rows_t, torch.stack(attended).to(torch.float64))
        return mask

    def run(self, layer: int, query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: SeerPlan,
            out: Tensor) -> None:
        from strategies import ops
        for group in plan.prefill:
            mask = self.prefill_mask(layer, query, key_cache, group, plan.count)
            run_prefill(self, group.rows, query, key_cache, value_cache, out, block_mask=mask,
                        mask_block=group.pool)
        for group in plan.decode:
            q = group.rows.gather(query)
            idx, num, _ = self.select(layer, q, key_cache, group)
            self.count_attended(plan.count, group.rows, num)
            o, _ = ops.sparse_paged_attention(q, key_cache, value_cache, group.rows.block_table, idx, num,
                                              self.scale, False)
            group.rows.scatter(out, o)

    def finish_step(self, plan: SeerPlan) -> None:
        for group in plan.decode + plan.prefill:
            for i, seq_len in zip(group.rows.rows, group.rows.seq_lens_cpu):
                self.pooled_upto[plan.count.request_ids[i]] = seq_len
        for group in plan.decode:
            for i, seq_len in zip(group.rows.rows, group.rows.seq_lens_cpu):
                self.projected_upto[plan.count.request_ids[i]] = seq_len
        super().finish_step(plan)

    def held_bytes(self) -> int:
        """The per-page caches; not the gate weights (model parameters: a few MiB per gate file in use, from
        the server-side set only)."""
        return tensor_bytes([*self.pooled.values(), *self.gate_keys.values()])

    def reset(self, request_id: str) -> None:
        self.pooled_upto.pop(request_id, None)
        self.projected_upto.pop(request_id, None)

    def free_idle(self) -> None:
        # the per-page caches (sized by the KV cache); a new request pools and projects its tokens again
        self.pooled.clear()
        self.gate_keys.clear()
