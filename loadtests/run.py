"""`python -m loadtests`: a bounded, headless Locust run against an OpenAI-compatible base URL,
written up as report.json, report.md and report.png (plus Locust's own CSV files) in --out.

It starts nothing but Locust, unless --start-server is given: then it starts `attnserve serve`
on a free loopback port, waits for /health, runs, and stops the server again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from loadtests.mix import DEFAULT_APIS, DEFAULT_PROMPT_LENGTHS, DEFAULT_STRATEGIES, Mix
from loadtests.report import write_report

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def parse_duration(text: str) -> float:
    """`60s`, `2m`, `1m30s`, `90` → seconds."""
    text = text.strip().lower()
    if text.replace(".", "", 1).isdigit():
        return float(text)
    total, number = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in "hms" and number:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
        else:
            raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 60s, 2m, 1m30s)")
    if number:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: a number without unit at the end")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (no /v1)")
    target.add_argument("--start-server", action="store_true",
                        help="start `attnserve serve` on a free loopback port and stop it after")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="an extra argument for `attnserve serve` (repeatable; with --start-server)")
    p.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for the started server's /health")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--duration", default="60s", help="how long users send (60s, 2m)")
    p.add_argument("--stop-timeout", default="120s",
                   help="at the end, how long in-flight requests may take to finish")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                   help="strategies with weights: full:2,sink:1,landmark:1; `listed` = every "
                        "strategy GET /v1/strategies lists, weight 1")
    p.add_argument("--apis", default=DEFAULT_APIS,
                   help="chat, chat-stream, completions, completions-stream with weights")
    p.add_argument("--prompt-lengths", default=DEFAULT_PROMPT_LENGTHS,
                   help="prompt lengths in (about) tokens with weights: 32:2,128:1")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--strategy-params", default="",
                   help='JSON: params per strategy, e.g. {"sink": {"n_sink": 4, "window": 64}}')
    p.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let generations stop at EOS (default: exactly --max-tokens)")
    p.add_argument("--no-attention-report", action="store_true",
                   help="do not require attnserve's `attention` report (e.g. against stock vLLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cancel-share", type=float, default=0.0,
                   help="share of streamed requests abandoned by the client after the first token")
    p.add_argument("--out", default="loadtest-report", help="report folder")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def listed_strategies(base_url: str) -> list[str] | None:
    """Names from GET /v1/strategies; None where the server has no such route (stock vLLM)."""
    try:
        data = get_json(f"{base_url}/v1/strategies")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise
    items = data.get("data", data) if isinstance(data, dict) else data
    return [item["name"] if isinstance(item, dict) else str(item) for item in items]


def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before /health")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{base_url}/health not ready after {timeout:.0f} s")


def attnserve_command() -> list[str]:
    script = Path(sys.executable).with_name("attnserve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM, then SIGKILL, to the process group this module started (the server and the
    engine processes it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # engine processes that outlived the API process
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@contextmanager
def started_server_process(serve_args: list[str], timeout: float, log_path: Path):
    """(base URL, the server's process: the leader of its own process group) while it runs."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = attnserve_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    log = open(log_path, "w")
    print(f"starting: {' '.join(cmd)} (log: {log_path})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base_url, timeout, proc)
        yield base_url, proc
    finally:
        stop_process_group(proc)
        log.close()


@contextmanager
def started_server(serve_args: list[str], timeout: float, log_path: Path):
    with started_server_process(serve_args, timeout, log_path) as (base_url, _):
        yield base_url


def post_json(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def runnable_with(base_url: str, strategy: str, params: dict | None) -> str | None:
    """None if one 1-token request with this strategy (and params) succeeds, else the reason."""
    model = get_json(f"{base_url}/v1/models")["data"][0]["id"]
    attention = {"strategy": strategy, **({"params": params} if params else {})}
    status, body = post_json(f"{base_url}/v1/completions", {
        "model": model, "prompt": "Hello", "max_tokens": 1, "attention": attention})
    if status == 200:
        return None
    return f"HTTP {status}: {(body.get('error') or {}).get('message', body)}"


def resolve_strategies(text: str, listed: list[str] | None, base_url: str = "",
                       params: dict | None = None) -> str:
    """The mix as NAME:WEIGHT text. `listed`: every strategy the server lists that answers a
    1-token probe with the given (or default) params; the others are named and left out."""
    if text.strip() == "listed":
        if not listed:
            raise SystemExit("--strategies listed: the server has no GET /v1/strategies")
        keep = []
        for name in listed:
            reason = runnable_with(base_url, name, (params or {}).get(name))
            if reason is None:
                keep.append(name)
            else:
                print(f"leaving out {name!r}: {reason}", flush=True)
        if not keep:
            raise SystemExit("--strategies listed: no strategy answered the probe request")
        return ",".join(f"{name}:1" for name in keep)
    if listed is not None:
        unknown = [n for n in Mix.parse(strategies=text).strategies if n not in listed]
        if unknown:
            raise SystemExit(f"strategies not offered by the server: {unknown}; it lists {listed}")
    return text


def run_locust(base_url: str, args, strategies: str, out: Path, duration_s: float) -> int:
    samples = out / "samples.jsonl"
    samples.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", base_url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", f"{int(round(duration_s))}s",
        "--stop-timeout", f"{int(round(parse_duration(args.stop_timeout)))}s",
        "--csv", str(out / "locust"), "--only-summary", "--loglevel", "WARNING",
        "--strategies", strategies, "--apis", args.apis, "--prompt-lengths", args.prompt_lengths,
        "--max-tokens", str(args.max_tokens), "--strategy-params", args.strategy_params,
        "--model", args.model, "--seed", str(args.seed), "--samples-out", str(samples),
        "--cancel-share", str(args.cancel_share),
        "--ignore-eos", "false" if args.no_ignore_eos else "true",
        "--require-attention-report", "false" if args.no_attention_report else "true",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(LOCUSTFILE.parent.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # Bounded: run time + stop timeout + a margin for start-up and the summary.
    limit = duration_s + parse_duration(args.stop_timeout) + 120
    try:
        proc = subprocess.run(cmd, env=env, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        print(f"locust did not finish within {limit:.0f} s", file=sys.stderr)
        return 124
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    duration_s = parse_duration(args.duration)
    # Fail on a bad mix before starting anything.
    listed_mode = args.strategies.strip() == "listed"
    params = json.loads(args.strategy_params) if args.strategy_params.strip() else {}
    Mix.parse(",".join(params) or "x" if listed_mode else args.strategies, args.apis,
              args.prompt_lengths, args.max_tokens, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def go(base_url: str) -> int:
        base_url = base_url.rstrip("/")
        listed = listed_strategies(base_url)
        params = json.loads(args.strategy_params) if args.strategy_params.strip() else {}
        strategies = resolve_strategies(args.strategies, listed, base_url, params)
        if params:
            if args.strategies.strip() == "listed":  # params of left-out strategies: drop them
                names = Mix.parse(strategies=strategies).strategies
                args.strategy_params = json.dumps({k: v for k, v in params.items() if k in names})
            Mix.parse(strategies, args.apis, args.prompt_lengths, args.max_tokens,
                      args.strategy_params)
        config = {
            "base_url": base_url, "users": args.users, "spawn_rate": args.spawn_rate,
            "duration": args.duration, "strategies": strategies, "apis": args.apis,
            "prompt_lengths": args.prompt_lengths, "max_tokens": args.max_tokens,
            "strategy_params": args.strategy_params, "model": args.model,
            "server_strategies": listed,
        }
        print(f"load test: {json.dumps(config)}", flush=True)
        code = run_locust(base_url, args, strategies, out, duration_s)
        report = write_report(out, out / "samples.jsonl", {**config, "locust_exit_code": code})
        print((out / "report.md").read_text(), flush=True)
        if code == 124 or report["total"]["requests"] == 0:
            return 2
        return 0 if report["total"]["errors"] == 0 and report["unanswered"] == 0 else 1

    if args.start_server:
        with started_server(args.serve_arg, args.server_timeout, out / "server.log") as base_url:
            return go(base_url)
    return go(args.base_url)
