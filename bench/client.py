"""A small async client of the attnserve HTTP API for the evaluation tools, and a managed server.

All requests go to `/v1/completions` with the prompt as token ids (exact lengths), greedy
(temperature 0), the attention choice in the top-level `attention` field. Streaming requests time
the first token and each later one (TTFT, TPOT); `top_logprobs` come back keyed by token id
(`return_tokens_as_token_ids`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 900.0


@dataclass
class Completion:
    """One finished request."""

    ok: bool
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # per generated token: {token_id: logprob} of the top-k (empty without logprobs)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    # per generated token: its own logprob (with logprobs >= 0)
    token_logprobs: list[float | None] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # logprob of each prompt token (first: None)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    attention: dict[str, Any] | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None  # mean time between output tokens after the first
    e2e_s: float | None = None
    error: str | None = None
    status: int | None = None

    @property
    def attended_fraction(self) -> float | None:
        return (self.attention or {}).get("attended_fraction")


def parse_token_key(key: str) -> int:
    """`token_id:123` (return_tokens_as_token_ids) -> 123."""
    return int(key.rsplit(":", 1)[1]) if ":" in key else int(key)


class Client:
    """Async client of one attnserve server (base_url without /v1)."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> "Client":
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s, limits=limits)
        if self.model is None:
            self.model = (await self.models())[0]["id"]
        return self

    async def __aexit__(self, *exc) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None, "use `async with Client(...)`"
        return self._http

    async def models(self) -> list[dict]:
        response = await self.http.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"]

    async def strategies(self) -> dict[str, dict]:
        """GET /v1/strategies: name -> description (with `available`, `dense_prefill`, params)."""
        response = await self.http.get("/v1/strategies")
        response.raise_for_status()
        return {item["name"]: item for item in response.json()["data"]}

    async def complete(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        attention: dict | None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        stream: bool = True,
        ignore_eos: bool = False,
        stop: list[str] | None = None,
        force_tokens: list[int] | None = None,
    ) -> Completion:
        """`force_tokens`: the output must be these tokens (teacher forcing, sent as
        `vllm_xargs.attnserve_force_tokens`); with `logprobs=0` each comes back with the model's
        logprob of it."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "return_tokens_as_token_ids": True,
        }
        if attention is not None:
            body["attention"] = attention
        if logprobs is not None:
            body["logprobs"] = logprobs
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        if ignore_eos:
            body["ignore_eos"] = True
        if stop:
            body["stop"] = stop
        if force_tokens is not None:
            body["vllm_xargs"] = {"attnserve_force_tokens": list(force_tokens)}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            return await self._stream(body)
        return await self._once(body)

    async def _once(self, body: dict) -> Completion:
        started = time.perf_counter()
        try:
            response = await self.http.post("/v1/completions", json=body)
        except httpx.HTTPError as err:
            return Completion(ok=False, error=f"{type(err).__name__}: {err}")
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            return Completion(ok=False, status=response.status_code, error=error_text(response.text))
        data = response.json()
        result = Completion(ok=True, e2e_s=elapsed, status=200, attention=data.get("attention"))
        choice = data["choices"][0]
        result.text = choice.get("text") or ""
        result.finish_reason = choice.get("finish_reason")
        add_logprobs(result, choice.get("logprobs"))
        if choice.get("prompt_logprobs") is not None:
            result.prompt_logprobs = prompt_token_logprobs(choice["prompt_logprobs"], body["prompt"])
        usage = data.get("usage") or {}
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
        return result

    async def _stream(self, body: dict) -> Completion:
        result = Completion(ok=False)
        started = time.perf_counter()
        token_times: list[float] = []
        texts: list[str] = []
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as response:
                result.status = response.status_code
                if response.status_code != 200:
                    result.error = error_text((await response.aread()).decode(errors="replace"))
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        result.error = json.dumps(data["error"])
                        return result
                    now = time.perf_counter()
                    for choice in data.get("choices") or []:
                        piece = choice.get("text") or ""
                        lp = choice.get("logprobs")
                        n_new = len(lp.get("tokens") or []) if lp else (1 if piece else 0)
                        token_times.extend([now] * n_new)
                        texts.append(piece)
                        add_logprobs(result, lp)
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                    if data.get("usage"):
                        result.prompt_tokens = data["usage"].get("prompt_tokens")
                        result.completion_tokens = data["usage"].get("completion_tokens")
                    if data.get("attention"):
                        result.attention = data["attention"]
        except (httpx.HTTPError, json.JSONDecodeError) as err:
            result.error = f"{type(err).__name__}: {err}"
            return result
        end = time.perf_counter()
        result.ok = True
        result.text = "".join(texts)
        result.e2e_s = end - started
        if token_times:
            result.ttft_s = token_times[0] - started
            n_out = max(result.completion_tokens or len(token_times), 1)
            if n_out > 1:
                result.tpot_s = (token_times[-1] - token_times[0]) / (n_out - 1)
        return result


def add_logprobs(result: Completion, logprobs: dict | None) -> None:
    if not logprobs:
        return
    for key in logprobs.get("tokens") or []:
        result.token_ids.append(parse_token_key(key))
    for top in logprobs.get("top_logprobs") or []:
        result.top_logprobs.append({parse_token_key(k): float(v) for k, v in (top or {}).items()})
    for value in logprobs.get("token_logprobs") or []:
        result.token_logprobs.append(None if value is None else float(value))


def prompt_token_logprobs(entries: list, prompt_ids: list[int]) -> list[float | None]:
    """vLLM's `prompt_logprobs` (one dict per prompt token, keyed by token id as a string, the
    first None) -> the logprob of each actual prompt token."""
    out: list[float | None] = []
    for token_id, entry in zip(prompt_ids, entries):
        if not entry:
            out.append(None)
            continue
        value = entry.get(str(token_id))
        if value is None:
            value = entry.get(f"token_id:{token_id}")
        if isinstance(value, dict):
            value = value.get("logprob")
        out.append(None if value is None else float(value))
    return out


def error_text(raw: str) -> str:
    try:
        data = json.loads(raw)
        err = data.get("error", data)
        if isinstance(err, dict):
            param = err.get("param")
            return f"{err.get('message')}" + (f" (param: {param})" if param else "")
        return str(err)
    except (json.JSONDecodeError, AttributeError):
        return raw[:500]


async def gather_limited(coros, limit: int, progress=None) -> list:
    """Run coroutines with at most `limit` in flight; results in order; `progress.update(1)` each."""
    semaphore = asyncio.Semaphore(max(1, limit))

    async def one(coro):
        async with semaphore:
            try:
                return await coro
            finally:
                if progress is not None:
                    progress.update(1)

    return await asyncio.gather(*(one(c) for c in coros))


# -- tokenizer and model facts --------------------------------------------------------------------


def load_tokenizer(path: str | None = None):
    """The served model's tokenizer: `path` (a folder or hub id) or the embedded model's folder."""
    from transformers import AutoTokenizer

    if path is None:
        from server.model import prepare_embedded_model

        path = str(prepare_embedded_model().path)
    return AutoTokenizer.from_pretrained(path)


# -- a server started for the duration of a command ------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def attnserve_command() -> list[str]:
    script = Path(sys.executable).with_name("attnserve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "server.cli"]


def wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"attnserve serve exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"attnserve serve was not healthy after {timeout_s:.0f} s (log: {log_path})")


def stop_process_group(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server's own process group (API, engine core, workers), then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived the API process
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


@contextlib.contextmanager
def managed_server(serve_args: list[str], log_path: Path, timeout_s: float = 900.0) -> Iterator[str]:
    """Start `attnserve serve` on a free loopback port; yield its base URL; stop it after."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = attnserve_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting: {' '.join(command)} (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(base_url, process, timeout_s, log_path)
        yield base_url
    finally:
        stop_process_group(process)


def add_server_arguments(parser, required: bool = True) -> None:
    """--base-url / --start-server (+ --serve-arg), shared by eval and bench."""
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--base-url", help="a running attnserve server, e.g. http://127.0.0.1:8000")
    target.add_argument("--start-server", action="store_true",
                        help="start `attnserve serve` on a free loopback port and stop it after")
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="an extra `attnserve serve` argument with --start-server (repeatable, "
                             "e.g. --serve-arg=--max-model-len --serve-arg=8192)")
    parser.add_argument("--model", default=None, help="the served model name (default: the first listed)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or id (default: the served model's folder when the server "
                             "runs on this machine, else the embedded model's)")


@contextlib.contextmanager
def server_from_args(args, log_dir: Path) -> Iterator[str]:
    if args.base_url:
        yield args.base_url.rstrip("/")
        return
    with managed_server(list(args.serve_args), log_dir / "server.log") as base_url:
        yield base_url
