"""Read every common character-card format into :class:`Character`, and write cards back.

Users bring cards from many tools (TavernAI, SillyTavern, Pygmalion, text-generation-webui,
V3 editors), so the reader is forgiving about *where* fields live but strict about their
*types*: a card with a number where text belongs is broken, and saying so early beats a
confusing prompt later. Every failure is a :class:`CardError` with a message a user can act on.

PNG chunks are parsed by hand (signature, length, type, data, CRC) so that no imaging
library is needed and a hostile file cannot make us decode pixels.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from kobold_api import jsontext
from kobold_api.chat.character import Character, Lorebook, LorebookEntry

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Keywords of the PNG text chunks that carry a card; V3 wins when both are present.
CHUNK_V2 = "chara"
CHUNK_V3 = "ccv3"
_CARD_KEYWORDS = (CHUNK_V2, CHUNK_V3)
_TEXT_CHUNK_TYPES = (b"tEXt", b"zTXt", b"iTXt")

# Guards against decompression bombs in zTXt/iTXt: no real card is anywhere near this.
MAX_DECOMPRESSED_TEXT = 32 * 1024 * 1024

V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
_LEGACY_KEYS = (
    "char_name",
    "char_persona",
    "char_greeting",
    "world_scenario",
    "example_dialogue",
    "context",
    "greeting",
)
# Root keys that describe the character itself; anything else at the root is preserved as-is.
_ROOT_CARD_KEYS = frozenset({*V1_FIELDS, *_LEGACY_KEYS, "spec", "spec_version", "data", "bot"})


class CardError(ValueError):
    """A card could not be read or written; the message is meant for the end user."""


# ---------------------------------------------------------------------------------------------
# Field coercion: None means "absent", wrong types are errors.
# ---------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    """Name a JSON type the way a card author would recognise it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _opt_str(obj: dict[str, Any], key: str, where: str, default: str = "") -> str:
    """Read an optional text field; YAML/JSON null counts as missing."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise CardError(f"card field '{where}{key}' must be text, got {_type_name(value)}")
    return value


def _opt_str_list(obj: dict[str, Any], key: str, where: str) -> list[str]:
    """Read an optional list of strings (greetings, tags, lorebook keys)."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CardError(
            f"card field '{where}{key}' must be a list of text, got {_type_name(value)}"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise CardError(
                f"card field '{where}{key}[{index}]' must be text, got {_type_name(item)}"
            )
    return list(value)


