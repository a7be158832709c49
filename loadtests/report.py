"""Turns the per-request samples of a Locust run into report.json, report.md and report.png."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "e2e")
METRIC_TITLES = {
    "ttft": "time to first token (streaming)",
    "tpot": "time per output token (streaming)",
    "e2e": "end-to-end latency",
}


def read_samples(path: Path) -> tuple[list[dict], dict]:
    """(request samples, run summary) from the locustfile's JSON lines."""
    samples, summary = [], {}
    if not path.exists():
        return samples, summary
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "summary" in item:
            summary = item["summary"]
        else:
            samples.append(item)
    return samples, summary


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _stats(values: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(values)}
    out["mean"] = sum(values) / len(values) if values else None
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def _group(samples: list[dict]) -> dict[str, Any]:
    ok = [s for s in samples if s["ok"]]
    cancelled = [s for s in ok if s.get("cancelled")]       # abandoned by the client: TTFT only
    whole = [s for s in ok if not s.get("cancelled")]
    fractions = [s["attended_fraction"] for s in whole if s.get("attended_fraction") is not None]
    return {
        "requests": len(samples),
        "succeeded": len(ok),
        "cancelled": len(cancelled),
        "errors": len(samples) - len(ok),
        "errors_by_kind": dict(Counter(s["error"] for s in samples if not s["ok"])),
        "output_tokens": sum(s["output_tokens"] or 0 for s in whole),
        **{m: _stats([s[m] for s in (ok if m == "ttft" else whole) if s.get(m) is not None]) for m in METRICS},
        "attended_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
    }


def summarize(samples: list[dict], summary: dict, config: dict) -> dict[str, Any]:
    if samples:
        t0 = min(s["start"] for s in samples)
        t1 = max(s["start"] + (s["e2e"] or 0.0) for s in samples)
        wall = max(t1 - t0, 1e-9)
    else:
        wall = 0.0
    total = _group(samples)
    by_strategy = defaultdict(list)
    by_api = defaultdict(list)
    for s in samples:
        by_strategy[s["strategy"]].append(s)
        by_api[s["api"]].append(s)
    started = summary.get("started", len(samples))
    finished = summary.get("finished", len(samples))
    messages = [f"{s['error']}: {s['message']}" for s in samples if not s["ok"]]
    return {
        "config": config,
        "wall_s": wall,
        "started": started,
        "finished": finished,
        "unanswered": started - finished,
        "requests_per_s": len(samples) / wall if wall else 0.0,
        "output_tokens_per_s": total["output_tokens"] / wall if wall else 0.0,
        "total": total,
        "by_strategy": {k: _group(v) for k, v in sorted(by_strategy.items())},
        "by_api": {k: _group(v) for k, v in sorted(by_api.items())},
        "error_examples": sorted(set(messages))[:20],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# attnserve load test",
        "",
        f"- target: `{cfg.get('base_url')}`, model `{cfg.get('model') or '(first of /v1/models)'}`",
        f"- users: {cfg.get('users')}, spawn rate {cfg.get('spawn_rate')}/s, duration "
        f"{cfg.get('duration')}",
        f"- strategies: `{cfg.get('strategies')}`; APIs: `{cfg.get('apis')}`; prompt lengths "
        f"(≈tokens): `{cfg.get('prompt_lengths')}`; max tokens: {cfg.get('max_tokens')}",
        "",
        f"**{report['total']['requests']} requests** in {report['wall_s']:.1f} s "
        f"({report['requests_per_s']:.2f} req/s, {report['output_tokens_per_s']:.1f} output "
        f"tokens/s), **{report['total']['errors']} errors**, "
        + (f"{report['total']['cancelled']} abandoned by the client after the first token "
           "(`--cancel-share`), " if report['total'].get('cancelled') else "")
        + f"{report['unanswered']} requests left unanswered at the end.",
        "",
        "## Latency by strategy (ms)",
        "",
        "TTFT and TPOT come from streamed requests; end-to-end from all successful requests.",
        "",
        "| strategy | requests | errors | TTFT p50 | p90 | p99 | TPOT p50 | p90 | p99 | "
        "e2e p50 | p90 | p99 | attended |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(report["by_strategy"].items()) + [("**all**", report["total"])]
    for name, g in rows:
        cells = [name, str(g["requests"]), str(g["errors"])]
        for m in METRICS:
            cells += [_ms(g[m][f"p{p}"]) for p in PERCENTILES]
        frac = g["attended_fraction_mean"]
        cells.append("-" if frac is None else f"{frac:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Requests by API", "", "| API | requests | errors | e2e p50 (ms) | e2e p99 (ms) |",
              "|---|---:|---:|---:|---:|"]
    for name, g in report["by_api"].items():
        lines.append(f"| {name} | {g['requests']} | {g['errors']} | {_ms(g['e2e']['p50'])} | "
                     f"{_ms(g['e2e']['p99'])} |")
    lines += ["", "## Errors by kind", ""]
    kinds = report["total"]["errors_by_kind"]
    if kinds:
        lines += ["| kind | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
        lines += ["", "Examples:", ""] + [f"- `{m}`" for m in report["error_examples"]]
    else:
        lines.append("none")
    lines += ["", "![latency by strategy](report.png)", ""]
    return "\n".join(lines)


def plot(report: dict, samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(report["by_strategy"])
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, metric in zip(axes[:3], METRICS):
        data = [[s[metric] * 1000 for s in samples if s["ok"] and s["strategy"] == name
                 and s.get(metric) is not None] for name in strategies]
        shown = [(n, d) for n, d in zip(strategies, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], whis=(1, 99), showfliers=False)
            ax.set_xticks(range(1, len(shown) + 1), [n for n, _ in shown])
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[3]
    if samples:
        t0 = min(s["start"] for s in samples)
        for name in strategies:
            pts = sorted((s["start"] + (s["e2e"] or 0) - t0, s["e2e"] * 1000)
                         for s in samples if s["strategy"] == name and s["ok"])
            if pts:
                ax.plot(*zip(*pts), ".", label=name, alpha=0.6)
        bad = [(s["start"] + (s["e2e"] or 0) - t0, (s["e2e"] or 0) * 1000)
               for s in samples if not s["ok"]]
        if bad:
            ax.plot(*zip(*bad), "x", color="red", label="errors")
        ax.legend(fontsize=8)
    ax.set_title("end-to-end latency over the run", fontsize=10)
    ax.set_xlabel("s since start")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{report['total']['requests']} requests, {report['total']['errors']} errors, "
                 f"{report['requests_per_s']:.2f} req/s (whiskers: p1-p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out_dir: Path, samples_path: Path, config: dict) -> dict:
    samples, summary = read_samples(samples_path)
    report = summarize(samples, summary, config)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    plot(report, samples, out_dir / "report.png")
    return report
