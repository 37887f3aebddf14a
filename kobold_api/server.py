"""Serve the app with waitress."""

from __future__ import annotations

import logging
import sys

from waitress import serve as waitress_serve

from .api.access import exposure_warnings
from .api.services import EXTENSION_KEY
from .api.textgen.websocket import WebSocketServer
from .app import create_app, load_engine
from .settings import Settings

log = logging.getLogger(__name__)


def waitress_options(settings: Settings) -> dict:
    """Shared by the CLI and the tests, so both run the server the same way.

    ``channel_request_lookahead`` makes waitress notice a client that hangs up while
    its request is still running, which is how an abandoned generation gets cancelled.
    """
    return {
        "threads": settings.threads,
        "channel_request_lookahead": 1,
        "connection_limit": max(100, settings.threads * 4),
        "ident": "kobold_api",
    }


def warn_loudly(messages: list[str]) -> None:
    """A banner on the terminal and in the log, whatever ``log_level`` says."""
    for message in messages:
        rule = "!" * 78
        banner = f"\n{rule}\n!! WARNING: {message}\n{rule}"
        if log.isEnabledFor(logging.WARNING):
            log.warning("%s", banner)
        else:
            print(banner, file=sys.stderr, flush=True)


def serve(settings: Settings) -> None:
    engine = load_engine(settings, progress=lambda message: log.info("%s", message))
    app = create_app(settings, engine)
    log.info("kobold_api serving %s on http://%s:%d (Kobold API at /api, OpenAI API at /v1)",
             engine.model_name, settings.host, settings.port)
    warn_loudly(exposure_warnings(settings))
    websockets = None
    if settings.ws_port:
        try:
            websockets = WebSocketServer(app, settings.host, settings.ws_port)
            log.info("text-generation-webui streaming on ws://%s:%d/api/v1/stream and /api/v1/chat-stream",
                     settings.host, websockets.port)
        except OSError as exc:  # the port is taken: the HTTP API still serves
            log.warning("websocket streaming is off: cannot listen on port %d (%s); set ws_port", settings.ws_port, exc)
    try:
        waitress_serve(app, host=settings.host, port=settings.port, **waitress_options(settings))
    finally:
        horde = app.extensions[EXTENSION_KEY].horde
        if horde is not None:  # first, so a job in hand is handed back to the Horde
            horde.stop()
        if websockets is not None:
            websockets.close()
        engine.shutdown()
