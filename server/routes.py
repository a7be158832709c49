"""attnserve's OpenAI routes: our validation of the body and of `attention` in front of vLLM's own
serving classes (OpenAIServingCompletion / OpenAIServingChat), and the `attention` report added
next to `usage` in their responses."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable
from http import HTTPStatus
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.entrypoints.serve.utils.api_utils import load_aware_call, with_cancellation
from vllm.exceptions import VLLMValidationError

from server import metrics
from server.attention import (
    AttentionFieldError,
    AttentionPolicy,
    attention_report,
    extra_args_for,
    pop_attention_request,
)
from server.errors import bad_request

router = APIRouter()

SSE_DONE = "data: [DONE]\n\n"


class BodyError(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


async def read_json_object(raw_request: Request) -> dict[str, Any]:
    raw = await raw_request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BodyError(None, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BodyError(None, f"the request body must be a JSON object, got {type(body).__name__}")
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
    children of an n > 1 request (strategies.stats matches those)."""
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


async def prepare(
    raw_request: Request, protocol: type[pydantic.BaseModel], prefix: str
) -> tuple[Any, Any, list[str]] | JSONResponse:
    """Body → (vLLM protocol request with our extra_args, AttentionChoice, engine ids), or a 400."""
    policy: AttentionPolicy = raw_request.app.state.attention_policy
    try:
        body = await read_json_object(raw_request)
        requested = pop_attention_request(body)
        choice = policy.resolve(requested)
    except (BodyError, AttentionFieldError) as err:
        return bad_request(err.message, err.param)
    try:
        request = protocol.model_validate(body)
    except pydantic.ValidationError as err:
        param, message = validation_message(err)
        return bad_request(message, param)
    except ValueError as err:  # vLLM's own validators may raise plain errors
        return bad_request(str(err), getattr(err, "parameter", None))
    engine_ids = engine_request_ids(prefix, request, raw_request)
    # vLLM copies `vllm_xargs` into SamplingParams.extra_args (to_sampling_params); the protocol
    # limits its values to scalars for clients, so ours are set after validation.
    request.vllm_xargs = {**(request.vllm_xargs or {}), **extra_args_for(choice)}
    metrics.count_request(choice.strategy)
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


def respond(
    result: Any, request: Any, choice: Any, engine_ids: list[str]
) -> JSONResponse | StreamingResponse:
    if isinstance(result, ErrorResponse):
        name_error_param(result, request)
        return JSONResponse(content=result.model_dump(), status_code=result.error.code)
    if isinstance(result, pydantic.BaseModel):
        content = result.model_dump()
        content["attention"] = attention_report(choice, engine_ids)
        return JSONResponse(content=content)
    return StreamingResponse(
        content=annotate_stream(result, choice, engine_ids), media_type="text/event-stream"
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
    chunks: AsyncGenerator[str, None], choice: Any, engine_ids: list[str]
) -> AsyncGenerator[str, None]:
    """Add the `attention` report to the last data chunk before `[DONE]` when it carries usage
    or a finish_reason (vLLM's stream ends with that chunk)."""
    held: str | None = None
    async for chunk in chunks:
        if held is not None:
            yield annotate_chunk(held, choice, engine_ids) if chunk == SSE_DONE else held
        held = chunk
    if held is not None:
        yield held


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
    prepared = await prepare(raw_request, CompletionRequest, "cmpl")
    if isinstance(prepared, JSONResponse):
        return prepared
    request, choice, engine_ids = prepared
    handler = raw_request.app.state.openai_serving_completion
    result = await client_errors_as_response(handler.create_completion(request, raw_request))
    return respond(result, request, choice, engine_ids)


@router.post("/v1/chat/completions")
async def create_chat_completion(raw_request: Request):
    await raw_request.body()
    return await _create_chat_completion(raw_request=raw_request)


@with_cancellation
@load_aware_call
async def _create_chat_completion(raw_request: Request):
    prepared = await prepare(raw_request, ChatCompletionRequest, "chatcmpl")
    if isinstance(prepared, JSONResponse):
        return prepared
    request, choice, engine_ids = prepared
    handler = raw_request.app.state.openai_serving_chat
    result = await client_errors_as_response(handler.create_chat_completion(request, raw_request))
    return respond(result, request, choice, engine_ids)


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
