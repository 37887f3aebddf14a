"""The bytes each token id writes in the middle of a text, read from the tokenizer's decoder.

A constraint engine must know exactly which bytes a token adds to the output, or its masks
and the text disagree. The decoder in ``tokenizer.json`` says how token strings become text,
and tokenizers differ in it: plain byte-level BPE (``Ġ`` is a space), SentencePiece (``▁`` is a
space, ``<0x0A>`` is one byte), and the chains a GGUF conversion writes, such as
``Sequence[ByteFallback, Fuse, Replace, ByteLevel]`` for a byte-level vocabulary, which a reader
that looks only for a top-level ``ByteLevel`` takes for plain UTF-8 (``Ċ`` then passes for the
letter U+010A where the model's decoder writes a newline).

:func:`token_bytes` runs each token string through the decoder's steps the way the
``tokenizers`` library does, keeping bytes instead of lossy text. Steps that only act at the
start of a text (stripping the first token's leading space) are left out: a constraint sees
tokens after the prompt. ``tests/test_token_bytes.py`` checks the result against the library's
own decoding, in context, for every token of every tokenizer we load.
"""

from __future__ import annotations

import re
from typing import Any, Callable

#: ``<0xNN>``: SentencePiece's byte-fallback tokens.
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class UnsupportedDecoder(ValueError):
    """The decoder has a step whose effect on one token is not known here."""


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (``Ġ`` for a space, ``Ċ`` for a newline)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def _steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [step for part in decoder.get("decoders", []) for step in _steps(part)]
    return [decoder]


def _replace(step: dict[str, Any]) -> Callable[[str], str]:
    pattern, content = step.get("pattern", {}), step.get("content", "")
    if "String" in pattern:
        return lambda text: text.replace(pattern["String"], content)
    if "Regex" in pattern:
        regex = re.compile(pattern["Regex"])
        return lambda text: regex.sub(content.replace("\\", "\\\\"), text)
    raise UnsupportedDecoder(f"Replace pattern {pattern!r}")


def token_bytes(decoder: dict[str, Any] | None, tokens: list[str]) -> list[bytes | None]:
    """For each token string, the bytes it adds in the middle of a decoded text; None for a
    token the decoder renders differently by context (it must never be chosen under a
    constraint). Raises :class:`UnsupportedDecoder` for a decoder step not known here."""
    steps = _steps(decoder)
    fused = False
    #: Per step: a function on one token's value (text, or bytes once a step produced bytes).
    actions: list[Callable[[str | bytes], str | bytes | None]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Fuse":
            fused = True
        elif kind == "ByteFallback":
            actions.append(_byte_fallback)
        elif kind == "Replace":
            actions.append(_on_text(_replace(step)))
        elif kind == "ByteLevel":
            actions.append(_byte_level(fused))
        elif kind == "Metaspace":
            # Each ``▁`` is a space; the first token of a text loses its leading one (context).
            replacement = step.get("replacement", "▁")
            actions.append(_on_text(lambda text, r=replacement: text.replace(r, " ")))
        elif kind == "Strip":
            if not fused:  # before a Fuse it strips every token; after one only the whole text
                actions.append(_on_text(_strip(step)))
        elif kind == "BPEDecoder":
            suffix = step.get("suffix", "</w>")
            actions.append(_on_text(lambda text, s=suffix: text.replace(s, " ")))
        else:
            raise UnsupportedDecoder(f"decoder step {kind!r}")
    result: list[bytes | None] = []
    for token in tokens:
        value: str | bytes | None = token
        for action in actions:
            value = action(value)
            if value is None:
                break
        result.append(value.encode("utf-8") if isinstance(value, str) else value)
    return result


def _on_text(function: Callable[[str], str]) -> Callable[[str | bytes], str | bytes]:
    """A text step; a byte token passes through it as it is (see :func:`_byte_fallback`)."""
    return lambda value: function(value) if isinstance(value, str) else value


def _byte_fallback(value: str | bytes) -> str | bytes:
    match = _BYTE_TOKEN.match(value) if isinstance(value, str) else None
    return bytes([int(match.group(1), 16)]) if match else value


def _byte_level(fused: bool) -> Callable[[str | bytes], str | bytes | None]:
    """Every character one byte by GPT-2's table. A token with a character outside the table
    is left as its UTF-8 text; after a Fuse the whole text is one token, so such a token would
    leave every byte-level token around it unmapped: it has no bytes of its own (None)."""

    def convert(value: str | bytes) -> str | bytes | None:
        text = value if isinstance(value, str) else None
        if text is not None and all(char in _BYTE_LEVEL for char in text):
            return bytes(_BYTE_LEVEL[char] for char in text)
        return None if fused else value

    return convert


def _strip(step: dict[str, Any]) -> Callable[[str], str]:
    content, start, stop = step.get("content", " "), int(step.get("start", 0)), int(step.get("stop", 0))

    def strip(text: str) -> str:
        for _ in range(start):
            if text.startswith(content):
                text = text[len(content):]
        for _ in range(stop):
            if text.endswith(content):
                text = text[: -len(content)]
        return text

    return strip
