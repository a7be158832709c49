"""The bound on the strategies' own buffers (issue 20; server/resources.py) on a real server: concurrent
`recycled` requests at a large `k` stay inside `--strategy-memory-gib` (429 with Retry-After past it,
`--strategy-memory-wait 0`), a request that alone needs more gets a 400 naming its field, /metrics shows
the reserved and held bytes, and both return to 0 when the requests end."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
import torch

from production_helpers import LIVENESS_S, metric, scrape
from strategies import registry
from strategies.base import ModelFacts

Recycled = registry.get("recycled")
LIMIT_MIB = 24
MAX_MODEL_LEN = 2048
PROMPT_TOKENS = 600
MAX_TOKENS = 128
STRIDE = 4


@pytest.fixture(scope="module")
def server(launch_attnserve):
    args = ["--strategy-memory-gib", repr(LIMIT_MIB / 1024), "--strategy-memory-wait", "0"]
    with launch_attnserve(args, max_model_len=MAX_MODEL_LEN, kv_cache_gib=1) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=LIVENESS_S * 5) as client:
        yield client


@pytest.fixture(scope="module")
def facts(server, embedded_model_dir) -> ModelFacts:
    """The served model as the workers see it: the dtype vLLM chose (it depends on the CPU's ISA)."""
    found = re.search(r"dtype=torch\.(\w+)", server.log_path.read_text(errors="replace"))
    assert found, "vLLM's engine config line (dtype=...) is not in the server log"
    return ModelFacts.from_model_dir(embedded_model_dir, dtype=getattr(torch, found.group(1)))


def k_for_share(facts: ModelFacts, share: float) -> int:
    """A `k` whose pool pages take about ``share`` of the bound."""
    pages = int(share * LIMIT_MIB * (1 << 20) // Recycled.pool_page_bytes(facts))
    assert pages >= 2
    return pages * Recycled.POOL_PAGE - STRIDE - 1


def completion(k, tokens=PROMPT_TOKENS, **fields):
    prompt = [(i * 37) % 5000 + 100 for i in range(tokens)]
    return {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0.0, "attention": {"strategy": "recycled", "params": {"k": k, "stride": STRIDE}},
            **fields}


def memory(samples):
    return (metric(samples, "attnserve:strategy_memory_reserved_bytes", strategy="recycled"),
            metric(samples, "attnserve:strategy_memory_held_bytes", strategy="recycled"))


def wait_for_floor(http) -> dict:
    deadline = time.monotonic() + LIVENESS_S
    while True:
        samples = scrape(http)
        if memory(samples) == (0.0, 0.0):
            return samples
        assert time.monotonic() < deadline, f"reserved, held = {memory(samples)} after the requests ended"
        time.sleep(0.5)


def test_the_bound_is_reported(http):
    samples = scrape(http)
    assert metric(samples, "attnserve:strategy_memory_limit_bytes") == pytest.approx(LIMIT_MIB << 20, abs=1)
    assert memory(samples) == (0.0, 0.0)


def test_concurrent_requests_stay_inside_the_bound_and_the_pool_returns_to_its_floor(http, server, facts):
    k = k_for_share(facts, 0.4)                   # two fit, a third does not
    limit = LIMIT_MIB << 20
    before = scrape(http)
    seen: list[tuple[float, float]] = []
    results: list[httpx.Response] = []
    done = threading.Event()

    def watch():
        with httpx.Client(base_url=server.base_url, timeout=LIVENESS_S) as c:
            while not done.is_set():
                seen.append(memory(scrape(c)))
                time.sleep(0.05)

    def send(body):
        with httpx.Client(base_url=server.base_url, timeout=LIVENESS_S * 5) as c:
            results.append(c.post("/v1/completions", json=body))

    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=send, args=(completion(k),)) for _ in range(6)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(LIVENESS_S * 5)
    done.set()
    watcher.join()
    assert len(results) == 6, "a request hung"
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) >= 2 and refused and len(ok) + len(refused) == 6, [r.text[:200] for r in results]
    for response in ok:
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == 429 and "--strategy-memory-gib" in error["message"], error
        assert int(response.headers["retry-after"]) >= 1
    assert max(r for r, _ in seen) <= limit and max(h for _, h in seen) <= limit, seen
    assert max(h for _, h in seen) > 0, "the workers' pool never showed in /metrics"
    print(f"k {k}: {len(ok)} ran, {len(refused)} got 429; max reserved {max(r for r, _ in seen):.0f}, "
          f"max held {max(h for _, h in seen):.0f}, bound {limit} bytes")
    after = wait_for_floor(http)
    for name, labels in [("attnserve:requests_rejected_total", {"reason": "memory"}),
                         ("attnserve:requests_total", {"strategy": "recycled", "status": "overload"})]:
        assert metric(after, name, **labels) - metric(before, name, **labels) == len(refused), name
    response = http.post("/v1/completions", json=completion(k))     # the room came back
    assert response.status_code == 200, response.text
    wait_for_floor(http)


@pytest.mark.parametrize("attention, field", [
    ({"strategy": "recycled", "params": {"k": 1.0, "stride": STRIDE}}, "attention.params.k"),
    ({"strategy": "recycled", "params": {"stride": STRIDE}, "budget": 1.0}, "attention.budget"),
])
def test_a_request_that_alone_exceeds_the_bound_is_400_naming_its_field(http, facts, attention, field):
    body = completion(0, tokens=1500, attention=attention)
    assert Recycled.request_state_bytes(Recycled.Params(k=1.0, stride=STRIDE), 1500, facts) > LIMIT_MIB << 20
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "--strategy-memory-gib" in error["message"], error
    streamed = http.post("/v1/completions", json={**body, "stream": True})    # the stream had started: an event
    assert '"code":400' in streamed.text.replace(" ", "") and field in streamed.text, streamed.text[:500]
    assert memory(scrape(http)) == (0.0, 0.0)
