"""The one normalized character model every card format is read into.

Card formats differ only in where they keep the same few fields; the rest of the
server (prompt builder, routes, storage) only ever sees :class:`Character`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LorebookEntry:
    """One keyword-activated world-info entry (Character Card V2/V3 ``character_book``)."""

    keys: list[str]
    content: str
    enabled: bool = True
    insertion_order: int = 100
    case_sensitive: bool = False
    constant: bool = False
    selective: bool = False
    secondary_keys: list[str] = field(default_factory=list)
    priority: int = 10
    position: str = "before_char"  # "before_char" | "after_char"
    use_regex: bool = False
    name: str = ""
    comment: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lorebook:
    """A card's embedded lorebook; ``scan_depth``/``token_budget`` of ``None`` mean server defaults."""

    entries: list[LorebookEntry] = field(default_factory=list)
    name: str = ""
    description: str = ""
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool = False
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Character:
    """A character card, independent of the format it came in.

    ``raw`` keeps the original card JSON so unknown fields survive a round trip
    (the V2 spec requires that they are preserved).
    """

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    creator_notes: str = ""
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    nickname: str = ""
    character_book: Lorebook | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    source_format: str = "v2"  # v1 | v2 | v3 | pygmalion | textgen_yaml
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """The name used for ``{{char}}``: V3's ``nickname`` wins when set."""
        return self.nickname or self.name

    @property
    def greetings(self) -> list[str]:
        """First message followed by the alternates: the swipes offered on message one."""
        return [g for g in [self.first_mes, *self.alternate_greetings] if g]
