"""The OpenAI API of a real attnserve (real engine, embedded model) through httpx and `openai`."""

import json

import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def completion_body(model, **overrides):
    return {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, **overrides}


def sse_events(response):
    """The `data:` payloads of an SSE response, `[DONE]` included."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# -- discovery -------------------------------------------------------------------------------


def test_health(http):
    assert http.get("/health").status_code == 200


def test_models_lists_the_served_model(openai_client, attnserve_server):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [attnserve_server.model]


def test_strategies_come_from_the_registry(http):
    from strategies.registry import describe_all

    response = http.get("/v1/strategies")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "full"
    by_name = {s["name"]: s for s in body["data"]}
    expected = {s["name"]: s for s in describe_all()}
    assert set(by_name) == set(expected)
    for name, described in expected.items():
        assert by_name[name]["params"] == described["params"]
        assert isinstance(by_name[name]["available"], bool)
    assert by_name["full"]["available"] is True


def test_metrics_export_vllm_and_attnserve_metrics(http, attnserve_server):
    http.post("/v1/completions", json=completion_body(attnserve_server.model, max_tokens=1))
    response = http.get("/metrics")
    assert response.status_code == 200
    assert "vllm:num_requests_running" in response.text
    assert "vllm:prompt_tokens" in response.text
    counted = [line for line in response.text.splitlines()
               if line.startswith("attnserve:requests_total{") and 'strategy="full"' in line
               and 'status="ok"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1


# -- completions -------------------------------------------------------------------------------


def test_completion_greedy_is_deterministic_and_counts_usage(openai_client, attnserve_server, tokenizer):
    first = openai_client.completions.create(model=attnserve_server.model, prompt=PROMPT,
                                             max_tokens=8, temperature=0.0)
    second = openai_client.completions.create(model=attnserve_server.model, prompt=PROMPT,
                                              max_tokens=8, temperature=0.0)
    assert first.choices[0].text == second.choices[0].text
    assert "Paris" in first.choices[0].text
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert first.usage.completion_tokens == 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + 8
    assert first.model_extra["attention"] == {"strategy": "full", "params": {},
                                              "attended_fraction": 1.0, "decode_attended_fraction": 1.0}


def test_completion_stream_matches_non_stream(http, attnserve_server):
    body = completion_body(attnserve_server.model)
    expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=streamed) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for chunk in chunks for c in chunk["choices"]) == expected
    final = chunks[-1]
    assert final["usage"]["completion_tokens"] == 8
    assert final["attention"]["strategy"] == "full"
    assert all("attention" not in chunk for chunk in chunks[:-1])


def test_stop_sequence_is_honoured(openai_client, attnserve_server):
    unstopped = openai_client.completions.create(model=attnserve_server.model, prompt=PROMPT,
                                                 max_tokens=16, temperature=0.0).choices[0].text
    stop = unstopped.strip().split()[1]  # a word from the middle of the greedy continuation
    stopped = openai_client.completions.create(model=attnserve_server.model, prompt=PROMPT,
                                               max_tokens=16, temperature=0.0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert choice.text == unstopped[: unstopped.index(stop)]


def test_n_and_seed(openai_client, attnserve_server):
    kwargs = dict(model=attnserve_server.model, prompt="Once upon a time", max_tokens=12,
                  temperature=1.0, n=2, seed=1234)
    first = openai_client.completions.create(**kwargs)
    second = openai_client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert 2 <= first.usage.completion_tokens <= 2 * 12


def test_completion_logprobs(openai_client, attnserve_server):
    result = openai_client.completions.create(model=attnserve_server.model, prompt=PROMPT,
                                              max_tokens=4, temperature=0.0, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    # Greedy: each sampled token is the most likely one among the top candidates.
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert 2 <= len(top) <= 3
        assert max(top, key=top.get) == token


# -- chat --------------------------------------------------------------------------------------


def test_chat_uses_the_chat_template(openai_client, attnserve_server, tokenizer):
    result = openai_client.chat.completions.create(model=attnserve_server.model, messages=CHAT,
                                                   max_tokens=16, temperature=0.0)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    templated = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(templated, dict) or hasattr(templated, "input_ids"):
        templated = templated["input_ids"]
    assert result.usage.prompt_tokens == len(templated)
    assert 1 <= result.usage.completion_tokens <= 16


def test_chat_stream_with_openai_client(openai_client, attnserve_server):
    kwargs = dict(model=attnserve_server.model, messages=CHAT, max_tokens=16, temperature=0.0)
    expected = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    stream = openai_client.chat.completions.create(**kwargs, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["attention"]["strategy"] == "full"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_stream_without_usage_annotates_the_finish_chunk(http, attnserve_server):
    body = {"model": attnserve_server.model, "messages": CHAT, "max_tokens": 4,
            "temperature": 0.0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["attention"]["strategy"] == "full"


def test_chat_logprobs_and_n(openai_client, attnserve_server):
    result = openai_client.chat.completions.create(
        model=attnserve_server.model, messages=CHAT, max_tokens=5, temperature=1.0, seed=7,
        logprobs=True, top_logprobs=2, n=2)
    assert sorted(c.index for c in result.choices) == [0, 1]
    for choice in result.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 5
        assert all(len(entry.top_logprobs) == 2 for entry in content)
        assert all(entry.logprob <= 0.0 for entry in content)


# -- the attention field -----------------------------------------------------------------------


def test_attention_choice_via_extra_body(openai_client, attnserve_server):
    result = openai_client.chat.completions.create(
        model=attnserve_server.model, messages=CHAT, max_tokens=8, temperature=0.0,
        extra_body={"attention": {"strategy": "sink", "params": {"n_sink": 4, "window": 64}}})
    report = result.model_extra["attention"]
    assert report["strategy"] == "sink"
    assert report["params"]["n_sink"] == 4 and report["params"]["window"] == 64
    fraction = report["attended_fraction"]
    assert fraction is None or 0.0 < fraction <= 1.0
    assert result.choices[0].message.content


@pytest.mark.parametrize("xargs", [
    {"attention": json.dumps({"strategy": "sink", "params": {"window": 32}})},
    {"attention_strategy": "sink", "attention_params": json.dumps({"window": 32})},
])
def test_attention_choice_via_vllm_xargs(http, attnserve_server, xargs):
    body = completion_body(attnserve_server.model, max_tokens=2, vllm_xargs=xargs)
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    report = response.json()["attention"]
    assert report["strategy"] == "sink" and report["params"]["window"] == 32


@pytest.mark.parametrize("strategy", ["sink", "recycled", "landmark", "seer"])
def test_a_budget_bounds_the_decode_share(http, attnserve_server, strategy):
    """`attention.budget` 1/4 on a ~700-token prompt, 16 decode steps (one of recycled's cycles): the
    strategy's own params come from it, the share it reports stays within 1/4 + 1/64 (and above 1/8:
    seer's 64-token blocks are 1/11 of this context)."""
    prompt = " ".join(f"Line {i}: the grass is green and the sky is blue." for i in range(60))
    body = completion_body(attnserve_server.model, prompt=prompt, max_tokens=17, ignore_eos=True,
                           attention={"strategy": strategy, "budget": 0.25})
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    report = response.json()["attention"]
    assert report["strategy"] == strategy and report["budget"] == 0.25
    assert 0.25 / 2 <= report["decode_attended_fraction"] <= 0.25 + 1 / 64, report


def test_default_strategy_is_reported(http, attnserve_server):
    response = http.post("/v1/completions", json=completion_body(attnserve_server.model, max_tokens=1))
    # one token: the prefill step made it, there was no decode step
    assert response.json()["attention"] == {"strategy": "full", "params": {}, "attended_fraction": 1.0,
                                            "decode_attended_fraction": None}


def test_concurrent_requests_keep_their_own_strategy(http, attnserve_server):
    from concurrent.futures import ThreadPoolExecutor

    choices = [{"strategy": "full"}, {"strategy": "sink", "params": {"window": 16}}] * 3

    def ask(choice):
        body = completion_body(attnserve_server.model, max_tokens=6, attention=choice)
        return http.post("/v1/completions", json=body)

    with ThreadPoolExecutor(max_workers=len(choices)) as pool:
        responses = list(pool.map(ask, choices))
    for choice, response in zip(choices, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["attention"]["strategy"] == choice["strategy"]
        assert body["usage"]["completion_tokens"] == 6


def test_client_disconnect_mid_stream_does_not_hurt_the_server(http, attnserve_server):
    body = completion_body(attnserve_server.model, max_tokens=200, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first token: the connection closes
    follow_up = http.post("/v1/completions", json=completion_body(attnserve_server.model))
    assert follow_up.status_code == 200
    assert "Paris" in follow_up.json()["choices"][0]["text"]
