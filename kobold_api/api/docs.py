"""The OpenAPI document of every route, and a readable page rendered from it.

The document is written by hand (the routes take lenient JSON that no generator would
describe well); a test in ``tests/test_kobold_api.py`` checks it against the app's URL map so
it stays true.
"""

from __future__ import annotations

import html
from typing import Any

from flask import Blueprint, Response, jsonify

from .. import __version__
from ..chat.prompt import MODES
from .generation_fields import EOS_BAN_FIELDS, MAX_N, STOP_STRING_FIELDS, sampler_schema
from .openai.schemas import MESSAGE_ROLES
from .services import services

docs = Blueprint("docs", __name__)

_NUMBER, _INTEGER, _STRING, _BOOLEAN = {"type": "number"}, {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
_STRINGS = {"type": "array", "items": _STRING}
#: How lenient readers take a list of strings: a list, or one string (a JSON-encoded list when it
#: starts with "[", as SillyTavern sends, else a single item).
_STRING_LIST = {"anyOf": [_STRINGS, _STRING]}


def _generation_options(**properties: Any) -> dict[str, Any]:
    """A request object with the options every generating route shares (from the tables the
    readers validate with) plus its own ``properties``."""
    samplers = sampler_schema()
    return {
        "type": "object",
        "additionalProperties": True,
        "properties": {
            **samplers["properties"],
            **{name: _STRING_LIST for name in STOP_STRING_FIELDS},
            **{name: _BOOLEAN for name in EOS_BAN_FIELDS},
            "banned_strings": {**_STRING_LIST, "description": "phrases never written (alias banned_tokens)"},
            "banned_tokens": _STRING_LIST,
            "custom_token_bans": {"description": "comma list (or list) of token ids never generated"},
            **properties,
        },
        "allOf": samplers["allOf"],
    }


_N = {**_INTEGER, "minimum": 1, "maximum": MAX_N}
GENERATION_INPUT: dict[str, Any] = {**_generation_options(
    prompt=_STRING, memory=_STRING,
    max_length={**_INTEGER, "minimum": 1, "description": "tokens to generate"},
    max_context_length={**_INTEGER, "minimum": 1, "description": "prompt is left-truncated to this minus max_length"},
    trim_stop={**_BOOLEAN, "description": "cut the stop string from the output (default true)"},
    n=_N, genkey=_STRING, quiet=_BOOLEAN,
), "required": ["prompt"]}
CHAT_INPUT: dict[str, Any] = _generation_options(
    user_input=_STRING,
    history={"type": "object", "properties": {"internal": {"type": "array"}, "visible": {"type": "array"}}},
    mode={"enum": list(MODES)},
    character=_STRING, your_name=_STRING, conversation_id=_STRING,
    regenerate=_BOOLEAN, _continue=_BOOLEAN, impersonate=_BOOLEAN,
    instruction_template=_STRING, chat_instruct_command=_STRING,
    max_new_tokens={**_INTEGER, "minimum": 1}, truncation_length={**_INTEGER, "minimum": 16},
)
_OPENAI = dict(model=_STRING, max_tokens={**_INTEGER, "minimum": 1}, n=_N, stream=_BOOLEAN,
               stream_options={"type": "object"})
#: A token id; bounded by the loaded model's vocabulary in the served document.
_TOKEN_ID = {**_INTEGER, "minimum": 0, "x-token-id": True}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}
OPENAI_COMPLETION: dict[str, Any] = {**_generation_options(
    **_OPENAI, prompt={"anyOf": [_STRING, _TOKEN_IDS, {"type": "array", "minItems": 1,
                                                       "items": {"anyOf": [_STRING, _TOKEN_IDS]}}],
                       "description": "text, token ids, or a list of either"},
    logprobs={**_INTEGER, "minimum": 0, "maximum": 20}, echo=_BOOLEAN,
), "required": ["prompt"]}
OPENAI_CHAT: dict[str, Any] = {**_generation_options(
    **_OPENAI, messages={"type": "array", "minItems": 1,
                         "contains": {"type": "object", "required": ["role"],
                                      "properties": {"role": {"enum": ["user", "assistant"]}}},
                         "items": {
        "type": "object", "required": ["role"],
        "properties": {"role": {"enum": list(MESSAGE_ROLES)},
                       "content": {"anyOf": [_STRING, {"type": "array", "items": {"type": "object"}},
                                             {"type": "null"}]}}}},
    response_format={"type": "object"}, logprobs=_BOOLEAN, top_logprobs={**_INTEGER, "minimum": 0, "maximum": 20},
    character={**_STRING, "description": "extension: answer as this character (server-side chat)"},
    conversation_id={**_STRING, "description": "extension: use and store a server-side conversation"},
), "required": ["messages"]}
GENKEY = {"type": "object", "properties": {"genkey": _STRING}}
TOKENCOUNT = {"type": "object", "properties": {"prompt": _STRING}}
DETOKENIZE = {"type": "object", "properties": {"ids": {"type": "array", "items": _TOKEN_ID}}}
NEW_CONVERSATION = {"type": "object", "properties": {
    "character": _STRING, "user_name": _STRING, "title": _STRING, "greeting_index": {**_INTEGER, "minimum": 0}}}
