"""The CUDA kernels (csrc/cuda) against strategies/reference.py.

Two ways to run them:
- on a CUDA GPU, through torch.ops.attnserve from strategies._C (the full grid: fp16 / bf16,
  GQA 1 / 3 / 8, head 64 / 128, contexts 1..4096, vLLM's flash layout);
- anywhere, through the CPU emulation of csrc/cuda/emulation/: the same .cu kernels and
  csrc/cuda/binding.cpp compiled by the host compiler for CPU tensors (a smaller grid). The
  emulation registers the CUDA binding under the CPU dispatch key, so it runs in a subprocess
  (`python tests/ops/test_cuda_ops.py CASE`) that never loads the real CPU kernels.

Selections are compared exactly on integer-valued inputs (exact fp32 scores, with ties).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from strategies import reference  # noqa: E402

CUDA_DIR = ROOT / "csrc" / "cuda"
EMULATION_BUILD_DIR = ROOT / "build" / "cuda_emulation"

TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# ---- inputs ---------------------------------------------------------------------------------

def make_cache(seq_lens, num_kv_heads, head_size, page, dtype, device, layout="flash",
               integer=False, seed=0):
    """Paged K / V views [num_blocks, Hkv, page, D] and a shuffled int32 block table.
    flash: vLLM CUDA [2, num_blocks, page, Hkv, D]; cpu: vLLM CPU [num_blocks, Hkv, page, 2D]."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, -(-n // page)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2

    def values(*shape):
        if integer:
            return torch.randint(-3, 4, shape, generator=generator).float()
        return torch.randn(*shape, generator=generator)

    if layout == "flash":
        kv = values(2, num_blocks, page, num_kv_heads, head_size).to(dtype).to(device)
        key_cache, value_cache = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    else:
        kv = values(num_blocks, num_kv_heads, page, 2 * head_size).to(dtype).to(device)
        key_cache, value_cache = kv[..., :head_size], kv[..., head_size:]
    physical = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    table = torch.full((len(seq_lens), max(blocks_per_seq)), int(physical[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = physical[used:used + n]
        used += n
    return key_cache, value_cache, table.to(device)


def random_token_lists(seq_lens, num_kv_heads, budget, seed=0, empty_first=False):
    """Per (b, g): min(budget, seq_len) distinct positions in random order, 0-padded."""
    generator = torch.Generator().manual_seed(seed)
    K = max(1, min(budget, max(seq_lens)))
    token_idx = torch.zeros(len(seq_lens), num_kv_heads, K, dtype=torch.int32)
    num_idx = torch.zeros(len(seq_lens), num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for g in range(num_kv_heads):
            count = 0 if (empty_first and b == 0 and g == 0) else min(budget, n)
            token_idx[b, g, :count] = torch.randperm(n, generator=generator)[:count].to(torch.int32)
            num_idx[b, g] = count
    return token_idx, num_idx


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOLERANCE[dtype],
                               msg=lambda m: f"{what}: {m}")


def same_selection(actual_idx, actual_num, expected_idx, expected_num, what):
    assert torch.equal(actual_num.cpu(), expected_num.cpu()), (
        f"{what}: counts {actual_num.tolist()} != {expected_num.tolist()}")
    assert torch.equal(actual_idx.cpu(), expected_idx.cpu()), f"{what}: selected tokens differ"


# ---- checks (device "cuda": the GPU; "cpu": the emulation) -----------------------------------

def check_sparse(ops, device, dtype, group, head_size, seq_lens, budget, layout="flash",
                 num_kv_heads=2, page=16, seed=0):
    key_cache, value_cache, table = make_cache(seq_lens, num_kv_heads, head_size, page, dtype,
                                               device, layout, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_size,
                        generator=generator).to(dtype).to(device)
    token_idx, num_idx = random_token_lists(seq_lens, num_kv_heads, budget, seed,
                                            empty_first=len(seq_lens) > 1)
    token_idx, num_idx = token_idx.to(device), num_idx.to(device)
    scale = 1.0 / math.sqrt(head_size)
    what = f"sparse {dtype} G={group} D={head_size} lens={seq_lens} budget={budget} {layout}"
    for want_mass in (True, False):
        out, mass = ops.sparse_paged_attention(query, key_cache, value_cache, table, token_idx,
                                               num_idx, scale, want_mass)
        ref_out, ref_mass = reference.sparse_paged_attention(
            query, key_cache, value_cache, table, token_idx, num_idx, scale, want_mass)
        assert out.dtype == dtype and out.shape == ref_out.shape
        close(out, ref_out, dtype, what)
        assert mass.shape == ref_mass.shape, f"{what}: mass shape {mass.shape}"
        if want_mass:
            torch.testing.assert_close(mass.cpu(), ref_mass.cpu(), atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{what} mass: {m}")


def check_prefill(ops, device, dtype, group, head_size, seq_lens, query_lens, n_sink=0,
                  window=-1, with_mask=False, layout="flash", num_kv_heads=2, page=16, seed=0):
    key_cache, value_cache, table = make_cache(seq_lens, num_kv_heads, head_size, page, dtype,
                                               device, layout, seed=seed)
    generator = torch.Generator().manual_seed(seed + 2)
    padding = 3
    T = sum(query_lens) + padding
    query = torch.randn(T, num_kv_heads * group, head_size, generator=generator).to(dtype).to(device)
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    mask, mask_block = None, 1
    if with_mask:
        mask_block = 16
        blocks = -(-max(seq_lens) // mask_block)
        mask = torch.rand(len(seq_lens), num_kv_heads, blocks, blocks, generator=generator) < 0.6
        mask = mask.to(device)
    scale = 1.0 / math.sqrt(head_size)
    args = (query, key_cache, value_cache, table, starts.to(device), lens.to(device), scale,
            n_sink, window, mask, mask_block)
    out = ops.paged_prefill_attention(*args)
    expected = reference.paged_prefill_attention(*args)
    close(out, expected, dtype, f"prefill {dtype} G={group} D={head_size} lens={seq_lens} "
          f"q={query_lens} sink={n_sink} window={window} mask={with_mask} {layout}")


def check_landmark(ops, device, dtype, group, head_size, seq_lens, chunk, k_chunks,
                   num_kv_heads=2, page=16, seed=0):
    key_cache, _, table = make_cache(seq_lens, num_kv_heads, head_size, page, dtype, device,
                                     integer=True, seed=seed)
    num_blocks, slots = key_cache.shape[0], page // chunk
    generator = torch.Generator().manual_seed(seed + 3)
    initial = torch.randn(num_blocks, num_kv_heads, slots, head_size, generator=generator)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    what = f"landmark {dtype} G={group} D={head_size} lens={seq_lens} chunk={chunk}"
    kmin, kmax = initial.clone().to(device), initial.clone().to(device)
    ref_min, ref_max = kmin.clone(), kmax.clone()
    for start in ([0] * len(seq_lens), [max(0, n - 2 * chunk - 1) for n in seq_lens]):
        starts = torch.tensor(start, dtype=torch.int32, device=device)
        ops.landmark_update_summaries(key_cache, table, starts, lens, chunk, kmin, kmax)
        reference.landmark_update_summaries(key_cache, table, starts, lens, chunk, ref_min,
                                            ref_max)
        assert torch.equal(kmin.cpu(), ref_min.cpu()), f"{what}: kmin"
        assert torch.equal(kmax.cpu(), ref_max.cpu()), f"{what}: kmax"
    query = torch.randint(-3, 4, (len(seq_lens), num_kv_heads * group, head_size),
                          generator=generator).to(dtype).to(device)
    for k in (0, 1, k_chunks, 10_000):
        for group_max in (False, True):
            got = ops.landmark_select(query, kmin, kmax, table, lens, chunk, k, group_max)
            expected = reference.landmark_select(query, kmin, kmax, table, lens, chunk, k, group_max)
            same_selection(*got, *expected, f"{what} k_chunks={k} group_max={group_max}")


def check_seer(ops, device, dtype, num_kv_heads, gate_dim, num_blocks_list, pool, seq_lens,
               max_blocks, seed=0):
    generator = torch.Generator().manual_seed(seed + 4)
    B = len(seq_lens)
    q_gate = torch.randn(B, num_kv_heads, gate_dim, generator=generator).to(dtype).to(device)
    k_full = torch.randn(B, num_kv_heads, max_blocks, gate_dim + 3, generator=generator)
    k_gate = k_full[..., 1:gate_dim + 1].to(dtype).to(device)  # non-contiguous rows
    num_blocks = torch.tensor(num_blocks_list, dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    what = f"seer {dtype} Dg={gate_dim} blocks={num_blocks_list} lens={seq_lens}"
    for threshold, top_k in ((2e-2, 0), (0.0, 0), (1.0, 0), (0.0, 1), (0.0, 3), (0.0, 10_000)):
        token_idx, num_idx, probs = ops.seer_select(q_gate, k_gate, num_blocks, pool, lens,
                                                    threshold, top_k)
        _, _, ref_probs = reference.seer_select(q_gate, k_gate, num_blocks, pool, lens,
                                                threshold, top_k)
        torch.testing.assert_close(probs.cpu(), ref_probs.cpu(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{what} probs: {m}")
        # The selection rule of reference.seer_select applied to the kernel's own probs (exact).
        chosen = []
        for b, nb in enumerate(num_blocks_list):
            for g in range(num_kv_heads):
                p = probs[b, g, :nb].cpu()
                if nb == 0:
                    chosen.append(torch.zeros(0, dtype=torch.long))
                elif top_k <= 0:
                    keep = p >= threshold
                    keep[nb - 1] = True
                    chosen.append(keep.nonzero().view(-1))
                else:
                    chosen.append(reference._top_with_forced(p, top_k, [nb - 1]))
        K = token_idx.shape[2]
        expected = reference._expand_chunks(chosen, pool, seq_lens, K, "cpu")
        same_selection(token_idx, num_idx, *expected, f"{what} threshold={threshold} top_k={top_k}")


def check_seer_pool(ops, device, dtype, head_size, seq_lens, pool, num_kv_heads=2, page=32,
                    seed=0):
    key_cache, _, table = make_cache(seq_lens, num_kv_heads, head_size, page, dtype, device,
                                     integer=True, seed=seed)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    initial = torch.randn(key_cache.shape[0], num_kv_heads, page // pool, 3 * head_size)
    pooled, ref_pooled = initial.clone().to(device), initial.clone().to(device)
    for start in ([0] * len(seq_lens), [max(0, n - pool - 3) for n in seq_lens]):
        starts = torch.tensor(start, dtype=torch.int32, device=device)
        ops.seer_pool_keys(key_cache, table, starts, lens, pool, pooled)
        reference.seer_pool_keys(key_cache, table, starts, lens, pool, ref_pooled)
        torch.testing.assert_close(pooled.cpu(), ref_pooled.cpu(), atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"seer_pool_keys lens={seq_lens}: {m}")


def check_topk(ops, device, K, k, num_kv_heads=3, batch=2, ties=True, seed=0):
    generator = torch.Generator().manual_seed(seed + 5)
    mass = (torch.randint(0, 6, (batch, num_kv_heads, K), generator=generator).float() / 8
            if ties else torch.rand(batch, num_kv_heads, K, generator=generator))
    token_idx = torch.zeros(batch, num_kv_heads, K, dtype=torch.int32)
    num_idx = torch.zeros(batch, num_kv_heads, dtype=torch.int32)
    for b in range(batch):
        for g in range(num_kv_heads):
            n = [K, K // 2, 0][(b * num_kv_heads + g) % 3]
            token_idx[b, g, :n] = torch.randperm(3 * K + 5, generator=generator)[:n].to(torch.int32)
            num_idx[b, g] = n
    args = (mass.to(device), token_idx.to(device), num_idx.to(device), k)
    got = ops.topk_from_mass(*args)
    expected = reference.topk_from_mass(*args)
    same_selection(*got, *expected, f"topk_from_mass K={K} k={k} ties={ties}")


def check_gather(ops, device, dtype, head_size, seq_lens, budget, dst_page, layout="flash",
                 num_kv_heads=2, page=16, key_layout="rows", dst_layout="rows", seed=0):
    """gather_kv vs the twin, bit-exact on the whole destination buffer. key_layout "tokens": K
    token-contiguous per page (vLLM CPU); dst_layout "tokens": dst K token-contiguous,
    "offset": rows one element off 16-byte alignment (the per-element path)."""
    key_cache, value_cache, table = make_cache(seq_lens, num_kv_heads, head_size, page, dtype,
                                               device, layout, seed=seed)
    if key_layout == "tokens":
        key_cache = key_cache.transpose(2, 3).contiguous().transpose(2, 3)
        assert key_cache.stride(2) == 1
    token_idx, num_idx = random_token_lists(seq_lens, num_kv_heads, budget, seed,
                                            empty_first=len(seq_lens) > 1)
    B, K = len(seq_lens), token_idx.shape[2]
    generator = torch.Generator().manual_seed(seed + 6)
    dst_start = torch.randint(0, 2 * dst_page, (B,), generator=generator).to(torch.int32)
    blocks = [-(-(int(dst_start[b]) + K) // dst_page) for b in range(B)]
    num_dst = sum(blocks) + 1
    physical = torch.randperm(num_dst, generator=generator).to(torch.int32)
    dst_table = torch.full((B, max(blocks)), int(physical[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        dst_table[b, :n] = physical[used:used + n]
        used += n
    extra = 1 if dst_layout == "offset" else 0
    storage = torch.randn(2, num_dst, num_kv_heads, dst_page, head_size + extra,
                          generator=generator).to(dtype).to(device)
    expected = storage.clone()

    def views(buffer):
        dst_key, dst_value = buffer[0, ..., extra:], buffer[1, ..., extra:]
        if dst_layout == "tokens":
            dst_key = buffer[0].view(num_dst, num_kv_heads, head_size, dst_page).transpose(2, 3)
        return dst_key, dst_value

    args = (key_cache, value_cache, table, token_idx.to(device), num_idx.to(device),
            dst_table.to(device), dst_start.to(device))
    ops.gather_kv(*args, *views(storage))
    reference.gather_kv(*args, *views(expected))
    assert torch.equal(storage.cpu(), expected.cpu()), (
        f"gather_kv {dtype} D={head_size} lens={seq_lens} budget={budget} dst_page={dst_page} "
        f"{layout} key={key_layout} dst={dst_layout}: destinations differ")


# ---- the emulation: cases run in a subprocess -----------------------------------------------

EMULATED_CASES = {
    "sparse": lambda ops: [
        check_sparse(ops, "cpu", dtype, group, head_size, lens, budget, layout)
        for dtype, group, head_size, lens, budget, layout in [
            (torch.bfloat16, 3, 64, [1, 37], 16, "flash"),
            (torch.float16, 1, 128, [300, 5], 64, "flash"),
            (torch.bfloat16, 8, 128, [700], 700, "flash"),
            (torch.float32, 3, 64, [1200, 90], 400, "cpu"),
            (torch.bfloat16, 5, 96, [129], 50, "flash"),
            (torch.float16, 2, 256, [64], 64, "cpu"),
            (torch.bfloat16, 10, 64, [90, 3], 90, "flash"),
        ]],
    "prefill": lambda ops: [
        check_prefill(ops, "cpu", dtype, group, head_size, lens, qlens, sink, window, mask, layout)
        for dtype, group, head_size, lens, qlens, sink, window, mask, layout in [
            (torch.bfloat16, 3, 64, [40, 1], [40, 1], 0, -1, False, "flash"),
            (torch.float16, 1, 128, [70, 33], [20, 33], 4, 24, False, "flash"),
            (torch.float32, 2, 64, [100], [37], 0, -1, True, "cpu"),
            (torch.bfloat16, 8, 64, [50], [50], 3, 0, False, "flash"),
            (torch.float16, 1, 256, [36], [36], 2, 9, True, "flash"),
            (torch.bfloat16, 2, 128, [40, 20, 9], [0, 20, 4], 0, -1, False, "cpu"),
        ]],
    "landmark": lambda ops: [
        check_landmark(ops, "cpu", dtype, group, head_size, lens, chunk, k_chunks)
        for dtype, group, head_size, lens, chunk, k_chunks in [
            (torch.bfloat16, 3, 64, [1, 45, 300], 16, 3),
            (torch.float16, 1, 128, [130, 0, 16], 8, 5),
            (torch.float32, 8, 64, [64], 16, 2),
            (torch.bfloat16, 2, 64, [1100, 520], 8, 20),
        ]],
    "seer": lambda ops: [
        check_seer(ops, "cpu", dtype, num_kv_heads, gate_dim, blocks, pool, lens, max_blocks)
        for dtype, num_kv_heads, gate_dim, blocks, pool, lens, max_blocks in [
            (torch.bfloat16, 3, 128, [5, 1, 0], 16, [70, 3, 0], 6),
            (torch.float32, 2, 64, [40, 17], 64, [2540, 1030], 40),
            (torch.float16, 1, 32, [150, 129], 16, [2390, 2064], 150),
        ]] + [check_seer_pool(ops, "cpu", torch.bfloat16, 64, [1, 45, 300], 16),
              check_seer_pool(ops, "cpu", torch.float32, 128, [64, 7], 32)],
    "gather": lambda ops: [
        check_gather(ops, "cpu", dtype, head_size, lens, budget, dst_page, layout,
                     key_layout=key_layout, dst_layout=dst_layout)
        for dtype, head_size, lens, budget, dst_page, layout, key_layout, dst_layout in [
            (torch.bfloat16, 64, [1, 45, 300], 40, 16, "flash", "rows", "rows"),
            (torch.float16, 128, [130, 7], 100, 32, "cpu", "rows", "rows"),
            (torch.float32, 64, [90, 200], 64, 8, "flash", "rows", "rows"),
            (torch.float32, 64, [70], 30, 16, "cpu", "tokens", "tokens"),
            (torch.bfloat16, 96, [50, 33], 20, 16, "flash", "tokens", "offset"),
        ]],
    "topk": lambda ops: [
        check_topk(ops, "cpu", K, k, ties=ties)
        for K, k, ties in [(10, 4, True), (300, 50, True), (300, 300, False), (700, 512, False),
                           (50, 0, True), (20, 40, True), (9000, 8500, False)]],
}


def emulation_library() -> Path:
    """csrc/cuda + csrc/cuda/binding.cpp built for CPU tensors with the schemas of
    csrc/bindings.cpp, by the host compiler (no ninja needed); cached in build/ by content."""
    import hashlib
    import sysconfig
    from concurrent.futures import ThreadPoolExecutor
    from tempfile import TemporaryDirectory

    from torch.utils.cpp_extension import include_paths, library_paths

    sources = [ROOT / "csrc" / "bindings.cpp", ROOT / "csrc" / "cpu" / "parallel.cpp",
               CUDA_DIR / "binding.cpp", *sorted(CUDA_DIR.glob("*.cu"))]
    headers = [ROOT / "csrc" / "cpu" / "common.h", *sorted(CUDA_DIR.glob("*.h")), *sorted(CUDA_DIR.glob("*.cuh")),
               *sorted((CUDA_DIR / "emulation").glob("*.h"))]
    compiler = os.environ.get("CXX", "c++")
    flags = ["-std=c++20", "-O1", "-fPIC", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
             "-DATTNSERVE_CUDA_EMULATION", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{CUDA_DIR / 'emulation'}", f"-I{CUDA_DIR}",
             *[f"-isystem{path}" for path in include_paths()],
             f"-isystem{sysconfig.get_paths()['include']}"]
    digest = hashlib.sha256(" ".join([compiler, torch.__version__, *flags]).encode())
    for path in sources + headers:
        digest.update(path.read_bytes())
    library = EMULATION_BUILD_DIR / f"attnserve_cuda_emulation_{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    EMULATION_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with TemporaryDirectory(dir=EMULATION_BUILD_DIR) as work:
        def compile_one(source: Path) -> str:
            obj = str(Path(work) / f"{source.parent.name}_{source.stem}.o")
            result = subprocess.run([compiler, *flags, "-x", "c++", "-c", str(source), "-o", obj],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"emulation build of {source} failed:\n{result.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "2"))) as pool:
            objects = list(pool.map(compile_one, sources))
        lib_dir = library_paths()[0]
        partial = Path(work) / library.name
        result = subprocess.run(
            [compiler, "-shared", *objects, "-o", str(partial), f"-L{lib_dir}", "-lc10",
             "-ltorch_cpu", "-ltorch", "-ltorch_python", f"-Wl,-rpath,{lib_dir}"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{result.stderr}")
        partial.replace(library)
    for stale in EMULATION_BUILD_DIR.glob("attnserve_cuda_emulation_*.so"):
        if stale != library:
            stale.unlink(missing_ok=True)
    return library


def run_emulated_case(case: str) -> None:
    torch.ops.load_library(str(emulation_library()))
    torch.manual_seed(0)
    EMULATED_CASES[case](torch.ops.attnserve)


@pytest.mark.parametrize("case", sorted(EMULATED_CASES))
def test_emulated_cuda_kernels(case):
    result = subprocess.run([sys.executable, __file__, case], cwd=ROOT, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, (
        f"emulated CUDA case {case!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


# ---- the GPU ---------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def cuda_ops():
    from strategies import ops
    assert ops.has_compiled("sparse_paged_attention", "cuda"), (
        f"strategies._C has no CUDA kernels: {ops.EXTENSION_ERROR or 'built without CUDA'}")
    return torch.ops.attnserve


DTYPES = [torch.float16, torch.bfloat16]
CONTEXTS = [[1], [17, 1000], [4096, 333, 2048]]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("seq_lens", CONTEXTS)
def test_cuda_sparse_paged_attention(cuda_ops, dtype, group, head_size, seq_lens):
    for budget in (1, 256, 4096):
        check_sparse(cuda_ops, "cuda", dtype, group, head_size, seq_lens, budget)
    check_sparse(cuda_ops, "cuda", dtype, group, head_size, seq_lens, 512, layout="cpu",
                 page=128)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_size", [64, 128])
def test_cuda_paged_prefill_attention(cuda_ops, dtype, group, head_size):
    check_prefill(cuda_ops, "cuda", dtype, group, head_size, [1, 700, 4096], [1, 700, 300])
    check_prefill(cuda_ops, "cuda", dtype, group, head_size, [900, 64], [900, 10], 4, 128)
    check_prefill(cuda_ops, "cuda", dtype, group, head_size, [513, 200], [513, 7], 0, -1,
                  with_mask=True)
    check_prefill(cuda_ops, "cuda", dtype, group, head_size, [300], [300], layout="cpu", page=128)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_size", [64, 128])
def test_cuda_landmark(cuda_ops, dtype, group, head_size):
    check_landmark(cuda_ops, "cuda", dtype, group, head_size, [1, 45, 4096, 1000], 16, 32)
    check_landmark(cuda_ops, "cuda", dtype, group, head_size, [2049], 8, 100)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES])
def test_cuda_seer(cuda_ops, dtype):
    check_seer(cuda_ops, "cuda", dtype, 8, 128, [64, 1, 0, 17], 64, [4096, 40, 0, 1070], 64)
    check_seer(cuda_ops, "cuda", dtype, 3, 64, [256], 16, [4090], 256)
    check_seer_pool(cuda_ops, "cuda", dtype, 128, [1, 45, 4096], 64, page=64)
    check_seer_pool(cuda_ops, "cuda", dtype, 64, [1000, 3], 16, page=16)


@requires_cuda
@pytest.mark.parametrize("K,k", [(10, 4), (4096, 512), (4096, 4096), (20000, 9000), (300, 1)])
@pytest.mark.parametrize("ties", [True, False])
def test_cuda_topk_from_mass(cuda_ops, K, k, ties):
    check_topk(cuda_ops, "cuda", K, k, ties=ties)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES])
@pytest.mark.parametrize("head_size", [64, 128])
def test_cuda_gather_kv(cuda_ops, dtype, head_size):
    check_gather(cuda_ops, "cuda", dtype, head_size, [1, 45, 4096, 1000], 512, 16)
    check_gather(cuda_ops, "cuda", dtype, head_size, [2049, 300], 1, 128)  # the decode append
    check_gather(cuda_ops, "cuda", dtype, head_size, [700], 300, 64, layout="cpu", page=128)
    check_gather(cuda_ops, "cuda", dtype, head_size, [300, 20], 100, 16, key_layout="tokens",
                 dst_layout="offset")


if __name__ == "__main__":
    run_emulated_case(sys.argv[1])
    print(f"emulated case {sys.argv[1]}: ok")
