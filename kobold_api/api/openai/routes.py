"""OpenAI-compatible routes under /v1."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..services import request_json, services
from ..sse import disconnect_probe, sse_response
from .schemas import parse_completion

openai = Blueprint("openai", __name__)


@openai.route("/models", methods=["GET"], strict_slashes=False)
def list_models() -> Response:
    return jsonify(services().openai.list_models())


@openai.route("/completions", methods=["POST"], strict_slashes=False)
@openai.route("/completion", methods=["POST"], strict_slashes=False)
def completions() -> Response:
    svc = services()
    result = svc.openai.completion(parse_completion(request_json(), svc.settings.generation), disconnect_probe())
    return jsonify(result) if isinstance(result, dict) else sse_response(result)


@openai.route("/chat/completions", methods=["POST"], strict_slashes=False)
def chat_completions() -> Response:
    svc = services()
    result = svc.openai.chat_completions(request_json(), svc.chat, disconnect_probe(),
                                         request.headers.get("Idempotency-Key"))
    return jsonify(result) if isinstance(result, dict) else sse_response(result)
