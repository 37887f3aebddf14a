"""The OpenAPI document of every route, and a readable page rendered from it.

Request bodies and queries are documented from the same pydantic models that validate them
(:mod:`.request_model`), so the document says exactly what the server checks; a test in
``tests/test_kobold_api.py`` checks the route list against the app's URL map, and a schemathesis
run (``tests/test_openapi_fuzz.py``) checks the server against the document.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic.json_schema import GenerateJsonSchema

from .. import __version__
from ..web import DOCS_CSP, swagger_dist
from .chat.schemas import CARD_UPLOAD, ChatBody, MessageEditBody, NewConversationBody, RenameBody, UploadQuery
from .kobold.schemas import (
    DetokenizeBody, GenkeyBody, JsonToGrammarBody, KoboldGenerateBody, SoftPromptBody, TokenCountBody,
)
from .ollama.schemas import OllamaChatBody, OllamaGenerateBody, OllamaShowBody
from .openai.schemas import ChatCompletionBody, CompletionBody
from .request_model import RequestModel
from .services import services

docs = Blueprint("docs", __name__)

_STRING = {"type": "string"}


@dataclass(frozen=True)
class Route:
    """One operation: its body and query models (or a raw schema for a body no model reads)."""

    path: str
    method: str
    tag: str
    summary: str
    body: type[RequestModel] | dict[str, Any] | None = None
    query: type[RequestModel] | None = None


ROUTES: list[Route] = []
for _prefix in ("/api/v1", "/api/latest"):
    ROUTES += [
        Route(f"{_prefix}/model", "get", "Kobold", "Loaded model id: {\"result\": \"koboldcpp/<name>\"}"),
        Route(f"{_prefix}/info/version", "get", "Kobold", "KoboldAI API level: {\"result\": \"1.2.5\"}"),
        Route(f"{_prefix}/info/version/latest", "get", "Kobold", "Latest API level"),
        Route(f"{_prefix}/info/version/list", "get", "Kobold", "Supported API levels"),
        Route(f"{_prefix}/config/max_length", "get", "Kobold", "Default tokens to generate: {\"value\": n}"),
        Route(f"{_prefix}/config/max_context_length", "get", "Kobold", "Default context size: {\"value\": n}"),
        Route(f"{_prefix}/config/soft_prompt", "get", "Kobold", "Always {\"value\": \"\"}"),
        Route(f"{_prefix}/config/soft_prompt", "put", "Kobold", "Only \"\" is accepted", SoftPromptBody),
        Route(f"{_prefix}/config/soft_prompts_list", "get", "Kobold", "Always {\"values\": []}"),
        Route(f"{_prefix}/generate", "post", "Kobold",
              "Generate a continuation: {\"results\": [{\"text\", \"finish_reason\"}]}", KoboldGenerateBody),
    ]
ROUTES += [
    Route("/api/extra/version", "get", "KoboldCpp",
          "{\"result\": \"KoboldCpp\", \"version\"}: enables SillyTavern's streaming and tokencount"),
    Route("/api/extra/true_max_context_length", "get", "KoboldCpp", "The model's context size"),
    Route("/api/extra/preloadstory", "get", "KoboldCpp", "The story Kobold Lite opens with: always {} (none preloaded)"),
    Route("/api/extra/perf", "get", "KoboldCpp", "Figures of the last generation"),
    Route("/api/extra/generate/stream", "post", "KoboldCpp",
          "SSE: event: message / data: {\"token\", \"finish_reason\"}", KoboldGenerateBody),
    Route("/api/extra/generate/check", "get", "KoboldCpp", "Partial text of a running generation", query=GenkeyBody),
    Route("/api/extra/generate/check", "post", "KoboldCpp", "Partial text of a running generation", GenkeyBody),
    Route("/api/extra/abort", "post", "KoboldCpp",
          "Abort by genkey, or without one the caller's running and waiting generations; an empty body is fine",
          GenkeyBody),
    Route("/api/extra/tokencount", "post", "KoboldCpp", "{\"value\": count, \"ids\": [...]}", TokenCountBody),
    Route("/api/extra/tokenize", "post", "KoboldCpp", "Alias of tokencount", TokenCountBody),
    Route("/api/extra/detokenize", "post", "KoboldCpp", "{\"ids\": [...]} to {\"result\": text}", DetokenizeBody),
    Route("/props", "get", "KoboldCpp", "llama.cpp's props: chat_template and n_ctx (SillyTavern's Text Completion)"),
    Route("/.well-known/serviceinfo", "get", "KoboldCpp", "Which APIs this server speaks, and where"),
    Route("/health", "get", "Operations", "200 when the model runs and the database answers, else 503 (no key needed)"),
    Route("/metrics", "get", "Operations", "Prometheus text: queue, running rows, KV cache, tokens, TTFT, decode rate"),
    Route("/api/extra/json_to_grammar", "post", "KoboldCpp",
          "A JSON schema ({\"schema\": ...} or bare) to GBNF: {\"result\", \"success\"}", JsonToGrammarBody),
    Route("/api/extra/last_logprobs", "post", "KoboldCpp",
          "{\"logprobs\": ...} of a finished generation that asked for logprobs, for its own genkey only",
          GenkeyBody),
    Route("/api/v1/chat", "post", "Chat", "One chat turn; stateless with history, or stored with conversation_id",
          ChatBody),
    Route("/api/v1/chat/stream", "post", "Chat", "Streaming chat turn (SSE); the last event carries the history",
          ChatBody),
    Route("/api/v1/token-count", "post", "text-generation-webui", "{\"results\": [{\"tokens\": n}]}", TokenCountBody),
    Route("/api/v1/stop-stream", "post", "text-generation-webui", "Stop the caller's generations: {\"results\": \"success\"}"),
    Route("/api/v1/characters", "get", "Characters", "List characters"),
    Route("/api/v1/characters", "post", "Characters", "Upload a card", CARD_UPLOAD, UploadQuery),
    Route("/api/v1/characters/{name}", "get", "Characters", "A character as a V2 card"),
    Route("/api/v1/characters/{name}/avatar", "get", "Characters", "A PNG card's picture (image/png)"),
    Route("/api/v1/characters/{name}", "delete", "Characters", "Delete a character"),
    Route("/api/v1/conversations", "get", "Conversations", "List conversations (?character=)"),
    Route("/api/v1/conversations", "post", "Conversations", "Start a conversation", NewConversationBody),
    Route("/api/v1/conversations/{conversation_id}", "get", "Conversations", "A conversation with all messages and swipes"),
    Route("/api/v1/conversations/{conversation_id}", "patch", "Conversations", "Rename: {title}", RenameBody),
    Route("/api/v1/conversations/{conversation_id}", "delete", "Conversations", "Delete a conversation"),
    Route("/api/v1/conversations/{conversation_id}/export", "get", "Conversations", "Export as JSON"),
    Route("/api/v1/conversations/{conversation_id}/messages/{index}", "patch", "Conversations",
          "Edit text ({text}) or pick a swipe ({swipe_id})", MessageEditBody),
    Route("/api/v1/conversations/{conversation_id}/messages/{index}", "delete", "Conversations", "Delete a message"),
    Route("/v1/models", "get", "OpenAI", "Models list"),
    Route("/v1/completions", "post", "OpenAI", "Text completion (stream: true for SSE ending in [DONE])", CompletionBody),
    Route("/v1/completion", "post", "OpenAI", "Alias of /v1/completions", CompletionBody),
    Route("/v1/chat/completions", "post", "OpenAI", "Chat completion with the model's chat template",
          ChatCompletionBody),
    Route("/api/version", "get", "Ollama", "{\"version\": \"0.7.0\"} (what KoboldCpp's Ollama emulation reports)"),
    Route("/api/tags", "get", "Ollama", "The loaded model as <name>:latest: {\"models\": [...]}"),
    Route("/api/ps", "get", "Ollama", "The loaded model, with expires_at and size_vram"),
    Route("/api/show", "post", "Ollama", "Details of the loaded model (any name)", OllamaShowBody),
    Route("/api/generate", "post", "Ollama",
          "Completion; NDJSON stream unless stream is false; the last object has done: true, counts, durations "
          "and context", OllamaGenerateBody),
    Route("/api/chat", "post", "Ollama", "Chat with the model's chat template; NDJSON stream unless stream is false",
          OllamaChatBody),
    Route("/api/openapi.json", "get", "Docs", "This document"),
    Route("/api/docs", "get", "Docs", "This document as a page (Swagger UI)"),
]


class _CanonicalSchema(GenerateJsonSchema):
    """Each field's canonical form: no titles (they repeat the names), and no ``null`` (the
    models read ``null`` as "not sent", which the document says by leaving a field out)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def nullable_schema(self, schema: Any) -> Any:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: Any) -> Any:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def model_schema(model: type[RequestModel], components: dict[str, Any]) -> dict[str, Any]:
    """``model`` as JSON Schema; the models it nests go to ``components``."""
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}",
                                     schema_generator=_CanonicalSchema)
    components.update(schema.pop("$defs", {}))
    return schema


