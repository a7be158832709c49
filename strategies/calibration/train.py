"""Calibration of SeerAttention gates (``strategies.seer.SeerGates``) for a served model, and their report.

Pipeline (docs/seer.md):
1. ``calibration_documents`` / ``calibration_text``: long natural text that ships on the machine (licence
   texts, documentation inside installed packages, /usr/share/doc), in a deterministic order; one document
   in ``EVAL_EVERY`` (by content hash) is held out for evaluation. Nothing is downloaded.
2. ``capture``: the frozen Hugging Face model (transformers, eager attention, CPU) runs windows of that
   text; a forward pre-hook on every attention module recomputes the post-RoPE queries and keys exactly as
   the module does (vLLM caches post-RoPE keys, so the gates see what the runtime sees).
3. ``features``: per layer, the gate inputs the runtime computes (pooled (max, min, mean) keys of every
   block, the partially filled newest block's pooled key of each decode row, block-averaged queries) and
   the targets: the attention map max-pooled into key blocks (decode: per query token; prefill: per query
   block, also max-pooled over the block's queries), summed over the KV group's query heads, row normalised.
4. ``train``: the gates (base model frozen) by KL(target || gate) on the rows of the last 3/4 of each
   window (SeerAttention), decode and prefill gates, all layers at once; Adam; resumable checkpoints.
5. ``report``: recall of the true attention mass vs sparsity, against the oracle top-k blocks and
   landmark's (Quest) min/max bound at the same budget.

The gate math here (``decode_logits``, ``prefill_logits``, ``pool_keys``) mirrors
``SeerStrategy.select`` / ``SeerStrategy.prefill_mask`` / ``ops.seer_pool_keys`` /
``ops.seer_select`` in pure, differentiable torch; tests/calibration/test_runtime_agreement.py checks
that both agree on real captured keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from strategies.base import ModelFacts
from strategies.seer import SeerGates, model_name
from strategies.calibration.config import CalibrationConfig

BLOCK_SIZE = 64
EVAL_EVERY = 8                       # one document in 8 (by content hash) is held out for evaluation
MIN_DOC_CHARS = 2000
MAX_DOC_CHARS = 400_000
TEXT_SUFFIXES = (".md", ".rst", ".txt")
LOSS_FROM = 0.25                     # loss on the rows of the last 3/4 of a window (SeerAttention)
LOG_ROWS_FROM = 1 / 16               # log-spaced decode rows: from T/16 to T (every prompt length alike)


# -- 1. calibration text ----------------------------------------------------------------------------

def _site_packages() -> list[Path]:
    import site
    import sysconfig
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return sorted(Path(r) for r in roots if Path(r).is_dir())


def default_text_sources() -> list[tuple[str, Path, tuple[str, ...]]]:
    """(label, root, suffixes) in the order documents are taken; '' = every regular file."""
    out = [("licenses", Path("/usr/share/common-licenses"), ("",))]
    out += [(f"site-packages{i}", p, TEXT_SUFFIXES) for i, p in enumerate(_site_packages())]
    out.append(("doc", Path("/usr/share/doc"), TEXT_SUFFIXES))
    return out


def _is_prose(text: str) -> bool:
    """Mostly letters and spaces (licences, READMEs); not tables of numbers, code or word lists."""
    if len(text) < MIN_DOC_CHARS:
        return False
    sample = text[:50_000]
    letters = sum(c.isalpha() or c == " " for c in sample)
    lines = sample.splitlines() or [""]
    mean_line = len(sample) / len(lines)
    return letters / len(sample) >= 0.78 and mean_line >= 25 and sample.count(" ") / len(sample) >= 0.1


def calibration_documents(sources: Optional[list] = None) -> list[tuple[str, str]]:
    """(name, text) of every prose document found, deterministic order (source order, then sorted
    relative path), duplicates (same content) dropped. Names are ``label/relative/path``."""
    seen: set[str] = set()
    docs = []
    for label, root, suffixes in (sources if sources is not None else default_text_sources()):
        root = Path(root)
        if not root.is_dir():
            continue
        paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                       and ("" in suffixes or p.name.endswith(suffixes)))
        for p in paths:
            try:
                if p.stat().st_size < MIN_DOC_CHARS:
                    continue
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            text = text.replace("\r\n", "\n")[:MAX_DOC_CHARS]
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen or not _is_prose(text):
                continue
            seen.add(digest)
            docs.append((f"{label}/{p.relative_to(root)}", text))
    return docs


def is_eval_document(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % EVAL_EVERY == 0


def calibration_text(split: str = "train", docs: Optional[list[tuple[str, str]]] = None) -> str:
    """The documents of one split (``train`` or ``eval``) joined by blank lines."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    docs = calibration_documents() if docs is None else docs
    return "\n\n".join(t for _, t in docs if is_eval_document(t) == (split == "eval"))


