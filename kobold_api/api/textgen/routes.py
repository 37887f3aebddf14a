"""text-generation-webui's legacy routes on the main port (its ``/api/v1/chat`` lives in the chat area)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..services import request_json, services

textgen = Blueprint("textgen", __name__)


@textgen.route("/token-count", methods=["POST"], strict_slashes=False)
def token_count() -> Response:
    return jsonify(services().textgen.token_count(request_json()))


@textgen.route("/stop-stream", methods=["POST"], strict_slashes=False)
def stop_stream() -> Response:
    return jsonify(services().textgen.stop_stream())
