"""`python -m loadtests.soak`: a bounded soak. It starts `attnserve serve`, runs the load test's mixed-strategy
Locust load for `--duration` with a share of streams abandoned by the client (`--cancel-share`), and samples
every `--every` seconds the server's memory (RSS summed over its process group: API process, engine core,
workers) and the strategies' buffer bytes reserved and held (/metrics). It writes soak.json, soak.md and
soak.png (the series over time) beside the load test's report in --out, and fails (exit 1) on any request
error, on RSS or held bytes that grow after `--warmup`, or on buffers still held once the load is over.

    python -m loadtests.soak --duration 30m --out soak-report
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.report import write_report
from loadtests.run import (build_parser, listed_strategies, parse_duration, resolve_strategies, run_locust,
                           started_server_process)

MiB = 1 << 20
# Growth after the warm-up, projected over the rest of the run by a least-squares line, that fails the soak.
RSS_GROWTH_SHARE, RSS_GROWTH_FLOOR = 0.02, 48 * MiB
HELD_GROWTH_SHARE, HELD_GROWTH_FLOOR = 0.10, 8 * MiB
SOAK_DEFAULTS = dict(duration="30m", users=6, spawn_rate=2.0, cancel_share=0.2, strategies="listed",
                     prompt_lengths="32:2,256:2,1024:1", max_tokens=32, out="soak-report",
                     strategy_params=json.dumps({"recycled": {"k": 0.5, "stride": 8}}))
METRIC = re.compile(r'^(attnserve:strategy_memory_(?:reserved|held)_bytes|attnserve:requests_in_flight)'
                    r'(?:\{[^}]*\})? (\S+)$')


@dataclass
class Sample:
    t: float                # seconds since the load started
    rss: int                # bytes, the server's process group
    reserved: int           # the strategies' buffers, reserved (API process)
    held: int               # ... held (workers)
    in_flight: int
    rss_anon: int = 0       # bytes, the anonymous part of ``rss`` (heaps, tensors; not mapped files)
    rss_by_process: dict[str, int] = field(default_factory=dict)   # process name -> its RSS bytes


def group_memory(pgid: int) -> tuple[int, int, dict[str, int]]:
    """(resident bytes, anonymous resident bytes, resident bytes by process name) of the process group
    ``pgid``: the API process, the engine core and its workers."""
    rss = anon = 0
    by_process: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
            if int(fields[2]) != pgid:                     # field 5 of stat: the process group
                continue
            status = dict(line.split(":", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                          if ":" in line)
            process_rss = int(status["VmRSS"].split()[0]) * 1024
            anon += int(status["RssAnon"].split()[0]) * 1024
            name = status["Name"].strip()
        except (OSError, ValueError, IndexError, KeyError):
            continue
        rss += process_rss
        by_process[name] = by_process.get(name, 0) + process_rss
    return rss, anon, by_process


def memory_metrics(base_url: str) -> tuple[int, int, int]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = {"reserved": 0.0, "held": 0.0, "in_flight": 0.0}
    for line in text.splitlines():
        match = METRIC.match(line)
        if match:
            key = "in_flight" if match.group(1).endswith("in_flight") else \
                "reserved" if "reserved" in match.group(1) else "held"
            found[key] += float(match.group(2))
    return int(found["reserved"]), int(found["held"]), int(found["in_flight"])


def projected_growth(samples: list[Sample], field: str, after: float) -> float:
    """Least-squares slope of ``field`` over the samples past ``after`` seconds, times their span."""
    return line_growth([(s.t, getattr(s, field)) for s in samples if s.t >= after])


def line_growth(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points, times their span (0 for fewer than 3)."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
    return slope * (points[-1][0] - points[0][0])


def ceiling_growth(samples: list[Sample], field: str, after: float) -> float:
    """How much the ceiling of a bursty series (its 90th percentile) rose from the samples up to the end of
    the first third past ``after`` seconds to the last third. The strategies' buffers come with the
    requests in flight and their caches fill lazily and are dropped whenever the workers go idle, so the
    series dips to 0 at random moments; at steady load it keeps reaching the same ceiling, a leak lifts it."""
    values = [getattr(s, field) for s in samples if s.t >= after]
    third = len(values) // 3
    if third < 1:
        return 0.0
    early = [getattr(s, field) for s in samples if s.t < after] + values[:third]

    def ceiling(part: list[float]) -> float:
        return sorted(part)[min(len(part) - 1, (len(part) * 9) // 10)]

    return ceiling(values[-third:]) - ceiling(early)


def verdict(samples: list[Sample], warmup_s: float, final: Sample) -> list[str]:
    """What failed (empty: the soak passed)."""
    failures = []
    after = [s for s in samples if s.t >= warmup_s]
    if len(after) < 3:
        return [f"fewer than 3 samples after the {warmup_s:g} s warm-up: run longer"]
    rss_growth = projected_growth(samples, "rss", warmup_s)
    rss_allowed = max(RSS_GROWTH_SHARE * max(s.rss for s in after), RSS_GROWTH_FLOOR)
    if rss_growth > rss_allowed:
        failures.append(f"RSS grew {rss_growth / MiB:.0f} MiB after the warm-up (allowed {rss_allowed / MiB:.0f})")
    held_growth = ceiling_growth(samples, "held", warmup_s)
    held_allowed = max(HELD_GROWTH_SHARE * max(s.held for s in after), HELD_GROWTH_FLOOR)
    if held_growth > held_allowed:
        failures.append(f"the ceiling of the held bytes rose {held_growth / MiB:.1f} MiB after the warm-up "
                        f"(allowed {held_allowed / MiB:.1f})")
    if final.reserved or final.held:
        failures.append(f"after the load: {final.reserved} bytes reserved, {final.held} held (expected 0)")
    return failures


def plot(samples: list[Sample], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(minutes, [s.rss / MiB for s in samples], label="RSS, server process group")
    top.plot(minutes, [s.rss_anon / MiB for s in samples], label="... anonymous", alpha=0.7)
    top.set_ylabel("MiB")
    top.legend(loc="lower right")
    bottom.plot(minutes, [s.held / MiB for s in samples], label="strategy buffers held (workers)")
    bottom.plot(minutes, [s.reserved / MiB for s in samples], label="reserved (API)", alpha=0.7)
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper right")
    for axis in (top, bottom):
        axis.axvline(warmup_s / 60, color="grey", linestyle=":")
    fig.suptitle("attnserve soak: memory over time (dotted: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m loadtests.soak"
    parser.description = __doc__
    parser.set_defaults(**SOAK_DEFAULTS)
    parser.add_argument("--warmup", default="5m", help="growth is judged after this (5m)")
    parser.add_argument("--every", default="10s", help="sampling period (10s)")
    args = parser.parse_args(["--start-server", *(argv if argv is not None else sys.argv[1:])])
    duration_s, warmup_s, every_s = (parse_duration(x) for x in (args.duration, args.warmup, args.every))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with started_server_process(args.serve_arg, args.server_timeout, out / "server.log") as (base_url, proc):
        strategies = resolve_strategies(args.strategies, listed_strategies(base_url), base_url,
                                        json.loads(args.strategy_params or "{}"))
        names = strategies.split(",")
        args.strategy_params = json.dumps({k: v for k, v in json.loads(args.strategy_params or "{}").items()
                                           if any(n.split(":")[0] == k for n in names)})
        config = {"base_url": base_url, "users": args.users, "spawn_rate": args.spawn_rate,
                  "duration": args.duration, "strategies": strategies, "apis": args.apis,
                  "prompt_lengths": args.prompt_lengths, "max_tokens": args.max_tokens,
                  "strategy_params": args.strategy_params, "model": args.model,
                  "cancel_share": args.cancel_share, "serve_args": args.serve_arg}
        print(f"soak: {json.dumps(config)}", flush=True)
        result: dict = {}
        locust = threading.Thread(target=lambda: result.update(
            code=run_locust(base_url, args, strategies, out, duration_s)))
        start = time.monotonic()
        locust.start()
        samples: list[Sample] = []

        def sample() -> Sample:
            rss, anon, by_process = group_memory(proc.pid)
            return Sample(time.monotonic() - start, rss, *memory_metrics(base_url), anon, by_process)

        while locust.is_alive():
            samples.append(sample())
            processes = ", ".join(f"{name} {rss / MiB:.0f}" for name, rss in samples[-1].rss_by_process.items())
            print(f"soak {samples[-1].t / 60:5.1f} min: RSS {samples[-1].rss / MiB:.0f} MiB (anonymous "
                  f"{samples[-1].rss_anon / MiB:.0f}; {processes}), held "
                  f"{samples[-1].held / MiB:.1f} MiB, reserved {samples[-1].reserved / MiB:.1f} MiB, "
                  f"in flight {samples[-1].in_flight}", flush=True)
            locust.join(every_s)
        final = sample()
        deadline = time.monotonic() + 60
        while (final.reserved or final.held or final.in_flight) and time.monotonic() < deadline:
            time.sleep(1)
            final = sample()
    report = write_report(out, out / "samples.jsonl", {**config, "locust_exit_code": result.get("code")})
    failures = verdict(samples, warmup_s, final)
    total = report["total"]
    if total["errors"] or report["unanswered"] or not total["requests"]:
        failures.append(f"{total['errors']} request errors, {report['unanswered']} unanswered, "
                        f"{total['requests']} requests")
    after = [s for s in samples if s.t >= warmup_s] or samples
    summary = {
        "config": config, "warmup_s": warmup_s, "samples": [asdict(s) for s in samples], "final": asdict(final),
        "requests": total["requests"], "errors": total["errors"], "cancelled": total.get("cancelled", 0),
        "e2e_p50_s": total["e2e"]["p50"], "e2e_p99_s": total["e2e"]["p99"],
        "rss_after_warmup_mib": [min(s.rss for s in after) / MiB, max(s.rss for s in after) / MiB],
        "rss_growth_after_warmup_mib": projected_growth(samples, "rss", warmup_s) / MiB,
        "rss_anon_growth_after_warmup_mib": projected_growth(samples, "rss_anon", warmup_s) / MiB,
        "rss_growth_after_warmup_by_process_mib": {
            name: line_growth([(s.t, s.rss_by_process.get(name, 0)) for s in samples if s.t >= warmup_s]) / MiB
            for name in (samples[-1].rss_by_process if samples else {})},
        "held_max_mib": max((s.held for s in samples), default=0) / MiB,
        "held_ceiling_growth_after_warmup_mib": ceiling_growth(samples, "held", warmup_s) / MiB,
        "failures": failures,
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    plot(samples, warmup_s, out / "soak.png")
    p50, p99 = total["e2e"]["p50"], total["e2e"]["p99"]
    lines = [
        "# attnserve soak", "",
        f"- {args.duration} of `{strategies}` ({args.users} users, prompts `{args.prompt_lengths}`, "
        f"{args.max_tokens} tokens, params `{args.strategy_params}`), {args.cancel_share:.0%} of streams "
        f"abandoned after the first token; warm-up {args.warmup}",
        f"- {total['requests']} requests, {total['errors']} errors, {summary['cancelled']} cancelled by the "
        f"client; end-to-end p50 {p50 if p50 is None else f'{p50:.2f} s'}, p99 "
        f"{p99 if p99 is None else f'{p99:.2f} s'}",
        f"- RSS after the warm-up {summary['rss_after_warmup_mib'][0]:.0f}-{summary['rss_after_warmup_mib'][1]:.0f}"
        f" MiB, projected growth {summary['rss_growth_after_warmup_mib']:+.1f} MiB (anonymous "
        f"{summary['rss_anon_growth_after_warmup_mib']:+.1f}; by process: "
        + ", ".join(f"{name} {growth:+.1f}" for name, growth in summary["rss_growth_after_warmup_by_process_mib"].items())
        + ")",
        f"- strategy buffers held: max {summary['held_max_mib']:.1f} MiB, growth of their ceiling (90th "
        f"percentile, up to the first vs the last third after the warm-up) "
        f"{summary['held_ceiling_growth_after_warmup_mib']:+.2f}"
        f" MiB; after the load {final.held} bytes held, "
        f"{final.reserved} reserved",
        f"- verdict: {'PASS' if not failures else 'FAIL: ' + '; '.join(failures)}", "",
        "![memory over time](soak.png)", "",
    ]
    (out / "soak.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