def _bound_token_ids(schema: Any, vocab_size: int | None) -> Any:
    """A copy of ``schema`` whose token ids are bounded by ``vocab_size`` (when known)."""
    if isinstance(schema, list):
        return [_bound_token_ids(item, vocab_size) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: _bound_token_ids(value, vocab_size) for key, value in schema.items() if key != "x-token-id"}
    if schema.get("x-token-id") and vocab_size:
        bounded["maximum"] = vocab_size - 1
    return bounded


#: Operations that create something, what they answer it with, and the operations that take
#: it in their path (OpenAPI links: clients and fuzzers can follow them).
CREATES = {
    ("/api/v1/conversations", "post"): ("201", "conversation_id", "$response.body#/result/id"),
    ("/api/v1/characters", "post"): ("201", "name", "$response.body#/result/id"),
}


def _operation_id(path: str, method: str) -> str:
    return method + "".join(f"_{part.strip('{}')}" for part in path.split("/") if part)


def _links(path: str, method: str) -> dict[str, Any]:
    """The ``responses`` entry of an operation in :data:`CREATES`, linked to its consumers."""
    status, parameter, source = CREATES[(path, method)]
    # Message routes also need an index, which no creator gives (a new conversation may have no
    # message: a character without a greeting); only a PNG card has a picture.
    links = {_operation_id(route.path, route.method): {"operationId": _operation_id(route.path, route.method),
                                                         "parameters": {parameter: source}}
             for route in ROUTES if f"{{{parameter}}}" in route.path and "{index}" not in route.path
             and not route.path.endswith("/avatar")}
    return {status: {"description": "Created", "links": links}}


