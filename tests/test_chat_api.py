"""HTTP tests for server-side chat: /api/v1/chat(/stream), /api/v1/characters, /api/v1/conversations.

Everything goes through a real waitress server on the tiny random byte-level model, so replies
are gibberish: the tests check structure, storage, ordering and stopping, never meaning.
Greedy decoding (``temperature: 0``) or a fixed ``seed`` makes replies repeatable.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from kobold_api.chat.cards import make_placeholder_png, write_png_card
from kobold_api.chat.character import Character
from kobold_api.chat.characters import SHIPPED_CHARACTERS

CHAT = "/api/v1/chat"
STREAM = "/api/v1/chat/stream"
CHARS = "/api/v1/characters"
CONVS = "/api/v1/conversations"

SHIPPED = {"Assistant", "Mira Vance", "Bramble"}
FAST = {"max_new_tokens": 16, "temperature": 0}

V1_CARD = {
    "name": "Old Tom",
    "description": "{{char}} is an old sailor.",
    "personality": "gruff",
    "scenario": "A harbour tavern.",
    "first_mes": "Ahoy, {{user}}.",
    "mes_example": "",
}
V2_CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Nova",
        "description": "{{char}} is a starship AI.",
        "personality": "calm",
        "scenario": "",
        "first_mes": "Systems online, {{user}}.",
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": ["Good cycle, {{user}}.", "Welcome aboard."],
        "tags": ["sci-fi"],
        "creator": "tests",
        "character_version": "1",
        "extensions": {"custom_key": {"kept": True}},
    },
}


# --------------------------------------------------------------------------- helpers


def chat(server: Any, **body: Any) -> dict[str, Any]:
    """POST /api/v1/chat, require 200, return ``results[0]``."""
    response = server.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data.get("results"), list) and len(data["results"]) == 1, data
    return data["results"][0]


def upload(server: Any, payload: bytes | dict[str, Any], **params: str) -> requests.Response:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return server.post(CHARS, data=data, params=params)


def new_conversation(server: Any, **body: Any) -> dict[str, Any]:
    response = server.post(CONVS, json=body)
    assert response.status_code == 201, response.text
    return response.json()["result"]


def get_conversation(server: Any, cid: str) -> dict[str, Any]:
    response = server.get(f"{CONVS}/{cid}")
    assert response.status_code == 200, response.text
    return response.json()["result"]


def stream_events(server: Any, **body: Any) -> list[dict[str, Any]]:
    """POST /api/v1/chat/stream and decode every ``data:`` line."""
    response = requests.post(server.url + STREAM, json=body, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in response.content.decode("utf-8").split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:"):].strip()))
    return events


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def detail_msg(response: requests.Response) -> str:
    body = response.json()
    assert isinstance(body.get("detail"), dict), body
    assert isinstance(body["detail"].get("msg"), str) and body["detail"]["msg"], body
    return body["detail"]["msg"]


def token_id(engine: Any, char: str) -> int:
    ids = engine.tokenizer.encode(char, add_special_tokens=False)
    assert len(ids) == 1, (char, ids)
    return ids[0]


@pytest.fixture
def characters_dir(test_settings: Any) -> Path:
    return test_settings.characters_path


# --------------------------------------------------------------------------- characters


def test_list_characters_includes_shipped(server: Any) -> None:
    response = server.get(CHARS)
    assert response.status_code == 200
    results = response.json()["results"]
    names = {c["name"] for c in results}
    assert SHIPPED <= names
    mira = next(c for c in results if c["name"] == "Mira Vance")
    assert mira["greetings"] == 2 and mira["has_lorebook"] is True


@pytest.mark.parametrize("name", ["Mira Vance", "mira vance", "MIRA VANCE"])
def test_get_character_v2_shape_case_insensitive(server: Any, name: str) -> None:
    response = server.get(f"{CHARS}/{name}")
    assert response.status_code == 200, response.text
    card = response.json()["result"]
    assert card["spec"] == "chara_card_v2" and card["spec_version"] == "2.0"
    data = card["data"]
    assert data["name"] == "Mira Vance"
    for key in ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                "post_history_instructions", "creator_notes", "creator", "character_version"):
        assert isinstance(data[key], str), key
    assert data["first_mes"].startswith("*The kettle rattles")
    assert len(data["alternate_greetings"]) == 1
    assert isinstance(data["tags"], list) and isinstance(data["extensions"], dict)
    assert len(data["character_book"]["entries"]) >= 1


def test_upload_v1_json(server: Any, characters_dir: Path) -> None:
    response = upload(server, V1_CARD)
    assert response.status_code == 201, response.text
    assert response.json()["result"]["name"] == "Old Tom"
    assert response.json()["result"]["format"] == "v1"
    assert (characters_dir / "Old Tom.json").is_file()
    card = server.get(f"{CHARS}/old tom").json()["result"]
    assert card["spec"] == "chara_card_v2"
    assert card["data"]["first_mes"] == "Ahoy, {{user}}."
    assert card["data"]["scenario"] == "A harbour tavern."
    assert "Old Tom" in {c["name"] for c in server.get(CHARS).json()["results"]}


def test_upload_v2_json_keeps_fields(server: Any, characters_dir: Path) -> None:
    response = upload(server, V2_CARD)
    assert response.status_code == 201, response.text
    summary = response.json()["result"]
    assert summary["name"] == "Nova" and summary["greetings"] == 3 and summary["format"] == "v2"
    assert (characters_dir / "Nova.json").is_file()
    data = server.get(f"{CHARS}/Nova").json()["result"]["data"]
    assert data["alternate_greetings"] == V2_CARD["data"]["alternate_greetings"]
    assert data["extensions"] == {"custom_key": {"kept": True}}
    assert data["tags"] == ["sci-fi"]


def test_upload_textgen_yaml(server: Any, characters_dir: Path) -> None:
    text = "name: Yammy\ngreeting: Hello there, {{user}}!\ncontext: Yammy is a cheerful robot.\n"
    response = upload(server, text.encode())
    assert response.status_code == 201, response.text
    assert response.json()["result"]["name"] == "Yammy"
    assert response.json()["result"]["format"] == "textgen_yaml"
    data = server.get(f"{CHARS}/Yammy").json()["result"]["data"]
    assert data["first_mes"] == "Hello there, {{user}}!"
    assert data["description"] == "Yammy is a cheerful robot."
    # Stored as a V2 JSON card.
    stored = json.loads((characters_dir / "Yammy.json").read_text("utf-8"))
    assert stored["spec"] == "chara_card_v2" and stored["data"]["name"] == "Yammy"


def test_upload_png_card(server: Any, characters_dir: Path) -> None:
    png = write_png_card(Character(name="Pixel", description="{{char}} lives in a PNG.", first_mes="Beep.",
                                   alternate_greetings=["Boop."]))
    response = upload(server, png)
    assert response.status_code == 201, response.text
    assert response.json()["result"]["name"] == "Pixel"
    path = characters_dir / "Pixel.png"
    assert path.is_file() and path.read_bytes() == png
    data = server.get(f"{CHARS}/pixel").json()["result"]["data"]
    assert data["first_mes"] == "Beep." and data["alternate_greetings"] == ["Boop."]


def test_upload_png_card_with_explicit_name(server: Any, characters_dir: Path) -> None:
    png = write_png_card(Character(name="Pixel", first_mes="Beep."))
    response = upload(server, png, name="Renamed Pixel")
    assert response.status_code == 201, response.text
    assert (characters_dir / "Renamed Pixel.png").is_file()
    assert not (characters_dir / "Pixel.png").exists()
    assert server.get(f"{CHARS}/Renamed Pixel").status_code == 200


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b'{"name": "Broken", "description": ', "json"),
        (b"", "empty"),
        (make_placeholder_png(), "chunk"),
        (write_png_card(Character(name="Cut", first_mes="hi"))[:120], "truncated"),
        (b"PK\x03\x04not really a zip", "not a valid zip"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), "name"),
    ],
    ids=["bad-json", "empty", "png-without-chunk", "truncated-png", "zip", "no-name"],
)
def test_upload_broken_card_is_400(server: Any, characters_dir: Path, payload: bytes, needle: str) -> None:
    before = files_under(characters_dir)
    response = upload(server, payload)
    assert response.status_code == 400, response.text
    msg = detail_msg(response)
    assert needle in msg.lower(), msg
    assert response.json()["detail"]["type"] == "bad_card"
    assert files_under(characters_dir) == before


def test_upload_existing_name_needs_overwrite(server: Any, characters_dir: Path) -> None:
    original = server.get(f"{CHARS}/Assistant").json()["result"]
    original_bytes = (SHIPPED_CHARACTERS / "Assistant.json").read_bytes()
    replacement = {"spec": "chara_card_v2", "spec_version": "2.0",
                   "data": {"name": "Assistant", "description": "A replaced assistant.", "first_mes": "Yo."}}

    response = upload(server, replacement)
    assert response.status_code == 409, response.text
    assert "overwrite" in detail_msg(response)
    assert server.get(f"{CHARS}/Assistant").json()["result"] == original
    assert (SHIPPED_CHARACTERS / "Assistant.json").read_bytes() == original_bytes
    assert not (characters_dir / "Assistant.json").exists()

    # Same when the clash comes from an explicit ?name= with different letter case.
    response = upload(server, V1_CARD, name="assistant")
    assert response.status_code == 409, response.text
    assert not (characters_dir / "Assistant.json").exists()

    response = upload(server, replacement, overwrite="true")
    assert response.status_code == 201, response.text
    data = server.get(f"{CHARS}/Assistant").json()["result"]["data"]
    assert data["description"] == "A replaced assistant." and data["first_mes"] == "Yo."
    assert sorted(p.name for p in characters_dir.iterdir() if p.stem.lower() == "assistant") == ["Assistant.json"]
    assert (SHIPPED_CHARACTERS / "Assistant.json").read_bytes() == original_bytes  # shadowed, not written


def test_overwrite_png_with_json_removes_old_file(server: Any, characters_dir: Path) -> None:
    assert upload(server, write_png_card(Character(name="Pebble", first_mes="Hi."))).status_code == 201
    assert (characters_dir / "Pebble.png").is_file()
    response = upload(server, {"name": "Pebble", "description": "Now JSON.", "first_mes": "Hi."},
                      overwrite="true")
    assert response.status_code == 201, response.text
    assert not (characters_dir / "Pebble.png").exists()
    assert server.get(f"{CHARS}/Pebble").json()["result"]["data"]["description"] == "Now JSON."


def test_shipped_png_overwritten_by_json_stays_on_disk(server: Any, characters_dir: Path) -> None:
    shipped = (SHIPPED_CHARACTERS / "Bramble.png").read_bytes()
    response = upload(server, {"name": "Bramble", "description": "Now JSON.", "first_mes": "Hi."},
                      overwrite="true")
    assert response.status_code == 201, response.text
    assert (characters_dir / "Bramble.json").is_file()
    assert (SHIPPED_CHARACTERS / "Bramble.png").read_bytes() == shipped
    assert server.get(f"{CHARS}/Bramble").json()["result"]["data"]["description"] == "Now JSON."


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "..\\evil", "/tmp/evil", ".hidden", "evil\x00x"])
def test_upload_traversal_name_rejected(server: Any, test_settings: Any, characters_dir: Path, name: str) -> None:
    root = characters_dir.parent
    before = files_under(root)
    response = upload(server, V1_CARD, name=name)
    assert 400 <= response.status_code < 500, response.text
    detail_msg(response)
    assert files_under(root) == before
    assert not Path("/tmp/evil.json").exists()


def test_traversal_in_raw_query_rejected(server: Any, characters_dir: Path) -> None:
    root = characters_dir.parent
    before = files_under(root)
    response = requests.post(server.url + CHARS + "?name=%2e%2e%2fevil", data=json.dumps(V1_CARD), timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert files_under(root) == before


@pytest.mark.parametrize("encoded", ["%2e%2e%2fvictim", "..%2fvictim", "%2e%2e%5cvictim", "%2e%2e"])
def test_traversal_in_get_and_delete_paths(server: Any, characters_dir: Path, encoded: str) -> None:
    victim = characters_dir.parent / "victim.json"
    victim.write_text(json.dumps({"name": "Victim", "description": "outside", "first_mes": "hi"}))
    before = files_under(characters_dir.parent)

    got = requests.get(f"{server.url}{CHARS}/{encoded}", timeout=60)
    assert 400 <= got.status_code < 500, got.text
    assert "outside" not in got.text

    deleted = requests.delete(f"{server.url}{CHARS}/{encoded}", timeout=60)
    assert 400 <= deleted.status_code < 500, deleted.text
    assert victim.is_file()
    assert files_under(characters_dir.parent) == before


def test_delete_character(server: Any, characters_dir: Path) -> None:
    response = server.request("DELETE", f"{CHARS}/bramble")
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    assert (SHIPPED_CHARACTERS / "Bramble.png").is_file()  # the shipped file is never deleted
    assert server.get(f"{CHARS}/Bramble").status_code == 404
    assert "Bramble" not in {c["name"] for c in server.get(CHARS).json()["results"]}
    assert server.get(f"{CHARS}/Assistant").status_code == 200
    again = server.request("DELETE", f"{CHARS}/Bramble")
    assert again.status_code == 404


def test_character_id_finds_exactly_one_of_two_cards_with_one_name(server: Any) -> None:
    # Two uploads of a card named "Twin" under their own file names: the id each upload answers
    # with (and the list shows) gets, and deletes, exactly that card.
    ids = []
    for stem, description in (("twin-a", "first"), ("twin-b", "second")):
        response = upload(server, {"name": "Twin", "description": description}, name=stem)
        assert response.status_code == 201, response.text
        assert response.json()["result"]["name"] == "Twin"
        ids.append(response.json()["result"]["id"])
    assert ids == ["twin-a", "twin-b"]
    listed = [c for c in server.get(CHARS).json()["results"] if c["name"] == "Twin"]
    assert [c["id"] for c in listed] == ids
    assert server.get(f"{CHARS}/twin-b").json()["result"]["data"]["description"] == "second"
    assert server.request("DELETE", f"{CHARS}/twin-a").status_code == 200
    assert server.get(f"{CHARS}/twin-a").status_code == 404
    assert server.get(f"{CHARS}/Twin").json()["result"]["data"]["description"] == "second"
    assert server.request("DELETE", f"{CHARS}/Twin").status_code == 200
    assert server.get(f"{CHARS}/Twin").status_code == 404 and server.get(f"{CHARS}/twin-b").status_code == 404


def test_get_missing_character_404(server: Any) -> None:
    response = server.get(f"{CHARS}/Nobody Here")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"detail"}
    assert body["detail"]["type"] == "key_error"
    assert "Nobody Here" in body["detail"]["msg"]


def test_oversize_upload_413(start_server: Any, tiny_engine: Any, test_settings: Any,
                             characters_dir: Path) -> None:
    server = start_server(tiny_engine, replace(test_settings, max_upload_mb=1))
    before = files_under(characters_dir)
    # Just over the card limit, but within what the HTTP layer accepts.
    card = dict(V1_CARD, name="Big", description="x" * (2**20 + 10_000))
    response = upload(server, card)
    assert response.status_code == 413, response.text
    detail_msg(response)
    # Far over every limit.
    card = dict(V1_CARD, name="Huge", description="x" * (3 * 2**20))
    response = upload(server, card)
    assert response.status_code == 413, response.text[:500]
    detail_msg(response)
    assert files_under(characters_dir) == before
    # A normal card still works on this server.
    assert upload(server, V1_CARD).status_code == 201


# --------------------------------------------------------------------------- conversations


def test_create_conversation_greeting_and_swipes(server: Any) -> None:
    conv = new_conversation(server, character="Mira Vance")
    assert conv["character"] == "Mira Vance" and conv["user_name"] == "You"
    assert conv["title"] and conv["message_count"] == 1
    (greeting,) = conv["messages"]
    assert greeting["index"] == 0 and greeting["role"] == "character"
    assert greeting["swipe_id"] == 0 and len(greeting["swipes"]) == 2
    assert greeting["text"] == greeting["swipes"][0]
    assert greeting["text"].startswith("*The kettle rattles")
    assert greeting["swipes"][1].startswith("*Morning light spills")
    # Macros are filled in with the character's and the user's names.
    assert "Mira Vance pushes a chipped mug" in greeting["text"]
    assert "{{char}}" not in json.dumps(greeting)

    conv = new_conversation(server, character="Mira Vance", greeting_index=1, user_name="Kit", title="Storm")
    (greeting,) = conv["messages"]
    assert conv["user_name"] == "Kit" and conv["title"] == "Storm"
    assert greeting["text"].startswith("*Morning light spills") and len(greeting["swipes"]) == 2


def test_create_conversation_errors(server: Any) -> None:
    # A well-formed request the character cannot satisfy (it has two greetings): a conflict.
    bad_index = server.post(CONVS, json={"character": "Mira Vance", "greeting_index": 2})
    assert bad_index.status_code == 409, bad_index.text
    assert bad_index.json()["detail"]["type"] == "conflict" and "greeting_index" in bad_index.json()["detail"]["msg"]
    malformed = server.post(CONVS, json={"character": "Mira Vance", "greeting_index": -1})
    assert malformed.status_code == 422 and "greeting_index" in malformed.json()["detail"], malformed.text
    missing = server.post(CONVS, json={"character": "Nobody"})
    assert missing.status_code == 404, missing.text
    assert server.get(CONVS).json()["results"] == []


def test_create_conversation_user_macro_in_greeting(server: Any) -> None:
    assert upload(server, V2_CARD).status_code == 201
    conv = new_conversation(server, character="Nova", user_name="Ripley")
    assert conv["messages"][0]["swipes"] == ["Systems online, Ripley.", "Good cycle, Ripley.", "Welcome aboard."]


def test_list_conversations_filter_by_character(server: Any) -> None:
    a = new_conversation(server, character="Mira Vance")
    b = new_conversation(server, character="Mira Vance")
    c = new_conversation(server, character="Assistant")
    all_ids = {item["id"] for item in server.get(CONVS).json()["results"]}
    assert all_ids == {a["id"], b["id"], c["id"]}
    mira = server.get(CONVS, params={"character": "Mira Vance"}).json()["results"]
    assert {item["id"] for item in mira} == {a["id"], b["id"]}
    assert all("messages" not in item and item["message_count"] == 1 for item in mira)
    assert [item["id"] for item in server.get(CONVS, params={"character": "Assistant"}).json()["results"]] == [c["id"]]
    assert server.get(CONVS, params={"character": "Nobody"}).json()["results"] == []


def test_get_rename_export_delete_conversation(server: Any) -> None:
    conv = new_conversation(server, character="Mira Vance")
    cid = conv["id"]
    got = get_conversation(server, cid)
    assert got["messages"] == conv["messages"]

    renamed = server.request("PATCH", f"{CONVS}/{cid}", json={"title": "Lighthouse night"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["result"]["title"] == "Lighthouse night"
    assert get_conversation(server, cid)["title"] == "Lighthouse night"
    assert server.request("PATCH", f"{CONVS}/{cid}", json={}).status_code == 422

    exported = server.get(f"{CONVS}/{cid}/export")
    assert exported.status_code == 200
    doc = exported.json()
    assert doc["format"] == "kobold_api.conversation" and doc["format_version"] == 1
    assert doc["id"] == cid and doc["title"] == "Lighthouse night"
    assert doc["messages"][0]["swipes"] == conv["messages"][0]["swipes"]

    deleted = server.request("DELETE", f"{CONVS}/{cid}")
    assert deleted.status_code == 200 and deleted.json() == {"success": True}
    assert server.get(f"{CONVS}/{cid}").status_code == 404
    assert server.get(f"{CONVS}/{cid}/export").status_code == 404
    assert server.request("DELETE", f"{CONVS}/{cid}").status_code == 404
    assert cid not in {item["id"] for item in server.get(CONVS).json()["results"]}


def test_edit_and_delete_messages(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    chat(server, conversation_id=cid, user_input="first question", **FAST)
    chat(server, conversation_id=cid, user_input="second question", **FAST)

    # Edit the shown swipe of the greeting; the other swipe is kept.
    original = get_conversation(server, cid)["messages"][0]
    edited = server.request("PATCH", f"{CONVS}/{cid}/messages/0", json={"text": "Edited greeting."})
    assert edited.status_code == 200, edited.text
    greeting = edited.json()["result"]["messages"][0]
    assert greeting["text"] == "Edited greeting."
    assert greeting["swipes"] == ["Edited greeting.", original["swipes"][1]]

    # Select the other swipe.
    swiped = server.request("PATCH", f"{CONVS}/{cid}/messages/0", json={"swipe_id": 1})
    assert swiped.status_code == 200, swiped.text
    greeting = get_conversation(server, cid)["messages"][0]
    assert greeting["swipe_id"] == 1 and greeting["text"] == original["swipes"][1]

    # Bad edits.
    beyond = server.request("PATCH", f"{CONVS}/{cid}/messages/0", json={"swipe_id": 5})
    assert beyond.status_code == 409 and beyond.json()["detail"]["type"] == "conflict", beyond.text
    assert server.request("PATCH", f"{CONVS}/{cid}/messages/0", json={}).status_code == 422
    assert server.request("PATCH", f"{CONVS}/{cid}/messages/99", json={"text": "x"}).status_code == 404
    assert get_conversation(server, cid)["messages"][0]["swipe_id"] == 1

    # Edit a user message by negative index.
    edited = server.request("PATCH", f"{CONVS}/{cid}/messages/-2", json={"text": "second, edited"})
    assert edited.status_code == 200, edited.text
    messages = get_conversation(server, cid)["messages"]
    assert [m["text"] for m in messages][3] == "second, edited"

    # Delete message 1 (the first user message): later messages move up.
    texts_before = [m["text"] for m in messages]
    deleted = server.request("DELETE", f"{CONVS}/{cid}/messages/1")
    assert deleted.status_code == 200, deleted.text
    messages = get_conversation(server, cid)["messages"]
    assert [m["text"] for m in messages] == texts_before[:1] + texts_before[2:]
    assert [m["index"] for m in messages] == [0, 1, 2, 3]
    deleted = server.request("DELETE", f"{CONVS}/{cid}/messages/-1")
    assert deleted.status_code == 200, deleted.text
    assert [m["text"] for m in get_conversation(server, cid)["messages"]] == texts_before[:1] + texts_before[2:4]
    assert server.request("DELETE", f"{CONVS}/{cid}/messages/7").status_code == 404


def test_unknown_conversation_404_everywhere(server: Any) -> None:
    cid = "doesNotExist"
    for method, path, body in [
        ("GET", f"{CONVS}/{cid}", None),
        ("PATCH", f"{CONVS}/{cid}", {"title": "x"}),
        ("DELETE", f"{CONVS}/{cid}", None),
        ("GET", f"{CONVS}/{cid}/export", None),
        ("PATCH", f"{CONVS}/{cid}/messages/0", {"text": "x"}),
        ("DELETE", f"{CONVS}/{cid}/messages/0", None),
        ("POST", CHAT, {"conversation_id": cid, "user_input": "hi", **FAST}),
        ("POST", STREAM, {"conversation_id": cid, "user_input": "hi", **FAST}),
    ]:
        response = server.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert response.json()["detail"]["type"] == "key_error", (method, path)


# --------------------------------------------------------------------------- stateless /api/v1/chat


def test_stateless_chat_shape(server: Any) -> None:
    user_input = 'Tell me about <b>"tags"</b> & \'quotes\''
    greeting = "Hi <there> & welcome"
    history = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", greeting], ["earlier & <q>", "answer > 1"]],
               "visible": [["", greeting], ["earlier & <q>", "answer > 1"]]}
    result = chat(server, user_input=user_input, history=history, **FAST)
    internal, visible = result["history"]["internal"], result["history"]["visible"]
    assert len(internal) == len(visible) == 3
    assert internal[:2] == history["internal"] and visible[:2] == history["visible"]
    assert internal[-1][0] == user_input and visible[-1][0] == user_input  # not HTML-escaped
    assert internal[-1][1] == result["text"] == visible[-1][1]
    assert "&amp;" not in json.dumps(result["history"]) and "&lt;" not in json.dumps(result["history"])
    assert result["completion_tokens"] >= 1 and result["prompt_tokens"] > 0
    assert result["dropped_turns"] == 0 and result["finish_reason"] in ("length", "stop")
    assert "conversation_id" not in result
    # Stateless: nothing is stored.
    assert server.get(CONVS).json()["results"] == []


def test_stateless_chat_without_history(server: Any) -> None:
    result = chat(server, user_input="hello", character="Mira Vance", **FAST)
    assert result["history"]["internal"] == [["hello", result["text"]]]
    assert result["history"]["visible"] == [["hello", result["text"]]]


def test_stateless_greedy_is_deterministic(server: Any) -> None:
    first = chat(server, user_input="hello", max_new_tokens=24, temperature=0)
    second = chat(server, user_input="hello", max_new_tokens=24, temperature=0)
    assert first["text"] == second["text"]
    seeded = [chat(server, user_input="hello", max_new_tokens=24, seed=7, temperature=1.0)["text"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stateless_regenerate_replaces_last_row(server: Any) -> None:
    rows = [["<|BEGIN-VISIBLE-CHAT|>", "Greeting."], ["q1", "a1"], ["q2", "OLD REPLY"]]
    result = chat(server, user_input="", history={"internal": rows, "visible": rows}, regenerate=True,
                  max_new_tokens=16, seed=5)
    internal = result["history"]["internal"]
    assert len(internal) == 3
    assert internal[:2] == rows[:2]
    assert internal[-1] == ["q2", result["text"]]
    assert internal[-1][1] != "OLD REPLY"
    # Regenerating equals answering q2 afresh with the same seed.
    fresh = chat(server, user_input="q2", history={"internal": rows[:2], "visible": rows[:2]},
                 max_new_tokens=16, seed=5)
    assert fresh["text"] == result["text"]


def test_stateless_regenerate_with_nothing_to_regenerate(server: Any) -> None:
    for history in ([], [["<|BEGIN-VISIBLE-CHAT|>", "Greeting."]]):
        response = server.post(CHAT, json={"user_input": "", "history": {"internal": history, "visible": history},
                                           "regenerate": True, **FAST})
        assert response.status_code == 409, response.text
        assert response.json()["detail"]["type"] == "conflict" and detail_msg(response)


def test_stateless_continue_appends(server: Any) -> None:
    rows = [["<|BEGIN-VISIBLE-CHAT|>", "Greeting."], ["tell a story", "Once upon a time"]]
    result = chat(server, user_input="", history={"internal": rows, "visible": rows}, _continue=True,
                  max_new_tokens=12, temperature=0, ban_eos_token=True)
    internal = result["history"]["internal"]
    assert len(internal) == 2 and internal[0] == rows[0]
    assert internal[-1][0] == "tell a story"
    reply = internal[-1][1]
    assert reply.startswith("Once upon a time")
    assert len(reply) > len("Once upon a time")
    assert reply == "Once upon a time" + result["text"]
    assert result["history"]["visible"][-1][1] == reply


def test_stateless_impersonate_leaves_history(server: Any) -> None:
    rows = [["<|BEGIN-VISIBLE-CHAT|>", "Greeting."], ["q1", "a1"]]
    result = chat(server, user_input="", history={"internal": rows, "visible": rows}, impersonate=True,
                  max_new_tokens=12, temperature=0, ban_eos_token=True)
    assert isinstance(result["text"], str) and result["completion_tokens"] >= 1
    assert result["history"]["internal"] == rows
    assert result["history"]["visible"] == [["", "Greeting."], ["q1", "a1"]]


def test_stateless_impersonate_uses_partial_input(server: Any) -> None:
    # The user's text is the start of the line the model completes for them.
    rows = [["q1", "a1"]]
    body = {"history": {"internal": rows}, "impersonate": True, "max_new_tokens": 8, "temperature": 0}
    empty = chat(server, user_input="", **body)
    partial = "I think that the lighthouse keeper"
    started = chat(server, user_input=partial, **body)
    assert started["history"]["internal"] == rows
    assert started["prompt_tokens"] >= empty["prompt_tokens"] + len(partial), (empty, started)


def test_conflicting_flags_rejected(server: Any) -> None:
    rows = [["q1", "a1"]]
    response = server.post(CHAT, json={"history": {"internal": rows}, "regenerate": True, "_continue": True, **FAST})
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("mode", ["chat", "instruct", "chat-instruct"])
def test_stateless_modes_answer(server: Any, mode: str) -> None:
    result = chat(server, user_input="hello", mode=mode, character="Mira Vance", **FAST)
    assert result["history"]["internal"][-1] == ["hello", result["text"]]
    assert result["completion_tokens"] >= 1 and result["prompt_tokens"] > 100


def test_modes_build_different_prompts(server: Any) -> None:
    tokens = {mode: chat(server, user_input="hello", mode=mode, **FAST)["prompt_tokens"]
              for mode in ("chat", "instruct", "chat-instruct")}
    assert len(set(tokens.values())) == 3, tokens
    alpaca = chat(server, user_input="hello", mode="instruct", instruction_template="Alpaca", **FAST)
    assert alpaca["prompt_tokens"] != tokens["instruct"]
    response = server.post(CHAT, json={"user_input": "hello", "mode": "instruct",
                                       "instruction_template": "No Such Template", **FAST})
    assert response.status_code == 422, response.text


def test_bad_mode_and_history_rejected(server: Any) -> None:
    assert server.post(CHAT, json={"user_input": "x", "mode": "story", **FAST}).status_code == 422
    assert server.post(CHAT, json={"user_input": "x", "history": {"internal": [["only one"]]}, **FAST}).status_code == 422
    assert server.post(CHAT, json={"user_input": "x", "character": "Nobody", **FAST}).status_code == 404


# --------------------------------------------------------------------------- stateful /api/v1/chat


def test_stateful_two_turns(server: Any) -> None:
    conv = new_conversation(server, character="Mira Vance", user_name="Kit")
    cid = conv["id"]
    first = chat(server, conversation_id=cid, user_input="Where am I?", max_new_tokens=16, seed=1)
    second = chat(server, conversation_id=cid, user_input="Thank you.", max_new_tokens=16, seed=2)
    assert first["conversation_id"] == cid == second["conversation_id"]
    stored = get_conversation(server, cid)
    messages = stored["messages"]
    assert [m["role"] for m in messages] == ["character", "user", "character", "user", "character"]
    assert [m["index"] for m in messages] == [0, 1, 2, 3, 4]
    assert messages[0]["text"] == conv["messages"][0]["text"]
    assert messages[1]["text"] == "Where am I?" and messages[1]["speaker"] == "Kit"
    assert messages[2]["text"] == first["text"] and messages[2]["speaker"] == "Mira Vance"
    assert messages[3]["text"] == "Thank you."
    assert messages[4]["text"] == second["text"]
    assert stored["message_count"] == 5
    # The response mirrors the stored conversation, also in the row shape.
    assert second["conversation"]["messages"] == messages
    assert second["history"]["internal"] == [
        ["<|BEGIN-VISIBLE-CHAT|>", messages[0]["text"]],
        ["Where am I?", first["text"]],
        ["Thank you.", second["text"]],
    ]
    assert second["history"]["visible"][0][0] == ""


def test_stateful_prompt_holds_earlier_turns(server: Any) -> None:
    # Assistant has no lorebook, so the prompt only grows by the stored turns.
    cid = new_conversation(server, character="Assistant")["id"]
    first = chat(server, conversation_id=cid, user_input="ping", **FAST)
    second = chat(server, conversation_id=cid, user_input="pong", **FAST)
    grown = second["prompt_tokens"] - first["prompt_tokens"]
    assert grown >= len("You: ping\n") + first["completion_tokens"] // 2, (first, second)


def test_stateful_regenerate_adds_swipe(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    first = chat(server, conversation_id=cid, user_input="Hello?", max_new_tokens=16, seed=11)
    regen = chat(server, conversation_id=cid, regenerate=True, max_new_tokens=16, seed=12)
    messages = get_conversation(server, cid)["messages"]
    assert len(messages) == 3
    last = messages[-1]
    assert last["role"] == "character"
    assert len(last["swipes"]) == 2 and last["swipe_id"] == 1
    assert last["swipes"][0] == first["text"]
    assert last["swipes"][1] == regen["text"] == last["text"]
    assert regen["text"] != first["text"]
    assert messages[1]["text"] == "Hello?"
    # A regenerate prompt equals the original turn's prompt (the old reply is left out).
    assert regen["prompt_tokens"] == first["prompt_tokens"]
    # A second regenerate adds a third swipe.
    chat(server, conversation_id=cid, regenerate=True, max_new_tokens=16, seed=13)
    last = get_conversation(server, cid)["messages"][-1]
    assert len(last["swipes"]) == 3 and last["swipe_id"] == 2


def test_stateful_regenerate_and_continue_need_a_reply(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    before = get_conversation(server, cid)
    # Only the greeting: there is no reply to regenerate.
    response = server.post(CHAT, json={"conversation_id": cid, "regenerate": True, **FAST})
    assert response.status_code == 409, response.text
    assert response.json()["detail"]["type"] == "conflict" and detail_msg(response)
    assert get_conversation(server, cid)["messages"] == before["messages"]
    # Last message from the user (its reply was deleted): nothing to regenerate or continue.
    chat(server, conversation_id=cid, user_input="hello", **FAST)
    assert server.request("DELETE", f"{CONVS}/{cid}/messages/-1").status_code == 200
    before = get_conversation(server, cid)
    assert before["messages"][-1]["role"] == "user"
    for flag in ("regenerate", "_continue"):
        response = server.post(CHAT, json={"conversation_id": cid, flag: True, **FAST})
        assert response.status_code == 409, (flag, response.text)
    assert get_conversation(server, cid)["messages"] == before["messages"]


def test_stateful_empty_input_lets_the_character_speak_again(server: Any) -> None:
    # SillyTavern's "send nothing": no user message is stored, the character adds a reply.
    cid = new_conversation(server, character="Mira Vance")["id"]
    chat(server, conversation_id=cid, user_input="hello", **FAST)
    result = chat(server, conversation_id=cid, user_input="", **FAST)
    messages = get_conversation(server, cid)["messages"]
    assert [m["role"] for m in messages] == ["character", "user", "character", "character"]
    assert messages[-1]["text"] == result["text"]
    assert result["history"]["internal"][-1] == ["", result["text"]]


def test_stateful_continue_extends_last_reply(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    first = chat(server, conversation_id=cid, user_input="Go on.", max_new_tokens=10, seed=3)
    before = get_conversation(server, cid)["messages"][-1]["text"]
    assert before == first["text"]
    cont = chat(server, conversation_id=cid, _continue=True, max_new_tokens=10, temperature=0, ban_eos_token=True)
    messages = get_conversation(server, cid)["messages"]
    assert len(messages) == 3
    after = messages[-1]
    assert after["text"].startswith(before)
    assert after["text"] == before + cont["text"]
    assert len(after["swipes"]) == 1
    assert cont["conversation"]["messages"][-1]["text"] == after["text"]


def test_stateful_impersonate_stores_nothing(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    chat(server, conversation_id=cid, user_input="hello", **FAST)
    before = get_conversation(server, cid)
    result = chat(server, conversation_id=cid, impersonate=True, max_new_tokens=12, temperature=0,
                  ban_eos_token=True)
    assert isinstance(result["text"], str) and result["completion_tokens"] >= 1
    assert get_conversation(server, cid)["messages"] == before["messages"]
    assert result["conversation"]["messages"] == before["messages"]


def test_stateful_impersonate_uses_partial_input(server: Any) -> None:
    cid = new_conversation(server, character="Assistant")["id"]
    chat(server, conversation_id=cid, user_input="hello", **FAST)
    body = {"conversation_id": cid, "impersonate": True, "max_new_tokens": 8, "temperature": 0}
    empty = chat(server, user_input="", **body)
    partial = "I think that the lighthouse keeper"
    started = chat(server, user_input=partial, **body)
    assert started["prompt_tokens"] >= empty["prompt_tokens"] + len(partial), (empty, started)
    assert get_conversation(server, cid)["message_count"] == 3


def test_stateful_character_without_greeting(server: Any) -> None:
    assert upload(server, {"name": "Mute", "description": "Says little.", "first_mes": ""}).status_code == 201
    conv = new_conversation(server, character="Mute")
    assert conv["messages"] == [] and conv["message_count"] == 0
    cid = conv["id"]
    assert server.post(CHAT, json={"conversation_id": cid, "regenerate": True, **FAST}).status_code == 409
    result = chat(server, conversation_id=cid, user_input="hi", **FAST)
    messages = get_conversation(server, cid)["messages"]
    assert [m["role"] for m in messages] == ["user", "character"]
    assert result["history"]["internal"] == [["hi", result["text"]]]


def test_stateful_persists_across_restart(start_server: Any, tiny_engine: Any, test_settings: Any) -> None:
    first_server = start_server(tiny_engine, test_settings)
    cid = new_conversation(first_server, character="Mira Vance", title="Keep me")["id"]
    reply = chat(first_server, conversation_id=cid, user_input="Remember this.", **FAST)["text"]
    before = get_conversation(first_server, cid)
    first_server.close()
    first_server.app.extensions["kobold_api"].chat.conversations.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(first_server.url + CONVS, timeout=5)

    second_server = start_server(tiny_engine, test_settings)
    after = get_conversation(second_server, cid)
    assert after == before
    assert after["title"] == "Keep me"
    assert [m["text"] for m in after["messages"]][1:] == ["Remember this.", reply]
    assert cid in {c["id"] for c in second_server.get(CONVS).json()["results"]}
    # The restored conversation can go on.
    chat(second_server, conversation_id=cid, user_input="Still there?", **FAST)
    assert get_conversation(second_server, cid)["message_count"] == 5


def test_concurrent_turns_are_serialized(server: Any) -> None:
    cid = new_conversation(server, character="Assistant")["id"]
    inputs = ["AAAA first thread", "BBBB other thread"]
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def turn(text: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[text] = chat(server, conversation_id=cid, user_input=text, max_new_tokens=80, seed=4,
                                 ban_eos_token=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=turn, args=(text,)) for text in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    messages = get_conversation(server, cid)["messages"]
    assert [m["role"] for m in messages] == ["character", "user", "character", "user", "character"]
    assert {messages[1]["text"], messages[3]["text"]} == set(inputs)
    earlier, later = results[messages[1]["text"]], results[messages[3]["text"]]
    assert messages[2]["text"] == earlier["text"] and messages[4]["text"] == later["text"]
    # The later turn saw the earlier one in its prompt (no two turns read the same history).
    assert later["prompt_tokens"] >= earlier["prompt_tokens"] + earlier["completion_tokens"] // 2 + len(inputs[0])


@pytest.mark.parametrize("body, status", [
    # A reply longer than the context is capped as on every route (KoboldCpp's rule); then the
    # card's definition no longer fits what is left: a conflict with the character, not bad input.
    ({"max_new_tokens": 5000}, 409),
    ({"max_new_tokens": 1100, "truncation_length": 1200}, 409),
    ({"user_input": "x" * 3000, "truncation_length": 1200, "max_new_tokens": 16}, 409),
    ({"mode": "story"}, 422),
    ({"temperature": -1}, 422),
])
def test_failed_turn_stores_nothing(server: Any, body: dict[str, Any], status: int) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    chat(server, conversation_id=cid, user_input="one", **FAST)
    before = get_conversation(server, cid)
    request = {"conversation_id": cid, "user_input": "this must not be stored", **body}
    response = server.post(CHAT, json=request)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail
    after = get_conversation(server, cid)
    assert after["messages"] == before["messages"]
    assert "this must not be stored" not in json.dumps(after)


def test_dropped_turns_reported(server: Any) -> None:
    cid = new_conversation(server, character="Assistant")["id"]
    settings = {"truncation_length": 1200, "max_new_tokens": 20, "temperature": 0}
    dropped = []
    for turn in range(6):
        result = chat(server, conversation_id=cid, user_input=f"turn {turn} " + "blah " * 60, **settings)
        dropped.append(result["dropped_turns"])
        assert result["prompt_tokens"] <= 1200 - 20
    assert dropped[0] == 0
    assert dropped[-1] > 0, dropped
    assert dropped == sorted(dropped), dropped
    # Dropping only shortens the prompt: every message is still stored.
    assert get_conversation(server, cid)["message_count"] == 1 + 2 * 6


# --------------------------------------------------------------------------- stopping


@pytest.fixture
def one_letter_names(server: Any) -> None:
    card = {"name": "Z", "description": "Z is terse.", "personality": "", "scenario": "", "first_mes": "Z here.",
            "mes_example": ""}
    assert upload(server, card).status_code == 201


def marker_bias(engine: Any) -> dict[str, float]:
    """Push the model towards ``\\n``, ``Q``, ``Z`` and ``:`` so turn markers appear fast."""
    return {str(token_id(engine, ch)): 12.0 for ch in ("\n", "Q", "Z", ":")}


def test_names_stop_the_reply_stateless(server: Any, tiny_engine: Any, one_letter_names: None) -> None:
    bias = marker_bias(tiny_engine)
    # Without name stop strings the biased model writes the markers almost at once; check the
    # bias really does that (through the plain generate route, which has no name stops).
    raw = server.post("/api/v1/generate", json={"prompt": "Z: hi\nQ:", "max_length": 60, "logit_bias": bias,
                                                "sampler_seed": 1, "temperature": 1.0})
    assert raw.status_code == 200, raw.text
    raw_text = raw.json()["results"][0]["text"]
    assert "\nQ:" in raw_text or "\nZ:" in raw_text, raw_text
    stopped = 0
    for seed in range(1, 7):
        result = chat(server, user_input="hello", character="Z", your_name="Q", max_new_tokens=60,
                      logit_bias=bias, seed=seed, temperature=1.0)
        assert "\nQ:" not in result["text"] and "\nZ:" not in result["text"], (seed, result["text"])
        assert not result["text"].endswith(("\nQ", "\nZ")), (seed, result["text"])
        assert result["history"]["internal"][-1][1] == result["text"]
        stopped += result["finish_reason"] == "stop"
    assert stopped >= 1


def test_names_stop_the_reply_stored_and_streamed(server: Any, tiny_engine: Any, one_letter_names: None) -> None:
    bias = marker_bias(tiny_engine)
    cid = new_conversation(server, character="Z", user_name="Q")["id"]
    for seed in range(1, 5):
        result = chat(server, conversation_id=cid, user_input=f"msg {seed}", max_new_tokens=60, logit_bias=bias,
                      seed=seed, temperature=1.0)
        assert "\nQ:" not in result["text"] and "\nZ:" not in result["text"], result["text"]
        events = stream_events(server, conversation_id=cid, user_input=f"stream {seed}", max_new_tokens=60,
                               logit_bias=bias, seed=seed, temperature=1.0)
        streamed = "".join(e["token"] for e in events)
        assert "\nQ:" not in streamed and "\nZ:" not in streamed, streamed
    for message in get_conversation(server, cid)["messages"]:
        assert "\nQ:" not in message["text"] and "\nZ:" not in message["text"], message


def test_reply_does_not_repeat_speaker_prefix(server: Any, tiny_engine: Any, one_letter_names: None) -> None:
    # Bias towards "Z", ":" and " " so replies tend to start with "Z:".
    bias = {str(token_id(tiny_engine, ch)): 12.0 for ch in ("Z", ":")}
    for seed in range(1, 5):
        text = chat(server, user_input="hi", character="Z", your_name="Q", max_new_tokens=20, logit_bias=bias,
                    seed=seed, temperature=1.0)["text"]
        assert not text.startswith("Z:"), text


def test_caller_stopping_strings_honoured(server: Any) -> None:
    body = {"user_input": "hello", "character": "Mira Vance", "max_new_tokens": 40, "temperature": 0,
            "ban_eos_token": True}
    full = chat(server, **body)["text"]
    # A short printable substring well inside the reply, first occurring there.
    stop = None
    for start in range(4, len(full) - 2):
        candidate = full[start:start + 2]
        if all(ch.isascii() and ch.isprintable() and not ch.isspace() for ch in candidate):
            if full.find(candidate) == start:
                stop = candidate
                break
    assert stop is not None, repr(full)
    cut = full.find(stop)
    for key in ("stopping_strings", "stop_sequence"):
        result = chat(server, **body, **{key: [stop]})
        assert stop not in result["text"]
        assert result["text"] == full[:cut].rstrip(), (key, stop, full, result["text"])
        assert result["finish_reason"] == "stop"


# --------------------------------------------------------------------------- streaming


def test_stream_stateless(server: Any) -> None:
    rows = [["<|BEGIN-VISIBLE-CHAT|>", "Greeting."]]
    events = stream_events(server, user_input="hello", history={"internal": rows, "visible": rows},
                           max_new_tokens=24, temperature=0, ban_eos_token=True)
    assert len(events) >= 2
    for event in events[:-1]:
        assert set(event) == {"token", "finish_reason"}, event
        assert isinstance(event["token"], str) and event["finish_reason"] is None
    last = events[-1]
    assert last["finish_reason"] in ("length", "stop")
    history = last["results"][0]["history"]
    streamed = "".join(e["token"] for e in events)
    assert history["internal"][0] == rows[0]
    assert history["internal"][-1][0] == "hello"
    assert history["internal"][-1][1] == last["results"][0]["text"]
    assert streamed.strip() == last["results"][0]["text"].strip()
    # Same reply as the blocking route.
    blocking = chat(server, user_input="hello", history={"internal": rows, "visible": rows}, max_new_tokens=24,
                    temperature=0, ban_eos_token=True)
    assert blocking["text"] == last["results"][0]["text"]


def test_stream_stored(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    events = stream_events(server, conversation_id=cid, user_input="hello", max_new_tokens=24, seed=9)
    last = events[-1]
    assert last["finish_reason"] in ("length", "stop")
    body = last["results"][0]
    assert body["conversation_id"] == cid
    stored = get_conversation(server, cid)
    assert body["conversation"]["messages"] == stored["messages"]
    assert [m["role"] for m in stored["messages"]] == ["character", "user", "character"]
    streamed = "".join(e["token"] for e in events)
    assert streamed.strip() == stored["messages"][-1]["text"].strip()
    assert stored["messages"][-1]["text"] == body["text"]
    assert body["history"]["internal"][-1] == ["hello", body["text"]]


def test_stream_stored_regenerate_and_continue(server: Any) -> None:
    cid = new_conversation(server, character="Mira Vance")["id"]
    chat(server, conversation_id=cid, user_input="hello", max_new_tokens=12, seed=1)
    events = stream_events(server, conversation_id=cid, regenerate=True, max_new_tokens=12, seed=2)
    last = get_conversation(server, cid)["messages"][-1]
    assert len(last["swipes"]) == 2 and last["swipe_id"] == 1
    assert "".join(e["token"] for e in events).strip() == last["text"].strip()
    before = last["text"]
    events = stream_events(server, conversation_id=cid, _continue=True, max_new_tokens=12, temperature=0,
                           ban_eos_token=True)
    messages = get_conversation(server, cid)["messages"]
    assert len(messages) == 3
    assert messages[-1]["text"] == before + events[-1]["results"][0]["text"]
    assert messages[-1]["text"].startswith(before) and len(messages[-1]["text"]) > len(before)


@pytest.mark.parametrize("chars", ["Z:", "\nQZ:"], ids=["speaker-prefix", "turn-markers"])
def test_stream_tokens_match_stored_reply_over_seeds(server: Any, tiny_engine: Any, one_letter_names: None,
                                                     chars: str) -> None:
    """What a streaming client showed must be what was stored, also when the reply is cleaned up.

    The bias makes replies start with ``Z:`` (the speaker's own name) or end in half a turn
    marker (``\nQ``) now and then, the cases the server tidies before storing.
    """
    bias = {str(token_id(tiny_engine, ch)): 12.0 for ch in chars}
    mismatches = []
    for seed in range(1, 25):
        cid = new_conversation(server, character="Z", user_name="Q")["id"]
        events = stream_events(server, conversation_id=cid, user_input="hi", max_new_tokens=12, logit_bias=bias,
                               seed=seed, temperature=1.0)
        streamed = "".join(e["token"] for e in events)
        stored = get_conversation(server, cid)["messages"][-1]["text"]
        assert events[-1]["results"][0]["text"] == stored
        if streamed.strip() != stored.strip():
            mismatches.append((seed, streamed, stored))
    assert not mismatches, mismatches


def test_abandoned_stream_does_not_block_the_conversation(server: Any) -> None:
    cid = new_conversation(server, character="Assistant")["id"]
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"conversation_id": cid, "user_input": "gone", "max_new_tokens": 300,
                       "ban_eos_token": True}).encode()
    for _ in range(2):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST " + STREAM.encode() + b" HTTP/1.1\r\nHost: test\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            sock.recv(1)  # the stream has started (headers are on their way), then hang up
    response = requests.post(server.url + CHAT, json={"conversation_id": cid, "user_input": "next", **FAST},
                             timeout=30)
    assert response.status_code == 200, response.text
    messages = get_conversation(server, cid)["messages"]
    assert messages[-2]["text"] == "next" and messages[-1]["role"] == "character"
    assert [m["role"] for m in messages] == ["character"] + ["user", "character"] * ((len(messages) - 1) // 2)


def test_stream_validation_error_is_json(server: Any) -> None:
    response = server.post(STREAM, json={"user_input": "x", "temperature": -1})
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"].startswith("application/json")
