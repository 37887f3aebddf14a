"""Card objects (already decoded from JSON or YAML) into :class:`Character`: V1, V2, V3 and legacy.

The reader is forgiving about *where* fields live but strict about their *types*: a card with a
number where text belongs is broken, and saying so early beats a confusing prompt later.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from kobold_api.chat.character import Character, Lorebook, LorebookEntry

from .errors import CardError, type_name as _type_name

__all__ = ["V1_FIELDS", "LEGACY_KEYS", "parse_card_dict", "group_only_greetings"]

logger = logging.getLogger(__name__)

V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
LEGACY_KEYS = (
    "char_name",
    "char_persona",
    "char_greeting",
    "world_scenario",
    "example_dialogue",
    "context",
    "greeting",
)


# Field coercion: None means "absent", wrong types are errors.


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


# Dict -> Character


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
    if not has_v1_body and any(obj.get(k) is not None for k in LEGACY_KEYS):
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
