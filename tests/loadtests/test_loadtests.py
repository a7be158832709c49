"""Load tests against the real server: a bounded Locust run with mixed strategies and APIs through
`python -m loadtests` (every request answered, no errors, the report files), vLLM's own serving
benchmark through `loadtests.vllm_bench`, and the metrics the Grafana dashboard reads."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# The mix we want; only the strategies GET /v1/strategies lists are used, so the test stays green
# (and grows) as strategies land in the registry.
WANTED = {"full": 2, "sink": 1, "recycled": 1, "landmark": 1, "seer": 1}
# Budgets small enough that the short prompts here really take the sparse paths; seer without
# calibrated gates runs with its training-free identity gate.
PARAMS = {
    "sink": {"n_sink": 4, "window": 16},
    "recycled": {"k": 16, "stride": 4},
    "landmark": {"block_size": 8, "k_blocks": 2},
    "seer": {"gates": "identity", "block_size": 16, "top_k": 2},
}
USERS = 8
DURATION = "45s"
MAX_TOKENS = 12


def run_module(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def listed_strategies(base_url: str) -> list[str]:
    data = httpx.get(f"{base_url}/v1/strategies", timeout=30).json()
    items = data.get("data", data) if isinstance(data, dict) else data
    return [item["name"] for item in items]


@pytest.fixture(scope="module")
def mix(base_url) -> dict[str, int]:
    listed = listed_strategies(base_url)
    assert "full" in listed, listed
    return {name: w for name, w in WANTED.items() if name in listed}


@pytest.fixture(scope="module")
def load_run(base_url, mix, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest")
    strategies = ",".join(f"{k}:{v}" for k, v in mix.items())
    result = run_module([
        "loadtests", "--base-url", base_url, "--users", str(USERS), "--spawn-rate", "4",
        "--duration", DURATION, "--stop-timeout", "120s", "--strategies", strategies,
        "--apis", "chat-stream:2,completions-stream:2,chat:1,completions:1",
        "--prompt-lengths", "24:2,96:1", "--max-tokens", str(MAX_TOKENS), "--out", str(out),
        "--strategy-params", json.dumps({k: v for k, v in PARAMS.items() if k in mix}),
    ], timeout=600)
    return result, out


def test_locust_run_answers_every_request_without_errors(load_run, mix):
    result, out = load_run
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    report = json.loads((out / "report.json").read_text())
    total = report["total"]
    assert total["requests"] >= USERS, output
    assert total["errors"] == 0, (total["errors_by_kind"], report["error_examples"])
    assert report["unanswered"] == 0 and report["started"] == report["finished"] == total["requests"]
    assert total["output_tokens"] == total["requests"] * MAX_TOKENS
    assert set(report["by_strategy"]) == set(mix)
    for name, group in report["by_strategy"].items():
        assert group["requests"] > 0 and group["errors"] == 0, name
        assert group["e2e"]["count"] == group["requests"]
        for metric in ("ttft", "tpot", "e2e"):
            stats = group[metric]
            assert stats["count"] > 0, (name, metric)
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (name, metric, stats)
        # every response reported its strategy (else an error above) and what it attended to:
        # all of the KV for full, less with the small budgets of the sparse strategies
        fraction = group["attended_fraction_mean"]
        assert fraction is not None, name
        assert (fraction == pytest.approx(1.0)) if name == "full" else (0 < fraction < 1), (name, fraction)
    assert set(report["by_api"]) == {"chat", "chat-stream", "completions", "completions-stream"}


def test_load_report_files(load_run, mix):
    _, out = load_run
    markdown = (out / "report.md").read_text()
    for name in mix:
        assert re.search(rf"^\| {name} \| \d+ \| 0 \|", markdown, re.M), markdown
    assert "## Errors by kind\n\nnone" in markdown
    with Image.open(out / "report.png") as image:
        image.verify()
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 300
    stats = (out / "locust_stats.csv").read_text()
    assert "Aggregated" in stats
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[-1] == {"summary": {"started": len(samples) - 1, "finished": len(samples) - 1}}


def test_metrics_the_dashboard_reads_are_exposed(load_run, base_url):
    """After the load, /metrics carries every metric family the Grafana dashboard queries."""
    dashboard = json.loads((REPO / "docker" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\b((?:vllm|attnserve):[a-z0-9_]+|http_requests_total)", e)}
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    missing = sorted(wanted - exposed)
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"


def test_vllm_serving_benchmark_against_our_server(base_url, mix, tmp_path, embedded_model_dir):
    strategy = next((name for name in mix if name != "full"), "full")
    params = ["--strategy-params", json.dumps(PARAMS[strategy])] if strategy in PARAMS else []
    result = run_module([
        "loadtests.vllm_bench", "--base-url", base_url, "--strategy", strategy, *params,
        "--tokenizer", str(embedded_model_dir), "--num-prompts", "8", "--max-concurrency", "4",
        "--random-input-len", "48", "--random-output-len", "12",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json",
    ], timeout=600)
    output = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "Serving Benchmark Result" in result.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["completed"] == 8 and bench["failed"] == 0, output
    assert bench["total_output_tokens"] == 8 * 12
    assert bench["median_ttft_ms"] > 0 and bench["median_tpot_ms"] > 0


def test_start_server_runs_and_stops_its_own_server(tmp_path):
    """`--start-server` starts `attnserve serve` on a free port, runs, and leaves nothing behind."""
    result = run_module([
        "loadtests", "--start-server", "--serve-arg=--kv-cache-gib", "--serve-arg=1",
        "--serve-arg=--max-model-len", "--serve-arg=2048",
        "--users", "2", "--spawn-rate", "2", "--duration", "6s", "--strategies", "full",
        "--apis", "chat-stream,completions", "--prompt-lengths", "16", "--max-tokens", "8",
        "--out", str(tmp_path),
    ], timeout=900)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output + (tmp_path / "server.log").read_text()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["total"]["requests"] > 0 and report["total"]["errors"] == 0
    port = urlparse(report["config"]["base_url"]).port
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the started server still listens"
