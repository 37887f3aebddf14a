"""A :class:`Character` back into V2 and V3 card objects, unknown fields carried forward from ``raw``."""

from __future__ import annotations

import copy
from typing import Any

from kobold_api.chat.character import Character, Lorebook

from .reading import LEGACY_KEYS, V1_FIELDS, group_only_greetings

__all__ = ["character_to_v2_dict", "character_to_v3_dict"]

# Root keys that describe the character itself; anything else at the root is preserved as-is.
_ROOT_CARD_KEYS = frozenset({*V1_FIELDS, *LEGACY_KEYS, "spec", "spec_version", "data", "bot"})


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
