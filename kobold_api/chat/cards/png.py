"""Cards inside PNG images: the ``chara`` (V2) and ``ccv3`` (V3) text chunks, read and written.

PNG chunks are parsed by hand (signature, length, type, data, CRC) so that no imaging library is
needed and a hostile file cannot make us decode pixels.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from kobold_api import jsontext
from kobold_api.chat.character import Character

from .errors import CardError, type_name as _type_name
from .writing import character_to_v2_dict, character_to_v3_dict

__all__ = [
    "PNG_SIGNATURE", "CHUNK_V2", "CHUNK_V3", "MAX_DECOMPRESSED_TEXT", "iter_png_chunks", "decode_text_chunk",
    "read_png_card_json", "make_placeholder_png", "write_png_card",
]

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Keywords of the PNG text chunks that carry a card; V3 wins when both are present.
CHUNK_V2 = "chara"
CHUNK_V3 = "ccv3"
_CARD_KEYWORDS = (CHUNK_V2, CHUNK_V3)
_TEXT_CHUNK_TYPES = (b"tEXt", b"zTXt", b"iTXt")

# Guards against decompression bombs in zTXt/iTXt (and CHARX): no real card is anywhere near this.
MAX_DECOMPRESSED_TEXT = 32 * 1024 * 1024


def iter_png_chunks(png: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(type, data)`` for each chunk up to and including IEND.

    Raises :class:`CardError` for a missing signature or a file cut short, because a damaged
    download is the usual cause and the user can fix it by downloading again.
    """
    if not png.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file (the PNG signature is missing)")
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(png):
            raise CardError("PNG is truncated or corrupt: it ends before the IEND chunk")
        length, chunk_type = struct.unpack(">I4s", png[pos : pos + 8])
        if length > 0x7FFFFFFF or not chunk_type.isalpha():
            raise CardError(f"PNG is corrupt: bad chunk header at byte {pos}")
        end = pos + 8 + length + 4
        if end > len(png):
            raise CardError(
                f"PNG is truncated: chunk {chunk_type.decode('ascii')} at byte {pos} is cut off"
            )
        data = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[end - 4 : end])
        if crc != zlib.crc32(chunk_type + data):
            logger.debug("PNG chunk %r at byte %d has a bad CRC; using it anyway", chunk_type, pos)
        yield chunk_type, data
        if chunk_type == b"IEND":
            return
        pos = end


