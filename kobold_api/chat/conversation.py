"""A stored chat as the rest of the server sees it: a :class:`Conversation` and its :class:`Message` list.

:mod:`.conversations` stores them; these classes are plain data with their JSON form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROLES", "Message", "Conversation", "conversation_from_row", "message_from_row"]

ROLES: frozenset[str] = frozenset({"user", "character", "system"})
"""Who wrote a message; ``system`` is for narration / notes injected into the chat."""


@dataclass
class Message:
    """One chat message; ``index`` is its 0-based position in the conversation."""

    index: int
    role: str
    speaker: str
    swipes: list[str]
    swipe_id: int
    created_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The text a reader sees: the currently selected swipe."""
        return self.swipes[self.swipe_id]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; includes every swipe so clients can page through them."""
        return {
            "index": self.index,
            "role": self.role,
            "speaker": self.speaker,
            "text": self.text,
            "swipes": list(self.swipes),
            "swipe_id": self.swipe_id,
            "created_at": self.created_at,
            "extra": dict(self.extra),
        }


@dataclass
class Conversation:
    """A chat with one character.

    ``messages`` is only filled by :meth:`ConversationStore.get` and
    :meth:`ConversationStore.create`; listings leave it empty and report
    ``message_count`` instead so they stay cheap.
    """

    id: str
    character: str
    user_name: str
    title: str
    created_at: float
    updated_at: float
    message_count: int = 0
    messages: list[Message] = field(default_factory=list)

    def to_dict(self, *, include_messages: bool = True) -> dict[str, Any]:
        """JSON-ready form (timestamps are Unix seconds)."""
        data: dict[str, Any] = {
            "id": self.id,
            "character": self.character,
            "user_name": self.user_name,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "message_count": self.message_count,
        }
        if include_messages:
            data["messages"] = [m.to_dict() for m in self.messages]
        return data


def conversation_from_row(row: Mapping[str, Any]) -> Conversation:
    """A ``conversations`` row (with ``message_count`` when a listing counted them), messages not loaded."""
    return Conversation(
        id=row["id"],
        character=row["character"],
        user_name=row["user_name"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        message_count=int(row.get("message_count", 0) or 0),
    )


def message_from_row(row: Mapping[str, Any]) -> Message:
    """A ``messages`` row; its ``position`` is the message's index."""
    return Message(
        index=row["position"],
        role=row["role"],
        speaker=row["speaker"],
        swipes=list(row["swipes"]),
        swipe_id=row["swipe_id"],
        created_at=row["created_at"],
        extra=dict(row["extra"] or {}),
    )
