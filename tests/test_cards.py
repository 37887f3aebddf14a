"""Card parsing/writing: every format, PNG chunk handling, round trips and clear errors."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import pytest

from kobold_api.chat.cards import (
    CardError,
    character_to_v2_dict,
    character_to_v3_dict,
    group_only_greetings,
    iter_png_chunks,
    make_placeholder_png,
    parse_card,
    write_png_card,
)
from kobold_api.chat.character import Character, Lorebook, LorebookEntry

# --- helpers: PNGs are built here independently of the module's writer ------------------------

SIG = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png(*extra_chunks: bytes) -> bytes:
    """A 1x1 grey PNG with ``extra_chunks`` placed before IEND."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x80")
    return (
        SIG
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat)
        + b"".join(extra_chunks)
        + chunk(b"IEND", b"")
    )


def b64json(obj: Any) -> bytes:
    return base64.b64encode(json.dumps(obj).encode("utf-8"))


def text_chunk(keyword: str, payload: bytes) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def ztxt_chunk(keyword: str, payload: bytes) -> bytes:
    return chunk(b"zTXt", keyword.encode("latin-1") + b"\0\0" + zlib.compress(payload))


def itxt_chunk(keyword: str, payload: bytes, compressed: bool = False) -> bytes:
    body = zlib.compress(payload) if compressed else payload
    flag = b"\x01\x00" if compressed else b"\x00\x00"
    return chunk(b"iTXt", keyword.encode("latin-1") + b"\0" + flag + b"en\0\0" + body)


V1 = {
    "name": "Tess",
    "description": "A tinkerer from {{user}}'s street.",
    "personality": "curious",
    "scenario": "A workshop.",
    "first_mes": "Hi there!",
    "mes_example": "<START>\n{{user}}: hi\n{{char}}: hello",
}


def v2_card(**data: Any) -> dict[str, Any]:
    body = {**V1, "alternate_greetings": ["Yo."], "tags": ["a"], "system_prompt": "Be Tess."}
    body.update(data)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": body}


def v3_card(**data: Any) -> dict[str, Any]:
    body = {
        **V1,
        "nickname": "T",
        "group_only_greetings": ["Hello, everyone."],
        "character_book": {
            "extensions": {},
            "entries": [
                {
                    "keys": ["gear.*"],
                    "content": "Gears are Tess's passion.",
                    "extensions": {},
                    "enabled": True,
                    "insertion_order": 5,
                    "use_regex": True,
                    "id": "abc",
                }
            ],
        },
    }
    body.update(data)
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": body}


# --- JSON / YAML formats -----------------------------------------------------------------------


def test_v1_json() -> None:
    c = parse_card(json.dumps(V1).encode())
    assert c.source_format == "v1"
    assert (c.name, c.personality, c.first_mes) == ("Tess", "curious", "Hi there!")
    assert c.mes_example.startswith("<START>")
    assert c.alternate_greetings == [] and c.character_book is None


def test_v2_json_reads_data() -> None:
    c = parse_card(json.dumps(v2_card(creator="me", extensions={"x": 1})).encode())
    assert c.source_format == "v2"
    assert c.alternate_greetings == ["Yo."]
    assert c.system_prompt == "Be Tess."
    assert c.creator == "me" and c.extensions == {"x": 1}
    assert c.greetings == ["Hi there!", "Yo."]


def test_v3_json_nickname_regex_and_group_greetings() -> None:
    c = parse_card(json.dumps(v3_card()).encode())
    assert c.source_format == "v3"
    assert c.nickname == "T" and c.display_name == "T"
    assert c.character_book is not None
    entry = c.character_book.entries[0]
    assert entry.use_regex is True and entry.insertion_order == 5
    assert group_only_greetings(c) == ["Hello, everyone."]


def test_newer_v3_spec_version_still_imports() -> None:
    card = v3_card()
    card["spec_version"] = "3.7"
    assert parse_card(json.dumps(card).encode()).source_format == "v3"
    card["spec_version"] = "4.0"
    assert parse_card(json.dumps(card).encode()).name == "Tess"


def test_st_hybrid_prefers_data_and_fills_gaps_from_root() -> None:
    card = {**V1, "name": "Old Name", "scenario": "root scenario", **v2_card(name="New Name")}
    del card["data"]["scenario"]
    c = parse_card(json.dumps(card).encode())
    assert c.name == "New Name"
    assert c.scenario == "root scenario"
    assert c.source_format == "v2"