RENAME = {"type": "object", "required": ["title"], "properties": {"title": _STRING}}
MESSAGE_EDIT = {"type": "object", "properties": {"text": _STRING, "swipe_id": {**_INTEGER, "minimum": 0}},
                "anyOf": [{"required": ["text"]}, {"required": ["swipe_id"]}]}

# (path, method, tag, summary, request schema or None)
ROUTES: list[tuple[str, str, str, str, dict[str, Any] | None]] = []
for _prefix in ("/api/v1", "/api/latest"):
    ROUTES += [
        (f"{_prefix}/model", "get", "Kobold", "Loaded model id: {\"result\": \"koboldcpp/<name>\"}", None),
        (f"{_prefix}/info/version", "get", "Kobold", "KoboldAI API level: {\"result\": \"1.2.5\"}", None),
        (f"{_prefix}/info/version/latest", "get", "Kobold", "Latest API level", None),
        (f"{_prefix}/info/version/list", "get", "Kobold", "Supported API levels", None),
        (f"{_prefix}/config/max_length", "get", "Kobold", "Default tokens to generate: {\"value\": n}", None),
        (f"{_prefix}/config/max_context_length", "get", "Kobold", "Default context size: {\"value\": n}", None),
        (f"{_prefix}/config/soft_prompt", "get", "Kobold", "Always {\"value\": \"\"}", None),
        (f"{_prefix}/config/soft_prompt", "put", "Kobold", "Only \"\" is accepted", {"type": "object"}),
        (f"{_prefix}/config/soft_prompts_list", "get", "Kobold", "Always {\"values\": []}", None),
        (f"{_prefix}/generate", "post", "Kobold", "Generate a continuation: {\"results\": [{\"text\", \"finish_reason\"}]}", GENERATION_INPUT),
    ]
ROUTES += [
    ("/api/extra/version", "get", "KoboldCpp", "{\"result\": \"KoboldCpp\", \"version\"}: enables SillyTavern's streaming and tokencount", None),
    ("/api/extra/true_max_context_length", "get", "KoboldCpp", "The model's context size", None),
    ("/api/extra/preloadstory", "get", "KoboldCpp", "The story Kobold Lite opens with: always {} (none preloaded)", None),
    ("/api/extra/perf", "get", "KoboldCpp", "Figures of the last generation", None),
    ("/api/extra/generate/stream", "post", "KoboldCpp", "SSE: event: message / data: {\"token\", \"finish_reason\"}", GENERATION_INPUT),
    ("/api/extra/generate/check", "get", "KoboldCpp", "Partial text of a running generation (?genkey=)", None),
    ("/api/extra/generate/check", "post", "KoboldCpp", "Partial text of a running generation", GENKEY),
    ("/api/extra/abort", "post", "KoboldCpp", "Abort by genkey, or without one the caller's running and waiting generations; an empty body is fine", GENKEY),
    ("/api/extra/tokencount", "post", "KoboldCpp", "{\"value\": count, \"ids\": [...]}", TOKENCOUNT),
    ("/api/extra/tokenize", "post", "KoboldCpp", "Alias of tokencount", TOKENCOUNT),
    ("/api/extra/detokenize", "post", "KoboldCpp", "{\"ids\": [...]} to {\"result\": text}", DETOKENIZE),
    ("/api/v1/chat", "post", "Chat", "One chat turn; stateless with history, or stored with conversation_id", CHAT_INPUT),
    ("/api/v1/chat/stream", "post", "Chat", "Streaming chat turn (SSE); the last event carries the history", CHAT_INPUT),
    ("/api/v1/token-count", "post", "text-generation-webui", "{\"results\": [{\"tokens\": n}]}", TOKENCOUNT),
    ("/api/v1/stop-stream", "post", "text-generation-webui", "Stop the caller's generations: {\"results\": \"success\"}", None),
    ("/api/v1/characters", "get", "Characters", "List characters", None),
    ("/api/v1/characters", "post", "Characters", "Upload a card (JSON, YAML or PNG body; ?name=&overwrite=true)", {"type": "string", "format": "binary"}),
    ("/api/v1/characters/{name}", "get", "Characters", "A character as a V2 card", None),
    ("/api/v1/characters/{name}", "delete", "Characters", "Delete a character", None),
    ("/api/v1/conversations", "get", "Conversations", "List conversations (?character=)", None),
    ("/api/v1/conversations", "post", "Conversations", "Start a conversation: {character, user_name, title?, greeting_index?}", NEW_CONVERSATION),
    ("/api/v1/conversations/{conversation_id}", "get", "Conversations", "A conversation with all messages and swipes", None),
    ("/api/v1/conversations/{conversation_id}", "patch", "Conversations", "Rename: {title}", RENAME),
    ("/api/v1/conversations/{conversation_id}", "delete", "Conversations", "Delete a conversation", None),
    ("/api/v1/conversations/{conversation_id}/export", "get", "Conversations", "Export as JSON", None),
    ("/api/v1/conversations/{conversation_id}/messages/{index}", "patch", "Conversations", "Edit text ({text}) or pick a swipe ({swipe_id})", MESSAGE_EDIT),
    ("/api/v1/conversations/{conversation_id}/messages/{index}", "delete", "Conversations", "Delete a message", None),
    ("/v1/models", "get", "OpenAI", "Models list", None),
    ("/v1/completions", "post", "OpenAI", "Text completion (stream: true for SSE ending in [DONE])", OPENAI_COMPLETION),
    ("/v1/completion", "post", "OpenAI", "Alias of /v1/completions", OPENAI_COMPLETION),
    ("/v1/chat/completions", "post", "OpenAI", "Chat completion with the model's chat template", OPENAI_CHAT),
    ("/api/openapi.json", "get", "Docs", "This document", None),
    ("/api/docs", "get", "Docs", "This document as a page", None),
]


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
    ("/api/v1/characters", "post"): ("201", "name", "$response.body#/result/name"),
}


