"""`attnserve recommend`: the cheapest strategy + budget measured on this model that meets a fidelity floor.

Reads a `sweep.json` of `attnserve eval`, takes the rows measured at the prompt length closest to
`--prompt-len` (the longer on a tie), keeps those whose fidelity metric is at least
`--min-fidelity` (and whose KL is at most `--max-kl`, whose perplexity ratios are at most
`--max-ppl-ratio`, if given), and picks the one that attends the
smallest share of the context per decode step (`nominal_fraction`), the faster (TPOT) on a tie.
`full` qualifies by definition, so there is always an answer; it is the answer when nothing sparser
meets the floor.

Metrics: `agreement` (default; greedy tokens equal to full's, position-wise, natural text),
`prefix` (common greedy prefix with full), `score_ratio` (mean task score over full's at the same
length; rows where full scores 0 are not comparable and are left out).

`--max-ppl-ratio R` bounds the teacher-forced decode perplexity ratio (`decode_ppl_ratio`; a row
without one does not qualify) and, where it was measured (sparse prefill), the prompt perplexity
ratio (`prompt_ppl_ratio`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.sweep import Config, model_facts
from strategies.registry import FULL

METRICS = ("agreement", "prefix", "score_ratio", "forced_top1")


def metric_value(row: dict, metric: str, full_row: dict | None) -> float | None:
    if row["strategy"] == FULL:
        return 1.0
    if metric == "score_ratio":
        if not full_row or not full_row.get("score") or row.get("score") is None:
            return None
        return row["score"] / full_row["score"]
    value = row.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def ppl_ok(row: dict, max_ppl_ratio: float | None) -> bool:
    if max_ppl_ratio is None or row["strategy"] == FULL:
        return True
    decode = row.get("decode_ppl_ratio")
    prompt = row.get("prompt_ppl_ratio")
    return decode is not None and decode <= max_ppl_ratio and (prompt is None or prompt <= max_ppl_ratio)


def recommend(result: dict, min_fidelity: float, prompt_len: int, metric: str = "agreement",
              max_kl: float | None = None, max_ppl_ratio: float | None = None) -> dict:
    rows = result["rows"]
    if not rows:
        raise ValueError("the sweep has no rows")
    lengths = sorted({r["length"] for r in rows})
    length = min(lengths, key=lambda L: (abs(L - prompt_len), -L))
    at = [r for r in rows if r["length"] == length]
    full_row = next((r for r in at if r["strategy"] == FULL), None)
    candidates = []
    rejected = []
    for row in at:
        value = metric_value(row, metric, full_row)
        kl_ok = max_kl is None or row["strategy"] == FULL or (row.get("kl") is not None and row["kl"] <= max_kl)
        entry = {"config": row["config"], "strategy": row["strategy"], "budget": row.get("budget"),
                 "metric": value, "kl": row.get("kl"), "decode_ppl_ratio": row.get("decode_ppl_ratio"),
                 "prompt_ppl_ratio": row.get("prompt_ppl_ratio"),
                 "nominal_fraction": row.get("nominal_fraction"),
                 "tpot_ms": row.get("tpot_ms"), "errors": row.get("errors", 0)}
        if (value is not None and value >= min_fidelity and kl_ok and ppl_ok(row, max_ppl_ratio)
                and not row.get("errors")):
            candidates.append((row, entry))
        else:
            rejected.append(entry)
    if not candidates:
        raise ValueError(f"no configuration at {length} tokens has a {metric}, not even full")

    def cost(item):
        row = item[0]
        frac = row.get("nominal_fraction")
        frac = 1.0 if frac is None or math.isnan(frac) else frac
        return (frac, row.get("tpot_ms") or math.inf, row["config"])

    best_row, best = min(candidates, key=cost)
    extra = next((c.get("extra", {}) for c in result["meta"].get("configs", []) if c["label"] == best_row["config"]), {})
    config = Config(best_row["strategy"], best_row.get("budget"), tuple(sorted(extra.items())))
    try:
        share = config.resolved(prompt_len, model_facts(result["meta"].get("model_folder")))[1]
    except (OSError, KeyError, ValueError):     # the model's folder is not on this machine
        share = None
    return {
        "prompt_len": prompt_len, "measured_length": length, "metric": metric, "min_fidelity": min_fidelity,
        "max_kl": max_kl, "max_ppl_ratio": max_ppl_ratio, "choice": best,
        "attention": config.attention(),
        "nominal_fraction_at_prompt_len": share,
        "candidates": sorted((e for _, e in candidates), key=lambda e: (e["nominal_fraction"] or 1.0)),
        "rejected": rejected,
        "model": result["meta"].get("model"),
    }


def describe(rec: dict) -> str:
    c = rec["choice"]
    lines = [
        f"model {rec['model']}, prompt {rec['prompt_len']} tokens (measured at {rec['measured_length']}), "
        f"floor {rec['metric']} >= {rec['min_fidelity']}" + (f", KL <= {rec['max_kl']}" if rec["max_kl"] else "")
        + (f", ppl ratio <= {rec['max_ppl_ratio']}" if rec.get("max_ppl_ratio") else ""),
        f"recommended: {c['config']} ({rec['metric']} {c['metric']:.3f}, attends "
        f"{(c['nominal_fraction'] or 1.0):.3f} of the context per decode step at {rec['measured_length']} tokens"
        + (f", TPOT {c['tpot_ms']:.1f} ms" if c.get("tpot_ms") else "") + ")",
        "request field: " + json.dumps({"attention": rec["attention"]}),
    ]
    if rec["measured_length"] != rec["prompt_len"]:
        share = rec["nominal_fraction_at_prompt_len"]
        lines.append(f"note: measured at {rec['measured_length']} tokens, not {rec['prompt_len']}"
                     + ("" if share is None else f"; at {rec['prompt_len']} this attends {share:.3f} of the "
                        "context per decode step") + "; sweep that length to confirm")
    if c["strategy"] == FULL:
        lines.append("no sparser configuration measured meets the floor")
    lines.append("meeting the floor: " + ", ".join(
        f"{e['config']} ({e['metric']:.3f})" for e in rec["candidates"]))
    if rec["rejected"]:
        lines.append("below the floor: " + ", ".join(
            f"{e['config']} ({'–' if e['metric'] is None else format(e['metric'], '.3f')})" for e in rec["rejected"]))
    return "\n".join(lines)


# `attnserve <command>`: pyproject.toml declares this module in the attnserve.commands entry points
COMMAND_HELP = "the cheapest measured strategy + budget meeting a fidelity floor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="sweep.json written by `attnserve eval`")
    parser.add_argument("--min-fidelity", type=float, default=0.95, help="floor of the metric (0..1)")
    parser.add_argument("--prompt-len", type=int, required=True, help="the prompt length to serve, in tokens")
    parser.add_argument("--metric", choices=METRICS, default="agreement")
    parser.add_argument("--max-kl", type=float, default=None, help="also require KL(full || strategy) <= this")
    parser.add_argument("--max-ppl-ratio", type=float, default=None,
                        help="also require the decode perplexity ratio (teacher-forced continuation) "
                             "and, where measured, the prompt perplexity ratio <= this, e.g. 1.05")
    parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def run(args: argparse.Namespace) -> int:
    result = json.loads(Path(args.results).read_text())
    try:
        rec = recommend(result, args.min_fidelity, args.prompt_len, args.metric, args.max_kl,
                        args.max_ppl_ratio)
    except ValueError as err:
        print(f"attnserve recommend: {err}", file=sys.stderr)
        return 1
    print(json.dumps(rec, indent=1) if args.json else describe(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recommend", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
