"""Server-side chat routes: /api/v1/chat, characters and conversations."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..security import may_administer
from ..services import request_json, services
from ..sse import disconnect_probe, sse_response
from .schemas import UploadQuery

chat = Blueprint("chat", __name__)


def _route(rule: str, methods: list[str]):
    return chat.route(rule, methods=methods, strict_slashes=False)


@_route("/chat", ["POST"])
def chat_turn() -> Response:
    svc = services().chat
    return jsonify(svc.chat(svc.parse(request_json(), request.headers.get("Idempotency-Key")), disconnect_probe()))


@_route("/chat/stream", ["POST"])
def chat_stream() -> Response:
    svc = services().chat
    return sse_response(svc.chat_stream(svc.parse(request_json(), request.headers.get("Idempotency-Key")),
                                        disconnect_probe()))


@_route("/characters", ["GET"])
def list_characters() -> Response:
    return jsonify(services().chat.list_characters())


@_route("/characters", ["POST"])
def upload_character() -> Response:
    """Body: the card itself (JSON, YAML or PNG bytes). Query: ``name``, ``overwrite``."""
    query = UploadQuery.parse(request.args.to_dict())
    svc = services()
    result = svc.chat.upload_character(request.get_data(), query.name, bool(query.overwrite),
                                       may_replace=may_administer(svc.access))
    return jsonify(result), 201


@_route("/characters/<path:name>/avatar", ["GET"])
def character_avatar(name: str) -> Response:
    """The card's picture (the PNG card itself: image viewers show the picture, the card rides
    in a text chunk)."""
    return Response(services().chat.character_picture(name), mimetype="image/png",
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@_route("/characters/<path:name>", ["GET"])
def get_character(name: str) -> Response:
    return jsonify(services().chat.get_character(name))


@_route("/characters/<path:name>", ["DELETE"])
def delete_character(name: str) -> Response:
    return jsonify(services().chat.delete_character(name))


@_route("/conversations", ["GET"])
def list_conversations() -> Response:
    return jsonify(services().chat.list_conversations(request.args.get("character")))


@_route("/conversations", ["POST"])
def create_conversation() -> Response:
    return jsonify(services().chat.create_conversation(request_json())), 201


@_route("/conversations/<conversation_id>", ["GET"])
def get_conversation(conversation_id: str) -> Response:
    return jsonify(services().chat.get_conversation(conversation_id))


@_route("/conversations/<conversation_id>", ["PATCH"])
def rename_conversation(conversation_id: str) -> Response:
    return jsonify(services().chat.rename_conversation(conversation_id, request_json()))


@_route("/conversations/<conversation_id>", ["DELETE"])
def delete_conversation(conversation_id: str) -> Response:
    return jsonify(services().chat.delete_conversation(conversation_id))


@_route("/conversations/<conversation_id>/export", ["GET"])
def export_conversation(conversation_id: str) -> Response:
    return jsonify(services().chat.export_conversation(conversation_id))


@_route("/conversations/<conversation_id>/messages/<int(signed=True):index>", ["PATCH"])
def edit_message(conversation_id: str, index: int) -> Response:
    return jsonify(services().chat.edit_message(conversation_id, index, request_json()))


@_route("/conversations/<conversation_id>/messages/<int(signed=True):index>", ["DELETE"])
def delete_message(conversation_id: str, index: int) -> Response:
    return jsonify(services().chat.delete_message(conversation_id, index))
