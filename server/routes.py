"""attnserve's OpenAI routes: our validation of the body and of `attention` in front of vLLM's own
serving classes (OpenAIServingCompletion / OpenAIServingChat), and the `attention` report added
next to `usage` in their responses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Awaitable
from http import HTTPStatus
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation
from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import TokenizeParams
from vllm.v1.engine.exceptions import EngineDeadError

from server import metrics
from server.attention import (
    XARGS_KEYS,
    AttentionPolicy,
    attention_report,
    extra_args_for,
    pop_attention_request,
)
from server.config import ServeSettings
from server.errors import bad_request, error_response
from server.production import RETRY_AFTER_S
from server.resources import StateLedger, request_state_bytes
from strategies.base import ParamError
from server.forcing import (
    FORCE_TOKENS_KEY,
    ForcingPolicy,
    check_compatible,
)

router = APIRouter()

SSE_DONE = "data: [DONE]\n\n"


async def read_json_object(raw_request: Request) -> dict[str, Any]:
    raw = await raw_request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ParamError("body", f"not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ParamError("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def validation_message(err: pydantic.ValidationError) -> tuple[str | None, str]:
    """(param, message) of the first error, in the dotted spelling the client sent (vLLM's own
    validators name their parameter in a VLLMValidationError)."""
    first = err.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, VLLMValidationError) and cause.parameter:
        return cause.parameter, str(cause)
    param = clean_loc_for_param(tuple(first.get("loc", ()))) or None
    return param, f"{param}: {first.get('msg')}" if param else str(first.get("msg"))


def engine_request_ids(prefix: str, request: Any, raw_request: Request) -> list[str]:
    """The ids vLLM's serving classes give `AsyncLLM.generate` for this request
    (`OpenAIServing._base_request_id`): chat `chatcmpl-<id>`; completions `cmpl-<id>-<i>` for each
    prompt i. The workers see each with `-<8 random chars>` appended, and `<n>_` in front for the
    children of an n > 1 request (strategies.engine.stats matches those)."""
    base = raw_request.headers.get("X-Request-Id") or request.request_id
    if prefix == "chatcmpl":
        return [f"chatcmpl-{base}"]
    return [f"cmpl-{base}-{i}" for i in range(count_prompts(request))]


def count_prompts(request: Any) -> int:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)  # a batch: list of strings or of token-id lists
    embeds = getattr(request, "prompt_embeds", None)
    if prompt is None and isinstance(embeds, list):
        return len(embeds)
    return 1


# -- bounds ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoundedTokenizeParams(TokenizeParams):
    """vLLM's tokenization parameters plus this server's bound on the prompt's length, checked on
    the tokens vLLM renders (chat template included) before anything reaches the engine."""

    max_prompt_tokens: int | None = None
    prompt_param: str = "prompt"

    def _token_len_check(self, tokenizer, tokens):
        if self.max_prompt_tokens is not None and len(tokens) > self.max_prompt_tokens:
            raise VLLMValidationError(
                f"{self.prompt_param}: the prompt has {len(tokens)} tokens, more than this "
                f"server's limit of {self.max_prompt_tokens} (--max-prompt-tokens)",
                parameter=self.prompt_param, value=len(tokens))
        return super()._token_len_check(tokenizer, tokens)


def bound_tok_params(params: TokenizeParams, max_prompt_tokens: int | None,
                     prompt_param: str) -> TokenizeParams:
    if max_prompt_tokens is None:
        return params
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return BoundedTokenizeParams(**values, max_prompt_tokens=max_prompt_tokens,
                                 prompt_param=prompt_param)


class BoundedCompletionRequest(CompletionRequest):
    _max_prompt_tokens: int | None = pydantic.PrivateAttr(default=None)

    def build_tok_params(self, model_config):
        return bound_tok_params(super().build_tok_params(model_config), self._max_prompt_tokens,
                                "prompt")


class BoundedChatCompletionRequest(ChatCompletionRequest):
    _max_prompt_tokens: int | None = pydantic.PrivateAttr(default=None)

    def build_tok_params(self, model_config):
        return bound_tok_params(super().build_tok_params(model_config), self._max_prompt_tokens,
                                "messages")


def check_bounds(request: Any, settings: ServeSettings) -> JSONResponse | None:
    """`max_tokens` (or chat's `max_completion_tokens`) and `n` against the server's bounds: a 400
    naming the field and the bound. A request without `max_tokens` gets the bound."""
    limit = settings.max_tokens_limit
    if limit is not None:
        fields = ["max_tokens"] + (["max_completion_tokens"] if hasattr(request, "messages") else [])
        given = [f for f in fields if getattr(request, f, None) is not None]
        for name in given:
            if getattr(request, name) > limit:
                return bad_request(f"{name} is {getattr(request, name)}, more than this server's "
                                   f"limit of {limit} (--max-tokens-limit)", name)
        if not given:
            request.max_tokens = limit
    if settings.max_n is not None and (request.n or 1) > settings.max_n:
        return bad_request(f"n is {request.n}, more than this server's limit of {settings.max_n} "
                           "(--max-n)", "n")
    if settings.max_prompt_tokens is not None:
        request._max_prompt_tokens = settings.max_prompt_tokens
    return None


PROTOCOLS = {"cmpl": BoundedCompletionRequest, "chatcmpl": BoundedChatCompletionRequest}


def take_our_xargs(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Our ``keys`` of the body's `vllm_xargs`, taken out of it (vLLM must not see them; a `vllm_xargs`
    left empty becomes null). The one reader of a request's `vllm_xargs`."""
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return {}
    ours = {k: xargs.pop(k) for k in keys if k in xargs}
    if not xargs:
        body["vllm_xargs"] = None
    return ours


async def prepare(
    raw_request: Request, protocol: type[pydantic.BaseModel], prefix: str
) -> tuple[Any, Any, list[str]] | JSONResponse:
    """Body → (vLLM protocol request with our extra_args, AttentionChoice, engine ids), or a 400.
    Our keys of `vllm_xargs` (the attention choice, `attnserve_force_tokens`) are taken out and
    validated before vLLM's protocol sees the body."""
    policy: AttentionPolicy = raw_request.app.state.attention_policy
    forcing: ForcingPolicy = getattr(raw_request.app.state, "forcing", ForcingPolicy(False))
    try:
        body = await read_json_object(raw_request)
        ours = take_our_xargs(body, (*XARGS_KEYS, FORCE_TOKENS_KEY))
        requested = pop_attention_request(body, ours)
        choice = policy.resolve(requested)
        forced = forcing.parse(ours[FORCE_TOKENS_KEY]) if FORCE_TOKENS_KEY in ours else None
    except ParamError as err:
        metrics.reject(metrics.REJECT_BAD_INPUT)
        return bad_request(err.message, err.field)
    try:
        request = protocol.model_validate(body)
    except pydantic.ValidationError as err:
        metrics.reject(metrics.REJECT_BAD_INPUT)
        param, message = validation_message(err)
        return bad_request(message, param)
    except ValueError as err:  # vLLM's own validators may raise plain errors
        metrics.reject(metrics.REJECT_BAD_INPUT)
        return bad_request(str(err), getattr(err, "parameter", None))
    settings: ServeSettings = raw_request.app.state.settings
    refused = check_bounds(request, settings)
    if refused is not None:
        metrics.reject(metrics.REJECT_BAD_INPUT)
        return refused
    ours = extra_args_for(choice)
    if forced is not None:
        try:
            check_compatible(request)
        except ParamError as err:
            metrics.reject(metrics.REJECT_BAD_INPUT)
            return bad_request(err.message, err.field)
        ours[FORCE_TOKENS_KEY] = forced
    engine_ids = engine_request_ids(prefix, request, raw_request)
    # vLLM copies `vllm_xargs` into SamplingParams.extra_args (to_sampling_params); the protocol
    # limits its values to scalars for clients, so ours are set after validation.
    request.vllm_xargs = {**(request.vllm_xargs or {}), **ours}
    return request, choice, engine_ids


async def client_errors_as_response(call: Awaitable[Any]) -> Any:
    """vLLM raises some request errors (prompt too long, SamplingParams checks) instead of
    returning them: turn the 4xx ones into an ErrorResponse so `respond` can name their field;
    anything else goes on to vLLM's exception handlers."""
    try:
        return await call
    except Exception as exc:
        error = create_error_response(exc)
        if error.error.code >= HTTPStatus.INTERNAL_SERVER_ERROR:
            raise
        return error


TIMEOUT_MESSAGE = ("the request took longer than this server's limit of {:g} s "
                   "(--request-timeout); it was aborted")


class RequestTracker:
    """The outcome of one validated generation request, for attnserve's metrics (counted once)."""

    def __init__(self, choice: Any, engine_client: Any = None):
        self.strategy = choice.strategy
        self.engine_client = engine_client
        self.done = False

    def finish(self, status: str, reason: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if status == metrics.ERROR and reason is None:
            dead = self.engine_client is not None and self.engine_client.errored
            reason = metrics.ENGINE_DEAD if dead else metrics.ENGINE_ERROR
        metrics.finish_request(self.strategy, status, reason)

    def finish_error_code(self, code: int) -> None:
        if code == HTTPStatus.GATEWAY_TIMEOUT:
            self.finish(metrics.TIMEOUT)
        elif code == HTTPStatus.TOO_MANY_REQUESTS:
            self.finish(metrics.OVERLOAD)
        elif code < HTTPStatus.INTERNAL_SERVER_ERROR:
            self.finish(metrics.BAD_INPUT)
        else:
            self.finish(metrics.ERROR)


def timeout_error(timeout: float) -> JSONResponse:
    return error_response(TIMEOUT_MESSAGE.format(timeout), "TimeoutError",
                          HTTPStatus.GATEWAY_TIMEOUT)


async def generate(raw_request: Request, prepared: tuple[Any, Any, list[str]], call) -> Any:
    """Run the serving class's call under the request timeout and answer; the tracker records
    the outcome (a timeout cancels the call, which aborts the request in the engine)."""
    request, choice, engine_ids = prepared
    settings: ServeSettings = raw_request.app.state.settings
    tracker = RequestTracker(choice, raw_request.app.state.engine_client)
    timeout = settings.request_timeout
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout is not None else None
    try:
        async with asyncio.timeout_at(deadline) as scope:
            result = await client_errors_as_response(call(request, raw_request))
    except TimeoutError:
        tracker.finish(metrics.TIMEOUT)
        return timeout_error(timeout)
    except asyncio.CancelledError:
        tracker.finish(metrics.ABORTED)
        raise
    except BaseException:
        tracker.finish(metrics.ERROR)
        raise
    if scope.expired():  # vLLM turned the cancellation into an error response
        tracker.finish(metrics.TIMEOUT)
        return timeout_error(timeout)
    return respond(result, request, choice, engine_ids, tracker, deadline, timeout)


def respond(
    result: Any, request: Any, choice: Any, engine_ids: list[str],
    tracker: RequestTracker | None = None, deadline: float | None = None,
    timeout: float | None = None,
) -> JSONResponse | StreamingResponse:
    if isinstance(result, ErrorResponse):
        name_error_param(result, request)
        if tracker is not None:
            tracker.finish_error_code(result.error.code)
        headers = {"retry-after": str(RETRY_AFTER_S)} if result.error.code == HTTPStatus.TOO_MANY_REQUESTS else None
        return JSONResponse(content=result.model_dump(), status_code=result.error.code, headers=headers)
    if isinstance(result, pydantic.BaseModel):
        content = result.model_dump()
        content["attention"] = attention_report(choice, engine_ids)
        metrics.observe_attended_fraction(choice.strategy,
                                          content["attention"]["attended_fraction"])
        if tracker is not None:
            tracker.finish(metrics.OK)
        return JSONResponse(content=content)
    return StreamingResponse(
        content=annotate_stream(result, choice, engine_ids, tracker, deadline, timeout),
        media_type="text/event-stream",
    )


def name_error_param(error: ErrorResponse, request: Any) -> None:
    """Give vLLM's errors the request field they are about where vLLM leaves it unnamed or names an
    internal quantity (`input_tokens` is the prompt's length)."""
    if error.error.param == "input_tokens":
        error.error.param = "messages" if hasattr(request, "messages") else "prompt"
    elif error.error.param is None:
        first_word = error.error.message.split(" ", 1)[0]
        if first_word in type(request).model_fields:
            error.error.param = first_word


async def annotate_stream(
    chunks: AsyncGenerator[str, None], choice: Any, engine_ids: list[str],
    tracker: RequestTracker | None = None, deadline: float | None = None,
    timeout: float | None = None,
) -> AsyncGenerator[str, None]:
    """Add the `attention` report to the last data chunk before `[DONE]` when it carries usage
    or a finish_reason (vLLM's stream ends with that chunk). Past the deadline the stream is
    aborted (the engine request with it) and ends with an error event and `[DONE]`."""
    held: str | None = None
    error_code: int | None = None
    status: str | None = None
    iterator = chunks.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline) as scope:
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            if scope.expired():
                raise TimeoutError
            if held is not None:
                yield annotate_chunk(held, choice, engine_ids) if chunk == SSE_DONE else held
            held = chunk
            error_code = error_code or chunk_error_code(chunk)
        if held is not None:
            yield held
        status = metrics.OK if error_code is None else None
    except TimeoutError:
        status = metrics.TIMEOUT
        if tracker is not None:
            tracker.finish(status)
        await iterator.aclose()
        if held is not None and held != SSE_DONE and chunk_error_code(held) is None:
            yield held
        error = create_error_response(TIMEOUT_MESSAGE.format(timeout or 0), "TimeoutError",
                                      HTTPStatus.GATEWAY_TIMEOUT)
        yield f"data: {json.dumps(error.model_dump())}\n\n"
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        status = metrics.ABORTED  # the client went away: vLLM aborts the engine request
        raise
    finally:
        if tracker is not None:
            if status is not None:
                tracker.finish(status)
            elif error_code is not None:
                tracker.finish_error_code(error_code)
            else:
                tracker.finish(metrics.ERROR)


def chunk_error_code(chunk: str) -> int | None:
    if not chunk.startswith("data: {") or '"error"' not in chunk:
        return None
    try:
        error = json.loads(chunk[len("data: "):]).get("error")
    except json.JSONDecodeError:
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    return code if isinstance(code, int) else HTTPStatus.INTERNAL_SERVER_ERROR


def annotate_chunk(chunk: str, choice: Any, engine_ids: list[str]) -> str:
    if not chunk.startswith("data: {"):
        return chunk
    try:
        data = json.loads(chunk[len("data: "):])
    except json.JSONDecodeError:
        return chunk
    finished = any(c.get("finish_reason") for c in data.get("choices") or [])
    if "error" in data or not (data.get("usage") or finished):
        return chunk
    data["attention"] = attention_report(choice, engine_ids)
    metrics.observe_attended_fraction(choice.strategy, data["attention"]["attended_fraction"])
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.post("/v1/completions")
async def create_completion(raw_request: Request):
    # The body is read (and cached on the request) before `with_cancellation` starts listening
    # to the connection for a disconnect, which would otherwise swallow it.
    await raw_request.body()
    return await _create_completion(raw_request=raw_request)


@with_cancellation
@load_aware_call
async def _create_completion(raw_request: Request):
    prepared = await prepare(raw_request, BoundedCompletionRequest, "cmpl")
    if isinstance(prepared, JSONResponse):
        return prepared
    handler = raw_request.app.state.openai_serving_completion
    return await generate(raw_request, prepared, handler.create_completion)


@router.post("/v1/chat/completions")
async def create_chat_completion(raw_request: Request):
    await raw_request.body()
    return await _create_chat_completion(raw_request=raw_request)


@with_cancellation
@load_aware_call
async def _create_chat_completion(raw_request: Request):
    prepared = await prepare(raw_request, BoundedChatCompletionRequest, "chatcmpl")
    if isinstance(prepared, JSONResponse):
        return prepared
    handler = raw_request.app.state.openai_serving_chat
    return await generate(raw_request, prepared, handler.create_chat_completion)


@router.get("/health", response_class=Response)
async def health(raw_request: Request) -> Response:
    """200 while the engine answers; 503 once it is dead or while the server drains (SIGTERM), so
    that load balancers stop sending work here."""
    gate = raw_request.app.state.gate
    client = raw_request.app.state.engine_client
    if gate.draining or client.errored:
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    try:
        await client.check_health()
    except EngineDeadError:
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    return Response(status_code=HTTPStatus.OK)


@router.get("/v1/strategies")
async def list_strategies(raw_request: Request):
    from strategies.registry import describe_all

    policy: AttentionPolicy = raw_request.app.state.attention_policy
    data = []
    for described in describe_all():
        reasons = policy.unsupported_reasons(described["name"])
        data.append({**described, "available": not reasons, "unsupported_reasons": reasons})
    return JSONResponse(
        content={"object": "list", "default": policy.default_strategy, "data": data},
        status_code=HTTPStatus.OK,
    )


# -- latency of each engine request, by strategy --------------------------------------------------


class ObservedEngineClient:
    """The engine client as the serving classes see it: `generate` holds each engine request's
    reservation of the strategies' buffers (server/resources.py) while it runs and times it (first
    token, per output token, end) for attnserve's per-strategy histograms; everything else is the
    engine client's own."""

    def __init__(self, inner: Any, ledger: StateLedger | None = None, model: Any = None):
        self._inner = inner
        self._ledger = ledger or StateLedger()
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args, **kwargs):
        extra = getattr(sampling_params, "extra_args", None) or {}
        strategy, nbytes, budget_field = request_state_bytes(
            extra, prompt_length(prompt, self._model), getattr(sampling_params, "max_tokens", None),
            getattr(sampling_params, "n", 1) or 1, self._model)
        async with self._ledger.hold(strategy, nbytes, budget_field):
            async for output in self._observed(prompt, sampling_params, request_id, strategy, *args, **kwargs):
                yield output

    async def _observed(self, prompt: Any, sampling_params: Any, request_id: str, strategy: str, *args,
                        **kwargs):
        start = time.monotonic()
        first = last = None
        tokens = 0
        final = None
        async for output in self._inner.generate(prompt, sampling_params, request_id, *args,
                                                 **kwargs):
            outputs = getattr(output, "outputs", None) or []
            count = max((len(o.token_ids) for o in outputs), default=0)
            if count > tokens:  # streamed outputs: delta or cumulative, either way more tokens
                last = time.monotonic()
                if first is None:
                    first = last
                tokens = count
            final = output if getattr(output, "finished", False) else None
            yield output
        if final is not None:
            observe_request_latency(strategy, final, start, first, last, tokens)


