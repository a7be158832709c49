"""The FastAPI app around vLLM's in-process `AsyncLLM`, wired the way vLLM's own api_server does it
(`build_async_engine_client` → `init_app_state` → `serve_http`), with our routes in front of its
OpenAI serving classes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

from fastapi import FastAPI

from server.config import ServeSettings

logger = logging.getLogger("attnserve.server")


def build_app(args: argparse.Namespace, settings: ServeSettings | None = None) -> FastAPI:
    """Our routes plus the parts of vLLM's server we keep (models, metrics, its error handlers).
    vLLM's other generation routes (responses, anthropic, ...) are not mounted: every generation
    request must pass through our attention validation. In front of them: CORS, then API keys,
    body size and the bound on concurrent generation requests (server/production.py)."""
    from starlette.middleware.cors import CORSMiddleware
    from vllm.entrypoints.launchers.utils.server_utils import lifespan
    from vllm.entrypoints.openai.models.api_router import attach_router as attach_models_router
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router as attach_metrics

    from server import metrics, openapi
    from server.production import Gate, ProductionMiddleware
    from server.routes import router as attnserve_router

    if settings is None:  # the app alone (no engine), e.g. to list its routes: default settings
        model = str(getattr(args, "model", "") or "")
        settings = ServeSettings(model=model, served_model_name=model)
    app = FastAPI(title="attnserve", lifespan=lifespan)
    app.state.args = args
    app.state.settings = settings
    app.state.gate = Gate(limit=settings.max_concurrent_requests)
    attach_models_router(app)
    app.include_router(attnserve_router)
    metrics.init_metrics(settings.max_concurrent_requests)
    attach_metrics(app)  # /metrics: vLLM's registry (vllm:* engine metrics) plus ours
    init_exception_handler(app)
    openapi.describe_request_bodies(app, settings)
    app.add_middleware(
        ProductionMiddleware,
        api_keys=settings.api_keys,
        protect_health=settings.protect_health,
        protect_metrics=settings.protect_metrics,
        max_body_bytes=settings.max_body_bytes,
        gate=app.state.gate,
    )
    if settings.cors_origins:  # outermost: preflights and refusals carry the CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=list(settings.cors_methods),
            allow_headers=list(settings.cors_headers),
            allow_credentials=settings.cors_credentials,
        )
    return app


async def init_state(app: FastAPI, engine_client, args: argparse.Namespace, settings: ServeSettings):
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    from strategies.base import ParamError
    from server.attention import (
        AttentionPolicy,
        AttentionRequest,
        model_facts_from_vllm_config,
    )

    supported_tasks = await engine_client.get_supported_tasks()
    await init_app_state(engine_client, app.state, args, supported_tasks)
    policy = AttentionPolicy(
        default_strategy=settings.default_strategy,
        model_facts=model_facts_from_vllm_config(engine_client.vllm_config),
    )
    try:  # the default must be valid and runnable here: fail at start, not per request
        policy.resolve(AttentionRequest())
    except ParamError as err:
        raise SystemExit(f"attnserve serve: --default-strategy {settings.default_strategy!r} "
                         f"cannot be served: {err.message}") from None
    app.state.attention_policy = policy
    from server.config import forcing_enabled
    from server.forcing import ForcingPolicy

    model_config = engine_client.vllm_config.model_config
    app.state.forcing = ForcingPolicy(enabled=forcing_enabled(model_config.logits_processors),
                                      vocab_size=model_config.get_vocab_size())
    from server import metrics
    from server.routes import observe_engine_client

    from server.resources import StateLedger

    facts = policy.model_facts
    cache_config = engine_client.vllm_config.cache_config
    kv_space = (cache_config.num_gpu_blocks or 0) * cache_config.block_size * facts.kv_bytes_per_token
    ledger = StateLedger(limit=settings.strategy_memory_bytes(kv_space or None), wait_s=settings.strategy_memory_wait)
    app.state.state_ledger = ledger
    metrics.init_metrics(settings.max_concurrent_requests, kv_blocks=cache_config.num_gpu_blocks,
                         state_bytes_limit=ledger.limit)
    for name in ("openai_serving_completion", "openai_serving_chat"):
        handler = getattr(app.state, name, None)
        if handler is not None:
            observe_engine_client(handler, ledger, facts)


@contextlib.contextmanager
def worker_stats_dir() -> Iterator[str]:
    """The folder where workers leave per-request attention stats (strategies.engine.stats); the engine's
    processes inherit it through the environment, so it is set before the engine starts."""
    from strategies.engine import stats

    existing = os.environ.get(stats.ENV_DIR)
    if existing:
        os.makedirs(existing, exist_ok=True)
        yield existing
        return
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="attnserve-stats-", dir=shm)
    os.environ[stats.ENV_DIR] = path
    try:
        yield path
    finally:
        os.environ.pop(stats.ENV_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


async def run_server(settings: ServeSettings) -> int:
    with worker_stats_dir():
        return await _run_server(settings)


async def _run_server(settings: ServeSettings) -> int:
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    from strategies.base import STATE_BYTES_LIMIT_ENV

    args = settings.vllm_namespace()
    limit = settings.strategy_memory_bytes()
    if limit:   # the engine's workers inherit it: their buffer pools never grow past it
        os.environ[STATE_BYTES_LIMIT_ENV] = str(limit)
    else:
        os.environ.pop(STATE_BYTES_LIMIT_ENV, None)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine_client:
            app = build_app(args, settings)
            await init_state(app, engine_client, args, settings)
            logger.info("attnserve listening on %s (default strategy: %s)", listen_address,
                        settings.default_strategy)
            exit_code = await serve(app, sock, engine_client, args, settings)
            if exit_code:
                logger.error("attnserve: the engine died; exiting with %d so that a supervisor "
                             "restarts the server", exit_code)
    finally:
        sock.close()
    return exit_code


ENGINE_DEAD_EXIT_CODE = 3
WATCHDOG_PERIOD_S = 1.0
GRACEFUL_CLOSE_S = 5.0  # after draining: how long uvicorn waits for connections to close


async def serve(app: FastAPI, sock, engine_client, args: argparse.Namespace,
                settings: ServeSettings) -> int:
    """Uvicorn with our own signal handling (vLLM's `serve_http` shuts the engine down at once):

    - SIGTERM/SIGINT: new generation requests get 503 and /health turns 503, the in-flight ones
      may finish for up to --drain-timeout, then the HTTP server stops and the engine is shut down
      (aborting whatever is left); returns 0. A second signal stops at once.
    - the engine died (EngineCore process gone, fatal error): /health is 503, in-flight requests
      end with an error (vLLM fails their streams), the HTTP server stops; returns non-zero.
    """
    import uvicorn
    from vllm import envs
    from vllm.entrypoints.launchers.launcher import NoSignalServer
    from vllm.entrypoints.launchers.utils.constants import (
        H11_MAX_HEADER_COUNT_DEFAULT,
        H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT,
    )

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
    )
    config.h11_max_incomplete_event_size = H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT
    config.h11_max_header_count = H11_MAX_HEADER_COUNT_DEFAULT
    config.load()
    server = NoSignalServer(config)
    app.state.server = server
    gate = app.state.gate
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            logger.info("attnserve: shutdown requested; draining %d in-flight request(s) for up "
                        "to %g s", gate.in_flight, settings.drain_timeout)
            gate.draining = True
            stop_requested.set()
        else:
            logger.info("attnserve: second signal; stopping now")
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    engine_dead = False

    async def watchdog() -> None:
        nonlocal engine_dead
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            if engine_client.errored:
                engine_dead = True
                logger.error("attnserve: the engine is dead; stopping the HTTP server")
                server.should_exit = True
                return

    async def drain() -> None:
        await stop_requested.wait()
        drained = await gate.wait_idle(settings.drain_timeout)
        if not drained:
            logger.warning("attnserve: %d request(s) still in flight after %g s; aborting them",
                           gate.in_flight, settings.drain_timeout)
        server.should_exit = True

    server_task = loop.create_task(server.serve(sockets=[sock]))
    helpers = [loop.create_task(watchdog()), loop.create_task(drain())]
    try:
        await server_task
    finally:
        for task in helpers:
            task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if engine_dead or engine_client.errored:
        return ENGINE_DEAD_EXIT_CODE
    return 0
