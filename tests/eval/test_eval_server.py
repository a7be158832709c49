"""`attnserve eval`, `recommend` and `bench` end to end through the real server (embedded model):
a short sweep of full and sink at small lengths writes its JSON, JSONL, table and valid PNGs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LENGTHS = (256, 512)
SINK_BUDGET = 64  # tokens: n_sink 4 + window 60


def attnserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep_dir(attnserve_server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    proc = attnserve(
        "eval", "--base-url", attnserve_server.base_url, "--strategies", "full,sink",
        "--budgets", str(SINK_BUDGET), "--lengths", ",".join(map(str, LENGTHS)),
        "--tasks", "passkey,niah_single", "--depths", "0.5", "--samples", "2", "--fidelity-samples", "1",
        "--concurrency", "4", "--out", str(out),
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{attnserve_server.log_tail()}"
    assert "eval requests" in proc.stderr  # the tqdm progress bar
    return out


def test_sweep_writes_results(sweep_dir: Path):
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert result["meta"]["errors"] == 0
    rows = {(r["config"], r["length"]): r for r in result["rows"]}
    assert set(rows) == {(c, L) for c in ("full", f"sink@{SINK_BUDGET}") for L in LENGTHS}
    for length in LENGTHS:
        full, sink = rows[("full", length)], rows[(f"sink@{SINK_BUDGET}", length)]
        assert full["attended_fraction"] == 1.0
        # the server really ran the sink: it reports attending less than everything
        assert 0 < sink["attended_fraction"] < 1
        assert sink["params"]["window"] == SINK_BUDGET - 4 and sink["budget"] == SINK_BUDGET
        assert sink["nominal_fraction"] == pytest.approx(SINK_BUDGET / length)
        assert set(full["task_scores"]) == {"passkey", "niah_single"} and full["n_task_samples"] == 4
        assert 0.0 <= sink["agreement"] <= 1.0 and 0.0 <= sink["prefix"] <= sink["agreement"]
        assert math.isfinite(sink["kl"]) and sink["kl"] >= 0
        assert sink["prompt_ppl_ratio"] > 0 and math.isfinite(sink["prompt_ppl_ratio"])  # sparse prefill
        # teacher-forced continuation, scored on decode steps
        assert full["decode_ppl_ratio"] == 1.0 and math.isfinite(full["decode_ppl"])
        assert sink["decode_ppl_ratio"] > 0 and math.isfinite(sink["decode_ppl_ratio"])
        # teacher-forced fidelity: full against itself is exact; the sink's top-1 share is a share
        assert full["forced_top1"] == 1.0 and full["forced_kl"] == pytest.approx(0.0, abs=1e-9)
        assert 0.0 <= sink["forced_top1"] <= 1.0 and sink["forced_kl"] >= 0
        assert full["tpot_ms"] > 0 and sink["tpot_ms"] > 0
    # a 135M model finds a pass key in 256 tokens with full attention
    assert rows[("full", 256)]["task_scores"]["passkey"] > 0


def test_outputs_are_kept_for_inspection(sweep_dir: Path):
    records = [json.loads(line) for line in (sweep_dir / "outputs.jsonl").read_text().splitlines()]
    # per length and config: 2 tasks x 2 samples + 1 text + 1 forced; + 1 ppl prompt for full and sink
    assert len(records) == len(LENGTHS) * 2 * (4 + 1 + 1 + 1)
    tasks = [r for r in records if r["kind"] == "task"]
    for rec in tasks:
        assert rec["ok"] and isinstance(rec["output"], str) and rec["references"]
        assert rec["score"] == (100.0 if rec["references"][0] in rec["output"] else 0.0)
        assert rec["attention"]["strategy"] == rec["strategy"]
        assert rec["prompt_len"] <= rec["length"]
    texts = [r for r in records if r["kind"] == "text"]
    assert all(len(r["token_ids"]) == 64 for r in texts)
    forced = [r for r in records if r["kind"] == "forced"]
    assert len(forced) == len(LENGTHS) * 2 and all(r["ok"] for r in forced)
    assert all(len(r["token_logprobs"]) == 64 and r["decode_ppl_ratio"] > 0 for r in forced)


def test_table_and_plots(sweep_dir: Path):
    from PIL import Image
    import matplotlib.image as mpimg

    md = (sweep_dir / "results.md").read_text()
    assert "| decode ppl ratio | prompt ppl ratio |" in md
    assert "| config | length |" in md and f"| sink@{SINK_BUDGET} | 512 |" in md and "| full | 256 |" in md
    for name in ("score_vs_budget.png", "fidelity_vs_length.png", "tpot_vs_length.png"):
        path = sweep_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in md
        pixels = mpimg.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # something is drawn
        with Image.open(path) as image:
            image.verify()


def test_recommend_reads_the_sweep(sweep_dir: Path):
    proc = attnserve("recommend", "--results", str(sweep_dir / "sweep.json"), "--min-fidelity", "0",
                     "--prompt-len", "500", "--json")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["measured_length"] == 512
    assert rec["choice"]["config"] == f"sink@{SINK_BUDGET}"  # the cheaper one meets a floor of 0
    assert rec["attention"] == {"strategy": "sink", "params": {}, "budget": SINK_BUDGET}
    assert rec["nominal_fraction_at_prompt_len"] == pytest.approx(SINK_BUDGET / 500)   # what it attends at 500
    proc = attnserve("recommend", "--results", str(sweep_dir / "sweep.json"), "--min-fidelity", "1.0",
                     "--prompt-len", "256")
    assert proc.returncode == 0, proc.stderr
    assert "recommended: full" in proc.stdout or "recommended: sink" in proc.stdout


def test_bench_prints_ratios_against_full(attnserve_server, tmp_path: Path):
    proc = attnserve("bench", "--base-url", attnserve_server.base_url, "--strategies", "full,sink",
                     "--budget", "64", "--lengths", "256", "--max-tokens", "8", "--repeats", "1",
                     "--no-warmup", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["full", "sink@64"]
    for r in rows:
        assert r["errors"] == 0 and r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["throughput_tok_s"] > 0
    assert rows[0]["tpot_speedup"] == 1.0
    assert "| 256 | sink@64 |" in proc.stdout and "TPOT speedup" in proc.stdout