def test_pygmalion_json() -> None:
    card = {
        "char_name": "Pyg",
        "char_persona": "A persona.",
        "char_greeting": "Greetings.",
        "world_scenario": "A world.",
        "example_dialogue": "You: hi\nPyg: hey",
    }
    c = parse_card(json.dumps(card).encode())
    assert c.source_format == "pygmalion"
    assert (c.name, c.description, c.first_mes, c.scenario) == (
        "Pyg",
        "A persona.",
        "Greetings.",
        "A world.",
    )
    assert c.mes_example == "You: hi\nPyg: hey" and c.personality == ""


def test_textgen_yaml() -> None:
    text = (
        "name: Chi\n"
        "greeting: |-\n  Hello!\n  Nice to meet you.\n"
        "context: |-\n  Chi is a barista.\n"
        "your_name: You\n"
        "created: 2023-05-01\n"
    )
    c = parse_card(text.encode(), filename_hint="Chi.yaml")
    assert c.source_format == "textgen_yaml"
    assert c.name == "Chi"
    assert c.first_mes == "Hello!\nNice to meet you."
    assert c.description == "Chi is a barista."
    # Dates from YAML must not break re-saving as JSON.
    json.dumps(character_to_v2_dict(c))


def test_textgen_yaml_with_legacy_keys() -> None:
    text = "char_name: Old\nchar_persona: persona\nchar_greeting: hey\nworld_scenario: there\n"
    c = parse_card(text.encode())
    assert (c.name, c.description, c.first_mes, c.scenario) == ("Old", "persona", "hey", "there")


def test_nulls_are_absent_and_missing_fields_default() -> None:
    card = v2_card(personality=None, alternate_greetings=None, tags=None, extensions=None)
    c = parse_card(json.dumps(card).encode())
    assert c.personality == "" and c.alternate_greetings == [] and c.tags == []
    assert c.extensions == {}
    minimal = parse_card(b'{"name": "Min"}')
    assert minimal.description == "" and minimal.first_mes == ""


def test_utf8_bom_and_unicode_survive() -> None:
    c = parse_card("\ufeff".encode() + json.dumps({"name": "Zoë ☕"}).encode())
    assert c.name == "Zoë ☕"


# --- PNG ---------------------------------------------------------------------------------------


def test_png_chara_v1() -> None:
    c = parse_card(tiny_png(text_chunk("chara", b64json(V1))))
    assert c.name == "Tess" and c.source_format == "v1"


def test_png_chara_v2() -> None:
    c = parse_card(tiny_png(text_chunk("chara", b64json(v2_card()))))
    assert c.source_format == "v2" and c.alternate_greetings == ["Yo."]


def test_png_ccv3_only() -> None:
    c = parse_card(tiny_png(text_chunk("ccv3", b64json(v3_card()))))
    assert c.source_format == "v3" and c.nickname == "T"


@pytest.mark.parametrize("v3_first", [True, False])
def test_png_both_chunks_ccv3_wins(v3_first: bool) -> None:
    v2 = text_chunk("chara", b64json(v2_card(name="From V2")))
    v3 = text_chunk("ccv3", b64json(v3_card(name="From V3")))
    png = tiny_png(v3, v2) if v3_first else tiny_png(v2, v3)
    assert parse_card(png).name == "From V3"


def test_png_keyword_case_insensitive() -> None:
    assert parse_card(tiny_png(text_chunk("Chara", b64json(V1)))).name == "Tess"
    assert parse_card(tiny_png(text_chunk("CCV3", b64json(v3_card())))).source_format == "v3"


def test_png_ztxt_and_itxt() -> None:
    assert parse_card(tiny_png(ztxt_chunk("chara", b64json(V1)))).name == "Tess"
    assert parse_card(tiny_png(itxt_chunk("chara", b64json(V1)))).name == "Tess"
    itxt = itxt_chunk("ccv3", b64json(v3_card()), compressed=True)
    assert parse_card(tiny_png(itxt)).source_format == "v3"


def test_png_unrelated_text_chunks_are_ignored() -> None:
    png = tiny_png(text_chunk("Software", b"paint"), text_chunk("chara", b64json(V1)))
    assert parse_card(png).name == "Tess"


def test_broken_ccv3_falls_back_to_chara() -> None:
    png = tiny_png(text_chunk("ccv3", b"!!!not base64!!!"), text_chunk("chara", b64json(V1)))
    assert parse_card(png).name == "Tess"


# --- errors ------------------------------------------------------------------------------------


def test_png_without_card_chunk() -> None:
    with pytest.raises(CardError, match="no 'chara' or 'ccv3' text chunk"):
        parse_card(tiny_png())


