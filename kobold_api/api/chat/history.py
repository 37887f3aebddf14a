"""text-generation-webui's chat history: rows of ``[user text, reply]``, the first one the greeting
(``internal`` marks it with :data:`BEGIN_VISIBLE_CHAT`, ``visible`` leaves it blank), as its
legacy ``/api/v1/chat`` clients send and read them; and a stored conversation in that shape."""

from __future__ import annotations

from typing import Any

from ...chat.prompt import ChatMessage
from .schemas import ChatInput

#: text-generation-webui marks the greeting row's user half with this.
BEGIN_VISIBLE_CHAT = "<|BEGIN-VISIBLE-CHAT|>"


def is_greeting_row(row: list[str]) -> bool:
    """A row holding the greeting (no user text before it)."""
    return row[0] in ("", BEGIN_VISIBLE_CHAT)


def rows_to_messages(rows: list[list[str]]) -> list[ChatMessage]:
    """The rows as the prompt builder's messages."""
    messages = []
    for user_text, reply in rows:
        if user_text and user_text != BEGIN_VISIBLE_CHAT:
            messages.append(ChatMessage("user", user_text))
        if reply:
            messages.append(ChatMessage("character", reply))
    return messages


def history_dict(rows: list[list[str]]) -> dict[str, list[list[str]]]:
    """``internal`` and ``visible`` (the greeting row's marker blanked) as the client reads them."""
    return {"internal": [list(r) for r in rows], "visible": [["" if r[0] == BEGIN_VISIBLE_CHAT else r[0], r[1]]
                                                             for r in rows]}


def with_reply(rows: list[list[str]], parsed: ChatInput, user_input: str | None,
                reply: str) -> list[list[str]]:
    """A copy of the history rows with this turn's reply in place: a new row, the last reply
    replaced (regenerate) or extended (continue); an impersonated line is not a turn."""
    rows = [list(row) for row in rows]
    if parsed.impersonate:
        return rows
    if parsed.continue_last:
        rows[-1][1] += reply
    elif parsed.regenerate and parsed.conversation_id:
        rows[-1][1] = reply
    else:
        rows.append([user_input or "", reply])
    return rows


def stored_history(conversation: Any) -> dict[str, list[list[str]]]:
    """A stored conversation in text-generation-webui's row shape (greeting row first)."""
    return history_dict(stored_rows(conversation))


def stored_rows(conversation: Any) -> list[list[str]]:
    """A stored conversation's messages as rows: a user line and the reply to it."""
    rows: list[list[str]] = []
    for message in conversation.messages:
        if message.role == "user":
            rows.append([message.text, ""])
        elif message.role == "character":
            if rows and rows[-1][1] == "" and rows[-1][0] not in ("", BEGIN_VISIBLE_CHAT):
                rows[-1][1] = message.text
            else:
                rows.append([BEGIN_VISIBLE_CHAT if not rows else "", message.text])
    return rows
