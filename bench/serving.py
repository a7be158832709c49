"""`attnserve bench`: serving speed per strategy against `full`, through the server (streaming).

For each prompt length and strategy it sends `--repeats` bursts of `--concurrency` streaming
completions (greedy, `--max-tokens` output tokens, ignore_eos), each on its own natural-text prompt
so no request hits another's prefix cache, and reports the medians of time to first token (TTFT)
and time per output token (TPOT, the mean gap between output tokens after the first), and the
throughput (output tokens per second of a burst's wall time), with each strategy's ratio to full
printed beside it (speedup: full's time / the strategy's, so > 1 is faster).

Lengths run up to the server's `max_model_len` (`max` = the longest prompt that fits with the
output). Longer prompts need a rope-scaling override of the model, which only a server started
here can get: `--start-server --rope-scaling F` serves `max_model_len x F` with
`hf_overrides={"rope_parameters": {"rope_type": "linear", "factor": F, "rope_theta": <the model's>}}` — positions the model was not
trained on, labelled as such in the output (the speed is meaningful, the quality is not).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

from bench import fidelity as fid
from bench.client import Client, add_server_arguments, gather_limited, load_tokenizer, server_from_args
from strategies.registry import FULL
from bench.sweep import Config, build_configs, machine_description, parse_budget, parse_list, parse_strategy_params

DEFAULT_LENGTHS = "512,1024,2048,4096,max"


def resolve_lengths(text: str, max_model_len: int, max_tokens: int) -> list[int]:
    limit = max_model_len - max_tokens
    lengths = []
    for item in parse_list(text):
        length = limit if item == "max" else int(item)
        if length > limit:
            raise SystemExit(
                f"length {length} + {max_tokens} output tokens exceeds the server's max_model_len "
                f"{max_model_len}; longer prompts need a server started with a rope-scaling override "
                "(--start-server --rope-scaling FACTOR), which attnserve bench cannot give a running server")
        lengths.append(length)
    return sorted(set(lengths))


async def burst(client: Client, prompts: list[list[int]], attention: dict, max_tokens: int) -> dict:
    started = time.perf_counter()
    results = await gather_limited(
        [client.complete(p, max_tokens, attention, ignore_eos=True) for p in prompts], len(prompts))
    wall = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    return {
        "wall_s": wall,
        "ttft_s": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot_s": [r.tpot_s for r in ok if r.tpot_s is not None],
        "tokens": sum(r.completion_tokens or 0 for r in ok),
        "attended": [r.attended_fraction for r in ok if r.attended_fraction is not None],
        "errors": [r.error for r in results if not r.ok],
    }


async def measure(base_url: str, model: str | None, configs: list[Config], lengths: list[int], tokenizer,
                  args) -> list[dict]:
    from tqdm import tqdm

    rows = []
    total = len(configs) * len(lengths) * (args.repeats + (1 if args.warmup else 0))
    async with Client(base_url, model=model) as client:
        with tqdm(total=total, desc="bench bursts", file=sys.stderr, disable=args.quiet) as bar:
            index = 0
            for length in lengths:
                for config in configs:
                    attention = config.attention()
                    bursts = []
                    for rep in range(args.repeats + (1 if args.warmup else 0)):
                        prompts = []
                        for _ in range(args.concurrency):
                            prompts.append(fid.text_sample(length, tokenizer, args.seed, index).prompt_ids)
                            index += 1
                        result = await burst(client, prompts, attention, args.max_tokens)
                        bar.update(1)
                        if rep > 0 or not args.warmup:
                            bursts.append(result)
                    ttft = [t for b in bursts for t in b["ttft_s"]]
                    tpot = [t for b in bursts for t in b["tpot_s"]]
                    thr = [b["tokens"] / b["wall_s"] for b in bursts if b["tokens"]]
                    errors = [e for b in bursts for e in b["errors"]]
                    rows.append({
                        "length": length, "config": config.label, "strategy": config.strategy,
                        "params": attention["params"],
                        "ttft_ms": 1000 * statistics.median(ttft) if ttft else None,
                        "tpot_ms": 1000 * statistics.median(tpot) if tpot else None,
                        "throughput_tok_s": statistics.median(thr) if thr else None,
                        "attended_fraction": statistics.mean(b for x in bursts for b in x["attended"])
                        if any(x["attended"] for x in bursts) else None,
                        "requests": sum(len(b["ttft_s"]) for b in bursts), "errors": len(errors),
                        "first_error": errors[0] if errors else None,
                    })
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    full = {r["length"]: r for r in rows if r["strategy"] == FULL}
    for r in rows:
        f = full.get(r["length"])
        for key, name, invert in (("ttft_ms", "ttft_speedup", True), ("tpot_ms", "tpot_speedup", True),
                                  ("throughput_tok_s", "throughput_ratio", False)):
            a, b = (f or {}).get(key), r.get(key)
            r[name] = None if not a or not b else (a / b if invert else b / a)


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict], label: str) -> str:
    lines = [
        f"| length | config | TTFT ms | TTFT speedup | TPOT ms | TPOT speedup | tok/s | tok/s ratio | attended | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']}{label} | {r['config']} | {fmt(r['ttft_ms'], '.0f')} | {fmt(r['ttft_speedup'], '.2f')}x | "
            f"{fmt(r['tpot_ms'], '.1f')} | {fmt(r['tpot_speedup'], '.2f')}x | {fmt(r['throughput_tok_s'], '.1f')} | "
            f"{fmt(r['throughput_ratio'], '.2f')}x | {fmt(r['attended_fraction'], '.3f')} | {r['errors']} |")
    return "\n".join(lines)


# `attnserve <command>`: pyproject.toml declares this module in the attnserve.commands entry points
COMMAND_HELP = "serving speed (TTFT, TPOT, throughput) per strategy against full"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--strategies", default="full,sink,recycled,landmark,seer",
                        help="comma-separated strategies (full is always measured, as the reference)")
    parser.add_argument("--budget", default="0.125",
                        help="one budget for every strategy: KV tokens per decode step (integer) or a "
                             "fraction of the prompt (float); '' for each strategy's defaults")
    parser.add_argument("--strategy-params", action="append", default=[], metavar="NAME=JSON",
                        help="fixed params of a strategy (repeatable); seer defaults to identity gates")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help="prompt lengths in tokens; 'max' = the server's max_model_len - max_tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="measured bursts per strategy and length")
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent requests per burst")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="do not send one unmeasured burst first")
    parser.add_argument("--rope-scaling", type=float, default=None, metavar="FACTOR",
                        help="with --start-server: serve max_model_len x FACTOR positions through a linear "
                             "rope-scaling override (beyond the trained length; speed only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write bench.json and bench.md here")
    parser.add_argument("--quiet", action="store_true")


def model_rope_theta(args: argparse.Namespace) -> float:
    """The served model's RoPE base (kept by the override, which replaces `rope_parameters`)."""
    from server.model import embedded_model_dir

    folder = Path(args.tokenizer) if args.tokenizer else embedded_model_dir()
    for i, value in enumerate(args.serve_args):
        if value == "--model" and i + 1 < len(args.serve_args):
            folder = Path(args.serve_args[i + 1])
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 10000.0
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def run(args: argparse.Namespace) -> int:
    label = ""
    if args.rope_scaling:
        if not args.start_server:
            raise SystemExit("--rope-scaling needs --start-server (the override is a server start option)")
        base_len = 8192
        for i, value in enumerate(args.serve_args):
            if value == "--max-model-len" and i + 1 < len(args.serve_args):
                base_len = int(args.serve_args[i + 1])
        args.serve_args = [a for i, a in enumerate(args.serve_args)
                           if a != "--max-model-len" and (i == 0 or args.serve_args[i - 1] != "--max-model-len")]
        override = json.dumps({"rope_parameters": {"rope_type": "linear", "factor": args.rope_scaling,
                                                   "rope_theta": model_rope_theta(args)}})
        args.serve_args += ["--max-model-len", str(int(base_len * args.rope_scaling)),
                            "--engine-arg", f"hf-overrides={override}"]
        label = f" (rope x{args.rope_scaling:g})"
    tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.out) if args.out else Path("bench-results")
    with server_from_args(args, out if args.out else Path("/tmp/attnserve-bench")) as base_url:
        async def info():
            async with Client(base_url, model=args.model) as client:
                models = await client.models()
                try:
                    offered = await client.strategies()
                except Exception:  # noqa: BLE001
                    offered = {}
                return next((m for m in models if m["id"] == client.model), models[0]), offered

        card, offered = asyncio.run(info())
        max_len = int(card.get("max_model_len") or 8192)
        lengths = resolve_lengths(args.lengths, max_len, args.max_tokens)
        names = [n for n in parse_list(args.strategies)
                 if not offered or (n in offered and offered[n].get("available", True))]
        dropped = [n for n in parse_list(args.strategies) if n not in names]
        if dropped:
            print(f"not offered or unavailable on this server, skipped: {', '.join(dropped)}", file=sys.stderr)
        budgets = [parse_budget(args.budget)] if args.budget else []
        configs = build_configs(names, budgets, parse_strategy_params(args.strategy_params))
        started = dt.datetime.now(dt.timezone.utc)
        rows = asyncio.run(measure(base_url, args.model, configs, lengths, tokenizer, args))
    header = (f"attnserve bench {started:%Y-%m-%d %H:%M} UTC on {machine_description()}\n"
              f"model {card.get('id')}, max_model_len {max_len}{label}; {args.max_tokens} output tokens, "
              f"{args.repeats} burst(s) of {args.concurrency} request(s) per cell, medians; speedup = full / "
              "strategy (>1 is faster); tok/s ratio = strategy / full")
    if not args.rope_scaling:
        header += ("\nlengths are capped by max_model_len: the running server has no rope-scaling override "
                   "(use --start-server --rope-scaling F to go beyond, labelled)")
    text = header + "\n\n" + table(rows, label)
    print(text)
    if args.out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(text + "\n")
        (out / "bench.json").write_text(json.dumps({"date": started.isoformat(), "machine": machine_description(),
                                                    "model": card.get("id"), "max_model_len": max_len,
                                                    "rope_scaling": args.rope_scaling, "rows": rows}, indent=1))
    return 1 if all(r["errors"] and not r["requests"] for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
