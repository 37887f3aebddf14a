"""The chat page at ``/`` and the API reference at ``/api/docs``: HTTP checks, then the page in a
real headless Chromium (Debian's ``chromium``, driven by Playwright) against a real server.

The browser tests skip, with the reason, where Chromium or Playwright is missing
(``scripts/install-test-deps.sh`` installs Chromium; ``.[test]`` installs Playwright).
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import LiveServer, close_server, make_engine, module_server
from kobold_api.engine.generation import STOP_ABORT
from kobold_api.settings import Settings
from model_probe import ModelProbe

#: Debian's Chromium; KOBOLD_API_TEST_CHROMIUM names another build of Chromium.
CHROMIUM = Path(os.environ.get("KOBOLD_API_TEST_CHROMIUM", "/usr/bin/chromium"))
#: What the page needs from Chromium here: headless, and nothing fetched from the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = "<img src=x onerror=alert(1)>"
#: Short replies keep the browser tests fast; the stop test asks for a long one.
FAST_SETTINGS = {"user_name": "Sam", "temperature": 0.8, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
                 "rep_pen": 1.0, "max_length": 12}


# --------------------------------------------------------------------------------------
# a server whose engine can be slowed down while a test watches a reply stream
# --------------------------------------------------------------------------------------
class Delay:
    """Seconds to sleep before each model run; 0 except while a test needs a slow reply."""

    seconds = 0.0


def slowable(engine: Any, delay: type[Delay]) -> Any:
    model = engine.generator.model
    for name in ("run_shared", "run_concat"):
        original = getattr(model, name, None)
        if original is None:
            continue

        def run(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if delay.seconds:
                time.sleep(delay.seconds)
            return _original(*args, **kwargs)

        setattr(model, name, run)
    return engine


@pytest.fixture(scope="module")
def page_engine(tiny_model_dir: Path) -> Iterator[Any]:
    engine = slowable(make_engine(tiny_model_dir, prefix_cache_mb=0), Delay)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def live(page_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = module_server(page_engine, tmp_path_factory.mktemp("chat-page"))
    yield server
    close_server(server)


@pytest.fixture
def slow() -> Iterator[type[Delay]]:
    Delay.seconds = 0.04
    yield Delay
    Delay.seconds = 0.0


# --------------------------------------------------------------------------------------
# cards
# --------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_card(card: dict[str, Any]) -> bytes:
    """A 1x1 PNG with ``card`` in a ``chara`` tEXt chunk, built byte by byte."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    chara = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + _chunk(b"tEXt", chara) + _chunk(b"IEND", b""))


def v2_card(name: str, **data: str) -> dict[str, Any]:
    return {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": name, "description": data.get("description", f"{name} is a test character."),
                     "personality": "", "scenario": "", "first_mes": data.get("first_mes", f"Hello, I am {name}."),
                     "mes_example": ""}}


# --------------------------------------------------------------------------------------
# HTTP: the page, its assets and the docs
# --------------------------------------------------------------------------------------
def test_page_is_served_with_a_strict_csp(live: LiveServer) -> None:
    response = live.get("/")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script src="/assets/app.js"' in response.text
    assert "http://" not in response.text and "https://" not in response.text  # nothing from the internet
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("docs.js", "javascript")):
        asset = live.get(f"/assets/{name}")
        assert asset.status_code == 200 and kind in asset.headers["Content-Type"], name
        assert "https://" not in asset.text, name
    assert "innerHTML" not in live.get("/assets/app.js").text  # text is only ever shown as text
    assert live.get("/assets/../app.py").status_code == 404
    assert live.get("/assets/__init__.py").status_code == 404


def test_docs_page_serves_swagger_ui_locally(live: LiveServer) -> None:
    response = live.get("/api/docs")
    assert response.status_code == 200
    assert "/assets/swagger/swagger-ui-bundle.js" in response.text and "/api/v1/generate" in response.text
    assert "https://" not in response.text
    assert "script-src 'self';" in response.headers["Content-Security-Policy"]
    bundle = live.get("/assets/swagger/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert live.get("/assets/swagger/swagger-ui.css").status_code == 200
    assert live.get("/assets/swagger/oauth2-redirect.html").status_code == 404


def test_page_needs_no_key_but_the_api_does(start_server: Callable[..., LiveServer], page_engine: Any,
                                            tmp_path: Path) -> None:
    settings = replace(Settings(), host="127.0.0.1", data_dir=str(tmp_path / "data"), threads=4, api_key="sekrit")
    server = start_server(page_engine, settings)
    assert server.get("/").status_code == 200
    assert server.get("/assets/app.js").status_code == 200
    assert server.get("/api/v1/characters").status_code == 401


# --------------------------------------------------------------------------------------
# the browser
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install-test-deps.sh (Debian's chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def open_page(browser: Any, url: str, settings: dict[str, Any] | None = None,
              viewport: dict[str, int] | None = None) -> Any:
    """A fresh browser context (its own localStorage) on ``url``, with the page's settings
    preset; alerts fail the test, other dialogs are accepted."""
    context = browser.new_context(viewport=viewport or {"width": 1200, "height": 800})
    context.add_init_script(
        f"if (!localStorage.getItem('kobold_api.settings')) "
        f"localStorage.setItem('kobold_api.settings', {json.dumps(json.dumps(settings or FAST_SETTINGS))});")
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.alerts = []
    page.errors = []
    page.answers = []  # what the next prompt() dialogs are answered with
    page.requested = []  # every URL the page asked for
    page.on("request", lambda request: page.requested.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))

    def on_dialog(dialog: Any) -> None:
        if dialog.type == "alert":
            page.alerts.append(dialog.message)
            dialog.dismiss()
        elif dialog.type == "prompt" and page.answers:
            dialog.accept(page.answers.pop(0))
        else:
            dialog.accept()

    page.on("dialog", on_dialog)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    return page


