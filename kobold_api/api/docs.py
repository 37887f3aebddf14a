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
from .generation_fields import MAX_N

docs = Blueprint("docs", __name__)

_NUMBER, _INTEGER, _STRING, _BOOLEAN = {"type": "number"}, {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
_STRINGS = {"type": "array", "items": _STRING}

GENERATION_INPUT: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": True,
    "properties": {
        "prompt": _STRING, "memory": _STRING,
        "max_length": {**_INTEGER, "minimum": 1, "description": "tokens to generate"},
        "max_context_length": {**_INTEGER, "minimum": 1, "description": "prompt is left-truncated to this minus max_length"},
        "temperature": {**_NUMBER, "minimum": 0}, "top_k": {**_INTEGER, "minimum": 0},
        "top_a": {**_NUMBER, "minimum": 0}, "top_p": {**_NUMBER, "minimum": 0, "maximum": 1},
        "tfs": {**_NUMBER, "minimum": 0, "maximum": 1}, "typical": {**_NUMBER, "minimum": 0, "maximum": 1},
        "min_p": {**_NUMBER, "minimum": 0, "maximum": 1}, "rep_pen": {**_NUMBER, "minimum": 0},
        "rep_pen_range": {**_INTEGER, "minimum": 0}, "rep_pen_slope": {**_NUMBER, "minimum": 0},
        "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
        "sampler_order": {"type": "array", "items": _INTEGER, "description": "ids 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen"},
        "sampler_seed": {**_INTEGER, "description": "-1 or absent: random"},
        "mirostat": {"enum": [0, 1, 2], "description": "1 or 2: Mirostat v1/v2 (replaces the truncating samplers)"},
        "mirostat_tau": _NUMBER, "mirostat_eta": _NUMBER,
        "dynatemp_range": {**_NUMBER, "minimum": 0, "description": "temperature +- range, by the entropy"},
        "dynatemp_exponent": _NUMBER,
        "smoothing_factor": {**_NUMBER, "minimum": 0, "description": "quadratic sampling"}, "smoothing_curve": _NUMBER,
        "xtc_threshold": _NUMBER, "xtc_probability": {**_NUMBER, "minimum": 0, "maximum": 1},
        "dry_multiplier": {**_NUMBER, "minimum": 0, "description": "DRY repetition penalty; 0 = off"},
        "dry_base": _NUMBER, "dry_allowed_length": _INTEGER,
        "dry_penalty_last_n": {**_INTEGER, "description": "0 or -1: the whole context"},
        "dry_sequence_breakers": {"description": "list of strings, or that list JSON-encoded (as SillyTavern sends)"},
        "stop_sequence": _STRINGS,
        "custom_stopping_strings": {"description": "list, JSON string or comma list; merged with stop_sequence"},
        "trim_stop": {**_BOOLEAN, "description": "cut the stop string from the output (default true)"},
        "use_default_badwordsids": _BOOLEAN, "ban_eos_token": _BOOLEAN,
        "logit_bias": {"type": "object", "additionalProperties": _NUMBER},
        "custom_token_bans": {"description": "comma list of token ids"},
        "banned_strings": {"description": "phrases never written (list or JSON list; alias banned_tokens)"},
        "n": {**_INTEGER, "minimum": 1, "maximum": MAX_N}, "genkey": _STRING, "quiet": _BOOLEAN,
    },
}
CHAT_INPUT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": True,
    "properties": {
        "user_input": _STRING,
        "history": {"type": "object", "properties": {"internal": {"type": "array"}, "visible": {"type": "array"}}},
        "mode": {"enum": list(MODES)},
        "character": _STRING, "your_name": _STRING, "conversation_id": _STRING,
        "regenerate": _BOOLEAN, "_continue": _BOOLEAN, "impersonate": _BOOLEAN,
        "instruction_template": _STRING, "chat_instruct_command": _STRING,
        "stopping_strings": _STRINGS, "custom_stopping_strings": {"description": "list or comma list"},
        "max_new_tokens": _INTEGER, "truncation_length": _INTEGER,
    },
}
OPENAI_COMPLETION: dict[str, Any] = {
    "type": "object", "required": ["prompt"], "additionalProperties": True,
    "properties": {"model": _STRING, "prompt": {"description": "string, list of strings, or token ids"},
                   "max_tokens": _INTEGER, "logprobs": _INTEGER,
                   "temperature": _NUMBER, "top_p": _NUMBER, "stop": {"oneOf": [_STRING, _STRINGS]},
                   "seed": _INTEGER, "n": {**_INTEGER, "minimum": 1, "maximum": MAX_N}, "echo": _BOOLEAN, "stream": _BOOLEAN,
                   "stream_options": {"type": "object"}, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER},
}
OPENAI_CHAT: dict[str, Any] = {
    "type": "object", "required": ["messages"], "additionalProperties": True,
    "properties": {"model": _STRING, "messages": {"type": "array", "items": {"type": "object"}},
                   "max_tokens": _INTEGER, "temperature": _NUMBER, "top_p": _NUMBER,
                   "stop": {"oneOf": [_STRING, _STRINGS]}, "seed": _INTEGER, "n": {**_INTEGER, "minimum": 1, "maximum": MAX_N}, "stream": _BOOLEAN,
                   "stream_options": {"type": "object"}, "response_format": {"type": "object"},
                   "logprobs": _BOOLEAN, "top_logprobs": _INTEGER,
                   "character": {**_STRING, "description": "extension: answer as this character (server-side chat)"},
                   "conversation_id": {**_STRING, "description": "extension: use and store a server-side conversation"}},
}
GENKEY = {"type": "object", "properties": {"genkey": _STRING}}
TOKENCOUNT = {"type": "object", "properties": {"prompt": _STRING}}

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
    ("/api/extra/detokenize", "post", "KoboldCpp", "{\"ids\": [...]} to {\"result\": text}", {"type": "object", "properties": {"ids": {"type": "array", "items": _INTEGER}}}),
    ("/api/v1/chat", "post", "Chat", "One chat turn; stateless with history, or stored with conversation_id", CHAT_INPUT),
    ("/api/v1/chat/stream", "post", "Chat", "Streaming chat turn (SSE); the last event carries the history", CHAT_INPUT),
    ("/api/v1/token-count", "post", "text-generation-webui", "{\"results\": [{\"tokens\": n}]}", TOKENCOUNT),
    ("/api/v1/stop-stream", "post", "text-generation-webui", "Stop the caller's generations: {\"results\": \"success\"}", None),
    ("/api/v1/characters", "get", "Characters", "List characters", None),
    ("/api/v1/characters", "post", "Characters", "Upload a card (JSON, YAML or PNG body; ?name=&overwrite=true)", {"type": "string", "format": "binary"}),
    ("/api/v1/characters/{name}", "get", "Characters", "A character as a V2 card", None),
    ("/api/v1/characters/{name}", "delete", "Characters", "Delete a character", None),
    ("/api/v1/conversations", "get", "Conversations", "List conversations (?character=)", None),
    ("/api/v1/conversations", "post", "Conversations", "Start a conversation: {character, user_name, title?, greeting_index?}", {"type": "object"}),
    ("/api/v1/conversations/{conversation_id}", "get", "Conversations", "A conversation with all messages and swipes", None),
    ("/api/v1/conversations/{conversation_id}", "patch", "Conversations", "Rename: {title}", {"type": "object"}),
    ("/api/v1/conversations/{conversation_id}", "delete", "Conversations", "Delete a conversation", None),
    ("/api/v1/conversations/{conversation_id}/export", "get", "Conversations", "Export as JSON", None),
    ("/api/v1/conversations/{conversation_id}/messages/{index}", "patch", "Conversations", "Edit text ({text}) or pick a swipe ({swipe_id})", {"type": "object"}),
    ("/api/v1/conversations/{conversation_id}/messages/{index}", "delete", "Conversations", "Delete a message", None),
    ("/v1/models", "get", "OpenAI", "Models list", None),
    ("/v1/completions", "post", "OpenAI", "Text completion (stream: true for SSE ending in [DONE])", OPENAI_COMPLETION),
    ("/v1/completion", "post", "OpenAI", "Alias of /v1/completions", OPENAI_COMPLETION),
    ("/v1/chat/completions", "post", "OpenAI", "Chat completion with the model's chat template", OPENAI_CHAT),
    ("/api/openapi.json", "get", "Docs", "This document", None),
    ("/api/docs", "get", "Docs", "This document as a page", None),
]


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, tag, summary, schema in ROUTES:
        operation: dict[str, Any] = {"tags": [tag], "summary": summary,
                                     "responses": {"200": {"description": "OK"}}}
        parameters = [{"name": part[1:-1], "in": "path", "required": True, "schema": _STRING}
                      for part in path.split("/") if part.startswith("{")]
        if parameters:
            operation["parameters"] = parameters
        if schema is not None:
            media = "application/octet-stream" if schema.get("format") == "binary" else "application/json"
            operation["requestBody"] = {"content": {media: {"schema": schema}}}
        if method in ("post", "put", "patch") and tag != "Docs":
            operation["responses"]["422"] = {"description": "Validation error: {\"detail\": {field: [message]}}"}
        paths.setdefault(path, {})[method] = operation
    return {"openapi": "3.0.3", "info": {"title": "kobold_api", "version": __version__,
                                         "description": "KoboldAI / KoboldCpp compatible API, server-side chat and OpenAI-compatible routes. "
                                                        "text-generation-webui's websocket streams (/api/v1/stream, /api/v1/chat-stream) "
                                                        "listen on ws_port (5005), outside this document."},
            "paths": paths}


@docs.route("/openapi.json", methods=["GET"], strict_slashes=False)
def openapi_json() -> Response:
    return jsonify(openapi_document())


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
