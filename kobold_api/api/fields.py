"""Lenient, typed reading of JSON request bodies, collecting every error at once.

Clients are sloppy in known ways: KoboldAI's own examples send ``"False"`` strings,
SillyTavern sends stop strings as JSON-encoded strings, older UIs send comma lists.
:class:`FieldReader` accepts those forms, rejects real type errors with marshmallow-style
messages, and reports all failures together as one 422.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .. import jsontext
from .errors import ApiError, ValidationError

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n", ""}
_MISSING = object()


def json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """Parse a request body as a JSON object whatever the content type says (clients vary)."""
    if not raw.strip():
        return {}
    try:
        body = jsontext.loads(raw)
    except ValueError as exc:
        raise ApiError(400, {"msg": f"Error parsing input: request body is not valid JSON ({exc}).",
                             "type": "bad_input"}) from exc
    if not isinstance(body, dict):
        raise ApiError(400, {"msg": "Error parsing input: the JSON body must be an object.", "type": "bad_input"})
    return body


class FieldReader:
    """Reads fields from ``body``; each getter returns a default on error and records it."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.errors: dict[str, list[str]] = {}

    def has(self, *names: str) -> bool:
        return any(self.body.get(name) is not None for name in names)

    def _lookup(self, names: Sequence[str]) -> tuple[str, Any]:
        for name in names:
            value = self.body.get(name)
            if value is not None:
                return name, value
        return names[0], _MISSING

    def _fail(self, name: str, message: str) -> None:
        self.errors.setdefault(name, []).append(message)

    def raw(self, *names: str) -> Any:
        return self._lookup(names)[1] if self.has(*names) else None

    def string(self, *names: str, default: str | None = None, required: bool = False) -> str | None:
        name, value = self._lookup(names)
        if value is _MISSING:
            if required:
                self._fail(name, "Missing data for required field.")
            return default
        if not isinstance(value, str):
            self._fail(name, "Not a valid string.")
            return default
        return value

    def boolean(self, *names: str, default: bool) -> bool:
        name, value = self._lookup(names)
        if value is _MISSING:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        self._fail(name, "Not a valid boolean.")
        return default

    def number(self, *names: str, default: float, minimum: float | None = None, maximum: float | None = None,
               exclusive_minimum: bool = False, integer: bool = False) -> Any:
        name, value = self._lookup(names)
        if value is _MISSING:
            return default
        number = _to_number(value, integer)
        if number is None:
            self._fail(name, "Not a valid integer." if integer else "Not a valid number.")
            return default
        if minimum is not None and (number < minimum or (exclusive_minimum and number == minimum)):
            self._fail(name, _range_message(minimum, maximum, exclusive_minimum))
            return default
        if maximum is not None and number > maximum:
            self._fail(name, _range_message(minimum, maximum, exclusive_minimum))
            return default
        return number

    def integer(self, *names: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        return int(self.number(*names, default=default, minimum=minimum, maximum=maximum, integer=True))

    def string_list(self, *names: str) -> list[str]:
        """A list of strings, or one string: JSON-encoded list, else a single stop string."""
        name, value = self._lookup(names)
        if value is _MISSING:
            return []
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                try:
                    value = jsontext.loads(stripped)
                except ValueError:
                    self._fail(name, "Not a valid list of strings.")
                    return []
            else:
                return [value] if value else []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self._fail(name, "Not a valid list of strings.")
            return []
        return [item for item in value if item]

    def comma_strings(self, *names: str) -> list[str]:
        """The old UI form: a list, a JSON list, or a comma list of (optionally quoted) strings."""
        name, value = self._lookup(names)
        if isinstance(value, str) and not value.strip().startswith("["):
            parts = [part.strip() for part in value.split(",")]
            return [_unquote(part) for part in parts if _unquote(part)]
        return self.string_list(*names)

    def integer_list(self, *names: str) -> list[int] | None:
        name, value = self._lookup(names)
        if value is _MISSING:
            return None
        if isinstance(value, str):
            try:
                value = jsontext.loads(value) if value.strip().startswith("[") else [
                    int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                self._fail(name, "Not a valid list of integers.")
                return None
        if not isinstance(value, list) or not all(_to_number(item, True) is not None for item in value):
            self._fail(name, "Not a valid list of integers.")
            return None
        return [int(_to_number(item, True)) for item in value]  # type: ignore[arg-type]

    def token_ids(self, *names: str) -> list[int]:
        """Non-negative token ids, as a list or KoboldCpp's ``"id,id"`` string."""
        ids = self.integer_list(*names) or []
        if any(token_id < 0 for token_id in ids):
            self._fail(names[0], "Token ids must be 0 or greater.")
            return []
        return ids

    def token_bias(self, *names: str) -> dict[int, float]:
        """``{"<token id>": bias}`` (KoboldCpp/OpenAI), bias clamped to ±100."""
        name, value = self._lookup(names)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self._fail(name, "Not a valid mapping of token ids to numbers.")
            return {}
        bias: dict[int, float] = {}
        for key, amount in value.items():
            token_id, number = _to_number(key, True), _to_number(amount, False)
            if token_id is None or number is None or token_id < 0:
                self._fail(name, f"Invalid entry {key!r}: {amount!r}.")
                continue
            bias[int(token_id)] = max(-100.0, min(100.0, float(number)))
        return bias

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


def _to_number(value: Any, integer: bool) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:  # integers first: float() would round ids and seeds above 2**53
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if integer and isinstance(value, int):
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if integer:
        if float(value) != int(value):
            return None
        return int(value)
    return float(value)


def _range_message(minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"Must be greater than or equal to {minimum:g} and less than or equal to {maximum:g}."
    if minimum is not None:
        return f"Must be greater than {minimum:g}." if exclusive else f"Must be greater than or equal to {minimum:g}."
    return f"Must be less than or equal to {maximum:g}."


def _unquote(text: str) -> str:
    """Strip matching quotes and resolve JSON escapes such as ``\\n`` inside them."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        try:
            return jsontext.loads('"' + inner.replace('"', '\\"') + '"')
        except ValueError:
            return inner
    return text