@pytest.fixture
def page(browser: Any, live: LiveServer) -> Iterator[Any]:
    page = open_page(browser, live.url + "/")
    yield page
    assert not page.errors, page.errors
    page.context.close()


def start_with(page: Any, character: str) -> str:
    """Click ``character`` in the list; returns the new conversation's id."""
    page.locator("button.character", has_text=character).first.click()
    page.wait_for_function("() => location.hash.startsWith('#c=')")
    page.wait_for_selector("#input:not([disabled])")
    return page.evaluate("decodeURIComponent(location.hash.slice(3))")


def wait_idle(page: Any) -> None:
    """Until the turn has ended and the page shows what the server stored."""
    page.wait_for_selector("body:not([data-busy])", timeout=30_000)
    assert page.locator(".message.pending").count() == 0 and page.locator("#send").is_visible()


def _poll(condition: Callable[[], Any], what: str, limit: float = 60.0) -> Any:
    """``condition``'s first truthy value; ``limit`` only bounds a test that is stuck."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def seed_turns(page: Any) -> None:
    """Give each turn the page sends a seed of its own and an EOS ban on its way: replies are the
    same on every run (never empty), and each regenerated one differs."""
    seeds = iter(range(100, 10_000))

    def seeded(route: Any) -> None:
        body = {**route.request.post_data_json, "sampler_seed": next(seeds), "ban_eos_token": True}
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/v1/chat/stream", seeded)


def test_chat_stream_regenerate_swipe_and_reload(page: Any, live: LiveServer, slow: Any) -> None:
    seed_turns(page)
    conversation_id = start_with(page, "Mira Vance")
    assert page.locator(".message.character").count() == 1  # the greeting
    # The reply streams: text shows up in the pending bubble while Stop is still offered. Each
    # change of the page is looked at as it happens, so a fast reply cannot slip between looks.
    page.evaluate("""() => {
        window.streamedWhileBusy = false;
        new MutationObserver(() => {
            const text = document.querySelector('.message.pending .text');
            if (text && text.textContent.length > 0 && !document.getElementById('stop').hidden) {
                window.streamedWhileBusy = true;
            }
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "Hello there, *Mira*!")
    page.press("#input", "Enter")
    wait_idle(page)
    assert page.evaluate("window.streamedWhileBusy")
    stored = live.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert [m["role"] for m in stored] == ["character", "user", "character"]
    assert stored[1]["text"] == "Hello there, *Mira*!"
    user = page.locator(".message.user .text").last
    assert user.locator("em").inner_text() == "Mira"  # markdown emphasis, built as elements
    # The random reply may hold markdown markers (*, _, `), which the page renders as elements.
    shown = page.locator(".message.character .text").last.inner_text()
    assert re.sub(r"[*_`]", "", shown).strip() == re.sub(r"[*_`]", "", stored[2]["text"]).strip()
    assert "tokens/s" in page.inner_text("#status") and "context" in page.inner_text("#status")

    page.click(".message.character:last-child .regenerate")
    wait_idle(page)
    page.wait_for_selector(".message.character:last-child .swipe-count:text('2/2')")
    swipes = live.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"][2]["swipes"]
    assert len(swipes) == 2
    page.click(".message.character:last-child .swipe-left")
    page.wait_for_selector(".message.character:last-child .swipe-count:text('1/2')")
    stored = live.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"][2]
    assert stored["swipe_id"] == 0 and stored["text"] == swipes[0]

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector(".message.character:last-child .swipe-count:text('1/2')")
    assert page.locator(".message.user .text").last.inner_text() == "Hello there, Mira!"
    assert page.locator(f"#conversations button[data-id='{conversation_id}']").count() == 1


def test_stop_aborts_a_long_reply(page: Any, live: LiveServer, page_engine: Any) -> None:
    results: list[Any] = []
    observe = lambda job, result: results.append(result)  # noqa: E731 - every finished generation
    page_engine.stats.observers.append(observe)
    try:
        # Greedy: a sampled reply could end (EOS, a stop string) before the probe holds it.
        page.evaluate("localStorage.setItem('kobold_api.settings', JSON.stringify("
                      "{...JSON.parse(localStorage.getItem('kobold_api.settings')), max_length: 400, temperature: 0}))")
        conversation_id = start_with(page, "Assistant")
        with ModelProbe(page_engine) as probe:
            # The reply is held mid-generation (after a few tokens) until Stop has reached the
            # server, so it is still running when Stop is pressed, however fast or slow the machine.
            probe.hold(after=8)
            page.fill("#input", "Tell me a very long story.")
            page.click("#send")
            probe.wait_held()
            page.wait_for_selector("#stop:not([hidden])")
            page.click("#stop")
            _poll(lambda: [job for job in page_engine.active_jobs() if job.cancel_token.cancelled],
                  "Stop to reach the running generation")
            probe.release()
            wait_idle(page)
        stopped = _poll(lambda: results, "the stopped generation to end")[0]
        assert stopped.stop_reason == STOP_ABORT and stopped.completion_tokens < 400
    finally:
        page_engine.stats.observers.remove(observe)
    assert "Stopped" in page.inner_text("#status")
    stored = live.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]
    assert len(stored) == 1  # an aborted turn stores nothing
    assert page.locator(".message").count() == 1
    # The server is free again: the next turn goes through.
    page.evaluate("localStorage.setItem('kobold_api.settings', JSON.stringify("
                  "{...JSON.parse(localStorage.getItem('kobold_api.settings')), max_length: 4}))")
    page.fill("#input", "Short, please.")
    page.click("#send")
    wait_idle(page)
    assert len(live.get(f"/api/v1/conversations/{conversation_id}").json()["result"]["messages"]) == 3


def test_upload_png_card_then_drop_a_json_card(page: Any, live: LiveServer, tmp_path: Path) -> None:
    card = tmp_path / "Pip.png"
    card.write_bytes(png_card(v2_card("Pip Lantern", description="A lamplighter who talks to moths.")))
    page.set_input_files("#card-file", str(card))
    page.wait_for_selector("button.character:has-text('Pip Lantern')")
    assert "Added Pip Lantern" in page.inner_text("#upload-status")
    assert "lamplighter" in page.locator("button.character", has_text="Pip Lantern").inner_text()
    assert any(c["name"] == "Pip Lantern" for c in live.get("/api/v1/characters").json()["results"])
    # Drag and drop: a File in a DataTransfer, dropped on the zone.
    dropped = json.dumps(v2_card("Dropped Dana"))
    page.evaluate("""(text) => {
        const data = new DataTransfer();
        data.items.add(new File([text], 'dana.json', {type: 'application/json'}));
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""", dropped)
    page.wait_for_selector("button.character:has-text('Dropped Dana')")
    # The PNG card's picture replaces its initials (it loaded: a 1x1 image); a JSON card keeps them.
    picture = page.wait_for_selector("button.character:has-text('Pip Lantern') .avatar img.picture")
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 1", arg=picture)
    assert page.locator("button.character:has-text('Dropped Dana') .avatar img").count() == 0
    start_with(page, "Pip Lantern")
    assert page.locator(".message.character .text").first.inner_text() == "Hello, I am Pip Lantern."


def test_html_in_a_card_is_shown_as_text(page: Any, live: LiveServer) -> None:
    card = v2_card("Mallory", description=f"Tries {XSS} on every page.",
                   first_mes=f"Look: {XSS} and **bold** and\n```\n<b>code</b>\n```")
    assert live.post("/api/v1/characters", data=json.dumps(card)).status_code == 201
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    entry = page.locator("button.character", has_text="Mallory")
    assert XSS in entry.inner_text()
    start_with(page, "Mallory")
    greeting = page.locator(".message.character .text").first
    assert XSS in greeting.inner_text()
    assert greeting.locator("strong").inner_text() == "bold"
    assert greeting.locator("pre code").inner_text() == "<b>code</b>"
    # No element came from the card's text (the only images are PNG cards' avatars, built by the page).
    assert page.locator("img:not(.avatar > img.picture)").count() == 0 and page.locator("b").count() == 0
    assert page.locator("img[src=x]").count() == 0 and page.locator("[onerror]").count() == 0
    # Nor was one ever made: an <img> asks for its src as soon as it exists, even detached, and
    # the page (several round trips since it showed the card) never asked for "x". With no such
    # element and no inline handler anywhere, no alert came and none can come later.
    assert not [url for url in page.requested if url.rstrip("/").endswith("/x")], page.requested
    assert page.alerts == []


def test_edit_delete_continue_impersonate_rename(page: Any, live: LiveServer) -> None:
    conversation_id = start_with(page, "Assistant")
    page.fill("#input", "First line")
    page.press("#input", "Enter")
    wait_idle(page)
    page.click(".message.character:last-child .edit")
    page.fill(".message.character:last-child .edit-box", "Edited **reply**")
    page.click(".message.character:last-child .save")
    page.wait_for_selector(".message.character:last-child strong:text('reply')")
    url = f"/api/v1/conversations/{conversation_id}"
    assert live.get(url).json()["result"]["messages"][-1]["text"] == "Edited **reply**"

    page.click("#continue")
    wait_idle(page)
    assert live.get(url).json()["result"]["messages"][-1]["text"].startswith("Edited **reply**")

    # The page's request gets a seed and an EOS ban on its way, so the suggested line is known: the
    # same request sent here gives it, and it is longer than what was typed.
    sent: list[dict[str, Any]] = []

    def seeded_turn(route: Any) -> None:
        body = {**route.request.post_data_json, "sampler_seed": 7, "ban_eos_token": True}
        sent.append(body)
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/v1/chat/stream", seeded_turn)
    page.fill("#input", "I say")
    page.click("#impersonate")
    wait_idle(page)
    page.unroute("**/api/v1/chat/stream")
    assert len(sent) == 1 and sent[0]["impersonate"] is True and sent[0]["user_input"] == "I say"
    suggestion = live.post("/api/v1/chat", json=sent[0]).json()["results"][0]["text"]
    assert suggestion.startswith("I say") and len(suggestion) > len("I say")
    # The page put the suggested line in the input (a textarea's value turns CR and CRLF into LF,
    # and a random model's suggestion may hold a CR).
    assert page.input_value("#input") == suggestion.replace("\r\n", "\n").replace("\r", "\n")
    assert len(live.get(url).json()["result"]["messages"]) == 3  # a suggestion, not a stored turn
    page.fill("#input", "")

    page.locator(".message.user .delete").last.click()  # confirm() is accepted
    page.wait_for_function("() => document.querySelectorAll('.message.user').length === 0")
    assert [m["role"] for m in live.get(url).json()["result"]["messages"]] == ["character", "character"]

    page.answers.append("Renamed chat")
    page.click(f"#conversations li:has(button[data-id='{conversation_id}']) .rename")
    page.wait_for_selector("#chat-title:text('Renamed chat')")
    assert live.get(url).json()["result"]["title"] == "Renamed chat"
    page.click(f"#conversations li:has(button[data-id='{conversation_id}']) .delete")
    page.wait_for_selector(f"#conversations button[data-id='{conversation_id}']", state="detached")
    assert live.get(url).status_code == 404


def test_api_key_is_asked_once_and_kept(browser: Any, start_server: Callable[..., LiveServer], page_engine: Any,
                                        tmp_path: Path) -> None:
    settings = replace(Settings(), host="127.0.0.1", data_dir=str(tmp_path / "data"), threads=8, api_key="sekrit")
    server = start_server(page_engine, settings)
    context = browser.new_context()
    page = context.new_page()
    prompts: list[str] = []

    def answer(dialog: Any) -> None:
        prompts.append(dialog.message)
        dialog.accept("sekrit")

    page.on("dialog", answer)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("button.character:has-text('Mira Vance')")
    assert len(prompts) == 1 and "key" in prompts[0]
    assert page.evaluate("localStorage.getItem('kobold_api.key')") == "sekrit"
    page.reload()
    page.wait_for_selector("button.character:has-text('Mira Vance')")
    assert len(prompts) == 1
    context.close()


def test_phone_layout_and_docs_page(browser: Any, live: LiveServer) -> None:
    page = open_page(browser, live.url + "/", viewport={"width": 390, "height": 800})
    assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < 0
    page.click("#open-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    start_with(page, "Bramble")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    page.goto(live.url + "/api/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=15_000)  # Swagger UI ran under the CSP
    assert page.locator(".opblock-summary-path", has_text="/api/v1/chat/stream").count() >= 1
    page.context.close()


def test_a_png_cards_picture_is_served(live: LiveServer) -> None:
    card = png_card(v2_card("Moth Keeper"))
    assert live.post("/api/v1/characters", data=card, headers={"Content-Type": "image/png"}).status_code == 201
    listed = {c["name"]: c for c in live.get("/api/v1/characters").json()["results"]}
    assert listed["Moth Keeper"]["avatar"] is True and listed["Assistant"]["avatar"] is False
    response = live.get("/api/v1/characters/Moth Keeper/avatar")
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert response.content == card
    assert live.get("/api/v1/characters/Assistant/avatar").status_code == 404  # a JSON card has none
    assert live.get("/api/v1/characters/Nobody/avatar").status_code == 404