def test_truncated_png() -> None:
    png = tiny_png(text_chunk("chara", b64json(V1)))
    for cut in (len(png) - 5, len(png) // 2, 12):
        with pytest.raises(CardError, match="truncated"):
            parse_card(png[:cut])


def test_bad_base64() -> None:
    with pytest.raises(CardError, match="not valid base64"):
        parse_card(tiny_png(text_chunk("chara", b"@@@@ not base64 ###")))


def test_base64_of_non_json() -> None:
    with pytest.raises(CardError, match="valid JSON"):
        parse_card(tiny_png(text_chunk("chara", base64.b64encode(b"hello there"))))


def test_png_name_hint_without_signature() -> None:
    with pytest.raises(CardError, match="not a PNG"):
        parse_card(b"GIF89a....", filename_hint="card.png")


def test_json_without_name() -> None:
    with pytest.raises(CardError, match="card JSON has no name"):
        parse_card(json.dumps({"description": "nameless"}).encode())
    with pytest.raises(CardError, match="no name"):
        parse_card(json.dumps(v2_card(name="   ")).encode())
    with pytest.raises(CardError, match="no name"):
        parse_card(tiny_png(text_chunk("chara", b64json({"first_mes": "hi"}))))


@pytest.mark.parametrize(
    ("card", "fragment"),
    [
        ({"name": 42}, "'name' must be text"),
        (v2_card(alternate_greetings="hi"), "alternate_greetings' must be a list"),
        (v2_card(alternate_greetings=["ok", 3]), "alternate_greetings[1]' must be text"),
        (v2_card(tags={"a": 1}), "'data.tags' must be a list"),
        (v2_card(extensions=[1]), "extensions' must be an object"),
        (v2_card(character_book=[]), "character_book' must be an object"),
        (v2_card(character_book={"entries": [{"keys": "k", "content": "c"}]}), "keys' must be"),
        (v2_card(character_book={"entries": [{"keys": [], "insertion_order": "x"}]}), "number"),
        ({"spec": "chara_card_v2", "data": "oops"}, "'data' is text"),
        ({"spec": "chara_card_v2"}, "'data' is missing"),
        (v3_card(group_only_greetings="hi"), "group_only_greetings"),
    ],
)
def test_wrong_types(card: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CardError) as info:
        parse_card(json.dumps(card).encode())
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON or YAML"),
        (b"just some prose", "not valid JSON or YAML"),
        (b"[1, 2]", "must be an object"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"PK\x03\x04rest", "CHARX file is not a valid zip"),
        (b'{"spec": "lorebook_v3", "data": {}}', "lorebook"),
    ],
)
def test_unreadable_input(data: bytes, fragment: str) -> None:
    with pytest.raises(CardError) as info:
        parse_card(data)
    assert fragment in str(info.value)