def _opt_dict(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """Read an optional object (``extensions``); a copy so callers never alias the raw card."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CardError(f"card field '{where}{key}' must be an object, got {_type_name(value)}")
    return copy.deepcopy(value)


def _opt_bool(obj: dict[str, Any], key: str, where: str, default: bool) -> bool:
    """Read a flag; 0/1 are accepted because some editors export them for booleans."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CardError(f"card field '{where}{key}' must be true or false, got {_type_name(value)}")


def _opt_int(obj: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    """Read a whole number; integral floats (``100.0``) pass since JSON has one number type."""
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"card field '{where}{key}' must be a number, got {_type_name(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise CardError(f"card field '{where}{key}' must be a whole number, got {value}")
        return int(value)
    return value


def _position(entry: dict[str, Any], where: str) -> str:
    """Normalise a lorebook entry position; unknown values fall back to the spec default."""
    value = entry.get("position")
    if value in ("before_char", "after_char"):
        return value
    if value == 1:  # numeric exports: 0 = before, 1 = after
        return "after_char"
    if value not in (None, "", 0):
        logger.info("lorebook entry %s has unknown position %r; using before_char", where, value)
    return "before_char"


# ---------------------------------------------------------------------------------------------
# Dict -> Character
# ---------------------------------------------------------------------------------------------


def _parse_lorebook(book: Any) -> Lorebook | None:
    """Read a V2/V3 ``character_book``; entries keep their V3 ``use_regex`` flag."""
    if book is None:
        return None
    if not isinstance(book, dict):
        raise CardError(f"card field 'character_book' must be an object, got {_type_name(book)}")
    where = "character_book."
    raw_entries = book.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise CardError(
            f"card field 'character_book.entries' must be a list, got {_type_name(raw_entries)}"
        )
    entries: list[LorebookEntry] = []
    for index, raw in enumerate(raw_entries):
        entry_where = f"character_book.entries[{index}]."
        if not isinstance(raw, dict):
            raise CardError(
                f"card field 'character_book.entries[{index}]' must be an object, "
                f"got {_type_name(raw)}"
            )
        entries.append(
            LorebookEntry(
                keys=_opt_str_list(raw, "keys", entry_where),
                content=_opt_str(raw, "content", entry_where),
                enabled=_opt_bool(raw, "enabled", entry_where, True),
                insertion_order=_opt_int(raw, "insertion_order", entry_where, 100) or 0,
                case_sensitive=_opt_bool(raw, "case_sensitive", entry_where, False),
                constant=_opt_bool(raw, "constant", entry_where, False),
                selective=_opt_bool(raw, "selective", entry_where, False),
                secondary_keys=_opt_str_list(raw, "secondary_keys", entry_where),
                priority=_opt_int(raw, "priority", entry_where, 10) or 0,
                position=_position(raw, entry_where),
                use_regex=_opt_bool(raw, "use_regex", entry_where, False),
                name=_opt_str(raw, "name", entry_where),
                comment=_opt_str(raw, "comment", entry_where),
                extensions=_opt_dict(raw, "extensions", entry_where),
            )
        )
    return Lorebook(
        entries=entries,
        name=_opt_str(book, "name", where),
        description=_opt_str(book, "description", where),
        scan_depth=_opt_int(book, "scan_depth", where, None),
        token_budget=_opt_int(book, "token_budget", where, None),
        recursive_scanning=_opt_bool(book, "recursive_scanning", where, False),
        extensions=_opt_dict(book, "extensions", where),
    )


def _require_name(name: str, container: str) -> str:
    """Every format needs a name: it is the ``{{char}}`` of every prompt."""
    if not name.strip():
        raise CardError(f"card {container} has no name (expected a non-empty 'name' field)")
    return name.strip()


def _spec_major_version(spec: str, spec_version: Any) -> int:
    """Work out whether a ``chara_card_vN`` card is V2 or V3-like; newer versions read as V3."""
    try:
        major = int(spec.removeprefix("chara_card_v"))
    except ValueError:
        major = 2
    if major >= 3:
        try:
            version = float(spec_version) if spec_version is not None else 3.0
        except (TypeError, ValueError):
            version = 3.0
        if major > 3 or version >= 4.0:
            logger.warning(
                "card spec %s version %s is newer than this server knows; importing as V3",
                spec,
                spec_version,
            )
        return 3
    return 2


def _from_spec_card(obj: dict[str, Any], container: str) -> Character:
    """Read a V2/V3 card (including ST hybrids whose V1 fields sit at the root)."""
    spec = obj["spec"]
    data = obj.get("data")
    if not isinstance(data, dict):
        found = "missing" if data is None else _type_name(data)
        raise CardError(f"card says spec '{spec}' but its 'data' is {found}, not an object")
    major = _spec_major_version(spec, obj.get("spec_version"))
    merged = dict(data)
    for key in V1_FIELDS:  # ST hybrid: data wins, the root only fills gaps
        if merged.get(key) is None and obj.get(key) is not None:
            merged[key] = obj[key]
    where = "data."
    if major == 3:
        _opt_str_list(merged, "group_only_greetings", where)  # validated; kept in raw
    return Character(
        name=_require_name(_opt_str(merged, "name", where), container),
        description=_opt_str(merged, "description", where),
        personality=_opt_str(merged, "personality", where),
        scenario=_opt_str(merged, "scenario", where),
        first_mes=_opt_str(merged, "first_mes", where),
        mes_example=_opt_str(merged, "mes_example", where),
        system_prompt=_opt_str(merged, "system_prompt", where),
        post_history_instructions=_opt_str(merged, "post_history_instructions", where),
        alternate_greetings=_opt_str_list(merged, "alternate_greetings", where),
        creator_notes=_opt_str(merged, "creator_notes", where),
        tags=_opt_str_list(merged, "tags", where),
        creator=_opt_str(merged, "creator", where),
        character_version=_opt_str(merged, "character_version", where),
        nickname=_opt_str(merged, "nickname", where),
        character_book=_parse_lorebook(merged.get("character_book")),
        extensions=_opt_dict(merged, "extensions", where),
        source_format="v3" if major == 3 else "v2",
        raw=copy.deepcopy(obj),
    )


def _first_present(obj: dict[str, Any], keys: tuple[str, ...], where: str = "") -> str:
    """Legacy formats spell the same field several ways; take the first one that is set."""
    for key in keys:
        if obj.get(key) is not None:
            return _opt_str(obj, key, where)
    return ""


def _from_legacy(obj: dict[str, Any], container: str, label: str) -> Character:
    """Read Pygmalion JSON / text-generation-webui YAML (``context`` is the description)."""
    name = _first_present(obj, ("name", "char_name", "bot"))
    return Character(
        name=_require_name(name, container),
        description=_first_present(obj, ("description", "context", "char_persona")),
        personality=_opt_str(obj, "personality", ""),
        scenario=_first_present(obj, ("scenario", "world_scenario")),
        first_mes=_first_present(obj, ("first_mes", "greeting", "char_greeting")),
        mes_example=_first_present(obj, ("mes_example", "example_dialogue")),
        source_format=label,
        raw=copy.deepcopy(obj),
    )


def _from_v1(obj: dict[str, Any], container: str) -> Character:
    """Read a TavernAI V1 card (six strings at the root)."""
    return Character(
        name=_require_name(_opt_str(obj, "name", ""), container),
        description=_opt_str(obj, "description", ""),
        personality=_opt_str(obj, "personality", ""),
        scenario=_opt_str(obj, "scenario", ""),
        first_mes=_opt_str(obj, "first_mes", ""),
        mes_example=_opt_str(obj, "mes_example", ""),
        source_format="v1",
        raw=copy.deepcopy(obj),
    )


def parse_card_dict(obj: Any, container: str = "JSON") -> Character:
    """Turn an already-decoded card object into a :class:`Character`, detecting its format.

    ``container`` ("JSON"/"YAML") only shapes error messages and tells a text-generation-webui
    YAML file apart from a Pygmalion JSON one.
    """
    if not isinstance(obj, dict):
        raise CardError(f"card {container} must be an object with fields, got {_type_name(obj)}")
    spec = obj.get("spec")
    if spec == "lorebook_v3" or (spec is None and "entries" in obj and "name" not in obj):
        raise CardError("this file is a lorebook, not a character card")
    if isinstance(spec, str) and spec.startswith("chara_card_v"):
        if obj.get("data") is not None or not any(obj.get(k) is not None for k in V1_FIELDS):
            return _from_spec_card(obj, container)
        logger.warning("card says spec %r but has no 'data'; reading it as V1", spec)
    has_v1_body = any(obj.get(k) is not None for k in ("description", "first_mes", "mes_example"))
    if not has_v1_body and any(obj.get(k) is not None for k in _LEGACY_KEYS):
        is_textgen = container == "YAML" or any(
            obj.get(k) is not None for k in ("context", "greeting")
        )
        return _from_legacy(obj, container, "textgen_yaml" if is_textgen else "pygmalion")
    return _from_v1(obj, container)


def group_only_greetings(character: Character) -> list[str]:
    """V3 greetings meant only for group chats; kept in ``raw`` since the model has no field."""
    data = character.raw.get("data") if isinstance(character.raw.get("data"), dict) else {}
    value = data.get("group_only_greetings") if data else None
    if isinstance(value, list):
        return [g for g in value if isinstance(g, str)]
    return []


# ---------------------------------------------------------------------------------------------
# PNG chunks
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Character -> dict
# ---------------------------------------------------------------------------------------------


def _lorebook_to_dict(book: Lorebook, raw_book: Any, v3: bool) -> dict[str, Any]:
    """Serialise a lorebook, starting from the raw one so unknown keys (``id``...) survive."""
    out: dict[str, Any] = copy.deepcopy(raw_book) if isinstance(raw_book, dict) else {}
    raw_entries = out.get("entries") if isinstance(out.get("entries"), list) else []
    same_shape = len(raw_entries) == len(book.entries)
    entries: list[dict[str, Any]] = []
    for index, entry in enumerate(book.entries):
        base = raw_entries[index] if same_shape and isinstance(raw_entries[index], dict) else {}
        item: dict[str, Any] = dict(base)
        item.update(
            keys=list(entry.keys),
            content=entry.content,
            extensions=copy.deepcopy(entry.extensions),
            enabled=entry.enabled,
            insertion_order=entry.insertion_order,
            case_sensitive=entry.case_sensitive,
            name=entry.name,
            priority=entry.priority,
            comment=entry.comment,
            selective=entry.selective,
            secondary_keys=list(entry.secondary_keys),
            constant=entry.constant,
            position=entry.position,
        )
        if v3 or entry.use_regex or "use_regex" in base:
            item["use_regex"] = entry.use_regex
        entries.append(item)
    out.update(name=book.name, description=book.description)
    for key, value in (("scan_depth", book.scan_depth), ("token_budget", book.token_budget)):
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    out["recursive_scanning"] = book.recursive_scanning
    out["extensions"] = copy.deepcopy(book.extensions)
    out["entries"] = entries
    return out


def _raw_parts(character: Character) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``raw`` into (root extras, data extras) to carry unknown fields forward."""
    raw = character.raw if isinstance(character.raw, dict) else {}
    root_extra = {k: copy.deepcopy(v) for k, v in raw.items() if k not in _ROOT_CARD_KEYS}
    data = raw.get("data")
    is_spec_card = isinstance(raw.get("spec"), str) and raw["spec"].startswith("chara_card_v")
    data_extra = copy.deepcopy(data) if is_spec_card and isinstance(data, dict) else {}
    return root_extra, data_extra


def _card_dict(character: Character, v3: bool) -> dict[str, Any]:
    """Build a V2 or V3 card; shared because V3 data is V2 data plus a few fields."""
    root_extra, data = _raw_parts(character)
    raw_book = data.get("character_book")
    data.update(
        name=character.name,
        description=character.description,
        personality=character.personality,
        scenario=character.scenario,
        first_mes=character.first_mes,
        mes_example=character.mes_example,
        creator_notes=character.creator_notes,
        system_prompt=character.system_prompt,
        post_history_instructions=character.post_history_instructions,
        alternate_greetings=list(character.alternate_greetings),
        tags=list(character.tags),
        creator=character.creator,
        character_version=character.character_version,
        extensions=copy.deepcopy(character.extensions),
    )
    if character.character_book is None:
        data.pop("character_book", None)
    else:
        data["character_book"] = _lorebook_to_dict(character.character_book, raw_book, v3)
    if character.nickname or "nickname" in data:
        data["nickname"] = character.nickname
    if v3:
        data["group_only_greetings"] = group_only_greetings(character)
    card: dict[str, Any] = {
        "spec": "chara_card_v3" if v3 else "chara_card_v2",
        "spec_version": "3.0" if v3 else "2.0",
        "data": data,
    }
    for key, value in root_extra.items():
        card.setdefault(key, value)
    return card


def character_to_v2_dict(character: Character) -> dict[str, Any]:
    """A Character Card V2 object; unknown ``data`` fields and extensions from ``raw`` are kept."""
    return _card_dict(character, v3=False)


def character_to_v3_dict(character: Character) -> dict[str, Any]:
    """The same card as V3 (for the ``ccv3`` chunk): adds ``group_only_greetings``/``use_regex``."""
    return _card_dict(character, v3=True)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


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
