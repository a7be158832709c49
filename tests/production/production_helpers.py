"""Constants and helpers of tests/production (fixtures in conftest.py)."""

from __future__ import annotations

import re
import time

import httpx

API_KEY = "test-key-cli"
FILE_KEY = "test-key-file"
ENV_KEY = "test-key-env"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CORS_ORIGIN = "http://client.example"
MAX_CONCURRENT = 2
MAX_TOKENS_LIMIT = 1024
MAX_N = 2
MAX_PROMPT_TOKENS = 512
MAX_BODY_BYTES = 32768
REQUEST_TIMEOUT_S = 4
DRAIN_TIMEOUT_S = 120
PROD_MAX_MODEL_LEN = 4096
KV_CACHE_GIB = 1
LIVENESS_S = 60.0  # generous bound for "it settles"/"it ends": never a performance claim



def client(server, auth: bool = True) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=300.0, headers=AUTH if auth else {})


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(http: httpx.Client) -> dict[str, float]:
    """`name{labels}` → value of every sample on /metrics."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for line in response.text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_for_idle_engine(http: httpx.Client, timeout: float = LIVENESS_S) -> dict[str, float]:
    """Poll /metrics until vLLM reports no running or waiting request and no KV block in use."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(http)
        busy = (metric(samples, "vllm:num_requests_running"),
                metric(samples, "vllm:num_requests_waiting"),
                metric(samples, "vllm:kv_cache_usage_perc"))
        if busy == (0.0, 0.0, 0.0):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout:.0f} s: running, waiting, "
                                 f"kv usage = {busy}")
        time.sleep(0.5)


def sse_data(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]