def eval_path_for(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.eval{out.suffix or '.txt'}")


def write_calibration_text(out: str | Path, docs: Optional[list[tuple[str, str]]] = None) -> tuple[Path, Path, dict]:
    """Write the train text to ``out`` and the held-out text next to it (``<stem>.eval<suffix>``)."""
    docs = calibration_documents() if docs is None else docs
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, path in (("train", out), ("eval", eval_path_for(out))):
        text = calibration_text(split, docs)
        path.write_text(text, encoding="utf-8")
        info[split] = {"path": str(path), "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "documents": sum(is_eval_document(t) == (split == "eval") for _, t in docs)}
    return out, eval_path_for(out), info


# -- 2. the frozen model and its post-RoPE queries/keys ----------------------------------------------

@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    facts: ModelFacts
    rope_theta: float


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, attention: str = "eager") -> LoadedModel:
    """The frozen model; ``attention="sdpa"`` for long windows (same math, no [H, T, T] map per layer: the
    hooks recompute q/k themselves)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = Path(model_dir).expanduser()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attention)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    theta = float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    return LoadedModel(model, tokenizer, ModelFacts.from_model_dir(model_dir, dtype=dtype), theta)


def token_windows(tokenizer, text: str, seq_len: int, count: int) -> Tensor:
    """``count`` consecutive non-overlapping windows [count, seq_len] of the tokenized text (fewer if the
    text is short). Only a prefix of the text is tokenized (cut at a paragraph break)."""
    need = count * seq_len
    chars = need * 6
    while True:
        cut = len(text) if chars >= len(text) else max(text.rfind("\n\n", 0, chars), chars // 2)
        ids = tokenizer(text[:cut], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() >= need or cut >= len(text):
            break
        chars *= 2
    n = min(count, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[:n * seq_len].view(n, seq_len)


def tokenize_prefix(tokenizer, text: str, max_tokens: int) -> Tensor:
    """The first ``max_tokens`` tokens of text (tokenizing only a prefix of it)."""
    return tokenizer(text[:max_tokens * 12], add_special_tokens=False, return_tensors="pt")["input_ids"][0][:max_tokens]


def gated_layers(facts: ModelFacts) -> list[int]:
    """The layers where ``seer`` runs: all but the sliding-window ones (vLLM's own kernel attends those
    for every request, strategies.engine.backend), so only these are calibrated."""
    return [i for i in range(facts.num_layers) if not facts.is_window_layer(i)]


@torch.no_grad()
def capture_qk(lm: LoadedModel, ids: Tensor, layers: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
    """Post-RoPE queries [L, T, Hq, D] and keys [L, T, Hkv, D] (fp32) of one window ``ids`` [T], of
    ``layers`` (default: every layer), in that order. Per-head q/k norms (Gemma 3's ``q_norm``/``k_norm``)
    are applied before RoPE as the modules do."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    all_layers = lm.model.model.layers
    layers = list(range(len(all_layers))) if layers is None else list(layers)
    qs: dict[int, Tensor] = {}
    ks: dict[int, Tensor] = {}

    def hook(i):
        def pre(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            if getattr(module, "q_norm", None) is not None:
                q, k = module.q_norm(q), module.k_norm(k)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            qs[i] = q[0].transpose(0, 1).float().contiguous()        # [T, Hq, D]
            ks[i] = k[0].transpose(0, 1).float().contiguous()        # [T, Hkv, D]
        return pre

    handles = [all_layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        lm.model.model(input_ids=ids.view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([qs[i] for i in layers]), torch.stack([ks[i] for i in layers])


# -- 3. the runtime's gate math, pure torch --------------------------------------------------------

def pool_keys(k: Tensor, block: int) -> Tensor:
    """(max, min, mean) over each block's filled tokens: k [..., T, Hkv, D] -> [..., NB, Hkv, 3D]
    (``ops.seer_pool_keys``)."""
    *lead, T, hkv, d = k.shape
    nb = -(-T // block)
    pad = nb * block - T
    shape = (*lead, nb, block, hkv, d)
    padded = lambda v: torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad), value=v).view(shape)  # noqa: E731
    counts = torch.clamp(T - torch.arange(nb) * block, max=block).float().view(nb, 1, 1)
    return torch.cat([padded(float("-inf")).amax(-3), padded(float("inf")).amin(-3),
                      padded(0.0).sum(-3) / counts], -1)


def prefix_pooled_keys(k: Tensor, rows: Tensor, block: int) -> Tensor:
    """The newest (partially filled) block's pooled key seen by a decode query at position t:
    (max, min, mean) over [block start of t, t]. k [..., T, Hkv, D], rows int64 [R] -> [..., R, Hkv, 3D]."""
    out = []
    for t in rows.tolist():
        part = k[..., (t // block) * block:t + 1, :, :]
        out.append(torch.cat([part.amax(-3), part.amin(-3), part.mean(-3)], -1))
    return torch.stack(out, dim=-3)


def gate_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    from strategies.seer import rope
    return rope(x, positions, theta) if theta > 0 else x


def decode_logits(wq: Tensor, wk: Tensor, rope_theta: float, q: Tensor, rows: Tensor, pooled: Tensor,
                  newest: Tensor, block: int) -> Tensor:
    """Scaled gate logits of decode queries (``SeerStrategy.select`` + ``ops.seer_select``), -inf past
    each row's newest block.

    wq [..., Hkv, G*D, Dg], wk [..., Hkv, 3D, Dg]; q [..., R, Hq, D] (the post-RoPE query of the token at
    position rows[r]); pooled [..., NB, Hkv, 3D] full-block pooled keys; newest [..., R, Hkv, 3D] the
    partially filled newest block of each row (``prefix_pooled_keys``). Returns [..., R, Hkv, NB]:
    column rows[r] // block is scored with ``newest``; softmax over the last dim gives ``probs``."""
    *lead, R, hq, d = q.shape
    hkv, dg = wk.shape[-3], wk.shape[-1]
    nb = pooled.shape[-3]
    qg = torch.einsum("...rhc,...hcd->...rhd", q.reshape(*lead, R, hkv, -1), wq)            # [..., R, Hkv, Dg]
    kg = torch.einsum("...nhc,...hcd->...nhd", pooled, wk)                                   # [..., NB, Hkv, Dg]
    kn = torch.einsum("...rhc,...hcd->...rhd", newest, wk)                                   # [..., R, Hkv, Dg]
    last = rows // block                                                                      # [R]
    if rope_theta > 0:
        kg = gate_rope(kg.transpose(-3, -2), torch.arange(nb), rope_theta).transpose(-3, -2)
        kn = gate_rope(kn.transpose(-3, -2), last, rope_theta).transpose(-3, -2)
        qg = gate_rope(qg.transpose(-3, -2), last, rope_theta).transpose(-3, -2)
    logits = torch.einsum("...rhd,...nhd->...rhn", qg, kg)
    diag = (qg * kn).sum(-1)                                                                  # [..., R, Hkv]
    cols = torch.arange(nb)
    is_newest = (cols[None, :] == last[:, None])[:, None, :]                                  # [R, 1, NB]
    logits = torch.where(is_newest, diag.unsqueeze(-1), logits)
    logits = logits.masked_fill((cols[None, :] > last[:, None])[:, None, :], float("-inf"))
    return logits / math.sqrt(dg)


def block_mean_queries(q: Tensor, block: int) -> Tensor:
    """Block-averaged queries [..., QB, Hq, D] of q [..., T, Hq, D] (partial last block over its tokens)."""
    *lead, T, hq, d = q.shape
    nb = -(-T // block)
    pad = nb * block - T
    total = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)).view(*lead, nb, block, hq, d).sum(-3)
    counts = torch.clamp(T - torch.arange(nb) * block, max=block).float().view(nb, 1, 1)
    return total / counts


def prefill_logits(wq: Tensor, wk: Tensor, rope_theta: float, q_pool: Tensor, q_blocks: Tensor,
                   pooled: Tensor) -> Tensor:
    """Scaled prefill gate logits (``SeerStrategy.prefill_mask``), -inf above the block diagonal.
    q_pool [..., QB, Hq, D] block-averaged queries of the absolute blocks q_blocks [QB]; pooled
    [..., KB, Hkv, 3D]. Returns [..., Hkv, QB, KB]."""
    *lead, qb, hq, d = q_pool.shape
    hkv, dg = wk.shape[-3], wk.shape[-1]
    kb = pooled.shape[-3]
    qg = torch.einsum("...nhc,...hcd->...hnd", q_pool.reshape(*lead, qb, hkv, -1), wq)       # [..., Hkv, QB, Dg]
    kg = torch.einsum("...nhc,...hcd->...hnd", pooled, wk)                                  # [..., Hkv, KB, Dg]
    k_blocks = torch.arange(kb)
    if rope_theta > 0:
        qg = gate_rope(qg, q_blocks, rope_theta)
        kg = gate_rope(kg, k_blocks, rope_theta)
    logits = torch.einsum("...hqd,...hkd->...hqk", qg, kg) / math.sqrt(dg)
    return logits.masked_fill(k_blocks[None, :] > q_blocks[:, None], float("-inf"))


# -- 4. features and targets -------------------------------------------------------------------------

@dataclass
class Features:
    """Gate inputs and targets of N windows, all layers. Shapes (N windows, L layers, R decode rows per
    window, S prefill query blocks per window, NB blocks per window):"""
    rows: Tensor            # int64 [R]: decode query positions (the same in every window)
    q: Tensor               # [N, L, R, Hq, D]
    pooled: Tensor          # [N, L, NB, Hkv, 3D]
    newest: Tensor          # [N, L, R, Hkv, 3D]
    target: Tensor          # [N, L, R, Hkv, NB] decode target (row normalised)
    mass: Tensor            # [N, L, R, Hkv, NB] true attention mass per block (mean over the group's heads)
    q_blocks: Tensor        # int64 [S]: prefill query blocks
    q_pool: Tensor          # [N, L, S, Hq, D]
    p_target: Tensor        # [N, L, Hkv, S, NB] prefill target (row normalised)
    p_mass: Tensor          # [N, L, Hkv, S, NB] attention mass of the query block's tokens, per key block
    kmax: Tensor = field(default=None)   # [N, L, NB, Hkv, D] Quest max   (landmark summaries)
    kmin: Tensor = field(default=None)     # [N, L, NB, Hkv, D] Quest min
    layers: Tensor = field(default=None)   # int64 [L]: the model's layer index of each L (None: all, in order)

    def cat(self, other: "Features") -> "Features":
        return Features(**{n: (getattr(self, n) if n in ("rows", "q_blocks", "layers") else
                               torch.cat([getattr(self, n), getattr(other, n)]))
                           for n in self.__dataclass_fields__})


def for_layers(tensors: dict[str, Tensor], f: Features) -> dict[str, Tensor]:
    """Gate tensors stacked over all the model's layers [L_model, ...] -> those of ``f``'s layers."""
    return tensors if f.layers is None else {n: v[f.layers] for n, v in tensors.items()}


def _group_sum(x: Tensor, hkv: int) -> Tensor:
    """[..., Hq, X] -> [..., Hkv, X] summed over each KV group's query heads."""
    *lead, hq, n = x.shape
    return x.reshape(*lead, hkv, hq // hkv, n).sum(-2)


def window_features(q: Tensor, k: Tensor, rows: Tensor, q_blocks: Tensor, block: int,
                    scale: Optional[float] = None) -> dict[str, Tensor]:
    """Features of one window: q [L, T, Hq, D], k [L, T, Hkv, D] post-RoPE; ``scale``: the model's softmax
    scale (None: D ** -0.5). The attention maps are computed one layer at a time (an 8k window's map of 256
    prefill queries is ~75 MB per layer, 2.3 GB for all)."""
    L, T, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    nb = -(-T // block)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(T)
    pad = nb * block - T
    qpos = (q_blocks[:, None] * block + torch.arange(block)).clamp(max=T - 1)   # [S, block]

    def block_reduce(p: Tensor, how: str) -> Tensor:                            # [..., T] -> [..., NB]
        p = torch.nn.functional.pad(p, (0, pad)).view(*p.shape[:-1], nb, block)
        return p.amax(-1) if how == "max" else p.sum(-1)

    parts: dict[str, list[Tensor]] = {}
    for layer in range(L):
        kk = k[layer].repeat_interleave(g, dim=1)                               # [T, Hq, D]
        # decode rows
        qr = q[layer, rows]                                                     # [R, Hq, D]
        att = torch.einsum("rhd,thd->hrt", qr, kk) * scale
        att = att.masked_fill(pos[None, :] > rows[:, None], float("-inf")).softmax(-1)   # [Hq, R, T]
        tmax = block_reduce(att, "max").permute(1, 0, 2)                        # [R, Hq, NB]
        tsum = block_reduce(att, "sum").permute(1, 0, 2)
        target = _group_sum(tmax, hkv)
        parts.setdefault("target", []).append(target / target.sum(-1, keepdim=True))
        parts.setdefault("mass", []).append(_group_sum(tsum, hkv) / g)
        # prefill query blocks
        qp = q[layer, qpos.reshape(-1)]                                         # [S*block, Hq, D]
        att = torch.einsum("rhd,thd->hrt", qp, kk) * scale
        att = att.masked_fill(pos[None, :] > qpos.reshape(-1)[:, None], float("-inf")).softmax(-1)
        att = att.view(hq, len(q_blocks), block, T)
        pmax = block_reduce(att.amax(-2), "max")                                # [Hq, S, NB]
        psum = block_reduce(att.sum(-2), "sum")
        p_target = pmax.view(hkv, g, len(q_blocks), nb).sum(1)
        parts.setdefault("p_target", []).append(p_target / p_target.sum(-1, keepdim=True))
        parts.setdefault("p_mass", []).append(psum.view(hkv, g, len(q_blocks), nb).sum(1) / (g * block))
        del att, kk
    return dict(rows=rows, q=q[:, rows], pooled=pool_keys(k, block), newest=prefix_pooled_keys(k, rows, block),
                q_blocks=q_blocks, q_pool=block_mean_queries(q, block)[:, q_blocks],
                **{n: torch.stack(v) for n, v in parts.items()})


def decode_rows(T: int, count: int, generator: torch.Generator, spacing: str = "uniform") -> Tensor:
    """Sorted decode positions of a window of T tokens. ``uniform``: ``count`` distinct positions drawn
    uniformly from the last 3/4 (SeerAttention). ``log``: stratified log-uniform over [T/16, T) (one draw
    per stratum, duplicates dropped): a row at position t of a window is exactly the last token of a
    t-token prompt (causal model), so every octave of prompt lengths, 1/16 of T to T, gets as many rows."""
    if spacing == "uniform":
        lo = int(T * LOSS_FROM)
        return torch.sort(lo + torch.randperm(T - lo, generator=generator)[:count]).values
    if spacing == "log":
        lo = max(1, int(T * LOG_ROWS_FROM))
        u = (torch.arange(count, dtype=torch.float64) + torch.rand(count, generator=generator, dtype=torch.float64)) / count
        return torch.unique((lo * (T / lo) ** u).floor().long().clamp(lo, T - 1))
    raise ValueError(f"rows spacing must be uniform or log, not {spacing!r}")


def features(lm: LoadedModel, windows: Tensor, block: int = BLOCK_SIZE, rows_per_window: int = 128,
             prefill_blocks: int = 4, seed: int = 0, rows: Optional[Tensor] = None,
             progress: bool = False, desc: str = "capturing", rows_spacing: str = "uniform") -> Features:
    """Features of every window [N, T], on the layers ``seer`` runs on (``gated_layers``). Decode rows
    (``decode_rows``: the last 3/4 of the window, or log-spaced from T/16) and prefill query blocks (the
    last 3/4) are sampled (seeded), the same positions in every window, unless ``rows``."""
    from tqdm import tqdm
    T = windows.shape[1]
    nb = -(-T // block)
    g = torch.Generator().manual_seed(seed)
    lo = int(T * LOSS_FROM)
    if rows is None:
        rows = decode_rows(T, rows_per_window, g, rows_spacing)
    first_qb = lo // block
    q_blocks = torch.sort(first_qb + torch.randperm(nb - first_qb, generator=g)[:prefill_blocks]).values
    layers = gated_layers(lm.facts)
    parts: dict[str, list[Tensor]] = {}
    for ids in tqdm(windows, desc=desc, disable=not progress, leave=False, file=sys.stderr):
        q, k = capture_qk(lm, ids, layers)
        f = window_features(q, k, rows, q_blocks, block, lm.facts.scale)
        pk = f["pooled"]
        d = k.shape[-1]
        f["kmax"], f["kmin"] = pk[..., :d], pk[..., d:2 * d]
        for n, v in f.items():
            if n not in ("rows", "q_blocks"):
                parts.setdefault(n, []).append(v)
        del q, k
    every = layers == list(range(lm.facts.num_layers))
    return Features(rows=rows, q_blocks=q_blocks, layers=None if every else torch.tensor(layers),
                    **{n: torch.stack(v) for n, v in parts.items()})


# -- 5. training ------------------------------------------------------------------------------------

def rotary_matrix(c: Tensor) -> Tensor:
    """Linear maps that commute with the model's RoPE: c [..., n, P, 2] (per input vector and frequency pair,
    a complex weight re + i*im) -> W [..., n*D, D], D = 2P, in the rotate-half layout of the model's RoPE
    (pair p = dims (p, p + P)): (x W) for input j, pair p = (re + i im) * (x_p + i x_{p+P}), summed over
    the n inputs. RoPE multiplies every pair by a unit complex number, so a rotary query projection and
    a rotary key projection give a score x_q W_q . x_k W_k that depends on relative positions only."""
    re, im = c[..., 0], c[..., 1]                                                 # [..., n, P]
    dg = torch.diag_embed
    w = torch.cat([torch.cat([dg(re), dg(im)], -1), torch.cat([dg(-im), dg(re)], -1)], -2)  # [..., n, D, D]
    *lead, n, d, _ = w.shape
    return w.reshape(*lead, n * d, d)


def gate_params(facts: ModelFacts, cfg: CalibrationConfig) -> dict[str, Tensor]:
    """Initial trainable gate parameters: ``free``: the weight matrices themselves; ``rotary``: complex
    weights per (input vector, frequency pair), [L, Hkv, G or 3, D/2, 2] (``gate_tensors`` expands them)."""
    L, hkv, d, gsz = facts.num_layers, facts.num_kv_heads, facts.head_size, facts.group_size
    g = torch.Generator().manual_seed(cfg.seed)
    dg = cfg.gate_dim
    if cfg.init not in ("identity", "random"):
        raise ValueError(f"init must be identity or random, not {cfg.init!r}")
    if cfg.param == "rotary":
        if dg != d or d % 2:
            raise ValueError("the rotary gate needs gate_dim == head_size (one gate pair per RoPE pair)")
        out = {}
        for n, inputs in (("decode_q", gsz), ("decode_k", 3), ("prefill_q", gsz), ("prefill_k", 3)):
            if cfg.init == "identity":      # = SeerGates.identity: mean query of the group . mean key
                c = torch.zeros(L, hkv, inputs, d // 2, 2)
                if n.endswith("_q"):
                    c[..., 0] = 1.0 / gsz
                else:
                    c[:, :, 2, :, 0] = 1.0
            else:
                c = torch.randn(L, hkv, inputs, d // 2, 2, generator=g) / math.sqrt(inputs)
            out[n] = c
    elif cfg.param == "free":
        if cfg.init == "identity":
            if dg != d:
                raise ValueError("identity init needs gate_dim == head_size")
            base = SeerGates.identity(facts, cfg.block_size)
            out = {n: getattr(base, n).clone() for n in SeerGates._TENSORS}
        else:
            out = {}
            for n, rows in (("decode_q", gsz * d), ("decode_k", 3 * d), ("prefill_q", gsz * d), ("prefill_k", 3 * d)):
                out[n] = torch.randn(L, hkv, rows, dg, generator=g) / math.sqrt(rows)
    else:
        raise ValueError(f"param must be rotary or free, not {cfg.param!r}")
    return {n: v.contiguous().requires_grad_(True) for n, v in out.items()}


def gate_tensors(params: dict[str, Tensor], cfg: CalibrationConfig) -> dict[str, Tensor]:
    """The gate weight matrices (``SeerGates`` layout) of the trainable parameters (differentiable)."""
    if cfg.param == "rotary":
        return {n: rotary_matrix(v) for n, v in params.items()}
    return dict(params)


def to_gates(params: dict[str, Tensor], facts: ModelFacts, cfg: CalibrationConfig) -> SeerGates:
    with torch.no_grad():
        w = gate_tensors(params, cfg)
    return SeerGates(model_id=facts.model_id, num_layers=facts.num_layers, num_q_heads=facts.num_q_heads,
                     num_kv_heads=facts.num_kv_heads, head_size=facts.head_size, block_size=cfg.block_size,
                     gate_dim=w["decode_q"].shape[-1], rope_theta=cfg.rope_theta,
                     **{n: w[n].detach().clone() for n in SeerGates._TENSORS})


def _kl(target: Tensor, logits: Tensor) -> Tensor:
    """KL(target || softmax(logits)) over the last dim, per row (0 * log 0 = 0, -inf logits masked)."""
    logp = torch.log_softmax(logits, -1)
    t = target.clamp_min(0)
    term = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    return term.sum(-1)


def losses(tensors: dict[str, Tensor], rope_theta: float, f: Features, idx: Optional[Tensor] = None,
           block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(decode KL, prefill KL), mean over windows, layers, rows, KV heads."""
    sel = (lambda x: x) if idx is None else (lambda x: x[idx])  # noqa: E731
    tensors = for_layers(tensors, f)
    dl = decode_logits(tensors["decode_q"], tensors["decode_k"], rope_theta, sel(f.q), f.rows, sel(f.pooled),
                       sel(f.newest), block)
    pl = prefill_logits(tensors["prefill_q"], tensors["prefill_k"], rope_theta, sel(f.q_pool), f.q_blocks,
                        sel(f.pooled))
    return _kl(sel(f.target), dl).mean(), _kl(sel(f.p_target), pl).mean()


def gate_losses(gates: SeerGates, f: Features) -> dict[str, float]:
    with torch.no_grad():
        d, p = losses({n: getattr(gates, n) for n in SeerGates._TENSORS}, gates.rope_theta, f,
                      block=gates.block_size)
    return {"decode_kl": float(d), "prefill_kl": float(p)}


def _checkpoint_path(out: Path) -> Path:
    return Path(str(out) + ".ckpt")


def train(params: dict[str, Tensor], f: Features, cfg: CalibrationConfig, checkpoint: Optional[Path] = None,
          resume: bool = False, progress: bool = True, checkpoint_every: int = 50,
          stop_after: Optional[int] = None) -> dict:
    """Adam on the gate weights; minibatches of windows drawn from a generator seeded by (seed, step), so
    an interrupted and resumed run equals an uninterrupted one. Returns the training log."""
    from tqdm import tqdm
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    start, log = 0, []
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{checkpoint} was made with another configuration: {state['config']} "
                             f"(now {asdict(cfg)}); delete it or rerun with the same options")
        with torch.no_grad():
            for n, v in params.items():
                v.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
    n = f.q.shape[0]
    bar = tqdm(range(start, cfg.steps), desc="calibrating seer gates", disable=not progress, file=sys.stderr,
               initial=start, total=cfg.steps)

    def save(step: int) -> None:
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"params": {k: v.detach() for k, v in params.items()}, "optimizer": opt.state_dict(),
                        "step": step, "log": log, "config": asdict(cfg)}, tmp)
            os.replace(tmp, checkpoint)

    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randperm(n, generator=g)[:min(cfg.batch, n)]
        d, p = losses(gate_tensors(params, cfg), cfg.rope_theta, f, idx, cfg.block_size)
        loss = d + p
        opt.zero_grad()
        loss.backward()
        opt.step()
        d, p = d.item(), p.item()
        log.append({"step": step + 1, "decode_kl": round(d, 5), "prefill_kl": round(p, 5)})
        bar.set_postfix(decode_kl=f"{d:.4f}", prefill_kl=f"{p:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            save(step + 1)
            break
    bar.close()
    return {"log": log}


def save_gates(gates: SeerGates, path: str | Path, provenance: dict) -> None:
    """SeerGates.save plus provenance metadata (extra keys; SeerGates.load ignores them)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gates.save(path)
    meta = SeerGates.read_metadata(path)
    meta.update({f"calibration_{k}": (v if isinstance(v, str) else json.dumps(v)) for k, v in provenance.items()})
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def calibrate(model_dir: str | Path, out: str | Path, cfg: CalibrationConfig, resume: bool = False,
              progress: bool = True, eval_windows: int = 2, log=print) -> dict:
    """The whole calibration: text, capture, train, save ``out``; returns a summary (losses before/after
    on held-out windows)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    out = Path(out).expanduser()
    lm = load_model(model_dir, getattr(torch, cfg.dtype), attention="sdpa")   # no [H, T, T] map per layer
    docs = calibration_documents()
    train_ids = token_windows(lm.tokenizer, calibration_text("train", docs), cfg.seq_len, cfg.windows)
    eval_ids = token_windows(lm.tokenizer, calibration_text("eval", docs), cfg.seq_len, eval_windows)
    log(f"calibration text: {train_ids.shape[0]} training and {eval_ids.shape[0]} held-out windows of "
        f"{cfg.seq_len} tokens")
    kw = dict(block=cfg.block_size, rows_per_window=cfg.rows_per_window, prefill_blocks=cfg.prefill_blocks,
              rows_spacing=cfg.rows_spacing, progress=progress)
    f_train = features(lm, train_ids, seed=cfg.seed, desc="capturing q/k (train)", **kw)
    f_eval = features(lm, eval_ids, seed=cfg.seed + 1, desc="capturing q/k (held out)", **kw)
    params = gate_params(lm.facts, cfg)
    before = gate_losses(to_gates(params, lm.facts, cfg), f_eval)
    result = train(params, f_train, cfg, checkpoint=_checkpoint_path(out), resume=resume, progress=progress)
    gates = to_gates(params, lm.facts, cfg)
    after = gate_losses(gates, f_eval)
    provenance = {"config": asdict(cfg), "heldout_before": before, "heldout_after": after,
                  "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "command": "attnserve calibrate-seer " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate-seer"]
                  else "strategies.calibration.train.calibrate"}
    save_gates(gates, out, provenance)
    _checkpoint_path(out).unlink(missing_ok=True)
    summary = {"out": str(out), "heldout_before": before, "heldout_after": after,
               "seconds": round(time.time() - t0, 1)}
    log(json.dumps(summary))
    return summary


# -- 6. evaluation: recall of the true attention mass --------------------------------------------------

def _keep_top(scores: Tensor, count: Tensor, forced: Tensor) -> Tensor:
    """Bool mask [..., NB] of the `count` (per row, broadcast [...]) blocks: the forced ones plus the
    best other scores (ties: lower block). scores are -inf where unavailable."""
    nb = scores.shape[-1]
    ranked = scores.masked_fill(forced, float("inf"))
    # stable descending order = ties by lower index
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order))
    return (rank < count.unsqueeze(-1)) & torch.isfinite(scores) | forced


def budget_blocks(nblocks: Tensor, fraction: float) -> Tensor:
    """Blocks kept in all (the newest included) at a fraction of the context's blocks: ceil, >= 1."""
    return torch.clamp(torch.ceil(nblocks.float() * fraction), min=1).long()


def quest_scores(q: Tensor, kmax: Tensor, kmin: Tensor, hkv: int) -> Tensor:
    """Landmark's (Quest) bound per KV group: Σ_heads Σ_d max(q_d max_d, q_d min_d).
    q [..., R, Hq, D]; kmax/kmin [..., NB, Hkv, D] -> [..., R, Hkv, NB]."""
    *lead, R, hq, d = q.shape
    g = hq // hkv
    qh = q.reshape(*lead, R, hkv, g, 1, d)
    hi = kmax.transpose(-3, -2).unsqueeze(-4).unsqueeze(-5)                   # [..., 1, Hkv, 1, NB, D]
    lo = kmin.transpose(-3, -2).unsqueeze(-4).unsqueeze(-5)
    return torch.maximum(qh * hi, qh * lo).sum(-1).sum(-2)


@dataclass
class RecallRow:
    setting: str
    method: str
    sparsity: Tensor     # [L]
    recall: Tensor       # [L]


def decode_recall(gates: SeerGates, f: Features, fractions=(1 / 4, 1 / 8, 1 / 16),
                  thresholds=(5e-4, 2e-3, 5e-3, 2e-2), quest: bool = True) -> list[RecallRow]:
    """Per layer (mean over windows, rows, KV heads) recall of the attention mass and block sparsity:
    seer by threshold (with the oracle at the same per-row block count) and by budget fraction (with
    oracle top-k and Quest at the same budget)."""
    block = gates.block_size
    with torch.no_grad():
        w = for_layers({"q": gates.decode_q, "k": gates.decode_k}, f)
        logits = decode_logits(w["q"], w["k"], gates.rope_theta, f.q, f.rows, f.pooled,
                               f.newest, block)                               # [N, L, R, Hkv, NB]
        probs = logits.softmax(-1)
        nb = probs.shape[-1]
        last = f.rows // block
        cols = torch.arange(nb)
        avail = (cols[None, :] <= last[:, None])[:, None, :]                  # [R, 1, NB]
        newest = (cols[None, :] == last[:, None])[:, None, :].expand_as(probs)
        first = (cols == 0).expand_as(probs)
        nblocks = (last + 1).view(-1, 1).expand(probs.shape[2], probs.shape[3])   # [R, Hkv]
        mass = f.mass
        oracle_scores = mass.masked_fill(~avail, float("-inf"))
        gate_scores = probs.masked_fill(~avail, float("-inf"))
        out = []

        def summarise(keep: Tensor) -> tuple[Tensor, Tensor]:
            kept = keep.sum(-1).float() / nblocks
            recall = (mass * keep).sum(-1)
            dims = [0, 2, 3]
            return (1 - kept).mean(dims), recall.mean(dims)

        for thr in thresholds:
            keep = ((probs >= thr) & avail) | newest
            s, r = summarise(keep)
            out.append(RecallRow(f"threshold {thr:g}", "seer", s, r))
            count = keep.sum(-1)
            s, r = summarise(_keep_top(oracle_scores, count, newest))
            out.append(RecallRow(f"threshold {thr:g}", "oracle", s, r))
        if quest:
            qs = quest_scores(f.q, f.kmax, f.kmin, gates.num_kv_heads).masked_fill(~avail, float("-inf"))
        for frac in fractions:
            count = budget_blocks(nblocks, frac)
            name = f"budget 1/{round(1 / frac)}"
            out.append(RecallRow(name, "seer", *summarise(_keep_top(gate_scores, count, newest))))
            out.append(RecallRow(name, "oracle", *summarise(_keep_top(oracle_scores, count, newest))))
            if quest:
                forced = newest | (first & (count > 1).unsqueeze(-1))
                out.append(RecallRow(name, "landmark (Quest)", *summarise(_keep_top(qs, count, forced))))
    return out


def prefill_recall(gates: SeerGates, f: Features, fraction: float = 1 / 8) -> dict[str, Tensor]:
    """Per layer recall of the query blocks' attention mass at a block budget (diagonal kept): prefill
    gate vs oracle."""
    with torch.no_grad():
        w = for_layers({"q": gates.prefill_q, "k": gates.prefill_k}, f)
        logits = prefill_logits(w["q"], w["k"], gates.rope_theta, f.q_pool, f.q_blocks,
                                f.pooled)                                     # [N, L, Hkv, S, NB]
        nb = logits.shape[-1]
        cols = torch.arange(nb)
        diag = (cols[None, :] == f.q_blocks[:, None]).expand_as(logits)
        count = budget_blocks((f.q_blocks + 1).view(-1, 1).expand(logits.shape[-2], 1).squeeze(-1), fraction)
        count = count.expand(logits.shape[:-1])
        oracle = f.p_mass.masked_fill(~torch.isfinite(logits), float("-inf"))
        return {m: (f.p_mass * _keep_top(s, count, diag)).sum(-1).mean([0, 2, 3])
                for m, s in (("seer", logits), ("oracle", oracle))}


def report_markdown(rows: list[RecallRow], prefill: Optional[dict] = None, title: str = "",
                    per_layer=("threshold 0.002", "budget 1/8"), layers: Optional[list[int]] = None) -> str:
    """Summary table (mean over layers) then per layer: sparsity / recall of each setting and method."""
    lines = []
    if title:
        lines += [title, ""]
    lines += ["| setting | method | block sparsity | attention-mass recall |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.method} | {r.sparsity.mean():.3f} | {r.recall.mean():.3f} |")
    if prefill:
        lines += ["", "| prefill gate, budget 1/8 | " + " | ".join(prefill) + " |",
                  "|---|" + "---|" * len(prefill),
                  "| recall (mean over layers) | " + " | ".join(f"{v.mean():.3f}" for v in prefill.values()) + " |"]
    L = rows[0].recall.numel()
    shown = [r for r in rows if r.setting in per_layer]
    lines += ["", f"Per layer ({', '.join(per_layer)}; recall, block sparsity in brackets):", "",
              "| layer | " + " | ".join(f"{r.setting}: {r.method}" for r in shown) + " |",
              "|---" * (len(shown) + 1) + "|"]
    for i, layer in enumerate(range(L) if layers is None else layers):
        cells = [f"{r.recall[i]:.3f} ({r.sparsity[i]:.2f})" for r in shown]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seer_report(model_dir: str | Path, gates_path: str | Path, seq_len: int = 2048, windows: int = 2,
                rows_per_window: int = 128, seed: int = 1, progress: bool = True) -> str:
    """``gates_path``: a gate file, or ``"identity"`` (the training-free gate, blocks of ``BLOCK_SIZE``)."""
    lm = load_model(model_dir, attention="sdpa")     # the hooks recompute q/k: no [H, T, T] map needed
    gates = SeerGates.identity(lm.facts, BLOCK_SIZE) if str(gates_path) == "identity" else SeerGates.load(gates_path)
    problems = gates.problems(lm.facts, gates.block_size)
    if problems:
        raise ValueError(f"{gates_path} does not fit {model_dir}: {'; '.join(problems)}")
    ids = token_windows(lm.tokenizer, calibration_text("eval"), seq_len, windows)
    f = features(lm, ids, block=gates.block_size, rows_per_window=rows_per_window, seed=seed, progress=progress,
                 desc="capturing q/k (held out)")
    title = (f"Seer gates {gates_path} on {model_name(str(model_dir))}: held-out text, {ids.shape[0]} windows of "
             f"{seq_len} tokens, {f.rows.numel()} decode rows each (last 3/4), block {gates.block_size}; "
             f"KL held out: {gate_losses(gates, f)}")
    return report_markdown(decode_recall(gates, f), prefill_recall(gates, f), title,
                           layers=None if f.layers is None else f.layers.tolist())


# -- default gates for the served model ------------------------------------------------------------

def default_gates_path(model_dir: str | Path) -> Path:
    """Where ``seer`` looks when a request gives no ``gates`` (strategies.seer.resolve_gates)."""
    from strategies.seer import resolve_gates
    facts = ModelFacts.from_model_dir(model_dir)
    return resolve_gates(None, facts)


def ensure_default_gates(model_dir: str | Path, cfg: Optional[CalibrationConfig] = None, log=print) -> Path:
    """Calibrate the served model's default gates unless they exist (idempotent; resumable)."""
    path = default_gates_path(model_dir)
    if path.is_file():
        log(f"seer gates already calibrated: {path}")
        return path
    calibrate(model_dir, path, cfg or CalibrationConfig(), resume=True, log=log)
    return path

