"""Read every common character-card format into :class:`Character`, and write cards back.

Users bring cards from many tools (TavernAI, SillyTavern, Pygmalion, text-generation-webui,
V3 editors). Every failure is a :class:`CardError` with a message a user can act on.

* :mod:`.files` - the entry point, :func:`parse_card`: a file's bytes, whatever the container;
* :mod:`.reading` - a decoded card object (V1, V2, V3, legacy) into a :class:`Character`;
* :mod:`.png` - the ``chara``/``ccv3`` text chunks of PNG cards, read and written;
* :mod:`.writing` - a :class:`Character` back into V2/V3 card objects;
* :mod:`.errors` - :class:`CardError`.
"""

from .errors import CardError
from .files import parse_card, read_charx_card_json
from .png import (
    CHUNK_V2, CHUNK_V3, PNG_SIGNATURE, decode_text_chunk, iter_png_chunks, make_placeholder_png, read_png_card_json,
    write_png_card,
)
from .reading import V1_FIELDS, group_only_greetings, parse_card_dict
from .writing import character_to_v2_dict, character_to_v3_dict

__all__ = [
    "CardError", "parse_card", "parse_card_dict", "read_charx_card_json", "read_png_card_json", "write_png_card",
    "iter_png_chunks", "decode_text_chunk", "make_placeholder_png", "character_to_v2_dict", "character_to_v3_dict",
    "group_only_greetings", "PNG_SIGNATURE", "CHUNK_V2", "CHUNK_V3", "V1_FIELDS",
]