def _operation_id(path: str, method: str) -> str:
    return method + "".join(f"_{part.strip('{}')}" for part in path.split("/") if part)


def _links(path: str, method: str) -> dict[str, Any]:
    """The ``responses`` entry of an operation in :data:`CREATES`, linked to its consumers."""
    status, parameter, source = CREATES[(path, method)]
    links = {_operation_id(target, target_method): {"operationId": _operation_id(target, target_method),
                                                      "parameters": {parameter: source}}
             for target, target_method, *_ in ROUTES if f"{{{parameter}}}" in target
             and "{index}" not in target}  # message routes also need an index the creator does not give
    return {status: {"description": "Created", "links": links}}


#: Routes whose body may be left out (SillyTavern sends none to abort).
OPTIONAL_BODIES = {"/api/extra/abort", "/api/extra/generate/check", "/api/v1/stop-stream"}


def openapi_document(vocab_size: int | None = None) -> dict[str, Any]:
    """The document; with ``vocab_size`` (the loaded model's) token ids are bounded by it."""
    paths: dict[str, dict[str, Any]] = {}
    for path, method, tag, summary, schema in ROUTES:
        schema = _bound_token_ids(schema, vocab_size)
        operation: dict[str, Any] = {"tags": [tag], "summary": summary, "operationId": _operation_id(path, method),
                                     "responses": {"200": {"description": "OK"}}}
        if (path, method) in CREATES:
            operation["responses"] = _links(path, method)
        parameters = [{"name": part[1:-1], "in": "path", "required": True, "schema": _STRING}
                      for part in path.split("/") if part.startswith("{")]
        if parameters:
            operation["parameters"] = parameters
        if schema is not None:
            media = "application/octet-stream" if schema.get("format") == "binary" else "application/json"
            operation["requestBody"] = {"content": {media: {"schema": schema}},
                                        "required": path not in OPTIONAL_BODIES}
        if method in ("post", "put", "patch") and tag != "Docs":
            operation["responses"]["422"] = {"description": "Validation error: {\"detail\": {field: [message]}}"}
        operation["responses"]["default"] = {"description": "An error, in the route family's shape: "
                                                            "{\"detail\": {\"msg\", \"type\"}} or OpenAI's {\"error\": {...}}"}
        paths.setdefault(path, {})[method] = operation
    return {"openapi": "3.1.0", "info": {"title": "kobold_api", "version": __version__,
                                         "description": "KoboldAI / KoboldCpp compatible API, server-side chat and OpenAI-compatible routes. "
                                                        "text-generation-webui's websocket streams (/api/v1/stream, /api/v1/chat-stream) "
                                                        "listen on ws_port (5005), outside this document."},
            "paths": paths}


@docs.route("/openapi.json", methods=["GET"], strict_slashes=False)
def openapi_json() -> Response:
    return jsonify(openapi_document(services().engine.tokenizer.vocab_size))


@docs.route("/docs", methods=["GET"], strict_slashes=False)
def docs_page() -> Response:
    rows = "".join(
        f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td><td>{html.escape(tag)}</td>"
        f"<td>{html.escape(summary)}</td></tr>"
        for path, method, tag, summary, _ in ROUTES
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>kobold_api API</title></head><body>"
            f"<h1>kobold_api {__version__}</h1><p>Machine-readable: <a href='/api/openapi.json'>/api/openapi.json</a></p>"
            f"<table border='1' cellpadding='4'><tr><th>Method</th><th>Path</th><th>Area</th><th>What</th></tr>"
            f"{rows}</table></body></html>")
    return Response(page, mimetype="text/html")
