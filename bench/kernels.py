"""Decode-attention kernel benchmark (CPU): `python -m bench.kernels [--quick]`.

One run prints, side by side, for bf16 KV in vLLM's CPU layout (page 128), head 64, 9 q / 3 KV heads:
  - our sparse op with a 1/16 budget vs our dense op (all indices), and the ratio to the ideal
    speedup (context / attended);
  - our dense op's KV read bandwidth vs a STREAM-like copy measured in the same run;
  - vLLM's own CPU attention kernel (cpu_attention_with_kv_cache + its scheduler metadata) on the
    same cache vs our dense op.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import torch

from strategies import ops

HQ, HKV, D, PAGE, DTYPE = 9, 3, 64, 128, torch.bfloat16
SPARSE_FRACTION = 16


@dataclass(frozen=True)
class Case:
    batch: int
    context: int


def best_seconds(fn, min_time: float = 0.5, min_reps: int = 10) -> float:
    """Best of repeated runs: the machine is shared, the minimum is the least disturbed."""
    fn()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 29) -> float:
    """STREAM 'copy' convention: (bytes read + bytes written) / time."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src)) / 1e9


def make_cache(case: Case, generator: torch.Generator):
    blocks_per_seq = -(-case.context // PAGE)
    num_blocks = case.batch * blocks_per_seq
    kv = torch.randn(num_blocks, HKV, PAGE, 2 * D, generator=generator).to(DTYPE)
    table = torch.randperm(num_blocks, generator=generator).to(torch.int32).view(case.batch, -1)
    # vLLM's CPU layout (ISA vec): per (block, head) K transposed [D, page], then V [page, D]
    halves = kv.view(num_blocks, HKV, 2, PAGE * D)
    key_cache = halves[:, :, 0].view(num_blocks, HKV, D, PAGE).transpose(2, 3)
    value_cache = halves[:, :, 1].view(num_blocks, HKV, PAGE, D)
    return kv, key_cache, value_cache, table


def sparse_indices(case: Case, attended: int, run: int, generator: torch.Generator):
    """attended tokens per (b, g), ascending, as random runs of `run` consecutive tokens
    (run 16: landmark chunks; run 1: scattered tokens as recycled picks them)."""
    def one():
        runs = torch.randperm(case.context // run, generator=generator)[:attended // run]
        return (runs.sort().values.view(-1, 1) * run + torch.arange(run)).view(-1)
    idx = torch.stack([torch.stack([one() for _ in range(HKV)]) for _ in range(case.batch)])
    return idx.to(torch.int32), torch.full((case.batch, HKV), attended, dtype=torch.int32)


def vllm_decode(kv: torch.Tensor, query: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor,
                scale: float):
    """vLLM's CPU decode path exactly as CPUAttentionBackendImpl.forward calls it."""
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    batch = query.shape[0]
    isa = _get_attn_isa(DTYPE, PAGE, D, "auto")
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    metadata = torch.ops._C.get_scheduler_metadata(
        batch, HQ, HKV, D, seq_lens, DTYPE, query_start_loc, True, -1, isa, False, None, "auto")
    key_cache, value_cache = kv.view(kv.shape[0], HKV, 2 * PAGE, D).chunk(2, dim=2)
    output = torch.empty_like(query)

    def run():
        torch.ops._C.cpu_attention_with_kv_cache(
            query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, True, None,
            -1, table, 0.0, metadata, None, None, 1.0, 1.0, "auto")
        return output
    return run, isa


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="contexts 4k and 16k only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert ops.has_compiled("sparse_paged_attention", "cpu"), ops.EXTENSION_ERROR
    contexts = [4096, 16384] if args.quick else [4096, 16384, 65536]
    cases = [Case(b, c) for c in contexts for b in (1, 8)]
    generator = torch.Generator().manual_seed(0)
    scale = D ** -0.5
    copy_gbs = copy_bandwidth_gbs()

    rows = []
    for case in cases:
        kv, key_cache, value_cache, table = make_cache(case, generator)
        query = torch.randn(case.batch, HQ, D, generator=generator).to(DTYPE)
        seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32)
        dense_idx = torch.arange(case.context, dtype=torch.int32).expand(case.batch, HKV, -1).contiguous()
        dense_num = torch.full((case.batch, HKV), case.context, dtype=torch.int32)
        attended = case.context // SPARSE_FRACTION
        chunk_idx, chunk_num = sparse_indices(case, attended, 16, generator)
        token_idx, token_num = sparse_indices(case, attended, 1, generator)

        def ours(idx, num):
            return lambda: ops.sparse_paged_attention(query, key_cache, value_cache, table, idx,
                                                      num, scale)
        dense_s = best_seconds(ours(dense_idx, dense_num))
        chunks_s = best_seconds(ours(chunk_idx, chunk_num))
        tokens_s = best_seconds(ours(token_idx, token_num))
        vllm_run, isa = vllm_decode(kv, query, table, seq_lens, scale)
        vllm_s = best_seconds(vllm_run)
        # same answer as vLLM on the same cache (a sanity check; the tests assert it)
        diff = (vllm_run().float() - ours(dense_idx, dense_num)()[0].float()).abs().max().item()
        kv_bytes = 2 * case.batch * case.context * HKV * D * kv.element_size()
        rows.append([
            f"{case.context // 1024}k", case.batch, f"{dense_s * 1e3:.3f}",
            f"{chunks_s * 1e3:.3f}", f"{dense_s / chunks_s / SPARSE_FRACTION:.0%}",
            f"{tokens_s * 1e3:.3f}", f"{dense_s / tokens_s / SPARSE_FRACTION:.0%}",
            f"{kv_bytes / dense_s / 1e9:.1f}", f"{kv_bytes / dense_s / 1e9 / copy_gbs:.0%}",
            f"{vllm_s * 1e3:.3f}", f"{vllm_s / dense_s:.2f}x", f"{diff:.0e}"])
        del kv, key_cache, value_cache

    header = ["context", "batch", "dense ms", "1/16 chunks ms", "of ideal 16x", "1/16 tokens ms",
              "of ideal 16x", "dense KV GB/s", "of copy BW", f"vLLM ({isa}) ms", "vLLM / ours",
              "max |diff|"]
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    print(f"{time.strftime('%Y-%m-%d')}, {model}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, bf16 KV, head {D}, {HQ} q / {HKV} kv heads, page {PAGE}, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"STREAM-like copy bandwidth: {copy_gbs:.1f} GB/s (read + write)")
    print("best of >= 10 runs; 1/16 chunks: random 16-token chunks (landmark-like); 1/16 tokens: "
          "scattered tokens (recycled-like); ideal = dense time / 16")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