#: Routes whose body may be left out (SillyTavern sends none to abort).
OPTIONAL_BODIES = {"/api/extra/abort", "/api/extra/last_logprobs", "/api/extra/generate/check", "/api/v1/stop-stream"}
#: Query parameters of routes that take no query model.
_FILTERS = {("/api/v1/conversations", "get"): [{"name": "character", "in": "query", "required": False,
                                                 "schema": _STRING}]}


def _parameters(route: Route, components: dict[str, Any]) -> list[dict[str, Any]]:
    parameters = [{"name": part[1:-1], "in": "path", "required": True,
                   "schema": {"type": "integer"} if part == "{index}" else _STRING}
                  for part in route.path.split("/") if part.startswith("{")]
    if route.query is not None:
        schema = model_schema(route.query, components)
        parameters += [{"name": name, "in": "query", "required": name in schema.get("required", ()),
                        "schema": field} for name, field in schema["properties"].items()]
    return parameters + _FILTERS.get((route.path, route.method), [])


def openapi_document(vocab_size: int | None = None) -> dict[str, Any]:
    """The document; with ``vocab_size`` (the loaded model's) token ids are bounded by it."""
    paths: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {"tags": [route.tag], "summary": route.summary,
                                     "operationId": _operation_id(route.path, route.method),
                                     "responses": {"200": {"description": "OK"}}}
        if (route.path, route.method) in CREATES:
            operation["responses"] = _links(route.path, route.method)
        if route.path.endswith("/avatar"):
            operation["responses"]["200"] = {"description": "The picture", "content": {"image/png": {}}}
        parameters = _parameters(route, components)
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            schema = route.body if isinstance(route.body, dict) else model_schema(route.body, components)
            operation["requestBody"] = {"content": {"application/json": {"schema": schema}},
                                        "required": route.path not in OPTIONAL_BODIES}
        if route.tag == "Ollama" and route.method == "post":
            operation["responses"]["400"] = {"description": "Bad input: {\"error\": \"message\"}"}
        elif route.method in ("post", "put", "patch") and route.tag != "Docs":
            operation["responses"]["422"] = {"description": "Validation error: {\"detail\": {field: [message]}}"}
        operation["responses"]["default"] = {"description": "An error, in the route family's shape: "
                                                            "{\"detail\": {\"msg\", \"type\"}}, OpenAI's "
                                                            "{\"error\": {...}} or Ollama's {\"error\": \"message\"}"}
        paths.setdefault(route.path, {})[route.method] = operation
    document = {"openapi": "3.1.0", "info": {"title": "kobold_api", "version": __version__,
                                             "description": "KoboldAI / KoboldCpp compatible API, server-side chat, OpenAI- and Ollama-compatible routes. "
                                                            "text-generation-webui's websocket streams (/api/v1/stream, /api/v1/chat-stream) "
                                                            "listen on ws_port (5005), outside this document."},
                "paths": paths, "components": {"schemas": components}}
    return _bound_token_ids(document, vocab_size)


@docs.route("/openapi.json", methods=["GET"], strict_slashes=False)
def openapi_json() -> Response:
    return jsonify(openapi_document(services().engine.tokenizer.vocab_size))


@docs.route("/docs", methods=["GET"], strict_slashes=False)
def docs_page() -> Response:
    """Swagger UI (shipped by the ``flask-swagger-ui`` package, served from ``/assets/swagger``)
    on /api/openapi.json, above the plain route table, which works without JavaScript."""
    rows = "".join(
        f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td><td>{html.escape(tag)}</td>"
        f"<td>{html.escape(summary)}</td></tr>"
        for path, method, tag, summary in ((r.path, r.method, r.tag, r.summary) for r in ROUTES)
    )
    swagger = swagger_dist() is not None
    head = ("<link rel='stylesheet' href='/assets/swagger/swagger-ui.css'>"
            "<script src='/assets/swagger/swagger-ui-bundle.js' defer></script>"
            "<script src='/assets/docs.js' defer></script>") if swagger else ""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>kobold_api API</title>{head}</head><body>"
            f"<h1>kobold_api {__version__}</h1><p><a href='/'>Chat page</a> &middot; machine-readable: "
            f"<a href='/api/openapi.json'>/api/openapi.json</a></p><div id='swagger-ui'></div>"
            f"<details id='route-table' open><summary>Every route</summary>"
            f"<table border='1' cellpadding='4'><tr><th>Method</th><th>Path</th><th>Area</th><th>What</th></tr>"
            f"{rows}</table></details></body></html>")
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response
