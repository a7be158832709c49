"""Decode-attention kernel benchmark (CUDA): `python -m bench.kernels_gpu [--quick]`.

bf16 KV in vLLM's CUDA flash layout [2, num_blocks, 16, Hkv, D], head 64, 9 q / 3 KV heads (the
embedded model's shape, as bench/kernels.py on CPU). For batch 1 / 8 and contexts 4k / 16k / 64k
it prints, side by side:
  - our sparse op with a 1/16 budget vs our dense op (all indices), and the ratio to the ideal
    speedup 16;
  - the KV bytes each op reads per call over its time (GB/s), and that as a share of the H200's
    ~4.8 TB/s HBM bandwidth;
  - torch's own SDPA over the same KV laid out contiguously (a dense baseline that needs no page
    table), and our dense op with the mass output (a `recycled` refresh step);
  - the selection ops of one decode step at that context.
L2 is flushed before every timed call (decode reads each layer's KV once per step).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from strategies import ops

HQ, HKV, D, PAGE, DTYPE = 9, 3, 64, 16, torch.bfloat16
SPARSE_FRACTION = 16
H200_HBM_GBS = 4800.0


class Timer:
    """Median milliseconds of fn on the current stream, L2 flushed before each call."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def make_cache(batch: int, context: int, generator: torch.Generator):
    blocks_per_seq = -(-context // PAGE)
    num_blocks = batch * blocks_per_seq
    kv = torch.randn(2, num_blocks, PAGE, HKV, D, device="cuda", generator=generator, dtype=DTYPE)
    table = torch.randperm(num_blocks, device="cuda", generator=generator).to(torch.int32)
    return kv, kv[0].transpose(1, 2), kv[1].transpose(1, 2), table.view(batch, -1)


def token_lists(batch: int, context: int, count: int, generator: torch.Generator):
    """Per (b, g): `count` distinct positions, ascending (as the selection ops return them)."""
    if count == context:
        token_idx = torch.arange(context, device="cuda", dtype=torch.int32).expand(
            batch, HKV, context).contiguous()
    else:
        scores = torch.rand(batch, HKV, context, device="cuda", generator=generator)
        token_idx = scores.topk(count, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    num_idx = torch.full((batch, HKV), count, device="cuda", dtype=torch.int32)
    return token_idx, num_idx


def kv_bytes(batch: int, tokens: int) -> int:
    """K and V rows read plus the token list."""
    return batch * HKV * tokens * (2 * D * 2 + 4)


def run(quick: bool) -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__} "
          f"CUDA {torch.version.cuda}")
    print(f"bf16, head {D}, {HQ} q / {HKV} KV heads, page {PAGE} (flash layout), "
          f"sparse budget 1/{SPARSE_FRACTION}, L2 flushed per call; times in microseconds\n")
    assert ops.has_compiled("sparse_paged_attention", "cuda"), "strategies._C has no CUDA kernels"
    generator = torch.Generator(device="cuda").manual_seed(0)
    timer = Timer(reps=10 if quick else 30)
    scale = 1.0 / math.sqrt(D)
    header = (f"{'batch':>5} {'context':>7} | {'dense':>8} {'sparse':>8} {'speedup':>7} "
              f"{'/ideal':>6} | {'dense GB/s':>10} {'%HBM':>5} {'sparse GB/s':>11} {'%HBM':>5} | "
              f"{'sdpa':>8} {'dense+mass':>10}")
    print(header)
    print("-" * len(header))
    selection_rows = []
    for batch in (1, 8):
        for context in (4096, 16384, 65536):
            kv, key_cache, value_cache, table = make_cache(batch, context, generator)
            query = torch.randn(batch, HQ, D, device="cuda", generator=generator, dtype=DTYPE)
            dense_idx, dense_num = token_lists(batch, context, context, generator)
            attended = context // SPARSE_FRACTION
            sparse_idx, sparse_num = token_lists(batch, context, attended, generator)

            def attention(idx, num, want_mass=False):
                return lambda: torch.ops.attnserve.sparse_paged_attention(
                    query, key_cache, value_cache, table, idx, num, scale, want_mass)

            dense_ms = timer(attention(dense_idx, dense_num))
            sparse_ms = timer(attention(sparse_idx, sparse_num))
            mass_ms = timer(attention(dense_idx, dense_num, True))
            # torch SDPA on contiguous [B, H, S, D] K/V (GQA by enable_gqa).
            keys = key_cache[table.long()].permute(0, 2, 1, 3, 4).reshape(batch, HKV, -1, D)
            values = value_cache[table.long()].permute(0, 2, 1, 3, 4).reshape(batch, HKV, -1, D)
            keys, values = keys[:, :, :context].contiguous(), values[:, :, :context].contiguous()
            q4 = query.view(batch, HQ, 1, D)
            sdpa_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, keys, values, scale=scale, enable_gqa=True))
            del keys, values

            dense_gbs = kv_bytes(batch, context) / dense_ms / 1e6
            sparse_gbs = kv_bytes(batch, attended) / sparse_ms / 1e6
            speedup = dense_ms / sparse_ms
            print(f"{batch:>5} {context:>7} | {dense_ms * 1e3:>8.1f} {sparse_ms * 1e3:>8.1f} "
                  f"{speedup:>6.2f}x {speedup / SPARSE_FRACTION:>6.2f} | {dense_gbs:>10.0f} "
                  f"{100 * dense_gbs / H200_HBM_GBS:>4.0f}% {sparse_gbs:>11.0f} "
                  f"{100 * sparse_gbs / H200_HBM_GBS:>4.0f}% | {sdpa_ms * 1e3:>8.1f} "
                  f"{mass_ms * 1e3:>10.1f}")

            # One decode step's selection work at this context (budget 1/16).
            chunk = 16
            slots = PAGE // chunk
            kmin = torch.zeros(kv.shape[1], HKV, slots, D, device="cuda")
            kmax = torch.zeros_like(kmin)
            lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
            zeros = torch.zeros_like(lens)
            ops.landmark_update_summaries(key_cache, table, zeros, lens, chunk, kmin, kmax)
            update_ms = timer(lambda: ops.landmark_update_summaries(
                key_cache, table, lens - 1, lens, chunk, kmin, kmax))
            k_chunks = attended // chunk
            landmark_ms = timer(lambda: ops.landmark_select(query, kmin, kmax, table, lens, chunk,
                                                            k_chunks))
            pool = 64
            nb = context // pool
            q_gate = torch.randn(batch, HKV, 128, device="cuda", generator=generator)
            k_gate = torch.randn(batch, HKV, nb, 128, device="cuda", generator=generator)
            blocks = torch.full((batch,), nb, device="cuda", dtype=torch.int32)
            seer_ms = timer(lambda: ops.seer_select(q_gate, k_gate, blocks, pool, lens, 0.0,
                                                    attended // pool))
            mass = torch.rand(batch, HKV, context, device="cuda", generator=generator)
            topk_ms = timer(lambda: ops.topk_from_mass(mass, dense_idx, dense_num, attended))
            selection_rows.append((batch, context, update_ms, landmark_ms, seer_ms, topk_ms))
            del kv, key_cache, value_cache, kmin, kmax
            torch.cuda.empty_cache()

    print(f"\nselection ops of one decode step (budget 1/{SPARSE_FRACTION}), microseconds")
    print(f"{'batch':>5} {'context':>7} | {'landmark_update':>15} {'landmark_select':>15} "
          f"{'seer_select':>11} {'topk_from_mass':>14}")
    for batch, context, update_ms, landmark_ms, seer_ms, topk_ms in selection_rows:
        print(f"{batch:>5} {context:>7} | {update_ms * 1e3:>15.1f} {landmark_ms * 1e3:>15.1f} "
              f"{seer_ms * 1e3:>11.1f} {topk_ms * 1e3:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 timed calls per point, not 30")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
