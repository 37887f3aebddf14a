"""text-generation-webui's legacy API on top of the Kobold and chat services.

Its websocket streams (:mod:`.websocket`) send, after the client's one JSON request:

- ``/api/v1/stream`` (a generate body): ``{"event": "text_stream", "message_num": n, "text": piece}``
  per piece, then ``{"event": "stream_end", "message_num": n}``;
- ``/api/v1/chat-stream`` (an ``/api/v1/chat`` body): ``{"event": "text_stream", "message_num": n,
  "history": {"internal": [...], "visible": [...]}}`` with the whole history so far (the reply
  growing in the last row), then ``stream_end``.

A request the HTTP routes would answer 4xx gets ``{"event": "error", "message_num": n, "status",
"detail"}`` instead, in the Kobold error shape.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from ...engine.engine import Engine, GenerationFailed
from ...settings import Settings
from .. import jobs
from ..chat.serving import ChatService
from ..kobold.schemas import TokenCountBody, parse_generation_input

Events = Iterator[dict[str, Any]]


class TextgenService:
    def __init__(self, engine: Engine, settings: Settings, chat: ChatService) -> None:
        self.engine = engine
        self.settings = settings
        self.chat = chat

    def token_count(self, body: dict[str, Any]) -> dict[str, Any]:
        text = TokenCountBody.parse(body).prompt or ""
        return {"results": [{"tokens": self.engine.tokenizer.count(text)}]}

    def stop_stream(self) -> dict[str, str]:
        """Stop the caller's running and waiting generations (text-generation-webui had one user)."""
        self.engine.abort(None, owner=jobs.client_address())
        return {"results": "success"}

    def stream(self, body: dict[str, Any], disconnected: Callable[[], bool]) -> Events:
        """``text_stream`` events of a generation; validation and a full queue raise before the first."""
        parsed = parse_generation_input(body, self.settings.generation)
        job = jobs.submit(self.engine, parsed.to_request(), parsed.genkey)
        return self._numbered(self._texts(job, disconnected), lambda: jobs.cancel_unfinished([job]))

    def chat_stream(self, body: dict[str, Any], disconnected: Callable[[], bool]) -> Events:
        """``text_stream`` events carrying the whole history so far, as the legacy chat stream did."""
        events, close = self.chat.stream_turn(self.chat.parse(body), disconnected, with_history=True)

        def histories() -> Iterator[dict[str, Any]]:
            for event in events:
                if event.error is not None:
                    yield {"event": "error", "status": event.error_status, "detail": {"msg": event.error}}
                    return
                if event.history is not None:
                    yield {"event": "text_stream", "history": event.history}
                elif event.result is not None:
                    yield {"event": "text_stream", "history": event.result["history"]}

        return self._numbered(histories(), close)

    @staticmethod
    def _texts(job: Any, disconnected: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        try:
            for chunk in job.chunks(disconnected):
                if chunk.text:
                    yield {"event": "text_stream", "text": chunk.text}
        except GenerationFailed as exc:
            yield {"event": "error", "status": 500, "detail": {"msg": jobs.stream_failure(exc)}}

    @staticmethod
    def _numbered(events: Iterator[dict[str, Any]], close: Callable[[], None]) -> Events:
        """``message_num`` on every event, ``stream_end`` last (unless an error ended it), and
        ``close`` however the stream ends (the client may leave at any point)."""
        number = 0
        try:
            for event in events:
                yield {**event, "message_num": number}
                number += 1
                if event["event"] == "error":
                    return
            yield {"event": "stream_end", "message_num": number}
        finally:
            close()
