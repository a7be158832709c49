"""Locust scenarios against attnserve's OpenAI endpoints with a mix of attention strategies.

Each user sends, back to back, a chat or completions request (streamed or not; `--apis`) with a
strategy (`--strategies full:2,sink:1`), a prompt of about N tokens (`--prompt-lengths 32:2,128:1`)
and `--max-tokens` output tokens, and measures end-to-end latency and, when streaming, the time to
the first token and per output token. Every request goes to Locust's own statistics under the name
`<api> [<strategy>]`; with `--samples-out FILE` each request is also written as one JSON line
(what `python -m loadtests` turns into its report).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --strategies full:2,sink:1
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import requests
from gevent import GreenletExit
from locust import HttpUser, between, events, task
from locust.exception import StopUser

try:
    from loadtests.mix import DEFAULT_APIS, DEFAULT_PROMPT_LENGTHS, DEFAULT_STRATEGIES, Mix, make_prompt, pick
except ImportError:  # run as `locust -f loadtests/locustfile.py`: Locust puts loadtests/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtests.mix import DEFAULT_APIS, DEFAULT_PROMPT_LENGTHS, DEFAULT_STRATEGIES, Mix, make_prompt, pick

REQUEST_TIMEOUT_S = 600.0


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    group = parser.add_argument_group("attnserve")
    group.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="NAME[:WEIGHT],... ")
    group.add_argument("--apis", default=DEFAULT_APIS,
                       help="chat, chat-stream, completions, completions-stream, with weights")
    group.add_argument("--prompt-lengths", default=DEFAULT_PROMPT_LENGTHS,
                       help="prompt lengths in (roughly) tokens, with weights: 32:2,128:1")
    group.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    group.add_argument("--strategy-params", default="",
                       help='JSON {"sink": {"window": 64}}: params sent with that strategy')
    group.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    group.add_argument("--ignore-eos", default="true", choices=["true", "false"],
                       help="generate exactly --max-tokens (vLLM's ignore_eos)")
    group.add_argument("--require-attention-report", default="true", choices=["true", "false"],
                       help="count a response without attnserve's `attention` report as an error")
    group.add_argument("--samples-out", default="", help="write one JSON line per request here")
    group.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    group.add_argument("--cancel-share", type=float, default=0.0,
                       help="share of streamed requests the client abandons after the first token")


class _Run:
    """Per-process state of the run (Locust runs this file in one process here)."""

    mix: Mix | None = None
    model: str = ""
    samples = None  # open file or None
    rng = random.Random(0)
    started = 0
    finished = 0


@events.test_start.add_listener
def _on_test_start(environment, **_):
    opts = environment.parsed_options
    _Run.mix = Mix.parse(opts.strategies, opts.apis, opts.prompt_lengths, opts.max_tokens,
                         opts.strategy_params)
    _Run.rng = random.Random(opts.seed)
    _Run.model = opts.model or _first_model(environment.host)
    if opts.samples_out:
        Path(opts.samples_out).parent.mkdir(parents=True, exist_ok=True)
        _Run.samples = open(opts.samples_out, "a", buffering=1)


@events.quitting.add_listener
def _on_quitting(environment, **_):
    if _Run.samples is not None:
        _Run.samples.write(json.dumps({"summary": {"started": _Run.started,
                                                    "finished": _Run.finished}}) + "\n")
        _Run.samples.close()
        _Run.samples = None


def _first_model(host: str) -> str:
    response = requests.get(f"{host.rstrip('/')}/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


class Sample:
    """What one request measured (seconds)."""

    def __init__(self, strategy: str, api: str, prompt_len: int):
        self.data = {"strategy": strategy, "api": api, "stream": api.endswith("-stream"),
                     "prompt_len": prompt_len, "start": time.time(), "ok": False, "error": None,
                     "ttft": None, "tpot": None, "e2e": None, "prompt_tokens": None,
                     "output_tokens": None, "attended_fraction": None, "message": None}
        self.t0 = time.perf_counter()

    def fail(self, kind: str, message: str = "") -> None:
        self.data["error"] = kind
        self.data["message"] = message[:300]


class OpenAIUser(HttpUser):
    """One client sending generation requests back to back (with a short think time)."""

    wait_time = between(0.0, 0.2)

    def on_start(self):
        if _Run.mix is None:
            raise StopUser()

    @task
    def generate(self):
        mix = _Run.mix
        rng = _Run.rng
        strategy = pick(mix.strategies, rng)
        api = pick(mix.apis, rng)
        prompt_len = pick(mix.prompt_lengths, rng)
        body = self._body(api, strategy, make_prompt(prompt_len, rng))
        path = "/v1/chat/completions" if api.startswith("chat") else "/v1/completions"
        sample = Sample(strategy, api, prompt_len)
        cancel = api.endswith("-stream") and rng.random() < self.environment.parsed_options.cancel_share
        _Run.started += 1
        try:
            self._send(path, body, sample, cancel)
        except requests.Timeout as err:
            sample.fail("timeout", str(err))
        except requests.ConnectionError as err:
            sample.fail("connection", str(err))
        except requests.RequestException as err:
            sample.fail("request", str(err))
        except GreenletExit:
            # Locust stopped this user mid-request at the end of the run: the load generator
            # cancelled the request, the server neither failed nor dropped it; not a sample
            _Run.started -= 1
            raise
        except Exception as err:  # noqa: BLE001 - a client-side bug: an error sample saying what
            sample.fail("client_exception", repr(err))
        self._record(sample)

    def _body(self, api: str, strategy: str, prompt: str) -> dict:
        mix = _Run.mix
        body: dict = {"model": _Run.model, "max_tokens": mix.max_tokens, "temperature": 0.0,
                      "attention": mix.attention(strategy)}
        if self.environment.parsed_options.ignore_eos == "true":
            body["ignore_eos"] = True
        if api.startswith("chat"):
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if api.endswith("-stream"):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _send(self, path: str, body: dict, sample: Sample, cancel: bool = False) -> None:
        url = f"{self.host.rstrip('/')}{path}"
        session = self._session()
        stream = bool(body.get("stream"))
        with session.post(url, json=body, stream=stream, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                sample.data["e2e"] = time.perf_counter() - sample.t0
                sample.fail(f"http_{response.status_code}", response.text)
                return
            if stream:
                self._read_stream(response, sample, body["attention"]["strategy"], cancel)
            else:
                try:
                    data = response.json()
                except ValueError as err:
                    sample.fail("invalid_json", str(err))
                    return
                sample.data["e2e"] = time.perf_counter() - sample.t0
                self._check_final(data, sample, body["attention"]["strategy"], api_text=True)

    def _read_stream(self, response, sample: Sample, strategy: str, cancel: bool = False) -> None:
        """Read an SSE stream to its end; with ``cancel``, hang up after the first token (the server must
        abort the request and free what it held): a cancelled sample, not an error."""
        first_token_at = None
        done = False
        final: dict = {}
        finish_reason = None
        pieces = 0
        for raw in response.iter_lines(decode_unicode=True):
            if not raw or not raw.startswith("data:"):
                continue
            payload = raw[len("data:"):].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError as err:
                sample.fail("invalid_json", str(err))
                return
            if "error" in chunk:
                sample.fail("stream_error", json.dumps(chunk["error"]))
                return
            for choice in chunk.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    pieces += 1
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if cancel:
                        response.close()
                        sample.data.update(ok=True, cancelled=True, ttft=first_token_at - sample.t0,
                                           e2e=first_token_at - sample.t0)
                        return
                finish_reason = choice.get("finish_reason") or finish_reason
            if chunk.get("usage"):
                final["usage"] = chunk["usage"]
            if "attention" in chunk:
                final["attention"] = chunk["attention"]
        end = time.perf_counter()
        sample.data["e2e"] = end - sample.t0
        if not done:
            sample.fail("incomplete_stream", "the stream ended without [DONE]")
            return
        if first_token_at is None:
            sample.fail("empty_output", "no content in the stream")
            return
        if finish_reason is None:
            sample.fail("no_finish_reason", "no chunk carried a finish_reason")
            return
        sample.data["ttft"] = first_token_at - sample.t0
        self._check_final(final, sample, strategy, api_text=False)
        n = sample.data["output_tokens"]
        if n and n > 1:
            sample.data["tpot"] = (end - first_token_at) / (n - 1)

    def _check_final(self, data: dict, sample: Sample, strategy: str, api_text: bool) -> None:
        usage = data.get("usage") or {}
        sample.data["prompt_tokens"] = usage.get("prompt_tokens")
        sample.data["output_tokens"] = usage.get("completion_tokens")
        if api_text:
            choices = data.get("choices") or []
            text = ""
            if choices:
                text = choices[0].get("text") or (choices[0].get("message") or {}).get("content") or ""
            if not text:
                sample.fail("empty_output", json.dumps(data)[:300])
                return
        if not sample.data["output_tokens"]:
            sample.fail("no_usage", "the response has no usage.completion_tokens")
            return
        if self.environment.parsed_options.ignore_eos == "true" and \
                sample.data["output_tokens"] != _Run.mix.max_tokens:
            sample.fail("wrong_length",
                        f"{sample.data['output_tokens']} output tokens, asked {_Run.mix.max_tokens}")
            return
        report = data.get("attention")
        if report is None:
            if self.environment.parsed_options.require_attention_report == "true":
                sample.fail("no_attention_report", "the response has no `attention` report")
                return
        else:
            if report.get("strategy") != strategy:
                sample.fail("strategy_mismatch", f"asked {strategy}, report says {report}")
                return
            sample.data["attended_fraction"] = report.get("attended_fraction")
        sample.data["ok"] = True

    def _session(self) -> requests.Session:
        # A plain requests session (gevent-patched by Locust): the Locust client would stop the
        # clock at the response headers, and we time the stream ourselves.
        if not hasattr(self, "_plain_session"):
            self._plain_session = requests.Session()
        return self._plain_session

    def _record(self, sample: Sample) -> None:
        d = sample.data
        if d["e2e"] is None:
            d["e2e"] = time.perf_counter() - sample.t0
        _Run.finished += 1
        self.environment.events.request.fire(
            request_type="POST",
            name=f"{d['api']} [{d['strategy']}]",
            response_time=d["e2e"] * 1000.0,
            response_length=d["output_tokens"] or 0,
            exception=None if d["ok"] else RuntimeError(f"{d['error']}: {d['message'] or ''}"),
            context={},
        )
        if _Run.samples is not None:
            _Run.samples.write(json.dumps(d) + "\n")

