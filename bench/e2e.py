"""End-to-end speed through the server: time per output token (TPOT) and time to first token (TTFT) of
each strategy vs ``full`` and vs stock vLLM (the same server with our plugin excluded through
``VLLM_PLUGINS``).

    .venv/bin/python -m bench.e2e                       # 2k/4k/8000 prompts, batch 1 and 8, budget 1/8
    .venv/bin/python -m bench.e2e --lengths 2048 --batches 1 --new-tokens 16
    .venv/bin/python -m bench.e2e --model gemma3-270m --lengths 8192 16384 --kv-cache-gib 6

Each cell sends ``batch`` concurrent streaming completions of ``--new-tokens`` tokens (greedy, EOS
ignored) whose prompts are natural text cut to the length, and reports the steady decode time per
output token: over the window in which every request of the batch is decoding (from the last
request's first token to the first request's last token), the median over requests of window /
tokens in it; TTFT is the median over the batch's requests of the time from sending a request to its
first token (the whole batch is sent at once, so at batch 8 it includes waiting for the others'
prefill). Seer uses the gates the server finds for the model (shipped for the embedded model and Gemma 3).
Prints two tables with ratios; no assertion. Prefix caching is off unless ``--prefix-caching``, so every
cell prefills its prompts.

The budget is the request's ``attention.budget`` by default (``--budget-is attended``): the share of the
context a decode step attends, dense parts included (recycled's full step every ``stride``, landmark's dense
first layers, sinks and newest blocks), mapped by the server onto each strategy's params, so that every row
attends the same share. With ``--budget-is params`` it is each strategy's own budget param instead
(``Strategy.budget_param``: sink window, recycled k, landmark k_blocks, seer top_k, each 1/8 of the prompt;
how docs/benchmarks.md's earlier tables were made). The table is preceded by each row's params and share
(``Strategy.decode_share``).

With ``--paired`` both servers run at once (the idle one waits on its socket) and every row of a cell
is measured in ``--rounds`` palindromes (full, stock, sparse..., then the reverse), so that drift and
order effects of this shared machine fall on all rows alike; each row is the mean of its runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import stop_process_group, wait_healthy
from server.model import resolve_model
from bench.sweep import Config
from strategies.base import ModelFacts
from strategies.registry import FULL, get

REPO = Path(__file__).resolve().parents[1]
TEXT_FILES = [Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/GFDL-1.3"),
              Path("/usr/share/common-licenses/Apache-2.0")]


def own_param_config(strategy: str, budget: float, length: int, extra: dict) -> Config:
    """``--budget-is params``: the strategy's budget param set to ``budget`` of the prompt (as a fraction
    where the param takes one, else as ``budget * length`` tokens)."""
    name = get(strategy).budget_param
    if name is None:
        return Config(strategy, None, tuple(sorted(extra.items())))
    spec = next(s for s in get(strategy).Params.specs() if s.name == name)
    value = budget if spec.kind is not int else max(1, round(budget * length))
    return Config(strategy, None, tuple(sorted({name: value, **extra}.items())))


def prompt_ids(tokenizer, length: int, offset: int) -> list[int]:
    text = "\n".join(p.read_text() for p in TEXT_FILES if p.exists())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length + offset:
        ids = ids + ids
    return ids[offset: offset + length]


def start_server(port: int, plugin: bool, log: Path, max_model_len: int, model_dir: Path,
                 prefix_caching: bool = False, kv_cache_gib: float | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if not plugin:
        env["VLLM_PLUGINS"] = "none"   # stock vLLM: no attnserve plugin loaded
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model_dir), "--max-model-len", str(max_model_len),
           *(["--kv-cache-gib", str(kv_cache_gib)] if kv_cache_gib else []),
           "--engine-arg", "max_num_seqs=8",
           "--engine-arg", f"enable_prefix_caching={str(prefix_caching).lower()}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


async def one_request(client: httpx.AsyncClient, base: str, model: str, ids: list[int], new_tokens: int,
                      attention: dict | None) -> tuple[float, list[float]]:
    """When the request was sent, and the arrival time of every streamed token of it."""
    body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    if attention is not None:
        body["attention"] = attention
    times = []
    sent = time.perf_counter()
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
    return sent, times


def steady_decode_tpot(token_times: list[list[float]]) -> float:
    """Time per output token while every request of the batch is decoding: the window from the last
    request's first token to the first request's last token (before it, some requests are still in
    prefill and the steps carry prefill chunks), over the tokens each request got inside it."""
    start = max(t[0] for t in token_times)
    end = min(t[-1] for t in token_times)
    per_request = [sum(start < x <= end for x in t) for t in token_times]
    if end <= start or min(per_request) < 2:
        return float("nan")
    return statistics.median((end - start) / n for n in per_request)


def median_ttft(sent: list[float], token_times: list[list[float]]) -> float:
    """Median over requests of the time from sending to the first streamed token."""
    return statistics.median(t[0] - s for s, t in zip(sent, token_times))


async def cell(base: str, model: str, prompts: list[list[int]], new_tokens: int,
               attention: dict | None) -> tuple[float, float]:
    """(steady decode TPOT, median TTFT) of one batch, seconds."""
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(*(one_request(client, base, model, p, new_tokens, attention)
                                         for p in prompts))
    sent, token_times = [a[0] for a in answers], [a[1] for a in answers]
    return steady_decode_tpot(token_times), median_ttft(sent, token_times)


def run_paired(args, variants, tokenizer, model, model_dir, max_len, attention_for, measure, results) -> None:
    """Both servers up at once; per cell, ``--rounds`` palindromes full, stock, the sparse strategies,
    then the same in reverse (each measured twice per round, symmetrically in time, so that a linear
    drift of this shared machine falls on all alike); results are the means over all runs."""
    ports = {"attnserve": args.port, "stock": args.port + 1}
    procs = {}
    try:
        for server_name, port in ports.items():
            log = Path(tempfile.mkdtemp()) / f"{server_name}.log"
            procs[server_name] = (start_server(port, server_name == "attnserve", log, max_len, model_dir,
                                               args.prefix_caching, args.kv_cache_gib), log)
        for server_name, (proc, log) in procs.items():
            wait_healthy(f"http://127.0.0.1:{ports[server_name]}", proc, timeout_s=900, log_path=log)
        attnserve, stock = (f"http://127.0.0.1:{ports[name]}" for name in ("attnserve", "stock"))
        names = [FULL, "stock"] + [n for n in args.strategies + list(variants) if n != FULL]
        for length in args.lengths:
            for batch in args.batches:
                prompts = [prompt_ids(tokenizer, length, 311 * i) for i in range(batch)]
                # warm both servers' prefix caches and allocators for this cell
                measure(attnserve, prompts, attention_for(FULL, length))
                measure(stock, prompts, None)
                runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
                for _ in range(args.rounds):
                    for name in names + names[::-1]:
                        if name == "stock":
                            runs[name].append(measure(stock, prompts, None))
                        else:
                            runs[name].append(measure(attnserve, prompts, attention_for(name, length)))
                for name, times in runs.items():
                    results[(name, length, batch)] = tuple(statistics.mean(t[i] for t in times) for i in (0, 1))
                    print(f"{(name, length, batch)}: {results[(name, length, batch)][0] * 1000:.1f} ms/token, "
                          f"TTFT {results[(name, length, batch)][1]:.2f} s (TPOT runs in order: "
                          f"{', '.join(f'{t[0] * 1000:.1f}' for t in times)})", flush=True)
    finally:
        for proc, _ in procs.values():
            stop_process_group(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a known model name (gemma3-270m, ...) or a model folder (default: the embedded model)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="the server's KV cache (default: the server's; 16k prompts at batch 8 need more)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--budget-is", choices=("params", "attended"), default="attended",
                        help="attended: the request's attention.budget, the share of the context a decode "
                             "step attends, dense parts included; params: each strategy's own budget param "
                             "(sink window, recycled k, landmark k_blocks, seer top_k) set to it")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="default: every registered strategy (full first)")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock vLLM server")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=STRATEGY:JSON",
                        help="an extra row: a strategy with params over the budget's, e.g. "
                             "'landmark-d0=landmark:{\"dense_layers\": 0}' (repeatable)")
    parser.add_argument("--stock-first", action="store_true",
                        help="run the stock vLLM server before attnserve's (to see order effects)")
    parser.add_argument("--paired", action="store_true",
                        help="run both servers at once and measure every row in palindrome rounds")
    parser.add_argument("--rounds", type=int, default=2, help="palindrome rounds per cell with --paired")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="let vLLM reuse the prompts' KV across cells (faster runs; decode TPOT is "
                             "what is measured, prefill is not)")
    args = parser.parse_args()
    variants: dict[str, tuple[str, dict]] = {}
    for item in args.variant:
        label, spec = item.split("=", 1)
        strategy, params = spec.split(":", 1)
        variants[label] = (strategy, json.loads(params))

    from transformers import AutoTokenizer

    model_dir = Path(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = max(args.lengths) + args.new_tokens + 16
    base = f"http://127.0.0.1:{args.port}"
    model = model_dir.name
    results: dict[tuple[str, int, int], float] = {}

    facts = ModelFacts.from_model_dir(model_dir)
    if args.strategies is None:
        from strategies.registry import names as registered

        args.strategies = registered()

    def config_for(name: str, length: int) -> Config:
        strategy, extra = variants.get(name, (name, {}))
        if args.budget_is == "params":
            return own_param_config(strategy, args.budget, length, extra)
        budget = args.budget if get(strategy).budget_param is not None else None
        return Config(strategy, budget, tuple(sorted(extra.items())))

    def attention_for(name: str, length: int) -> dict:
        return config_for(name, length).attention()

    def measure(server_base: str, prompts: list[list[int]], attention: dict | None) -> tuple[float, float]:
        return asyncio.run(cell(server_base, model, prompts, args.new_tokens, attention))

    if args.paired:
        run_paired(args, variants, tokenizer, model, model_dir, max_len, attention_for, measure, results)
    else:
        servers = [("attnserve", True)] + ([] if args.no_stock else [("stock", False)])
        if args.stock_first:
            servers.reverse()
        for server_name, plugin in servers:
            log = Path(tempfile.mkdtemp()) / f"{server_name}.log"
            proc = start_server(args.port, plugin, log, max_len, model_dir, args.prefix_caching, args.kv_cache_gib)
            try:
                wait_healthy(base, proc, timeout_s=900, log_path=log)
                names = args.strategies + list(variants) if plugin else [FULL]
                for length in args.lengths:
                    for batch in args.batches:
                        prompts = [prompt_ids(tokenizer, length, 311 * i) for i in range(batch)]
                        if args.prefix_caching:     # prefill once, so that the rows measure decode
                            measure(base, prompts, attention_for(FULL, length) if plugin else None)
                        for name in names:
                            key = (server_name if not plugin else name, length, batch)
                            results[key] = measure(base, prompts, attention_for(name, length) if plugin else None)
                            print(f"{key}: {results[key][0] * 1000:.1f} ms/token, TTFT {results[key][1]:.2f} s",
                                  flush=True)
            finally:
                stop_process_group(proc)

    rows = list(args.strategies) + list(variants) + ([] if args.no_stock else ["stock"])
    print(f"\nShare of the context a decode step attends (Strategy.decode_share, on the routed layers), "
          f"budget {args.budget} as {args.budget_is}:")
    for name in list(args.strategies) + list(variants):
        for length in args.lengths:
            params, fraction = config_for(name, length).resolved(length, facts)
            print(f"  {name} at {length}: {fraction:.3f} {json.dumps(params)}")
    print(f"\nModel {model}; {args.new_tokens} new tokens; budget {args.budget} as {args.budget_is}")
    width = max(10, *(len(r) + 2 for r in rows))
    for title, which, scale, digits in (("TPOT ms/token", 0, 1000.0, 1), ("TTFT s", 1, 1.0, 2)):
        print(f"\n{title} (ratio vs full | vs stock)")
        print("strategy".ljust(width) + "".join(f"{f'{L} b{b}':>24}" for L in args.lengths for b in args.batches))
        for name in rows:
            line = name.ljust(width)
            for length in args.lengths:
                for batch in args.batches:
                    t = results.get((name, length, batch))
                    full = results.get((FULL, length, batch))
                    stock = results.get(("stock", length, batch))
                    if t is None:
                        line += f"{'-':>24}"
                        continue
                    vs_full = f"{t[which] / full[which]:.2f}" if full else "-"
                    vs_stock = f"{t[which] / stock[which]:.2f}" if stock else "-"
                    line += f"{f'{t[which] * scale:.{digits}f} ({vs_full}|{vs_stock})':>24}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
