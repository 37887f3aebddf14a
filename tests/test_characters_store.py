"""CharacterStore: folder as source of truth, name safety, overwrite rules, size limit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kobold_api.chat.cards import CardError, parse_card, write_png_card
from kobold_api.chat.character import Character
from kobold_api.chat.characters import (
    SHIPPED_CHARACTERS,
    CardTooLargeError,
    CharacterExistsError,
    CharacterStore,
    UnsafeNameError,
    safe_file_stem,
    validate_name,
)

REPO_CHARACTERS = SHIPPED_CHARACTERS


def card_bytes(name: str, **data: object) -> bytes:
    body = {"name": name, "first_mes": f"Hi, I am {name}.", **data}
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": body}).encode()


def test_save_then_get_and_list(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    stem, saved = store.save(card_bytes("Alice", future={"x": 1}), None)
    assert stem == "Alice" and saved.name == "Alice"
    assert (tmp_path / "Alice.json").is_file()
    stored = json.loads((tmp_path / "Alice.json").read_text(encoding="utf-8"))
    assert stored["spec"] == "chara_card_v2" and stored["data"]["future"] == {"x": 1}
    assert store.get("alice").first_mes == "Hi, I am Alice."
    assert [c.name for c in store.list()] == ["Alice"]


def test_get_by_card_name_or_stem(tmp_path: Path) -> None:
    (tmp_path / "file-stem.json").write_bytes(card_bytes("Card Name"))
    store = CharacterStore(tmp_path)
    assert store.get("FILE-STEM").name == "Card Name"
    assert store.get("card name").name == "Card Name"
    with pytest.raises(KeyError):
        store.get("nobody")


def test_png_saved_verbatim(tmp_path: Path) -> None:
    png = write_png_card(Character(name="Pic", first_mes="hello"))
    store = CharacterStore(tmp_path)
    store.save(png, "Pic")
    assert (tmp_path / "Pic.png").read_bytes() == png
    assert store.get("pic").first_mes == "hello"


def test_yaml_and_v1_are_stored_as_v2_json(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(b"name: Chi\ngreeting: hey\ncontext: barista\n", None, filename_hint="Chi.yaml")
    stored = json.loads((tmp_path / "Chi.json").read_text(encoding="utf-8"))
    assert stored["data"]["description"] == "barista"
    assert store.get("Chi").first_mes == "hey"


def test_charx_in_the_folder_is_listed_and_an_upload_is_stored_as_json(tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("card.json", card_bytes("Zed"))
        archive.writestr("assets/icon.png", b"not really a png")
    (tmp_path / "zed.charx").write_bytes(buffer.getvalue())
    store = CharacterStore(tmp_path)
    assert [c.name for c in store.list()] == ["Zed"] and store.get("zed").first_mes == "Hi, I am Zed."
    store.save(buffer.getvalue(), "Zed Two")
    assert json.loads((tmp_path / "Zed Two.json").read_text(encoding="utf-8"))["data"]["name"] == "Zed"


def test_no_overwrite_without_flag(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("Bob", description="one"), None)
    with pytest.raises(CharacterExistsError):
        store.save(card_bytes("Bob", description="two"), None)
    with pytest.raises(CharacterExistsError):  # case-insensitive, any format
        store.save(write_png_card(Character(name="BOB")), None)
    assert store.get("Bob").description == "one"
    store.save(card_bytes("Bob", description="two"), None, overwrite=True)
    assert store.get("Bob").description == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Bob.json"]


def test_overwrite_across_formats_leaves_one_file(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("Cat"), None)
    store.save(write_png_card(Character(name="Cat", description="png now")), None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Cat.png"]
    assert store.get("Cat").description == "png now"


def test_explicit_name_sets_file_stem(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("Long Card Name"), "short")
    assert (tmp_path / "short.json").is_file()
    assert store.get("short").name == "Long Card Name"


def test_unsafe_card_name_is_cleaned_into_stem(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("../AC/DC"), None)
    assert [p.name for p in tmp_path.iterdir()] == ["_AC_DC.json"]
    assert safe_file_stem("...") == "character"


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b",
        "a\\b",
        "..",
        ".",
        ".hidden",
        "/etc/passwd",
        "C:evil",
        "nul\0byte",
        "",
        " x",
        "x\n",
        "x" * 200,
    ],
)
def test_unsafe_names_rejected_everywhere(tmp_path: Path, bad: str) -> None:
    store = CharacterStore(tmp_path / "chars")
    with pytest.raises(UnsafeNameError):
        store.save(card_bytes("Fine"), bad)
    with pytest.raises(UnsafeNameError):
        store.get(bad)
    with pytest.raises(UnsafeNameError):
        store.delete(bad)
    assert not any(tmp_path.rglob("*.json"))


def test_error_hierarchy() -> None:
    assert issubclass(UnsafeNameError, ValueError)
    assert issubclass(CardTooLargeError, CardError)
    assert not issubclass(CharacterExistsError, CardError)
    assert validate_name("Mira Vance") == "Mira Vance"


def test_size_limit(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path, max_bytes=2000)
    with pytest.raises(CardTooLargeError):
        store.save(card_bytes("Big", description="x" * 2500), None)
    with pytest.raises(CardTooLargeError, match="over the 2000-byte limit"):
        store.save(b"\x00" * 5000, "junk")  # refused before parsing is even attempted
    with pytest.raises(CardTooLargeError):  # PNGs are stored verbatim, so checked as uploaded
        store.save(write_png_card(Character(name="Pic", description="y" * 3000)), None)
    assert not any(tmp_path.iterdir())
    store.save(card_bytes("Small"), None)  # small cards still fit


def test_oversized_file_on_disk_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "big.json").write_bytes(card_bytes("Big", description="x" * 500))
    (tmp_path / "ok.json").write_bytes(card_bytes("Ok"))
    store = CharacterStore(tmp_path, max_bytes=200)
    assert [c.name for c in store.list()] == ["Ok"]


def test_broken_card_raises_and_writes_nothing(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    with pytest.raises(CardError, match="no name"):
        store.save(b'{"description": "no name"}', "x")
    with pytest.raises(CardError):
        store.save(b"\x89PNG\r\n\x1a\ntruncated", "y")
    assert not any(tmp_path.iterdir())


def test_list_skips_broken_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "good.json").write_bytes(card_bytes("Good"))
    (tmp_path / "bad.json").write_text("{oops", encoding="utf-8")
    (tmp_path / "noname.json").write_text("{}", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a card", encoding="utf-8")
    (tmp_path / ".tmp-123.part").write_text("partial", encoding="utf-8")
    store = CharacterStore(tmp_path)
    with caplog.at_level("WARNING"):
        assert [c.name for c in store.list()] == ["Good"]
    assert "bad.json" in caplog.text and "noname.json" in caplog.text


def test_list_sees_external_changes(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    assert store.list() == []
    (tmp_path / "late.json").write_bytes(card_bytes("Late"))
    assert [c.name for c in store.list()] == ["Late"]
    (tmp_path / "late.json").unlink()
    assert store.list() == []


def test_missing_folder_is_empty_and_created_on_save(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path / "new")
    assert store.list() == []
    store.save(card_bytes("First"), None)
    assert (tmp_path / "new" / "First.json").is_file()


def test_delete(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("Gone"), None)
    store.delete("gone")
    assert not any(tmp_path.iterdir())
    with pytest.raises(KeyError):
        store.delete("Gone")
    with pytest.raises(KeyError):
        store.get("Gone")


def test_delete_broken_file_by_stem(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{oops", encoding="utf-8")
    store = CharacterStore(tmp_path)
    with pytest.raises(KeyError):
        store.get("broken")
    store.delete("broken")
    assert not any(tmp_path.iterdir())


def test_delete_symlink_does_not_touch_target(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(card_bytes("Outside"))
    folder = tmp_path / "chars"
    folder.mkdir()
    (folder / "link.json").symlink_to(outside)
    store = CharacterStore(folder)
    store.delete("link")
    assert outside.is_file() and not (folder / "link.json").exists()


def test_returned_characters_are_copies(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    store.save(card_bytes("Solid"), None)
    store.get("Solid").name = "mutated"
    store.list()[0].tags.append("mutated")
    again = store.get("Solid")
    assert again.name == "Solid" and again.tags == []


def test_concurrent_saves_only_one_wins(tmp_path: Path) -> None:
    store = CharacterStore(tmp_path)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            store.save(card_bytes("Race", description=str(i)), None)
            result = "saved"
        except CharacterExistsError:
            result = "exists"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("saved") == 1 and outcomes.count("exists") == 15
    assert [p.name for p in tmp_path.iterdir()] == ["Race.json"]


# --- shipped characters ------------------------------------------------------------------------


def test_shipped_characters_all_load() -> None:
    files = sorted(p for p in REPO_CHARACTERS.iterdir() if not p.name.startswith("."))
    assert files, "the shipped cards folder is empty"
    for path in files:
        assert path.stat().st_size < 50_000, path.name
        parse_card(path.read_bytes(), filename_hint=path.name)  # raises on a broken card
    store = CharacterStore(REPO_CHARACTERS)
    names = {c.name for c in store.list()}
    assert len(names) == len(files)
    assert {"Assistant", "Mira Vance", "Bramble"} <= names


def test_shipped_assistant_is_plain_v2() -> None:
    c = parse_card((REPO_CHARACTERS / "Assistant.json").read_bytes())
    assert c.source_format == "v2" and c.first_mes


@pytest.mark.parametrize("name", ["Mira Vance", "Bramble"])
def test_shipped_examples_are_complete(name: str) -> None:
    c = CharacterStore(REPO_CHARACTERS).get(name)
    for field in ("system_prompt", "description", "personality", "scenario", "first_mes"):
        assert getattr(c, field), f"{name} lacks {field}"
    assert len(c.alternate_greetings) == 1
    assert "<START>" in c.mes_example
    assert "{{char}}" in c.mes_example and "{{user}}" in c.mes_example


def test_shipped_png_and_lorebook() -> None:
    assert (REPO_CHARACTERS / "Bramble.png").read_bytes().startswith(b"\x89PNG")
    mira = CharacterStore(REPO_CHARACTERS).get("Mira Vance")
    assert mira.character_book is not None and 2 <= len(mira.character_book.entries) <= 3


# --- the user's folder over the shipped cards ---------------------------------------------------


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_shipped_cards_are_listed_from_any_user_folder_and_never_written(tmp_path: Path) -> None:
    before = _fingerprint(SHIPPED_CHARACTERS)
    store = CharacterStore(tmp_path / "mine", shipped=SHIPPED_CHARACTERS)
    assert {"Assistant", "Mira Vance", "Bramble"} <= {c.name for c in store.list()}

    # An upload of a shipped name needs overwrite, and then shadows the shipped card.
    with pytest.raises(CharacterExistsError):
        store.save(card_bytes("Assistant", description="mine"))
    store.save(card_bytes("Assistant", description="mine"), overwrite=True)
    assert store.get("Assistant").description == "mine"
    assert [c.name for c in store.list()].count("Assistant") == 1
    assert (tmp_path / "mine" / "Assistant.json").is_file()

    # Deleting it removes the user's copy and hides the shipped one; the shipped file stays.
    store.delete("Assistant")
    store.delete("Bramble")
    with pytest.raises(KeyError):
        store.get("Assistant")
    with pytest.raises(KeyError):
        store.get("Bramble")
    names = {c.name for c in store.list()}
    assert "Assistant" not in names and "Bramble" not in names and "Mira Vance" in names
    assert _fingerprint(SHIPPED_CHARACTERS) == before

    # The deletion is remembered in the user's folder, across stores; a new upload is visible.
    again = CharacterStore(tmp_path / "mine", shipped=SHIPPED_CHARACTERS)
    assert "Bramble" not in {c.name for c in again.list()}
    again.save(card_bytes("Bramble", description="a new one"))
    assert again.get("Bramble").description == "a new one"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [".deleted.json", "Bramble.json"]
    assert _fingerprint(SHIPPED_CHARACTERS) == before