def _inflate(data: bytes, what: str) -> bytes:
    """Decompress a zTXt/iTXt payload with a size cap so a tiny file cannot eat the memory."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_DECOMPRESSED_TEXT)
    except zlib.error as exc:
        raise CardError(f"PNG text chunk {what} is not valid compressed data: {exc}") from exc
    if inflater.unconsumed_tail:
        raise CardError(f"PNG text chunk {what} is too large once decompressed")
    return out


def decode_text_chunk(chunk_type: bytes, data: bytes) -> tuple[str, str] | None:
    """Return ``(keyword, text)`` of a tEXt/zTXt/iTXt chunk, or None if it is malformed."""
    keyword_bytes, sep, rest = data.partition(b"\0")
    if not sep:
        return None
    keyword = keyword_bytes.decode("latin-1")
    if chunk_type == b"tEXt":
        return keyword, rest.decode("latin-1")
    if chunk_type == b"zTXt":
        if not rest or rest[0] != 0:
            return None
        return keyword, _inflate(rest[1:], repr(keyword)).decode("latin-1")
    if chunk_type == b"iTXt":
        if len(rest) < 2:
            return None
        compressed, method = rest[0], rest[1]
        parts = rest[2:].split(b"\0", 2)  # language tag, translated keyword, text
        if len(parts) != 3:
            return None
        text = parts[2]
        if compressed:
            if method != 0:
                return None
            text = _inflate(text, repr(keyword))
        try:
            return keyword, text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _decode_card_payload(keyword: str, text: str) -> dict[str, Any]:
    """base64 → UTF-8 → JSON object; a payload that is already JSON is accepted too."""
    stripped = text.strip()
    if stripped.startswith("{"):
        raw_json = stripped
    else:
        compact = "".join(stripped.split())
        compact += "=" * (-len(compact) % 4)
        try:
            decoded = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CardError(f"the PNG '{keyword}' chunk is not valid base64 ({exc})") from exc
        try:
            raw_json = decoded.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CardError(f"the PNG '{keyword}' chunk does not decode to UTF-8 text") from exc
    try:
        obj = jsontext.loads(raw_json)
    except ValueError as exc:
        raise CardError(f"the PNG '{keyword}' chunk does not hold valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CardError(f"the PNG '{keyword}' chunk holds {_type_name(obj)}, not a card object")
    return obj


def read_png_card_json(png: bytes) -> dict[str, Any]:
    """Extract the card JSON from a PNG, preferring ``ccv3`` over ``chara`` (V3 spec)."""
    found: dict[str, str] = {}
    for chunk_type, data in iter_png_chunks(png):
        if chunk_type not in _TEXT_CHUNK_TYPES:
            continue
        decoded = decode_text_chunk(chunk_type, data)
        if decoded is None:
            continue
        keyword = decoded[0].strip().lower()
        if keyword in _CARD_KEYWORDS and keyword not in found:
            found[keyword] = decoded[1]
    if not found:
        raise CardError(
            "PNG has no 'chara' or 'ccv3' text chunk: it is an ordinary image, "
            "not a character card"
        )
    if CHUNK_V3 in found:
        try:
            return _decode_card_payload(CHUNK_V3, found[CHUNK_V3])
        except CardError as exc:
            if CHUNK_V2 not in found:
                raise
            logger.warning("ignoring broken 'ccv3' chunk (%s); using 'chara' instead", exc)
    return _decode_card_payload(CHUNK_V2, found[CHUNK_V2])


def _png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    """Serialise one chunk with its CRC."""
    return (
        struct.pack(">I", len(data))
        + chunk_type
        + data
        + struct.pack(">I", zlib.crc32(chunk_type + data) & 0xFFFFFFFF)
    )


def make_placeholder_png(
    width: int = 64, height: int = 64, rgb: tuple[int, int, int] = (96, 112, 160)
) -> bytes:
    """Build a small solid-colour RGB PNG so a card can be exported without an avatar."""
    if not (0 < width <= 4096 and 0 < height <= 4096):
        raise ValueError("placeholder size must be between 1 and 4096 pixels")
    row = b"\x00" + bytes(rgb) * width  # filter type 0 (None) + pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row * height, 9))
        + _png_chunk(b"IEND", b"")
    )


def _text_chunk(keyword: str, card: dict[str, Any]) -> bytes:
    """A tEXt chunk holding base64(UTF-8 JSON), the encoding every card reader understands."""
    payload = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    return _png_chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def _is_card_chunk(chunk_type: bytes, data: bytes) -> bool:
    """True for an existing card text chunk, which must be replaced rather than duplicated."""
    if chunk_type not in _TEXT_CHUNK_TYPES:
        return False
    keyword = data.partition(b"\0")[0].decode("latin-1").strip().lower()
    return keyword in _CARD_KEYWORDS


def write_png_card(character: Character, image_png: bytes | None = None) -> bytes:
    """Embed the card as ``chara`` (V2) and ``ccv3`` (V3) tEXt chunks before IEND.

    Old card chunks in ``image_png`` are dropped so the file never carries two versions.
    """
    image = image_png if image_png is not None else make_placeholder_png()
    parts = [PNG_SIGNATURE]
    for chunk_type, data in iter_png_chunks(image):
        if chunk_type == b"IEND":
            break
        if not _is_card_chunk(chunk_type, data):
            parts.append(_png_chunk(chunk_type, data))
    parts.append(_text_chunk(CHUNK_V2, character_to_v2_dict(character)))
    parts.append(_text_chunk(CHUNK_V3, character_to_v3_dict(character)))
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)
