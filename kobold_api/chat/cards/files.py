"""The entry point: a card file's bytes (PNG, CHARX, JSON or YAML) into :class:`Character`."""

from __future__ import annotations

import zlib
from typing import Any

from kobold_api import jsontext
from kobold_api.chat.character import Character

from .errors import CardError, type_name as _type_name
from .png import MAX_DECOMPRESSED_TEXT, PNG_SIGNATURE, read_png_card_json
from .reading import parse_card_dict

__all__ = ["parse_card", "read_charx_card_json"]


def read_charx_card_json(data: bytes) -> dict[str, Any]:
    """The ``card.json`` at the root of a CHARX file (a zip; V3 spec). Its assets (images,
    ``embeded://`` references) are not used: the card's text is what builds prompts."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            try:
                info = archive.getinfo("card.json")
            except KeyError:
                raise CardError("CHARX file has no card.json at its root") from None
            if info.file_size > MAX_DECOMPRESSED_TEXT:
                raise CardError("card.json in the CHARX file is too large")
            raw = archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as exc:
        # damaged or truncated data, encrypted entries, compression methods zipfile lacks
        raise CardError(f"CHARX file is not a valid zip archive ({exc})") from exc
    try:
        obj = jsontext.loads(raw.decode("utf-8-sig"))
    except ValueError as exc:  # bad UTF-8 or JSON, or nested too deeply
        raise CardError(f"card.json in the CHARX file is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CardError(f"card.json in the CHARX file holds {_type_name(obj)}, not a card object")
    return obj


def _sniff_unsupported(data: bytes) -> str | None:
    """Name container formats we recognise but do not read, so the error says what to do."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP cards are not supported; export the card as PNG or JSON"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG images cannot hold a character card; use a PNG or JSON card"
    return None


def _load_yaml(text: str) -> Any:
    """Parse YAML safely (never constructs Python objects from tags)."""
    import yaml  # deferred: only text-generation-webui style cards need it

    try:
        return jsontext.clean(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise CardError(f"card is not valid JSON or YAML ({exc})") from exc
    except RecursionError:
        raise CardError("card is nested too deeply to be a character") from None


def parse_card(data: bytes, filename_hint: str | None = None) -> Character:
    """Read a card from raw bytes: PNG or CHARX (by signature), else JSON, else YAML.

    ``filename_hint`` only sharpens error messages (a ``.json`` file that fails to parse is
    reported as bad JSON rather than as bad YAML).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CardError("card data must be bytes")
    data = bytes(data)
    hint = (filename_hint or "").lower()
    if data.startswith(PNG_SIGNATURE):
        return parse_card_dict(read_png_card_json(data), "JSON")
    if data.startswith(b"PK\x03\x04"):
        return parse_card_dict(read_charx_card_json(data), "CHARX")
    unsupported = _sniff_unsupported(data)
    if unsupported:
        raise CardError(unsupported)
    if hint.endswith(".png"):
        raise CardError("file is named .png but is not a PNG image (the PNG signature is missing)")
    if not data.strip():
        raise CardError("card file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"card is not UTF-8 text and not a PNG (byte {exc.start})") from exc
    if text.lstrip().startswith(("{", "[")) or hint.endswith(".json"):
        try:
            obj = jsontext.loads(text)
        except ValueError as exc:
            if hint.endswith(".json"):
                raise CardError(f"card is not valid JSON ({exc})") from exc
            try:  # JSON-looking text can still be YAML flow style
                obj = _load_yaml(text)
            except CardError:
                raise CardError(f"card is not valid JSON or YAML ({exc})") from exc
            return _parse_yaml_object(obj)
        return parse_card_dict(obj, "JSON")
    return _parse_yaml_object(_load_yaml(text))


def _parse_yaml_object(obj: Any) -> Character:
    """YAML happily parses any prose as a string; only a mapping can be a card."""
    if not isinstance(obj, dict):
        raise CardError(
            "card is not valid JSON or YAML: expected fields such as 'name: ...', "
            f"got {_type_name(obj)}"
        )
    return parse_card_dict(_json_safe(obj), "YAML")


def _json_safe(value: Any) -> Any:
    """Make YAML output JSON-serialisable (dates, non-text keys) so the card can be re-saved."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
