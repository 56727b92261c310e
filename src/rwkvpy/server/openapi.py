"""The server's OpenAPI document, served at ``GET /openapi.json``.

The routes parse their JSON bodies by hand (``protocol.py``: OpenAI's lenient rules, 400 with
a JSON error body for anything wrong), so FastAPI cannot derive their schemas. This module
writes the document from the app's own route table, so every route the server has is in it,
with the request bodies and responses of the routes it knows and a generic JSON object for any
other. Limits come from the server's configuration (``max_tokens`` at most
``--max-tokens-limit``). With an API key every route but ``/health`` (and a public
``/metrics``) declares bearer authentication and a 401.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
STOP = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        {"type": "null"},
    ]
}
STREAM_OPTIONS = {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}}


def _sampling(cfg) -> dict:
    return {
        "model": {"type": "string"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 0, "maximum": cfg.max_tokens_limit},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": 0},
        "min_p": {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "seed": {"type": ["integer", "null"], "minimum": 0},
        "stop": STOP,
        "stream": {"type": ["boolean", "null"]},
        "stream_options": STREAM_OPTIONS,
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
        "state": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "user": {"type": "string"},
    }


def _bodies(cfg) -> dict:
    s = _sampling(cfg)
    prompt = {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            {**TOKENS, "minItems": 1},
        ]
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
        },
    }
    messages = {"type": "array", "items": message, "minItems": 1}
    return {
        ("post", "/v1/completions"): {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                **s,
                "prompt": prompt,
                "echo": {"type": ["boolean", "null"]},
                "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
            },
        },
        ("post", "/v1/chat/completions"): {
            "type": "object",
            "required": ["messages"],
            "properties": {**s, "messages": messages},
        },
        ("post", "/v1/states"): {
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                "prompt": {"type": "string"},
                "model": {"type": "string"},
            },
        },
        ("post", "/tokenize"): {
            "type": "object",
            "required": ["content"],
            "properties": {
                "content": {"type": "string"},
                "model": {"type": "string"},
                "with_pieces": {"type": "boolean"},
            },
        },
        ("post", "/detokenize"): {
            "type": "object",
            "required": ["tokens"],
            "properties": {"tokens": TOKENS, "model": {"type": "string"}},
        },
    }


def _obj(*required) -> dict:
    return {"type": "object", "required": list(required)}


RESULTS = {
    ("post", "/v1/completions"): _obj("id", "object", "choices"),
    ("post", "/v1/chat/completions"): _obj("id", "object", "choices"),
    ("get", "/v1/models"): _obj("object", "data"),
    ("get", "/v1/states"): _obj("object", "data"),
    ("post", "/tokenize"): _obj("tokens", "count"),
    ("post", "/detokenize"): _obj("content"),
    ("get", "/tokenizer_info"): _obj("eos_token", "bos_token", "tokenizer", "vocab_size"),
}
STREAMING = {"/v1/completions", "/v1/chat/completions"}
#: each server-sent event of a stream ("stream": true): a JSON chunk, then "[DONE]"
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
TEXT = {"/metrics"}


def _template(path: str) -> tuple[str, list]:
    names = re.findall(r"{(\w+)(?::\w+)?}", path)
    return re.sub(r"{(\w+):\w+}", r"{\1}", path), names


def _routes(routes):
    """The app's routes, the included routers' flattened (rwkvpy includes them unprefixed;
    FastAPI keeps an included router as one entry that holds the original)."""
    for r in routes:
        sub = getattr(r, "original_router", None)
        if sub is not None:
            yield from _routes(sub.routes)
        else:
            yield r


def document(app, cfg) -> dict:
    """The OpenAPI 3.1 document of ``app`` (its route table) for the configuration ``cfg``."""
    bodies = _bodies(cfg)
    open_paths = {"/health", "/openapi.json"} | ({"/metrics"} if cfg.metrics_public else set())
    paths: dict = {}
    for route in _routes(app.routes):
        methods = getattr(route, "methods", None)
        if not methods or not getattr(route, "include_in_schema", True):
            continue
        path, names = _template(route.path)
        for method in sorted(m.lower() for m in methods if m != "HEAD"):
            ok: dict[str, Any] = {"description": "OK"}
            if path in TEXT:
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            else:
                ok["content"] = {"application/json": {"schema": RESULTS.get((method, path), {})}}
                if path in STREAMING:
                    ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            err = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
            responses = {"200": ok, **{str(c): err for c in (400, 404, 413, 429, 503)}}
            op: dict[str, Any] = {
                "operationId": f"{method}_{path.strip('/').replace('/', '_') or 'root'}",
                "responses": responses,
            }
            if names:
                op["parameters"] = [
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in names
                ]
            if method in ("post", "put", "patch"):
                op["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": bodies.get((method, path), {"type": "object"})
                        }
                    },
                }
            if cfg.api_key and path not in open_paths:
                op["security"] = [{"bearer": []}]
                responses["401"] = err
            paths.setdefault(path, {})[method] = op
    doc = {"openapi": "3.1.0", "info": {"title": "rwkvpy", "version": _version()}, "paths": paths}
    if cfg.api_key:
        doc["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    return doc


def _version() -> str:
    from .. import __version__

    return __version__


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    app = request.app
    server = app.state.server
    doc = getattr(app.state, "openapi_doc", None)
    if doc is None:
        doc = app.state.openapi_doc = document(app, server.config)
    return JSONResponse(doc)
