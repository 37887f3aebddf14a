"""A Python port of SillyTavern's browser SSE parser (``public/scripts/sse-stream.js``).

SillyTavern's KoboldCpp streaming feeds the response body through a UTF-8
``TextDecoderStream`` and then this parser:

* the decoded text is buffered and split into events on a blank line
  (``\\r\\n\\r\\n``, ``\\r\\r`` or ``\\n\\n``); what follows the last blank line stays
  in the buffer, and whatever is left there when the body ends is dropped;
* each event is split into lines on ``\\n``/``\\r``/``\\r\\n`` and every line is
  matched with the JS regex ``/([^:]+)(?:: ?(.*))?/`` (``exec``, so a search, and
  JS ``.`` stops at ``\\n``, ``\\r``, U+2028 and U+2029);
* ``event:`` sets the type, ``data:`` lines are joined with ``\\n``, ``id:`` is
  remembered, anything else (comments) is ignored; an event without data is skipped;
* the consumer (``generateKoboldWithStreaming``) then runs ``JSON.parse`` on every
  event's data and concatenates the ``token`` values.

The port keeps those quirks so a test fails exactly where SillyTavern would.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

_EVENT_SPLIT = re.compile(r"\r\n\r\n|\r\r|\n\n")
_LINE_SPLIT = re.compile(r"\n|\r|\r\n")
# JS ``.`` (no s flag) matches anything but \n, \r, U+2028 and U+2029.
_LINE_MATCH = re.compile(r"([^:]+)(?:: ?([^\n\r\u2028\u2029]*))?")


@dataclass
class SSEEvent:
    """One dispatched event: ``type`` is the raw ``event:`` value ('' when absent)."""

    type: str
    data: str
    last_event_id: str = ""

    @property
    def dispatched_type(self) -> str:
        """What the browser's MessageEvent type would be."""
        return self.type or "message"

    def json(self) -> Any:
        """``JSON.parse(event.data)``, which SillyTavern does for every event."""
        return json.loads(self.data)


@dataclass
class EventSourceStream:
    """Feed it raw body bytes as they arrive; it returns the events completed so far."""

    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    buffer: str = ""
    last_event_id: str = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self.buffer += self._decoder.decode(chunk)
        return self._process()

    def close(self) -> str:
        """End of body: flush the decoder; returns the undispatched leftover (ST drops it)."""
        self.buffer += self._decoder.decode(b"", final=True)
        leftover, self.buffer = self.buffer, ""
        return leftover

    def _process(self) -> list[SSEEvent]:
        parts = _EVENT_SPLIT.split(self.buffer)
        self.buffer = parts.pop()
        events = []
        for chunk in parts:
            event_type = ""
            data = ""
            for line in _LINE_SPLIT.split(chunk):
                match = _LINE_MATCH.search(line)
                if not match:
                    continue
                name, value = match.group(1), match.group(2) or ""
                if name == "event":
                    event_type = value
                elif name == "data":
                    data += value + "\n"
                elif name == "id":
                    if "\0" not in value:
                        self.last_event_id = value
            if data == "":
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(SSEEvent(event_type, data, self.last_event_id))
        return events


def parse_all(chunks: Iterable[bytes]) -> tuple[list[SSEEvent], str]:
    """Parse a whole body given as chunks; returns (events, undispatched leftover)."""
    stream = EventSourceStream()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(stream.feed(chunk))
    return events, stream.close()


def sillytavern_text(events: Iterable[SSEEvent]) -> str:
    """What SillyTavern shows: ``text += data.token`` for every event (JSON.parse each)."""
    text = ""
    for event in events:
        data = event.json()
        token = data.get("token") if isinstance(data, dict) else None
        if token:
            text += token
    return text
