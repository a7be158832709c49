"""The load mix parsing and the report arithmetic (no server)."""

from __future__ import annotations

import json
import random

import pytest

from loadtests.mix import Mix, make_prompt, parse_lengths, parse_weights, pick
from loadtests.report import percentile, summarize, write_report
from loadtests.run import parse_duration


def test_weights_and_lengths():
    assert parse_weights("full:2, sink:1,landmark", "s") == {"full": 2.0, "sink": 1.0, "landmark": 1.0}
    assert parse_lengths("32:3,128") == {32: 3.0, 128: 1.0}
    for bad in ("", "full:0", "full:x", ":2"):
        with pytest.raises(ValueError):
            parse_weights(bad, "s")
    with pytest.raises(ValueError, match="valid: chat"):
        Mix.parse(apis="chat,websocket")
    with pytest.raises(ValueError, match="not in the mix"):
        Mix.parse(strategies="full", params='{"sink": {"window": 8}}')
    mix = Mix.parse(strategies="full,sink", params='{"sink": {"window": 8}}')
    assert mix.attention("sink") == {"strategy": "sink", "params": {"window": 8}}
    assert mix.attention("full") == {"strategy": "full"}


def test_pick_follows_the_weights():
    rng = random.Random(1)
    counts = {"a": 0, "b": 0}
    for _ in range(4000):
        counts[pick({"a": 3.0, "b": 1.0}, rng)] += 1
    assert 2700 < counts["a"] < 3300
    assert len(make_prompt(50, rng).split()) == 50


def test_durations():
    assert parse_duration("60s") == 60 and parse_duration("2m") == 120
    assert parse_duration("1m30s") == 90 and parse_duration("45") == 45
    with pytest.raises(Exception):
        parse_duration("10x")


def test_percentiles_and_summary(tmp_path):
    assert percentile([], 50) is None
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([3, 1, 2, 4], 99) == 4
    samples = [
        {"strategy": "full", "api": "chat-stream", "ok": True, "error": None, "start": 100.0 + i,
         "e2e": 1.0 + i, "ttft": 0.1 * (i + 1), "tpot": 0.05, "output_tokens": 8,
         "attended_fraction": 1.0, "message": None}
        for i in range(4)
    ] + [{"strategy": "sink", "api": "completions", "ok": False, "error": "http_400",
          "start": 101.0, "e2e": 0.01, "ttft": None, "tpot": None, "output_tokens": None,
          "attended_fraction": None, "message": "bad"}]
    report = summarize(samples, {"started": 6, "finished": 5}, {})
    assert report["unanswered"] == 1
    assert report["total"]["errors_by_kind"] == {"http_400": 1}
    assert report["by_strategy"]["full"]["ttft"]["p50"] == pytest.approx(0.2)
    assert report["by_strategy"]["full"]["output_tokens"] == 32
    assert report["by_strategy"]["sink"]["e2e"]["count"] == 0
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n"
                    + json.dumps({"summary": {"started": 5, "finished": 5}}) + "\n")
    written = write_report(tmp_path, path, {"base_url": "http://x"})
    assert written["unanswered"] == 0
    assert "| http_400 | 1 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_strategies_must_be_listed():
    from loadtests.run import resolve_strategies

    assert resolve_strategies("full:2,sink", ["full", "sink", "seer"]) == "full:2,sink"
    assert resolve_strategies("full:2,sink", None) == "full:2,sink"  # no /v1/strategies route
    with pytest.raises(SystemExit, match="not offered by the server"):
        resolve_strategies("full,quantum", ["full", "sink"])
    with pytest.raises(SystemExit, match="no GET /v1/strategies"):
        resolve_strategies("listed", None)
