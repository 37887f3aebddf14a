"""The two AI Horde endpoints a text worker calls, over ``urllib`` (no extra dependency).

``POST /api/v2/generate/text/pop`` asks for a job and ``POST /api/v2/generate/text/submit``
hands its text back; both carry the user's key in the ``apikey`` header and name the software
in ``Client-Agent``. The Horde answers an error as ``{"message", "rc"}`` with an HTTP status
(its ``horde/exceptions.py``); :class:`HordeError` keeps both, so the worker can tell a job the
Horde already gave up on (``AbortedGen``, ``InvalidJobID``) from an outage worth retrying.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

POP_PATH = "/api/v2/generate/text/pop"
SUBMIT_PATH = "/api/v2/generate/text/submit"
#: A pop answer carries one prompt (at most the worker's context); anything far larger is not the Horde.
_MAX_ANSWER_BYTES = 16 * 2**20


class HordeError(Exception):
    """A call that did not return a JSON object: the HTTP status (None: no answer at all, or not
    JSON), the Horde's ``rc`` code and message, and the seconds a ``Retry-After`` asked for."""

    def __init__(self, message: str, status: int | None = None, rc: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.rc = rc
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth trying again soon: no answer, a server error, or too many requests. Any other
        4xx (a bad key, maintenance mode, a refused body) needs the owner, not a retry."""
        return self.status is None or self.status >= 500 or self.status in (408, 429)

    def __str__(self) -> str:
        if self.status is None:
            return str(self.args[0])
        code = f" {self.rc}" if self.rc else ""
        return f"HTTP {self.status}{code}: {self.args[0]}"


class HordeClient:
    """Calls one Horde (``base_url``, e.g. https://aihorde.net) with one key; thread-safe."""

    def __init__(self, base_url: str, api_key: str, client_agent: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.client_agent = client_agent
        self.timeout = timeout

    def pop(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post(POP_PATH, body, self.timeout)

    def submit(self, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return self._post(SUBMIT_PATH, body, timeout or self.timeout)

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"apikey": self._api_key, "Client-Agent": self.client_agent, "User-Agent": self.client_agent,
                     "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw, status = response.read(_MAX_ANSWER_BYTES + 1), response.status
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, DNS, TLS, timeout
            reason = getattr(exc, "reason", None) or exc
            raise HordeError(f"cannot reach {self.base_url}: {reason}") from None
        if len(raw) > _MAX_ANSWER_BYTES:
            raise HordeError(f"the answer from {path} is larger than {_MAX_ANSWER_BYTES} bytes")
        answer = _json_object(raw)
        if answer is None:
            raise HordeError(f"the answer from {path} (HTTP {status}) is not a JSON object")
        return answer


def _http_error(exc: urllib.error.HTTPError) -> HordeError:
    """The Horde's ``{"message", "rc"}`` error (flask-restx's ``{"message": {...}}`` for a body
    that fails its parser), or the bare status for a proxy's HTML page."""
    try:
        body = _json_object(exc.read(64 * 1024)) or {}
    except OSError:
        body = {}
    message = body.get("message") or exc.reason or "error"
    if isinstance(message, dict):  # reqparse: {"field": "why"}
        message = "; ".join(f"{field}: {why}" for field, why in message.items())
    retry_after = None
    try:
        retry_after = float(exc.headers.get("Retry-After", "")) if exc.headers else None
    except ValueError:
        pass
    return HordeError(str(message)[:500], exc.code, str(body.get("rc") or ""), retry_after)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
