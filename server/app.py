"""The FastAPI app around vLLM's in-process `AsyncLLM`, wired the way vLLM's own api_server does it
(`build_async_engine_client` → `init_app_state` → `serve_http`), with our routes in front of its
OpenAI serving classes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from fastapi import FastAPI

from server.config import ServeSettings

logger = logging.getLogger("attnserve.server")


def build_app(args: argparse.Namespace) -> FastAPI:
    """Our routes plus the parts of vLLM's server we keep (health, metrics, models, its error
    handlers). vLLM's other generation routes (responses, anthropic, ...) are not mounted: every
    generation request must pass through our attention validation."""
    from vllm.entrypoints.launchers.utils.server_utils import lifespan
    from vllm.entrypoints.openai.models.api_router import attach_router as attach_models_router
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.entrypoints.serve.instrumentator.health import router as health_router
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router as attach_metrics

    from server import metrics
    from server.routes import router as attnserve_router

    app = FastAPI(title="attnserve", lifespan=lifespan)
    app.state.args = args
    app.include_router(health_router)
    attach_models_router(app)
    app.include_router(attnserve_router)
    metrics.init_metrics()
    attach_metrics(app)  # /metrics: vLLM's registry (vllm:* engine metrics) plus ours
    init_exception_handler(app)
    return app


async def init_state(app: FastAPI, engine_client, args: argparse.Namespace, settings: ServeSettings):
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    from server.attention import (
        AttentionFieldError,
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
    except AttentionFieldError as err:
        raise SystemExit(f"attnserve serve: --default-strategy {settings.default_strategy!r} "
                         f"cannot be served: {err.message}") from None
    app.state.attention_policy = policy


@contextlib.contextmanager
def worker_stats_dir() -> Iterator[str]:
    """The folder where workers leave per-request attention stats (strategies.stats); the engine's
    processes inherit it through the environment, so it is set before the engine starts."""
    from strategies import stats

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


async def run_server(settings: ServeSettings) -> None:
    with worker_stats_dir():
        await _run_server(settings)


async def _run_server(settings: ServeSettings) -> None:
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    args = settings.vllm_namespace()
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        app = build_app(args)
        await init_state(app, engine_client, args, settings)
        logger.info("attnserve listening on %s (default strategy: %s)", listen_address,
                    settings.default_strategy)
        shutdown_task = await serve_http(
            app,
            sock=sock,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        )
    try:
        await shutdown_task
    finally:
        sock.close()