def _charx(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_charx_reads_card_json_and_ignores_assets() -> None:
    card = {"spec": "chara_card_v3", "spec_version": "3.0",
            "data": {"name": "Zip", "description": "{{char}} lives in an archive.", "first_mes": "Hi!",
                     "assets": [{"type": "icon", "uri": "embeded://assets/icon.png", "name": "main", "ext": "png"}]}}
    character = parse_card(_charx({"card.json": json.dumps(card).encode(), "assets/icon.png": b"\x89PNG..."}))
    assert character.name == "Zip" and character.first_mes == "Hi!"
    assert "lives in an archive" in character.description
    with pytest.raises(CardError, match="no card.json"):
        parse_card(_charx({"other.json": b"{}"}))
    with pytest.raises(CardError, match="not a card object"):
        parse_card(_charx({"card.json": b"[1]"}))
    # a damaged compressed stream is a CardError (so a broken file never breaks the listing)
    damaged = bytearray(_charx({"card.json": json.dumps(card).encode() * 50}))
    start = damaged.index(b"card.json") + len(b"card.json")
    damaged[start:start + 40] = bytes(40)
    with pytest.raises(CardError, match="not a valid zip"):
        parse_card(bytes(damaged))


def test_json_hint_gives_json_error() -> None:
    with pytest.raises(CardError, match="not valid JSON"):
        parse_card(b"name: x\n", filename_hint="x.json")


def test_card_error_is_value_error() -> None:
    assert issubclass(CardError, ValueError)


# --- writing -----------------------------------------------------------------------------------


def test_v2_dict_preserves_unknown_fields() -> None:
    card = v2_card(
        extensions={"depth_prompt": {"depth": 4, "prompt": "x"}},
        some_future_field={"keep": True},
        character_book={
            "name": "book",
            "extensions": {"b": 1},
            "entries": [
                {"keys": ["k"], "content": "c", "id": 7, "extensions": {"e": 2}, "weird": "yes"}
            ],
        },
    )
    card["root_extra"] = "root"
    c = parse_card(json.dumps(card).encode())
    out = character_to_v2_dict(c)
    assert out["spec"] == "chara_card_v2" and out["spec_version"] == "2.0"
    assert out["data"]["some_future_field"] == {"keep": True}
    assert out["data"]["extensions"]["depth_prompt"]["depth"] == 4
    assert out["root_extra"] == "root"
    entry = out["data"]["character_book"]["entries"][0]
    assert entry["id"] == 7 and entry["weird"] == "yes" and entry["extensions"] == {"e": 2}
    assert out["data"]["character_book"]["extensions"] == {"b": 1}


def test_v2_dict_reflects_edits() -> None:
    c = parse_card(json.dumps(v2_card()).encode())
    c.first_mes = "Edited."
    c.character_book = None
    out = character_to_v2_dict(c)
    assert out["data"]["first_mes"] == "Edited."
    assert "character_book" not in out["data"]
    assert "personality" in out["data"] and out["data"]["alternate_greetings"] == ["Yo."]


def test_v3_dict_has_v3_fields() -> None:
    c = parse_card(json.dumps(v3_card()).encode())
    out = character_to_v3_dict(c)
    assert out["spec"] == "chara_card_v3"
    assert out["data"]["group_only_greetings"] == ["Hello, everyone."]
    assert out["data"]["nickname"] == "T"
    entry = out["data"]["character_book"]["entries"][0]
    assert entry["use_regex"] is True and entry["id"] == "abc"


def test_png_round_trip_into_given_image_keeps_unknown_fields() -> None:
    card = v2_card(some_future_field=[1, 2])
    original = tiny_png(text_chunk("chara", b64json(card)), text_chunk("Comment", b"keep me"))
    c = parse_card(original)
    c.scenario = "A new scenario."
    written = write_png_card(c, original)
    types = [t for t, _ in iter_png_chunks(written)]
    assert types[0] == b"IHDR" and types[-1] == b"IEND"
    keywords = [d.split(b"\0")[0] for t, d in iter_png_chunks(written) if t == b"tEXt"]
    assert sorted(keywords) == [b"Comment", b"ccv3", b"chara"]  # old chara replaced, not added
    again = parse_card(written)
    assert again.scenario == "A new scenario."
    assert again.raw["data"]["some_future_field"] == [1, 2]
    assert again.alternate_greetings == ["Yo."]
    assert again.source_format == "v3"  # ccv3 is preferred on read


def test_png_chara_chunk_is_v2() -> None:
    c = parse_card(json.dumps(v3_card()).encode())
    written = write_png_card(c)
    chunks = {
        d.split(b"\0")[0]: d.split(b"\0", 1)[1]
        for t, d in iter_png_chunks(written)
        if t == b"tEXt"
    }
    v2 = json.loads(base64.b64decode(chunks[b"chara"]))
    v3 = json.loads(base64.b64decode(chunks[b"ccv3"]))
    assert v2["spec"] == "chara_card_v2" and v3["spec"] == "chara_card_v3"
    assert v2["data"]["name"] == v3["data"]["name"] == "Tess"


def test_write_png_without_image_builds_valid_png() -> None:
    book = Lorebook(entries=[LorebookEntry(keys=["moon"], content="The moon is cheese.")])
    c = Character(name="Luna", first_mes="Hi", character_book=book, alternate_greetings=["Yo"])
    png = write_png_card(c)
    assert png.startswith(SIG)
    for chunk_type, data in iter_png_chunks(png):
        if chunk_type == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
            assert width > 0 and height > 0
    back = parse_card(png)
    assert back.name == "Luna" and back.alternate_greetings == ["Yo"]
    assert back.character_book is not None
    assert back.character_book.entries[0].content == "The moon is cheese."


def test_write_png_rejects_non_png_image() -> None:
    with pytest.raises(CardError, match="not a PNG"):
        write_png_card(Character(name="x"), b"not a png")


def test_placeholder_png_is_well_formed() -> None:
    png = make_placeholder_png(4, 3, (1, 2, 3))
    chunks = dict(iter_png_chunks(png))
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (4, 3)
    assert zlib.decompress(chunks[b"IDAT"]) == (b"\x00" + b"\x01\x02\x03" * 4) * 3


def test_v1_written_as_v2_keeps_root_extras() -> None:
    c = parse_card(json.dumps({**V1, "avatar": "none", "chat": "x"}).encode())
    out = character_to_v2_dict(c)
    assert out["data"]["name"] == "Tess" and out["avatar"] == "none"
    assert parse_card(json.dumps(out).encode()).personality == "curious"
