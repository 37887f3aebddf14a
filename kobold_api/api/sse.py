"""Server-sent events: one formatter and one response factory for every streaming route."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

from flask import Response, request

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One event; ``data`` is JSON-encoded unless it is already a string (OpenAI's ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    # U+2028/U+2029 are valid raw in JSON but end a line for JavaScript regexes, so
    # SillyTavern's parser would cut the event there: send them escaped.
    payload = payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode("utf-8")


class EventStream:
    """The body of a streaming response.

    WSGI servers call ``close()`` when the client leaves, and also when the body was never
    iterated at all; a generator's ``finally`` would not run in that second case, so the
    clean-up (cancel the job, release a lock) is ``on_close``, run exactly once.
    """

    def __init__(self, events: Iterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        self._events = events
        self._on_close = on_close

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def sse_response(events: Iterable[bytes]) -> Response:
    """A streamed response that waitress sends event by event."""
    body = events if isinstance(events, EventStream) else EventStream(iter(events))
    return Response(body, status=200, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True)


def disconnect_probe() -> Callable[[], bool]:
    """A callable, usable after the request context ends, that says whether the client left.

    waitress provides it when ``channel_request_lookahead`` is on; other servers do not,
    and then disconnects are only noticed when a write fails.
    """
    check = request.environ.get("waitress.client_disconnected")
    return (lambda: bool(check())) if check else (lambda: False)
