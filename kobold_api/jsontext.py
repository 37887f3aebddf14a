"""JSON and text from outside (request bodies, uploaded cards), made safe before anything uses it.

Two things valid input can hold that break whatever comes after the parser:

- nesting deep enough to exhaust Python's recursion limit (``[[[[...`` tens of thousands
  deep is a few dozen kilobytes): :func:`loads` reports it as a ``ValueError`` like any
  other malformed document;
- lone UTF-16 surrogates (``"\\ud800"`` is valid JSON, but no UTF-8 text can hold it: the
  tokenizer, SQLite and every encoder refuse it): :func:`loads` and :func:`clean` turn each
  one into U+FFFD, the replacement character, as a UTF-8 decoder does with a bad byte.

No Flask here: the engine (tokenizer) and the card reader use it too.
"""

from __future__ import annotations

import json
import re
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Only a ``\uD800``-``\uDFFF`` escape puts a surrogate into parsed JSON (UTF-8 bytes cannot).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(document: str | bytes) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` (bad JSON, bad UTF-8, nesting
    too deep) and whose strings hold no lone surrogates."""
    try:
        value = json.loads(document)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None
    pattern = _SURROGATE_ESCAPE_BYTES if isinstance(document, (bytes, bytearray)) else _SURROGATE_ESCAPE
    return clean(value) if pattern.search(document) else value


def clean_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    if text.isascii():
        return text
    return _SURROGATE.sub(REPLACEMENT_CHAR, text)


def clean(value: Any) -> Any:
    """``value`` with lone surrogates replaced in every string and key, however deep (the
    walk keeps its own stack; containers are changed in place)."""
    if isinstance(value, str):
        return clean_text(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            for index, member in enumerate(item):
                if isinstance(member, str):
                    item[index] = clean_text(member)
                elif isinstance(member, (list, dict)):
                    stack.append(member)
        elif isinstance(item, dict):
            for key in list(item):
                member = item[key]
                if isinstance(member, str):
                    item[key] = clean_text(member)
                elif isinstance(member, (list, dict)):
                    stack.append(member)
                if isinstance(key, str) and (cleaned := clean_text(key)) != key:
                    item[cleaned] = item.pop(key)
    return value
