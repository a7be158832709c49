"""Faults on a real server: /health and /metrics behind the key, the request timeout (the engine
request is aborted and its KV freed), and last the engine process dying under a request (which ends
this module's server: /health turns 503 and the server exits non-zero, nothing left hanging)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from production_helpers import (
    AUTH,
    LIVENESS_S,
    REQUEST_TIMEOUT_S,
    client,
    metric,
    scrape,
    sse_data,
    wait_for_idle_engine,
)

MODEL = "SmolLM2-135M-Instruct"
# Far more tokens than this machine generates within the timeout (it would take minutes).
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(fault_server):
    with client(fault_server) as c:
        yield c


def test_protected_health_and_metrics_need_the_key(fault_server, http):
    with client(fault_server, auth=False) as anonymous:
        for path in ("/health", "/metrics"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "AuthenticationError"
    assert http.get("/health").status_code == 200
    assert "vllm:num_requests_running" in http.get("/metrics").text


def test_request_timeout_aborts_a_non_streamed_request(http):
    before = scrape(http)
    start = time.monotonic()
    response = http.post("/v1/completions", json=LONG)
    elapsed = time.monotonic() - start
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "TimeoutError" and "--request-timeout" in error["message"]
    assert REQUEST_TIMEOUT_S <= elapsed < REQUEST_TIMEOUT_S + LIVENESS_S
    after = wait_for_idle_engine(http)  # aborted in the engine: no request, no KV left
    assert (metric(after, "attnserve:requests_total", status="timeout")
            - metric(before, "attnserve:requests_total", status="timeout")) == 1
    assert (metric(after, "attnserve:requests_rejected_total", reason="timeout")
            - metric(before, "attnserve:requests_rejected_total", reason="timeout")) == 1
    generated = (metric(after, "vllm:generation_tokens_total")
                 - metric(before, "vllm:generation_tokens_total"))
    assert generated < LONG["max_tokens"]


def test_request_timeout_ends_a_stream_with_an_error_event(http):
    body = {**LONG, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 3000, "ignore_eos": True, "stream": True}) as response:
        assert response.status_code == 200
        events = sse_data(response.iter_lines())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 504 and "--request-timeout" in error["message"]
    assert len(events) > 3  # it streamed tokens before the deadline
    wait_for_idle_engine(http)
    response = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
    assert response.status_code == 200, response.text


def engine_core(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no EngineCore child process found")


def test_engine_death_turns_health_503_and_the_server_exits_nonzero(fault_server, http):
    process = fault_server.process
    children = psutil.Process(process.pid).children(recursive=True)
    events: list[str] = []
    outcome: dict[str, object] = {}
    started = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(base_url=fault_server.base_url, timeout=LIVENESS_S,
                              headers=AUTH) as c, \
                    c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                outcome["status"] = r.status_code
                for line in r.iter_lines():
                    events.extend(sse_data([line]))
                    started.set()
        except httpx.HTTPError as err:  # the connection may close instead of an error event
            outcome["error"] = err
        finally:
            started.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert started.wait(LIVENESS_S) and outcome.get("status") == 200, outcome
    os.kill(engine_core(process.pid).pid, signal.SIGKILL)

    # /health says 503 until the server is gone (or it is already gone)
    deadline = time.monotonic() + LIVENESS_S
    health = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            health = httpx.get(f"{fault_server.base_url}/health", headers=AUTH,
                               timeout=5.0).status_code
        except httpx.HTTPError:
            health = "gone"
        if health != 200:
            break
        time.sleep(0.2)
    assert health in (503, "gone") or process.poll() is not None, health

    thread.join(LIVENESS_S)
    assert not thread.is_alive(), "the in-flight stream was left hanging"
    if "error" not in outcome:  # it ended with an error event, never with success
        assert any('"error"' in event for event in events), events[-3:]
        assert not any('"finish_reason":"length"' in event for event in events)

    code = process.wait(timeout=LIVENESS_S * 2)
    assert code != 0, fault_server.log_tail()
    deadline = time.monotonic() + LIVENESS_S
    while any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children):
        assert time.monotonic() < deadline, [c for c in children if c.is_running()]
        time.sleep(0.5)