def observe_request_latency(strategy: str, output: Any, start: float, first: float | None,
                            last: float | None, tokens: int) -> None:
    """TTFT and TPOT from vLLM's own per-request stats (engine timestamps) when it keeps them
    (`RequestOutput.metrics`; a non-streamed request yields only its final output), else from
    when the outputs reached this process."""
    end = time.monotonic()
    stats = getattr(output, "metrics", None)
    ttft = tpot = None
    if stats is not None and getattr(stats, "first_token_latency", 0.0) > 0:
        ttft = stats.first_token_latency
        generated = getattr(stats, "num_generation_tokens", 0)
        if generated > 1 and stats.last_token_ts > stats.first_token_ts:
            tpot = (stats.last_token_ts - stats.first_token_ts) / (generated - 1)
    elif first is not None and tokens > 0:
        ttft = first - start
        if tokens > 1 and last is not None and last > first:
            tpot = (last - first) / (tokens - 1)
    metrics.observe_latency(strategy, ttft, tpot, end - start)


def prompt_length(prompt: Any, model: Any) -> int:
    """Tokens of an engine request's prompt (token ids or embeddings); unknown forms count as the model's
    whole length (the reservation is then an upper bound)."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    if ids is not None:
        return len(ids)
    embeds = prompt.get("prompt_embeds") if isinstance(prompt, dict) else None
    if embeds is not None and hasattr(embeds, "shape"):
        return int(embeds.shape[0])
    return model.max_model_len if model is not None else 0


def observe_engine_client(handler: Any, ledger: StateLedger | None = None, model: Any = None) -> None:
    if not isinstance(handler.engine_client, ObservedEngineClient):
        handler.engine_client = ObservedEngineClient(handler.engine_client, ledger, model)
