"""The production surface in front of the routes: API keys, request-body size, the bound on running +
queued generation requests, and refusing new work while draining. One pure-ASGI middleware (so that
streaming responses pass through untouched and the in-flight count covers a stream to its end);
CORS is Starlette's own middleware, outside it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import metrics

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
ENV_API_KEYS = "ATTNSERVE_API_KEYS"
RETRY_AFTER_S = 1


def load_api_keys(keys: Iterable[str] = (), files: Iterable[str] = (),
                  env: str | None = None) -> tuple[str, ...]:
    """`--api-key` values, the lines of each `--api-keys-file` (blank lines and `#` comments
    skipped) and `ATTNSERVE_API_KEYS` (comma- or whitespace-separated), without duplicates."""
    found: list[str] = [k.strip() for k in keys]
    for path in files:
        for line in Path(path).expanduser().read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    env = os.environ.get(ENV_API_KEYS, "") if env is None else env
    found += env.replace(",", " ").split()
    return tuple(dict.fromkeys(k for k in found if k))


@dataclass
class Gate:
    """Generation requests in flight (running + queued in the engine, streams until their end), the
    bound on them, and the draining flag set by SIGTERM."""

    limit: int | None = None
    in_flight: int = 0
    draining: bool = False

    def __post_init__(self) -> None:
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.in_flight += 1
        metrics.set_in_flight(self.in_flight)
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        metrics.set_in_flight(self.in_flight)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """True when no generation request is left, False when `timeout` passed first."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return self.in_flight == 0


def error_body(message: str, err_type: str, status: HTTPStatus, param: str | None = None) -> bytes:
    """OpenAI's error shape, the same as vLLM's `create_error_response`."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    error = create_error_response(message, err_type, status, param)
    return json.dumps(error.model_dump()).encode()


async def send_error(send: Send, status: HTTPStatus, message: str, err_type: str,
                     param: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> None:
    body = error_body(message, err_type, status, param)
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": int(status), "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def drain_body(receive: Receive) -> None:
    """Read what is left of a refused request's body so the connection stays usable."""
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)


class ProductionMiddleware:
    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str] = (), protect_health: bool = False,
                 protect_metrics: bool = False, max_body_bytes: int | None = None,
                 gate: Gate | None = None) -> None:
        self.app = app
        self.key_hashes = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.open_paths = set()
        if not protect_health:
            self.open_paths.add(HEALTH_PATH)
        if not protect_metrics:
            self.open_paths.add(METRICS_PATH)
        self.max_body_bytes = max_body_bytes
        self.gate = gate or Gate()

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        match = False
        for key in self.key_hashes:  # no early exit: the same time for every key
            match |= secrets.compare_digest(digest, key)
        return match

    def needs_auth(self, path: str) -> bool:
        if not self.key_hashes:
            return False
        path = path.rstrip("/") or "/"
        return not any(path == p or path.startswith(p + "/") for p in self.open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = Headers(scope=scope)

        if method != "OPTIONS" and self.needs_auth(path) and not self.authorized(headers):
            metrics.reject(metrics.REJECT_AUTH)
            await drain_body(receive)
            await send_error(
                send, HTTPStatus.UNAUTHORIZED,
                "missing or invalid API key: send it as `Authorization: Bearer <key>`",
                "AuthenticationError", headers=[("www-authenticate", "Bearer")])
            return

        if self.max_body_bytes is not None and method in ("POST", "PUT", "PATCH"):
            body = await self.read_bounded_body(headers, receive, send)
            if body is None:
                return
            receive = replay(body, receive)

        if path in GENERATION_PATHS and method == "POST":
            gate = self.gate
            if gate.draining:
                metrics.reject(metrics.REJECT_DRAINING)
                await send_error(send, HTTPStatus.SERVICE_UNAVAILABLE,
                                 "the server is shutting down; retry on another instance",
                                 "ServiceUnavailableError",
                                 headers=[("retry-after", str(RETRY_AFTER_S)),
                                          ("connection", "close")])
                return
            if gate.limit is not None and gate.in_flight >= gate.limit:
                metrics.reject(metrics.REJECT_OVERLOAD)
                await send_error(
                    send, HTTPStatus.TOO_MANY_REQUESTS,
                    f"the server is at its limit of {gate.limit} concurrent requests "
                    f"(--max-concurrent-requests); retry after {RETRY_AFTER_S} s",
                    "RateLimitError", headers=[("retry-after", str(RETRY_AFTER_S))])
                return
            gate.enter()
            try:
                await self.app(scope, receive, send)
            finally:
                gate.leave()
            return
        await self.app(scope, receive, send)

    async def read_bounded_body(self, headers: Headers, receive: Receive,
                                send: Send) -> bytes | None:
        """The whole body, or None after answering 413 when it exceeds the bound."""
        limit = self.max_body_bytes
        assert limit is not None
        declared = headers.get("content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        if not too_large:
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    too_large = True
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
        if too_large:
            metrics.reject(metrics.REJECT_BAD_INPUT)
            shown = f"{int(declared)} bytes" if declared and declared.isdigit() else \
                f"more than {limit} bytes"
            await send_error(
                send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body: the request body is {shown}, over this server's limit of {limit} bytes "
                f"(--max-body-bytes)", "RequestEntityTooLargeError", param="body",
                headers=[("connection", "close")])
            return None
        return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body over once, then the client's own messages (so
    a disconnect still reaches vLLM's cancellation listener)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped
