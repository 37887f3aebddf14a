"""CORS for browser clients (Kobold Lite, SillyTavern in the browser) and the optional API key."""

from __future__ import annotations

import hmac

from flask import Flask, Response, request

from ..settings import Settings
from .errors import error_response, unauthorized_error

#: What a client must reach without a key to detect the server (SillyTavern's status
#: probe sends no auth header), kept open only when ``open_probes`` is set.
PROBE_PATHS = {
    "/api/v1/model", "/api/latest/model", "/api/v1/info/version", "/api/latest/info/version",
    "/api/extra/version", "/api/openapi.json", "/api/docs",
}
PROTECTED_PREFIXES = ("/api", "/v1")


def key_matches(api_key: str, authorization: str, x_api_key: str) -> bool:
    """Whether ``Authorization: Bearer <key>`` (or ``X-Api-Key``) carries ``api_key``."""
    scheme, _, token = (authorization or "").partition(" ")
    supplied = token.strip() if scheme.lower() == "bearer" else (x_api_key or "")
    return hmac.compare_digest(supplied.encode(), api_key.encode())


def _allowed_origin(settings: Settings) -> str | None:
    allowed = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if not allowed:
        return None
    if "*" in allowed:
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in allowed else None


def init_app(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _preflight_and_auth() -> Response | None:
        if request.method == "OPTIONS":
            return Response(status=200)
        path = request.path.rstrip("/") or "/"
        if not settings.api_key or not path.startswith(PROTECTED_PREFIXES):
            return None
        if settings.open_probes and path in PROBE_PATHS:
            return None
        authorized = key_matches(settings.api_key, request.headers.get("Authorization", ""),
                                 request.headers.get("X-Api-Key", ""))
        return None if authorized else error_response(unauthorized_error())

    @app.after_request
    def _cors_headers(response: Response) -> Response:
        origin = _allowed_origin(settings)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
            # "*" never covers Authorization (Fetch standard), so name what was asked for.
            requested = request.headers.get("Access-Control-Request-Headers")
            response.headers["Access-Control-Allow-Headers"] = requested or "Authorization, Content-Type, X-Api-Key"
            if origin != "*":
                response.headers["Vary"] = "Origin"
        response.headers.setdefault("Cache-Control", "no-store")
        return response
