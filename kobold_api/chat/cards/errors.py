"""The one error every card reader and writer raises, and how its messages name JSON types."""

from __future__ import annotations

from typing import Any

__all__ = ["CardError", "type_name"]


class CardError(ValueError):
    """A card could not be read or written; the message is meant for the end user."""


def type_name(value: Any) -> str:
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
