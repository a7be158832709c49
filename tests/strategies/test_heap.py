"""The worker gives its free heap pages back to the OS (strategies.engine.heap): glibc's malloc_trim really
lowers the resident memory that free()d heap chunks below the top keep, the trimmer releases at most every
interval while busy, and the router releases whenever its worker goes idle."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch

from strategies.base import ModelFacts
from strategies.engine.backend import Router
from strategies.engine.heap import HeapTrimmer

FRAGMENTED_HEAP = r"""
import ctypes
from strategies.engine.heap import release_free_heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def anon_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

chunk = 96 * 1024                     # below glibc's mmap threshold: served from the heap
blocks = [libc.malloc(chunk) for _ in range(1024)]          # 96 MiB
for block in blocks:
    ctypes.memset(block, 1, chunk)
for block in blocks[:-1]:             # the last one pins the heap's top: free() alone cannot shrink it
    libc.free(block)
before = anon_kib()
assert release_free_heap()
after = anon_kib()
print(before, after)
"""


def test_malloc_trim_returns_free_heap_pages_below_the_top():
    result = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before_kib, after_kib = map(int, result.stdout.split())
    assert before_kib - after_kib > 64 * 1024, (before_kib, after_kib)     # most of the 96 MiB freed


def test_the_trimmer_releases_at_most_once_per_interval():
    now = [0.0]
    released = []
    trimmer = HeapTrimmer(interval_s=10.0, clock=lambda: now[0], release=lambda: released.append(now[0]) or True)
    for t in range(0, 35):                # one engine step a second
        now[0] = float(t)
        trimmer.maybe_release()
    assert released == [10.0, 20.0, 30.0]
    now[0] = 31.5
    trimmer.release_now()                 # the worker went idle
    now[0] = 40.0
    trimmer.maybe_release()               # the interval counts from the idle release
    assert released == [10.0, 20.0, 30.0, 31.5] and trimmer.releases == 4


def test_the_router_releases_the_heap_when_its_worker_goes_idle():
    router = Router()
    router.model = ModelFacts(30, 9, 3, 64, 32, 2048, torch.bfloat16, "SmolLM2-135M-Instruct")
    router.heap = HeapTrimmer(interval_s=1e9)
    extra = {"a": {"strategy": "sink"}, "b": {"strategy": "landmark"}}
    router.runner = SimpleNamespace(requests={rid: SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args={"attention": attention}), num_prompt_tokens=100)
        for rid, attention in extra.items()})
    assert {router.choice(rid).strategy for rid in extra} == {"sink", "landmark"}
    router.release("a", finished=True)
    assert router.heap.releases == 0                  # "b" still runs
    router.release("b", finished=True)
    assert router.heap.releases == 1
