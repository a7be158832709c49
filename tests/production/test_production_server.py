"""The production surface of a real server (real engine, embedded model, real HTTP): API keys, CORS,
bounds, overload, a client leaving mid-stream, the metrics, the OpenAPI schema, a fuzz run, and
last a SIGTERM with requests in flight (which ends this module's server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from production_helpers import (
    API_KEY,
    AUTH,
    CORS_ORIGIN,
    ENV_KEY,
    FILE_KEY,
    LIVENESS_S,
    MAX_BODY_BYTES,
    MAX_CONCURRENT,
    MAX_N,
    MAX_PROMPT_TOKENS,
    MAX_TOKENS_LIMIT,
    client,
    metric,
    scrape,
    sse_data,
    wait_for_idle_engine,
)
from tests.fuzz_values import attention_values, force_tokens_values, xargs_values

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def completion(**fields):
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0.0, **fields}


def chat(**fields):
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0.0, **fields}


@pytest.fixture(scope="module")
def http(prod_server):
    with client(prod_server) as c:
        yield c


@pytest.fixture(scope="module")
def anonymous(prod_server):
    with client(prod_server, auth=False) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        says: tuple[str, ...] = ()) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"]
    for text in says:
        assert text in error["message"], error
    return error


# -- auth and CORS -------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": API_KEY},  # no scheme
                                     {"Authorization": "Basic dGVzdA=="}],
                         ids=["missing", "wrong", "no-scheme", "basic"])
def test_missing_or_wrong_key_is_401(anonymous, headers):
    for method, path, body in (("POST", "/v1/completions", completion()),
                               ("POST", "/v1/chat/completions", chat()),
                               ("GET", "/v1/models", None), ("GET", "/v1/strategies", None),
                               ("GET", "/openapi.json", None)):
        response = anonymous.request(method, path, json=body, headers=headers)
        error = assert_openai_error(response, 401, says=("API key",))
        assert error["type"] == "AuthenticationError"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", [API_KEY, FILE_KEY, ENV_KEY], ids=["flag", "file", "env"])
def test_each_key_source_is_accepted(anonymous, key):
    headers = {"Authorization": f"Bearer {key}"}
    assert anonymous.get("/v1/models", headers=headers).status_code == 200
    response = anonymous.post("/v1/completions", json=completion(), headers=headers)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["text"]


def test_health_and_metrics_are_open_by_default(anonymous):
    assert anonymous.get("/health").status_code == 200
    response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert "vllm:num_requests_running" in response.text


def test_auth_refusals_are_counted(anonymous):
    before = metric(scrape(anonymous), "attnserve:requests_rejected_total", reason="auth")
    assert anonymous.get("/v1/models").status_code == 401
    after = metric(scrape(anonymous), "attnserve:requests_rejected_total", reason="auth")
    assert after == before + 1


def test_cors_preflight_and_headers(anonymous):
    preflight = anonymous.options("/v1/chat/completions", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    refused = anonymous.options("/v1/chat/completions", headers={
        "Origin": "http://other.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # a refusal (401) still carries the CORS header, so a browser can read the error
    response = anonymous.get("/v1/models", headers={"Origin": CORS_ORIGIN})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == CORS_ORIGIN


# -- bounds ----------------------------------------------------------------------------------


def test_body_too_large_is_413(http):
    body = completion(prompt="word " * (MAX_BODY_BYTES // 5 + 10))
    response = http.post("/v1/completions", json=body)
    assert_openai_error(response, 413, param="body", says=(str(MAX_BODY_BYTES), "--max-body-bytes"))


def test_body_too_large_without_content_length_is_413(http):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 4):
            yield b" " * 1024

    response = http.post("/v1/completions", content=chunks(),
                         headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413, param="body", says=(str(MAX_BODY_BYTES),))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=MAX_TOKENS_LIMIT * 4),
     "max_completion_tokens"),
], ids=["completion", "chat", "chat-max-completion-tokens"])
def test_max_tokens_over_the_bound_is_400_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert_openai_error(response, 400, param=param, says=(str(MAX_TOKENS_LIMIT),))


def test_max_tokens_at_the_bound_is_accepted_and_absent_max_tokens_gets_the_bound(http):
    # (a stop string that the first word meets keeps the generations short)
    response = http.post("/v1/completions", json=completion(max_tokens=MAX_TOKENS_LIMIT,
                                                            stop=[" ", "\n"]))
    assert response.status_code == 200, response.text
    body = chat(stop=[" ", "\n", "."])
    del body["max_tokens"]
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= MAX_TOKENS_LIMIT


def test_n_over_the_bound_is_400(http):
    response = http.post("/v1/completions", json=completion(n=MAX_N + 1, temperature=0.8))
    assert_openai_error(response, 400, param="n", says=(str(MAX_N),))
    response = http.post("/v1/completions", json=completion(n=MAX_N, temperature=0.8))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == MAX_N


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(prompt="hello " * (MAX_PROMPT_TOKENS + 50)), "prompt"),
    ("/v1/completions", completion(prompt=[1] * (MAX_PROMPT_TOKENS + 1)), "prompt"),
    ("/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "hello " * (MAX_PROMPT_TOKENS + 50)}]),
     "messages"),
], ids=["text", "token-ids", "chat"])
def test_prompt_over_the_bound_is_400(http, path, body, param):
    response = http.post(path, json=body)
    assert_openai_error(response, 400, param=param, says=(str(MAX_PROMPT_TOKENS),))


def test_bad_input_is_counted(http):
    before = metric(scrape(http), "attnserve:requests_rejected_total", reason="bad_input")
    http.post("/v1/completions", json=completion(n=MAX_N + 1))
    http.post("/v1/completions", json=completion(attention={"strategy": "nope"}))
    after = metric(scrape(http), "attnserve:requests_rejected_total", reason="bad_input")
    assert after == before + 2


# -- overload --------------------------------------------------------------------------------


class HeldStream:
    """A streamed completion read up to its first token in a thread, then held until released."""

    def __init__(self, base_url: str, body: dict):
        self.base_url, self.body = base_url, body
        self.started = threading.Event()
        self.release = threading.Event()
        self.status: int | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=300.0, headers=AUTH) as c, \
                    c.stream("POST", "/v1/completions", json=self.body) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.events += sse_data([line])
                    if self.events and not self.started.is_set():
                        self.started.set()
                        self.release.wait(LIVENESS_S)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
        finally:
            self.started.set()

    def finish(self) -> None:
        self.release.set()
        self.thread.join(LIVENESS_S * 2)
        assert not self.thread.is_alive(), "a held stream never ended"
        assert self.error is None, repr(self.error)


HELD_MAX_TOKENS = MAX_TOKENS_LIMIT - 24  # seconds of generation here; within the server's cap
HOLD_ATTEMPTS = 3


def hold_streams(http: httpx.Client, base_url: str, count: int) -> list[HeldStream]:
    """`count` streamed completions, each read up to its first token and then held, all of them
    still in flight on return (checked on /metrics). A held request keeps generating (the kernel's
    socket buffers take its unread tokens), so a machine that stalls the test for as long as a
    whole generation takes could let one run to its end before the last has started: then the
    streams are finished and held again, up to HOLD_ATTEMPTS times."""
    body = completion(prompt="Once upon a time", max_tokens=HELD_MAX_TOKENS, ignore_eos=True,
                      stream=True)
    in_flight = 0.0
    for _ in range(HOLD_ATTEMPTS):
        wait_for_idle_engine(http)
        streams = [HeldStream(base_url, body) for _ in range(count)]
        for stream in streams:
            assert stream.started.wait(LIVENESS_S * 2), "a stream never started"
            assert stream.status == 200 and stream.error is None, (stream.status, stream.error)
        in_flight = metric(scrape(http), "attnserve:requests_in_flight")
        if in_flight == count:
            return streams
        for stream in streams:
            stream.finish()
    raise AssertionError(f"{count} held streams never were in flight together "
                         f"({HOLD_ATTEMPTS} attempts; last saw {in_flight:g})")


def test_overload_gets_429_with_retry_after_and_the_rest_succeed(http, prod_server):
    # long enough to be still generating while the extra requests are refused (a few hundred
    # tokens: seconds here), then read to their end
    streams = hold_streams(http, prod_server.base_url, MAX_CONCURRENT)
    try:
        before = metric(scrape(http), "attnserve:requests_rejected_total", reason="overload")
        results: list[httpx.Response] = []

        def extra(path: str, body: dict) -> None:
            with httpx.Client(base_url=prod_server.base_url, timeout=LIVENESS_S,
                              headers=AUTH) as c:
                results.append(c.post(path, json=body))

        threads = [threading.Thread(target=extra, args=args) for args in
                   [("/v1/completions", completion())] * 3 +
                   [("/v1/chat/completions", chat(stream=True))] * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LIVENESS_S)
        assert len(results) == 6, "an over-limit request hung instead of being refused"
        for response in results:
            error = assert_openai_error(response, 429, says=(str(MAX_CONCURRENT),
                                                             "--max-concurrent-requests"))
            assert error["type"] == "RateLimitError"
            assert int(response.headers["retry-after"]) >= 1
        samples = scrape(http)
        assert metric(samples, "attnserve:requests_rejected_total",
                      reason="overload") == before + 6
        assert metric(samples, "attnserve:requests_in_flight") == MAX_CONCURRENT
    finally:
        for stream in streams:
            stream.finish()
    for stream in streams:  # the held requests completed normally
        assert stream.events[-1] == "[DONE]"
        assert '"finish_reason":"length"' in stream.events[-2]
    wait_for_idle_engine(http)
    assert metric(scrape(http), "attnserve:requests_in_flight") == 0
    response = http.post("/v1/completions", json=completion())  # capacity is back
    assert response.status_code == 200, response.text


# -- a client that leaves mid-stream ---------------------------------------------------------


def test_disconnect_mid_stream_aborts_the_request_and_frees_its_kv(http, prod_server):
    wait_for_idle_engine(http)
    before = scrape(http)
    body = completion(prompt="Once upon a time " * 40, max_tokens=MAX_TOKENS_LIMIT,
                      ignore_eos=True, stream=True)
    with httpx.Client(base_url=prod_server.base_url, timeout=LIVENESS_S, headers=AUTH) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
            busy = scrape(http)  # the request holds KV while it streams
            assert metric(busy, "vllm:num_requests_running") == 1
            assert metric(busy, "vllm:kv_cache_usage_perc") > 0
            assert metric(busy, "attnserve:kv_cache_blocks_used") > 0
        # leaving the `with` closes the connection after one token of 1024
    after = wait_for_idle_engine(http)
    assert metric(after, "attnserve:kv_cache_blocks_used") == 0
    aborted = (metric(after, "attnserve:requests_total", status="aborted")
               - metric(before, "attnserve:requests_total", status="aborted"))
    assert aborted == 1
    # the engine finished it as aborted, long before its 1024 tokens
    generated = (metric(after, "vllm:generation_tokens_total")
                 - metric(before, "vllm:generation_tokens_total"))
    assert generated < MAX_TOKENS_LIMIT / 2
    assert http.post("/v1/completions", json=completion()).status_code == 200


# -- metrics and schema ----------------------------------------------------------------------


def test_metrics_are_labelled_by_strategy(http):
    for strategy in ("full", "sink"):
        body = completion(max_tokens=6, ignore_eos=True, attention={"strategy": strategy})
        assert http.post("/v1/completions", json=body).status_code == 200
        body = chat(max_tokens=6, ignore_eos=True, stream=True, attention={"strategy": strategy})
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert sse_data(response.iter_lines())[-1] == "[DONE]"
    samples = scrape(http)
    for strategy in ("full", "sink"):
        assert metric(samples, "attnserve:requests_total", strategy=strategy, status="ok") >= 2
        for histogram in ("attnserve:time_to_first_token_seconds",
                          "attnserve:time_per_output_token_seconds",
                          "attnserve:e2e_request_latency_seconds",
                          "attnserve:attended_fraction"):
            assert metric(samples, histogram + "_count", strategy=strategy) >= 2, histogram
        ttft = (metric(samples, "attnserve:time_to_first_token_seconds_sum", strategy=strategy)
                / metric(samples, "attnserve:time_to_first_token_seconds_count",
                         strategy=strategy))
        assert 0 < ttft < LIVENESS_S
        fraction_count = metric(samples, "attnserve:attended_fraction_count", strategy=strategy)
        fraction_sum = metric(samples, "attnserve:attended_fraction_sum", strategy=strategy)
        assert 0 < fraction_sum / fraction_count <= 1.0
    assert metric(samples, "attnserve:max_concurrent_requests") == MAX_CONCURRENT
    assert metric(samples, "attnserve:kv_cache_blocks_total") > 0
    assert "vllm:num_requests_running" in "".join(samples)


def integer_maximum(prop: dict) -> int | None:
    return next((v.get("maximum") for v in prop.get("anyOf", [prop]) if v.get("type") == "integer"),
                None)


def test_openapi_describes_the_generation_routes(anonymous):
    schema = anonymous.get("/openapi.json", headers=AUTH).json()
    components = schema["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"),
                       ("/v1/chat/completions", "ChatCompletionRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        properties = components[name]["properties"]
        assert properties["attention"] == {"$ref": "#/components/schemas/Attention"}
        assert integer_maximum(properties["max_tokens"]) == MAX_TOKENS_LIMIT
        assert integer_maximum(properties["n"]) == MAX_N
    strategies = {v["properties"]["strategy"]["enum"][0]
                  for v in components["Attention"]["oneOf"]}
    from strategies.registry import names

    assert strategies == set(names())


# -- fuzz ------------------------------------------------------------------------------------


# `make test` runs a short fuzz; `make fuzz` sets these to >= 1,000 cases in all (docs/operations.md)
FUZZ_CASES_PER_OPERATION = int(os.environ.get("ATTNSERVE_FUZZ_CASES", "10"))
FUZZ_BODIES = int(os.environ.get("ATTNSERVE_FUZZ_BODIES", "60"))
FUZZ_MAX_TOKENS = 8


def bounded(case) -> None:
    """Keep fuzzed generations short: the point is the input surface, not long outputs."""
    if isinstance(case.body, dict):
        if isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], FUZZ_MAX_TOKENS)
        else:
            case.body["max_tokens"] = FUZZ_MAX_TOKENS
        case.body.pop("max_completion_tokens", None)
        case.body.pop("min_tokens", None)


def test_fuzz_from_the_openapi_schema_gives_no_5xx(prod_server):
    """schemathesis cases from /openapi.json, at most FUZZ_CASES_PER_OPERATION per operation (6 operations),
    generated deterministically without shrinking; every answer arrives and is < 500."""
    schema = schemathesis.openapi.from_url(f"{prod_server.base_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= labels
    calls: list[str] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_CASES_PER_OPERATION, deadline=None, derandomize=True,
                  database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def call(case):
            bounded(case)
            response = case.call(headers=AUTH, timeout=LIVENESS_S * 2)
            calls.append(operation.label)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:2000])

        call()
    assert 0 < len(calls) <= FUZZ_CASES_PER_OPERATION * len(operations) * 2
    assert calls.count("POST /v1/completions") >= 5 and calls.count("POST /v1/chat/completions") >= 5
    print(f"schemathesis: {len(calls)} cases over {len(operations)} operations, none >= 500")


@st.composite
def fuzzed_bodies(draw) -> tuple[str, dict]:
    """A short completion or chat request carrying a generated ``attention``, ``vllm_xargs`` or
    ``vllm_xargs.attnserve_force_tokens`` (tests/fuzz_values.py)."""
    chat = draw(st.booleans())
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0.0,
            **({"messages": CHAT} if chat else {"prompt": "The capital of France is"})}
    field = draw(st.integers(0, 2))
    if field == 0:
        body["attention"] = draw(attention_values())
    elif field == 1:
        body["vllm_xargs"] = draw(xargs_values())
    else:
        body["vllm_xargs"] = {"attnserve_force_tokens": draw(force_tokens_values())}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def test_fuzzed_attention_xargs_and_forcing_give_no_5xx(http, prod_server):
    """FUZZ_BODIES requests whose attention / vllm_xargs / forcing fields come from the registry-driven
    generators (every strategy's params with random types and edge values, budgets, shorthand and JSON
    strings, NaN and lone surrogates): every answer is < 500, some are accepted, and the server stays healthy."""
    statuses: Counter = Counter()

    @given(fuzzed_bodies())
    @settings(max_examples=FUZZ_BODIES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def call(path_and_body):
        path, body = path_and_body
        response = http.post(path, content=json.dumps(body, allow_nan=True),
                             headers={"content-type": "application/json"})
        statuses[response.status_code] += 1
        assert response.status_code < 500, (path, body, response.text[:2000])

    call()
    assert sum(statuses.values()) >= FUZZ_BODIES * 0.9, statuses
    assert statuses[200] > 0 and sum(n for code, n in statuses.items() if 400 <= code < 500) > 0, statuses
    assert http.get("/health").status_code == 200, prod_server.log_tail()
    print(f"generated bodies: {sum(statuses.values())}, by status {dict(sorted(statuses.items()))}")


# -- SIGTERM with requests in flight (last: it ends this module's server) --------------------


def test_sigterm_drains_in_flight_requests_and_exits_0(http, prod_server):
    process = prod_server.process
    # near the token cap so generation outlasts the checks below on a fast or a loaded machine
    streams = hold_streams(http, prod_server.base_url, MAX_CONCURRENT)
    os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + LIVENESS_S
    while http.get("/health").status_code != 503:  # draining: out of the load balancer
        assert time.monotonic() < deadline, "/health never turned 503 while draining"
        time.sleep(0.2)
    refused = http.post("/v1/completions", json=completion())
    assert_openai_error(refused, 503, says=("shutting down",))
    assert int(refused.headers["retry-after"]) >= 1
    # still going while draining (at least one: how far each got is up to the machine's speed)
    assert 1 <= metric(scrape(http), "attnserve:requests_in_flight") <= MAX_CONCURRENT
    for stream in streams:
        stream.finish()
        assert stream.events[-1] == "[DONE]"
        assert '"finish_reason":"length"' in stream.events[-2]  # all its tokens, not cut short
    assert process.wait(timeout=LIVENESS_S * 2) == 0, prod_server.log_tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{prod_server.base_url}/health", timeout=5.0)
