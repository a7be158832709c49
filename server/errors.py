"""Errors in OpenAI's shape, built by vLLM's own helper so ours match the ones vLLM returns."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response


def bad_request(message: str, param: str | None) -> JSONResponse:
    """A 400 `{"error": {"message", "type", "param", "code"}}`; the message starts with `param`."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    error = create_error_response(message, "BadRequestError", HTTPStatus.BAD_REQUEST, param)
    return JSONResponse(content=error.model_dump(), status_code=HTTPStatus.BAD_REQUEST)


def error_response(message: str, err_type: str, status: HTTPStatus,
                   param: str | None = None) -> JSONResponse:
    """Any other error status in the same shape."""
    error = create_error_response(message, err_type, status, param)
    return JSONResponse(content=error.model_dump(), status_code=int(status))
