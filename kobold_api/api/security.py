"""The access rules of ``access.py`` on every HTTP request: Host, Origin, keys, and CORS headers.

Order, before any route runs: a Host the server does not answer to is a 403; a browser page
from an untrusted origin asking for stored data (characters, conversations) is a 403, its
preflight included; then the API key (401) and, on admin routes, the admin key (403 for the
plain key). Routes whose body decides whether stored data is involved (a chat turn naming a
conversation or an uploaded character) ask :func:`untrusted_origin` from the chat service instead.
"""

from __future__ import annotations

from typing import Callable

from flask import Flask, Response, g, request

from ..settings import Settings
from .access import AccessPolicy, Role, has_key
from .errors import admin_error, error_response, host_error, origin_error, unauthorized_error

#: What a client must reach without a key to detect the server (SillyTavern's status
#: probe sends no auth header), kept open only when ``open_probes`` is set.
PROBE_PATHS = {
    "/api/v1/model", "/api/latest/model", "/api/v1/info/version", "/api/latest/info/version",
    "/api/extra/version", "/api/openapi.json", "/api/docs",
}
PROTECTED_PREFIXES = ("/api", "/v1", "/props")
#: Routes that read or change stored characters and conversations: trusted origins only.
PRIVATE_PREFIXES = ("/api/v1/characters", "/api/v1/conversations")
#: The request's :class:`Role`, kept on ``flask.g`` for routes that decide by it.
_ROLE = "kobold_api_role"
#: Whether the request's page may touch stored data, decided once before the route.
_TRUSTED = "kobold_api_trusted_origin"
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def is_private_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PRIVATE_PREFIXES)


def is_admin_route(method: str, path: str) -> bool:
    """Destructive and admin routes: deleting a character (replacing one is decided by the
    upload route, which alone knows whether the name is taken)."""
    return method == "DELETE" and path.startswith("/api/v1/characters/")


def untrusted_origin(policy: AccessPolicy) -> Callable[[], str | None]:
    """For services: the current request's page when it is not trusted with stored data, else
    None (works in the websocket server's request contexts too, which have no before_request)."""

    def check() -> str | None:
        trusted = g.get(_TRUSTED)
        origin = request.headers.get("Origin")
        if trusted is None:
            trusted = policy.origin_trusted(origin, request.headers.get("Host"))
        return None if trusted else origin or ""

    return check


def may_administer(policy: AccessPolicy) -> bool:
    """Whether the current request's key allows admin actions."""
    role: Role | None = g.get(_ROLE)
    return policy.may_administer(role)


def init_app(app: Flask, settings: Settings, policy: AccessPolicy) -> None:
    @app.before_request
    def _guard() -> Response | None:
        host = request.headers.get("Host")
        if not policy.host_allowed(host):
            return error_response(host_error(host or ""))
        path = request.path.rstrip("/") or "/"
        origin = request.headers.get("Origin")
        trusted = policy.origin_trusted(origin, host)
        setattr(g, _TRUSTED, trusted)
        if is_private_path(path) and not trusted:
            return error_response(origin_error(origin or ""))
        if request.method == "OPTIONS":  # a preflight carries no key; after_request answers it
            return Response(status=200)
        if not path.startswith(PROTECTED_PREFIXES):
            return None
        authorization, x_api_key = request.headers.get("Authorization"), request.headers.get("X-Api-Key")
        role = policy.role(authorization, x_api_key)
        setattr(g, _ROLE, role)
        if role is None and not (settings.open_probes and path in PROBE_PATHS):
            return error_response(unauthorized_error())
        if is_admin_route(request.method, path) and not policy.may_administer(role):
            if not has_key(authorization, x_api_key):
                return error_response(unauthorized_error())
            return error_response(admin_error("Deleting a character"))
        return None

    @app.after_request
    def _cors_headers(response: Response) -> Response:
        path = request.path.rstrip("/") or "/"
        origin = request.headers.get("Origin")
        if not is_private_path(path):
            allow = "*"  # generation and probes: any page (Kobold Lite calls a local backend)
        elif origin and g.get(_TRUSTED):
            allow = "*" if policy.any_origin else origin
            response.vary.add("Origin")
        else:
            allow = None
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            # "*" never covers Authorization (Fetch standard), so name what was asked for.
            requested = request.headers.get("Access-Control-Request-Headers")
            response.headers["Access-Control-Allow-Headers"] = requested or "Authorization, Content-Type, X-Api-Key"
            # Chrome's Private Network Access: a public page's preflight to a local server asks this.
            if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
                response.headers["Access-Control-Allow-Private-Network"] = "true"
        response.headers.setdefault("Cache-Control", "no-store")
        return response
