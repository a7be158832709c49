"""The soak (`python -m loadtests.soak`, `make soak`): its verdict on synthetic series, and a short real run
with its own server, mixed strategies and clients that abandon streams."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.soak import MiB, Sample, ceiling_growth, projected_growth, verdict

REPO = Path(__file__).resolve().parents[2]
RSS = 5000 * MiB


def series(rss, held, minutes=30, every_s=10):
    return [Sample(t, int(rss(t)), 0, int(held(t)), 1) for t in range(0, minutes * 60 + 1, every_s)]


def test_flat_memory_with_bursty_buffers_passes():
    bursty = series(lambda t: RSS + (t % 70) * MiB / 10, lambda t: (200 if t % 30 < 10 else 0) * MiB)
    assert abs(projected_growth(bursty, "rss", 300)) < 8 * MiB
    assert ceiling_growth(bursty, "held", 300) == 0
    assert verdict(bursty, 300, Sample(1800, RSS, 0, 0, 0)) == []
    # caches dropped whenever the workers go idle (every 170 s here) and refilled lazily up to 100 MiB
    refilling = series(lambda t: RSS, lambda t: 0 if t % 170 < 10 else min(100, 40 + (t % 170)) * MiB)
    assert ceiling_growth(refilling, "held", 300) == 0
    assert verdict(refilling, 300, Sample(1800, RSS, 0, 0, 0)) == []


def test_growth_after_the_warm_up_fails():
    leaking_rss = series(lambda t: RSS + t / 5 * MiB, lambda t: 0)              # 360 MiB in 30 min
    assert any("RSS grew" in f for f in verdict(leaking_rss, 300, Sample(1800, RSS, 0, 0, 0)))
    warming = series(lambda t: RSS + min(t, 300) * MiB, lambda t: 0)           # growth only while warming up
    assert verdict(warming, 300, Sample(1800, RSS, 0, 0, 0)) == []
    leaking_buffers = series(lambda t: RSS, lambda t: (t / 20 + (100 if t % 30 < 10 else 0)) * MiB)
    assert any("held bytes" in f for f in verdict(leaking_buffers, 300, Sample(1800, RSS, 0, 0, 0)))
    left_held = verdict(series(lambda t: RSS, lambda t: 0), 300, Sample(1800, RSS, 0, 4096, 0))
    assert any("after the load" in f for f in left_held)
    assert verdict(series(lambda t: RSS, lambda t: 0, minutes=1), 300, Sample(60, RSS, 0, 0, 0))  # too short


def test_short_soak_with_cancellations_passes(tmp_path):
    out = tmp_path / "soak"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.soak", "--duration", "90s", "--warmup", "30s", "--every", "3s",
         "--users", "3", "--prompt-lengths", "32:1,256:1", "--max-tokens", "16", "--cancel-share", "0.3",
         "--out", str(out), "--serve-arg=--max-model-len", "--serve-arg=2048", "--serve-arg=--kv-cache-gib",
         "--serve-arg=1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "soak.json").read_text())
    assert summary["failures"] == [] and summary["errors"] == 0 and summary["requests"] > 20
    assert summary["cancelled"] > 0
    assert len(summary["samples"]) >= 20 and all(s["rss"] > 0 for s in summary["samples"])
    assert max(s["held"] for s in summary["samples"]) > 0        # the strategies' buffers showed
    assert summary["final"]["held"] == summary["final"]["reserved"] == 0
    assert "verdict: PASS" in (out / "soak.md").read_text()
    assert (out / "soak.png").stat().st_size > 10_000
    strategies = json.loads((out / "report.json").read_text())["by_strategy"]
    assert {"full", "recycled", "landmark"} <= set(strategies)
