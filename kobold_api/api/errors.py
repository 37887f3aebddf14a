"""Error responses in the shapes clients parse.

Kobold routes answer ``{"detail": {...}}`` (KoboldAI United / KoboldCpp); OpenAI
routes answer ``{"error": {"message", "type", "param", "code"}}``; Ollama routes answer
``{"error": "message"}``. Which shape a failure gets depends on the path, so one handler
serves the whole app. A 503 that says when to come back (the conversation database is away) carries
``Retry-After`` in every shape.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from ..chat.cards import CardError
from ..chat.characters import CardTooLargeError, CharacterExistsError, UnsafeNameError
from ..chat.conversations import (
    ConversationNotFound, DatabaseUnavailable, IdempotencyKeyReused, MessageNotFound, StoreError, SwipeNotFound,
    TurnLost,
)
from ..chat.prompt import PromptBuildError, PromptTooLongError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure with an HTTP status and a Kobold ``detail`` body."""

    def __init__(self, status: int, detail: dict[str, Any], openai_type: str | None = None,
                 param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail.get("msg", str(detail)))
        self.status = status
        self.detail = detail
        self.openai_type = openai_type
        self.param = param
        #: Seconds for the ``Retry-After`` header (None: no header).
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        if "msg" in self.detail:
            return str(self.detail["msg"])
        return "; ".join(f"{field}: {' '.join(map(str, msgs))}" for field, msgs in self.detail.items())


class ValidationError(ApiError):
    """422 with marshmallow's ``{"detail": {"field": ["message"]}}`` shape."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(422, errors, openai_type="invalid_request_error", param=next(iter(errors), None))
        self.errors = errors


def busy_error() -> ApiError:
    return ApiError(503, {"msg": "Server is busy; please try again later.", "type": "service_unavailable"},
                    openai_type="server_error", retry_after=1)


def unauthorized_error() -> ApiError:
    return ApiError(401, {"error": "Unauthorized", "msg": "Authentication key is missing or invalid.",
                          "type": "unauthorized"}, openai_type="invalid_request_error")


def forbidden_error(message: str, kind: str) -> ApiError:
    """403: the request is understood and authenticated as far as it goes, and not allowed
    (``forbidden_host``, ``forbidden_origin``, ``admin_required``)."""
    return ApiError(403, {"msg": message, "type": kind}, openai_type="invalid_request_error")


def host_error(host: str) -> ApiError:
    return forbidden_error(
        f"Host {host!r} is not allowed. The server answers to localhost names, IP addresses, this "
        "machine's name and the names in allowed_hosts (this check stops DNS-rebinding pages); behind a "
        "reverse proxy or on a DNS name, add the name to allowed_hosts (settings.json, "
        "KOBOLD_API_ALLOWED_HOSTS or --allowed-hosts).", "forbidden_host")


def origin_error(origin: str) -> ApiError:
    return forbidden_error(
        f"Origin {origin!r} may not read or change stored characters and conversations: only the server's "
        "own page, localhost pages and the origins in cors_origins may (generation is open to every "
        "origin). To trust this page, add it to cors_origins.", "forbidden_origin")


def admin_error(action: str) -> ApiError:
    return forbidden_error(f"{action} needs the admin key (admin_key); the API key is not enough.",
                           "admin_required")


def not_found_error(what: str) -> ApiError:
    return ApiError(404, {"msg": what, "type": "key_error"}, openai_type="invalid_request_error")


def bad_input_error(message: str) -> ApiError:
    return ApiError(400, {"msg": message, "type": "bad_input"}, openai_type="invalid_request_error")


#: The chat layer's exceptions, answered the same way wherever they surface (the most specific
#: class first): (class, status, type, message prefix).
_DOMAIN_ERRORS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int, str, str], ...] = (
    (CardTooLargeError, 413, "card_too_large", ""),
    (CardError, 400, "bad_card", "Invalid character card: "),
    (UnsafeNameError, 400, "bad_name", "Invalid character name: "),
    (CharacterExistsError, 409, "exists", ""),
    # The request is well formed; the character's definition and the new message need more of
    # the context than the reply leaves: a conflict with the stored card, as greeting_index is.
    (PromptTooLongError, 409, "prompt_too_long", "The context is too small for this chat: "),
    (PromptBuildError, 400, "prompt_error", ""),
    ((ConversationNotFound, MessageNotFound), 404, "key_error", ""),
    (SwipeNotFound, 409, "conflict", ""),  # the message is there; the body names a swipe it lacks
    (TurnLost, 409, "turn_lost", ""),
    (IdempotencyKeyReused, 422, "idempotency_key_reused", ""),
    # Down, restarting, or the connection was lost: try again (Retry-After), never a 500.
    (DatabaseUnavailable, 503, "database_unavailable", ""),
    (StoreError, 400, "bad_input", ""),
)
#: The classes to register a handler for (each subclass is found through its base).
DOMAIN_ERRORS = (CardError, UnsafeNameError, CharacterExistsError, PromptBuildError, StoreError)


def domain_error(error: Exception) -> ApiError:
    """The HTTP answer to one of :data:`DOMAIN_ERRORS` (the one place they are mapped)."""
    message = str(error.args[0]) if error.args else str(error)
    for kind, status, name, prefix in _DOMAIN_ERRORS:
        if isinstance(error, kind):
            if kind is CharacterExistsError:
                message += " Send overwrite=true to replace it."
            return ApiError(status, {"msg": prefix + message, "type": name},
                            openai_type="server_error" if status >= 500 else None,
                            retry_after=getattr(error, "retry_after", None))
    raise TypeError(f"not a domain error: {error!r}")


def internal_error(error: BaseException, what: str = "Internal server error") -> tuple[str, str]:
    """Log ``error`` with its traceback under a new request id; return (id, message for the
    client). The message never holds the exception's text, which can hold paths, prompts or
    other users' data."""
    request_id = uuid.uuid4().hex[:16]
    where = f"{request.method} {request.path}" if has_request_context() else "a stream"
    log.error("%s %s on %s: %s", what, request_id, where, error, exc_info=error)
    return request_id, f"{what} (request id {request_id}; the server log has the details)."


