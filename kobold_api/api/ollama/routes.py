"""Ollama-compatible routes under /api (beside the Kobold ones under /api/v1, /api/extra)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..services import request_json, services
from ..sse import disconnect_probe
from .schemas import OllamaChatBody, OllamaGenerateBody, OllamaShowBody
from .serving import ndjson_response

ollama = Blueprint("ollama", __name__)


@ollama.route("/version", methods=["GET"], strict_slashes=False)
def version() -> Response:
    return jsonify(services().ollama.version())


@ollama.route("/tags", methods=["GET"], strict_slashes=False)
def tags() -> Response:
    return jsonify(services().ollama.tags())


@ollama.route("/ps", methods=["GET"], strict_slashes=False)
def ps() -> Response:
    return jsonify(services().ollama.ps())


@ollama.route("/show", methods=["POST"], strict_slashes=False)
def show() -> Response:
    return jsonify(services().ollama.show(OllamaShowBody.parse(request_json())))


@ollama.route("/generate", methods=["POST"], strict_slashes=False)
def generate() -> Response:
    result = services().ollama.generate(OllamaGenerateBody.parse(request_json()), disconnect_probe())
    return jsonify(result) if isinstance(result, dict) else ndjson_response(result)


@ollama.route("/chat", methods=["POST"], strict_slashes=False)
def chat() -> Response:
    result = services().ollama.chat(OllamaChatBody.parse(request_json()), disconnect_probe())
    return jsonify(result) if isinstance(result, dict) else ndjson_response(result)
