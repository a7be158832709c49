"""Bad input is a 4xx in OpenAI's error shape naming the field and what is allowed; the server keeps
serving afterwards."""

import json
from dataclasses import dataclass, field

import pytest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "hello " * 9000  # > 8192 tokens


@dataclass(frozen=True)
class BadInput:
    id: str
    path: str
    body: dict | str  # a str is sent verbatim (malformed JSON)
    param: str | None
    says: tuple[str, ...] = ()  # substrings of the message (what is allowed)
    status: int = 400
    extra: dict = field(default_factory=dict)


def completion(**fields):
    return {"prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"messages": MESSAGES, "max_tokens": 4, **fields}


def valid_strategies() -> tuple[str, ...]:
    from strategies.registry import names

    return tuple(names())


BAD_INPUTS = [
    BadInput("unknown-strategy", COMPLETIONS, completion(attention={"strategy": "nope"}),
             "attention.strategy", valid_strategies()),
    BadInput("unknown-strategy-chat", CHAT, chat(attention={"strategy": "nope"}),
             "attention.strategy", valid_strategies()),
    BadInput("strategy-wrong-type", CHAT, chat(attention={"strategy": 3}), "attention.strategy",
             valid_strategies()),
    BadInput("attention-wrong-type", COMPLETIONS, completion(attention=5), "attention",
             ("strategy",)),
    BadInput("attention-unknown-key", COMPLETIONS,
             completion(attention={"strategy": "sink", "window": 3}), "attention.window",
             ("strategy", "params", "budget")),
    BadInput("budget-above-one", COMPLETIONS,
             completion(attention={"strategy": "landmark", "budget": 1.5}), "attention.budget",
             ("(0, 1]",)),
    BadInput("budget-zero", CHAT, chat(attention={"strategy": "sink", "budget": 0}), "attention.budget",
             (">= 1",)),
    BadInput("budget-wrong-type", COMPLETIONS,
             completion(attention={"strategy": "seer", "budget": "small"}), "attention.budget",
             ("fraction",)),
    BadInput("budget-for-full", COMPLETIONS, completion(attention={"strategy": "full", "budget": 0.5}),
             "attention.budget", ("whole context",)),
    BadInput("budget-below-recycled-full-steps", CHAT,
             chat(attention={"strategy": "recycled", "budget": 0.05, "params": {"stride": 16}}),
             "attention.budget", ("1/16", "stride")),
    BadInput("budget-below-landmark-dense-layers", COMPLETIONS,
             completion(attention={"strategy": "landmark", "budget": 0.05, "params": {"dense_layers": 2}}),
             "attention.budget", ("dense layers",)),
    BadInput("xargs-budget-out-of-range", COMPLETIONS,
             completion(vllm_xargs={"attention_strategy": "sink", "attention_budget": 2.5}),
             "vllm_xargs.attention_budget", ("(0, 1]",)),
    BadInput("xargs-budget-without-strategy", COMPLETIONS,
             completion(vllm_xargs={"attention_budget": 0.25}), "vllm_xargs.attention_strategy",
             ("required",)),
    BadInput("unknown-param", COMPLETIONS,
             completion(attention={"strategy": "sink", "params": {"bogus": 1}}),
             "attention.params.bogus", ("n_sink", "window")),
    BadInput("param-out-of-range", CHAT,
             chat(attention={"strategy": "sink", "params": {"window": -5}}),
             "attention.params.window", ("window",)),
    BadInput("param-wrong-type", COMPLETIONS,
             completion(attention={"strategy": "sink", "params": {"window": "wide"}}),
             "attention.params.window", ("integer",)),
    BadInput("xargs-unknown-strategy", COMPLETIONS,
             completion(vllm_xargs={"attention_strategy": "nope"}),
             "vllm_xargs.attention_strategy", valid_strategies()),
    BadInput("xargs-bad-json", COMPLETIONS,
             completion(vllm_xargs={"attention_strategy": "sink", "attention_params": "{window"}),
             "vllm_xargs.attention_params", ("JSON",)),
    BadInput("xargs-param-out-of-range", CHAT,
             chat(vllm_xargs={"attention": json.dumps({"strategy": "sink",
                                                       "params": {"window": 0}})}),
             "vllm_xargs.attention.params.window", ("window",)),
    BadInput("attention-given-twice", COMPLETIONS,
             completion(attention={"strategy": "full"}, vllm_xargs={"attention_strategy": "sink"}),
             "attention", ("twice",)),
    BadInput("strategy-cannot-run", COMPLETIONS,
             completion(attention={"strategy": "seer", "params": {"gates": "no-such-gates"}}),
             "attention.params.gates", ("gates", "calibrate")),
    BadInput("gates-path-refused", COMPLETIONS,
             completion(attention={"strategy": "seer",
                                   "params": {"gates": "/nonexistent/gates.safetensors"}}),
             "attention.params.gates", ("--allow-gate-paths",)),
    BadInput("gates-path-refused-existing-file", CHAT,
             chat(attention={"strategy": "seer", "params": {"gates": "/etc/passwd"}}),
             "attention.params.gates", ("--allow-gate-paths",)),
    BadInput("gates-name-traversal", COMPLETIONS,
             completion(attention={"strategy": "seer", "params": {"gates": "../../seer"}}),
             "attention.params.gates", ("gates",)),
    BadInput("force-tokens-empty", COMPLETIONS,
             completion(vllm_xargs={"attnserve_force_tokens": []}),
             "vllm_xargs.attnserve_force_tokens", ("non-empty list of token ids",)),
    BadInput("force-tokens-wrong-type", CHAT,
             chat(vllm_xargs={"attnserve_force_tokens": "hello"}),
             "vllm_xargs.attnserve_force_tokens", ("list of token ids",)),
    BadInput("force-tokens-not-integers", COMPLETIONS,
             completion(vllm_xargs={"attnserve_force_tokens": [1, 2.5]}),
             "vllm_xargs.attnserve_force_tokens", ("item 1", "integers")),
    BadInput("force-tokens-out-of-vocabulary", COMPLETIONS,
             completion(vllm_xargs={"attnserve_force_tokens": [5, 10_000_000]}),
             "vllm_xargs.attnserve_force_tokens", ("item 1", "49152")),
    BadInput("force-tokens-negative", CHAT,
             chat(vllm_xargs={"attnserve_force_tokens": [-3]}),
             "vllm_xargs.attnserve_force_tokens", (">= 0",)),
    BadInput("force-tokens-with-structured-output", CHAT,
             chat(vllm_xargs={"attnserve_force_tokens": [5]},
                  response_format={"type": "json_object"}),
             "vllm_xargs.attnserve_force_tokens", ("structured outputs",)),
    BadInput("prompt-too-long", COMPLETIONS, completion(prompt=LONG_PROMPT), "prompt",
             ("8192",)),
    BadInput("messages-too-long", CHAT,
             chat(messages=[{"role": "user", "content": LONG_PROMPT}]), "messages", ("8192",)),
    BadInput("max-tokens-zero", COMPLETIONS, completion(max_tokens=0), "max_tokens",
             ("at least 1",)),
    BadInput("max-tokens-negative-chat", CHAT, chat(max_tokens=-1), "max_tokens"),
    BadInput("max-tokens-too-large", COMPLETIONS, completion(max_tokens=100_000), "max_tokens",
             ("8192",)),
    BadInput("max-tokens-wrong-type", COMPLETIONS, completion(max_tokens="many"), "max_tokens",
             ("integer",)),
    BadInput("temperature-wrong-type", CHAT, chat(temperature="hot"), "temperature",
             ("number",)),
    BadInput("n-zero", COMPLETIONS, completion(n=0), "n"),
    BadInput("messages-wrong-type", CHAT, chat(messages="hi"), "messages"),
    BadInput("malformed-json", COMPLETIONS, '{"prompt": "Hello", ', "body", ("JSON",)),
    BadInput("body-not-an-object", CHAT, "[1, 2, 3]", "body", ("object",)),
    BadInput("unknown-model", COMPLETIONS, completion(model="no-such-model"), "model",
             ("no-such-model",), status=404),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_naming_the_field(http, attnserve_server, bad):
    if isinstance(bad.body, str):
        response = http.post(bad.path, content=bad.body,
                             headers={"content-type": "application/json"})
    else:
        response = http.post(bad.path, json={"model": attnserve_server.model, **bad.body})
    assert response.status_code == bad.status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == bad.param, error
    for text in bad.says:
        assert text in error["message"], error
    # The server keeps serving.
    follow_up = http.post(COMPLETIONS, json={"model": attnserve_server.model, "prompt": "Hi",
                                             "max_tokens": 1})
    assert follow_up.status_code == 200, follow_up.text


def test_openai_client_raises_bad_request_with_param(openai_client, attnserve_server):
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(
            model=attnserve_server.model, messages=MESSAGES, max_tokens=4,
            extra_body={"attention": {"strategy": "nope"}})
    assert raised.value.body["param"] == "attention.strategy"
    assert "full" in raised.value.body["message"]


def test_bad_streaming_request_is_a_4xx_before_streaming(http, attnserve_server):
    body = {"model": attnserve_server.model, **completion(stream=True,
                                                           attention={"strategy": "nope"})}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "attention.strategy"


def test_gate_paths_are_refused_alike_whether_or_not_they_exist(http, attnserve_server, tmp_path):
    """A client cannot learn from the error which files exist on the server."""
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"{}")
    messages = []
    for gates in (str(real), str(tmp_path / "missing.safetensors"), "/etc/passwd", "/no/such/file"):
        response = http.post(COMPLETIONS, json={"model": attnserve_server.model, **completion(
            attention={"strategy": "seer", "params": {"block_size": 32, "gates": gates}})})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "attention.params.gates", error
        messages.append(error["message"])
    assert len(set(messages)) == 1, messages


@pytest.fixture(scope="module")
def gate_dir_server(launch_attnserve, tmp_path_factory):
    """A server that allows gate files by path inside one folder (holding identity gates, block 32)."""
    from server.model import embedded_model_dir
    from strategies.base import ModelFacts
    from strategies.seer import SeerGates

    config = json.loads((embedded_model_dir() / "config.json").read_text())
    facts = ModelFacts(num_layers=config["num_hidden_layers"], num_q_heads=config["num_attention_heads"],
                       num_kv_heads=config["num_key_value_heads"],
                       head_size=config["hidden_size"] // config["num_attention_heads"], kv_block_size=128,
                       max_model_len=2048, dtype=None, model_id=str(embedded_model_dir()))
    allowed = tmp_path_factory.mktemp("allowed-gates").resolve()
    SeerGates.identity(facts, 32).save(allowed / "mine.safetensors")
    outside = tmp_path_factory.mktemp("outside-gates").resolve()
    SeerGates.identity(facts, 32).save(outside / "theirs.safetensors")
    (allowed / "escape.safetensors").symlink_to(outside / "theirs.safetensors")
    with launch_attnserve(["--allow-gate-paths", str(allowed)], max_model_len=2048, kv_cache_gib=1) as server:
        yield server, allowed, outside


def test_a_gate_file_inside_an_allowed_dir_serves(gate_dir_server):
    import httpx

    server, allowed, outside = gate_dir_server

    def ask(gates):
        return httpx.post(f"{server.base_url}{COMPLETIONS}", timeout=300.0, json={
            "model": server.model, **completion(attention={"strategy": "seer",
                                                           "params": {"block_size": 32, "gates": gates}})})

    response = ask(str(allowed / "mine.safetensors"))
    assert response.status_code == 200, response.text
    refused = [ask(str(p)) for p in (allowed / "escape.safetensors", outside / "theirs.safetensors",
                                     allowed / ".." / outside.name / "theirs.safetensors")]
    assert {r.status_code for r in refused} == {400}, [r.text for r in refused]
    assert {r.json()["error"]["param"] for r in refused} == {"attention.params.gates"}
    assert len({r.json()["error"]["message"] for r in refused}) == 1