def is_openai_path() -> bool:
    return request.path.startswith("/v1/")


#: Ollama's routes, and the ones of its API this server lacks (so an Ollama client can read the
#: 404). The Kobold routes beside them (/api/v1, /api/latest, /api/extra) keep their own shape.
OLLAMA_PATHS = ("/api/version", "/api/tags", "/api/ps", "/api/show", "/api/generate", "/api/chat", "/api/embed",
                "/api/embeddings", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")


def is_ollama_path() -> bool:
    path = request.path
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OLLAMA_PATHS)


def _ollama_message(error: ApiError) -> str:
    """One line; a validation error's messages without repeating a field they already name."""
    if not isinstance(error, ValidationError):
        return error.message
    return "; ".join(message if message.startswith(field) else f"{field}: {message}"
                     for field, messages in error.errors.items() for message in messages)


def error_response(error: ApiError) -> Response:
    status = error.status
    if is_openai_path():
        body = {"error": {"message": error.message, "type": error.openai_type or "invalid_request_error",
                          "param": error.param, "code": error.detail.get("type")}}
        status = 400 if status == 422 else status  # OpenAI reports bad parameters as 400
    elif is_ollama_path():
        body = {"error": _ollama_message(error)}
        status = 400 if status == 422 else status  # so does Ollama
    else:
        body = {"detail": error.detail}
    response = jsonify(body)
    response.status_code = status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def init_app(app: Flask) -> None:
    """Every error, including Flask's own 404/405/415 and unexpected exceptions, as JSON."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error)

    for kind in DOMAIN_ERRORS:
        app.register_error_handler(kind, lambda error: error_response(domain_error(error)))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        kind = "key_error" if status == 404 else f"generic.error_{status}"
        response = error_response(ApiError(status, {"msg": error.description or error.name, "type": kind}))
        for name, value in error.get_headers():  # e.g. a 405's Allow: the methods the route takes
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        """A bug: the log gets the traceback under an id, the client only the id (exception
        text can hold paths, prompts or other users' data)."""
        request_id, message = internal_error(error)
        response = error_response(ApiError(500, {"msg": message, "type": "generic.error_500",
                                                 "request_id": request_id}, openai_type="server_error"))
        response.headers["X-Request-Id"] = request_id
        return response
