"""Tokenizer access through the `tokenizers` library, and UTF-8-safe streaming decode.

We load ``tokenizer.json`` directly instead of transformers' AutoTokenizer: it is the
same fast tokenizer without seconds of import time, and the chat template is read
from the model folder by :func:`read_chat_template`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as FastTokenizer

from ..jsontext import REPLACEMENT_CHAR, clean_text
from .token_bytes import UnsupportedDecoder, token_bytes

log = logging.getLogger(__name__)


class Tokenizer:
    """Encode/decode for one model folder."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        self._tokenizer = FastTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template: str | None = read_chat_template(model_dir, self.config)
        self.bos_token: str = _token_text(self.config.get("bos_token"))
        self.eos_token: str = _token_text(self.config.get("eos_token"))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        #: :meth:`token_bytes`'s table once worked out (False: the decoder is not known).
        self._token_bytes: list[bytes | None] | bool | None = None
        self.special_ids: set[int] = {
            token_id for token_id, token in self._tokenizer.get_added_tokens_decoder().items() if token.special
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a lone surrogate (which no UTF-8 text holds, so the
        tokenizer refuses it) is read as U+FFFD, whatever path the text came by."""
        return self._tokenizer.encode(clean_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def token_bytes(self) -> list[bytes | None] | None:
        """The bytes each token id writes in the middle of a text (None for a token with none
        of its own; see :mod:`.token_bytes`), worked out once; None for a decoder not known
        there."""
        if self._token_bytes is None:
            decoder = json.loads(self._tokenizer.to_str()).get("decoder")
            strings = [self._tokenizer.id_to_token(token_id) for token_id in range(self.vocab_size)]
            try:
                table = token_bytes(decoder, [string or "" for string in strings])
            except UnsupportedDecoder as exc:
                log.warning("token bytes are read by each token's own decoding: %s is not known here", exc)
                self._token_bytes = False
            else:
                self._token_bytes = [None if string is None else value for string, value in zip(strings, table)]
        return self._token_bytes or None

    def token_piece(self, token_id: int) -> bytes:
        """What one token writes in the middle of a text (a lone token's decoding drops a
        leading space under some decoders); its own decoding where the table has none."""
        table = self.token_bytes() or []
        piece = table[token_id] if token_id < len(table) else None
        return piece if piece is not None else self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def to_json(self) -> str:
        """The whole tokenizer as ``tokenizer.json`` text."""
        return self._tokenizer.to_str()

    def count(self, text: str) -> int:
        return len(self.encode(text, add_special_tokens=False))

    @property
    def added_per_prompt(self) -> int:
        """Tokens the tokenizer adds to every encoded prompt (a BOS for some models)."""
        return len(self.encode("", add_special_tokens=True))


class IncrementalDecoder:
    """Turns a growing token list into text deltas without ever splitting a UTF-8 character.

    Decoding token by token breaks multi-byte characters and drops the spaces some
    tokenizers only render in context, so each delta is the difference between the
    decoding of a short window ending at the newest token and the same window without
    it. A delta that ends in U+FFFD (an incomplete byte sequence) is held back until
    the following tokens complete it.
    """

    #: Prompt tokens decoded before the first new one (see ``context``).
    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> None:
        """``context``: the tokens before the first one added (the prompt's end). Decoders that
        drop the leading space of a text (SentencePiece's, a GGUF conversion's ``Strip``) would
        drop it from the first new token too, and a continued story would read "timethere"."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(context)[-self.CONTEXT_TOKENS:]
        if context and tokenizer.decode(context, skip_special_tokens).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends inside a character: its end is no clean start
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full_text = decode(self._ids[self._prefix_offset:], self._skip_special)
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def snapshot(self) -> tuple[int, int, int]:
        """The decoder's position, to :meth:`restore` when tokens are taken back."""
        return len(self._ids), self._prefix_offset, self._read_offset

    def restore(self, state: tuple[int, int, int]) -> None:
        count, self._prefix_offset, self._read_offset = state
        del self._ids[count:]

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character becomes U+FFFD)."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        full_text = decode(self._ids[self._prefix_offset:], self._skip_special)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]


def read_chat_template(model_dir: Path, config: dict) -> str | None:
    """The model's own chat template: ``chat_template.jinja`` or tokenizer_config's field."""
    jinja_path = Path(model_dir) / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""
