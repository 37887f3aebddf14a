"""The websocket server text-generation-webui's legacy clients stream from (``ws_port``, 5005).

One thread per connection (websockets' threaded server). Each connection is one request: the
client sends a JSON body, the server sends the events of :mod:`.serving` and closes. A request
runs inside a Flask request context built for it (path, client address), so it uses the same
services, the same job ownership (``/api/v1/stop-stream`` from the same client stops it) and the
same API key as the HTTP routes.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from typing import Any

from flask import Flask
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.sync.server import ServerConnection, serve
from werkzeug.test import EnvironBuilder

from ..services import EXTENSION_KEY, Services
from ..errors import DOMAIN_ERRORS, ApiError, domain_error, host_error, internal_error
from ..request_model import json_body

log = logging.getLogger(__name__)

PATHS = ("/api/v1/stream", "/api/v1/chat-stream")
#: How long a connected client may take to send its request.
REQUEST_TIMEOUT_SECONDS = 60.0


class WebSocketServer:
    """Serves :data:`PATHS` on ``host:port`` (0 picks a free port) until :meth:`close`."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self.app = app
        self._services: Services = app.extensions[EXTENSION_KEY]
        self._server = serve(self._handle, host, port, process_request=self._admit,
                             max_size=max(self._services.settings.max_upload_mb, 1) * 2**20)
        self.port: int = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="websocket", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse before the handshake: a Host the server does not answer to (403, as on HTTP),
        an unknown path (404), a missing API key (401). Any origin may stream; the chat service
        refuses an untrusted page a stored character, as on HTTP."""
        access = self._services.access
        host = request.headers.get("Host")
        if not access.host_allowed(host):
            return connection.respond(HTTPStatus.FORBIDDEN, host_error(host or "").message + "\n")
        if _path(request.path) not in PATHS:
            return connection.respond(HTTPStatus.NOT_FOUND, f"No websocket route; use one of {', '.join(PATHS)}.\n")
        if access.role(request.headers.get("Authorization"), request.headers.get("X-Api-Key")) is None:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Authentication key is missing or invalid.\n")
        return None

    def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        path = _path(request.path if request else "")
        address = connection.remote_address[0] if connection.remote_address else ""
        # The headers the access rules read (Origin, Host) travel into the request context.
        headers = {name: request.headers[name] for name in ("Origin", "Host") if request and name in request.headers}
        environ = EnvironBuilder(path=path, method="POST", headers=headers,
                                 environ_base={"REMOTE_ADDR": address}).get_environ()
        with self.app.request_context(environ):
            try:
                self._serve_one(connection, path)
            except ConnectionClosed:
                pass  # the client left; the stream's close() already cancelled its generation

    def _serve_one(self, connection: ServerConnection, path: str) -> None:
        def disconnected() -> bool:
            return connection.state is not State.OPEN

        try:
            raw = connection.recv(timeout=REQUEST_TIMEOUT_SECONDS)
            body = json_body(raw.encode("utf-8") if isinstance(raw, str) else raw, "application/json")
            textgen = self._services.textgen
            events = textgen.stream(body, disconnected) if path == PATHS[0] else textgen.chat_stream(body, disconnected)
            for event in events:
                connection.send(json.dumps(event, ensure_ascii=False))
        except TimeoutError:
            _send_error(connection, 408, {"msg": "No request arrived; send one JSON body after connecting.",
                                          "type": "timeout"})
        except ApiError as exc:
            _send_error(connection, exc.status, exc.detail)
        except DOMAIN_ERRORS as exc:  # an unknown character, a prompt that cannot fit...
            error = domain_error(exc)
            _send_error(connection, error.status, error.detail)
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug: logged with an id, the client gets only the id
            request_id, message = internal_error(exc)
            _send_error(connection, 500, {"msg": message, "type": "generic.error_500", "request_id": request_id})
        connection.close()


def _path(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/") or "/"


def _send_error(connection: ServerConnection, status: int, detail: dict[str, Any]) -> None:
    connection.send(json.dumps({"event": "error", "message_num": 0, "status": status, "detail": detail},
                               ensure_ascii=False))
