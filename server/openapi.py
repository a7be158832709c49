"""`/openapi.json`: our generation routes read the raw body (to validate `attention` and give vLLM's
own errors their field), so FastAPI cannot infer their request schemas; they are added here from
vLLM's protocol models plus the `attention` field, with this server's bounds as `maximum`s."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.config import ServeSettings

REF = "#/components/schemas/{model}"


def attention_schema() -> dict[str, Any]:
    from strategies.registry import describe_all

    described = describe_all()
    variants = []
    for strategy in described:
        properties = {}
        for param in strategy.get("params", []):
            prop: dict[str, Any] = {"description": param.get("description") or ""}
            kind = str(param.get("type"))
            if param.get("choices"):
                prop["enum"] = list(param["choices"])
            elif kind == "budget":  # a token count >= 1 or a fraction of the context in (0, 1]
                prop["anyOf"] = [{"type": "integer", "minimum": 1},
                                 {"type": "number", "exclusiveMinimum": 0, "maximum": 1}]
            elif kind in ("integer", "number", "boolean", "string"):
                prop["type"] = kind
                if param.get("minimum") is not None:
                    prop["minimum"] = param["minimum"]
                if param.get("maximum") is not None:
                    prop["maximum"] = param["maximum"]
            if param.get("nullable") and "type" in prop:
                prop = {"description": prop.pop("description"), "anyOf": [prop, {"type": "null"}]}
            properties[param["name"]] = prop
        variants.append({
            "type": "object",
            "title": f"attention:{strategy['name']}",
            "description": strategy.get("description", ""),
            "properties": {
                "strategy": {"type": "string", "enum": [strategy["name"]]},
                "params": {"type": "object", "properties": properties,
                           "additionalProperties": False},
            },
            "required": ["strategy"],
            "additionalProperties": False,
        })
    return {
        "title": "Attention",
        "description": "The attention strategy of this request and its parameters "
                       "(GET /v1/strategies lists them); absent: the server's default.",
        "oneOf": variants,
    }


def bound(schema: dict[str, Any], field: str, maximum: int | None) -> None:
    """Add `maximum` to an integer property (possibly inside anyOf [integer, null])."""
    prop = schema.get("properties", {}).get(field)
    if prop is None or maximum is None:
        return
    for variant in prop.get("anyOf", [prop]):
        if variant.get("type") == "integer":
            variant["maximum"] = maximum


def describe_request_bodies(app: FastAPI, settings: ServeSettings) -> None:
    from server.routes import BoundedChatCompletionRequest, BoundedCompletionRequest

    bodies = {
        "/v1/completions": ("CompletionRequest", BoundedCompletionRequest),
        "/v1/chat/completions": ("ChatCompletionRequest", BoundedChatCompletionRequest),
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for _, model in bodies.values()], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(definitions.get("$defs", {}))
        components["Attention"] = attention_schema()
        for path, (name, model) in bodies.items():
            ref_name = model.__name__
            body = components.pop(ref_name, None) or model.model_json_schema(ref_template=REF)
            body = dict(body)
            body["title"] = name
            body.setdefault("properties", {})["attention"] = {"$ref": REF.format(model="Attention")}
            bound(body, "max_tokens", settings.max_tokens_limit)
            bound(body, "max_completion_tokens", settings.max_tokens_limit)
            bound(body, "n", settings.max_n)
            components[name] = body
            operation = schema["paths"].get(path, {}).get("post")
            if operation is None:
                continue
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": REF.format(model=name)}}},
            }
            responses = operation.setdefault("responses", {})
            for code, text in (("400", "Invalid request (the error's `param` names the field)"),
                               ("401", "Missing or invalid API key"),
                               ("413", "Request body too large"),
                               ("429", "Too many concurrent requests (see Retry-After)"),
                               ("503", "Shutting down"),
                               ("504", "Request timeout")):
                responses.setdefault(code, {"description": text})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
