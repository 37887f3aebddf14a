"""Screenshots of the chat page (desktop and phone width) for the README, into docs/.

    .venv/bin/python scripts/screenshots.py [--model default|PATH] [--out docs]

Starts a server in this process on a throwaway data dir (the default model unless --model says
otherwise), holds one short conversation with a shipped character, and photographs the main
views with the headless Chromium the browser tests use (/usr/bin/chromium, through Playwright).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from playwright.sync_api import sync_playwright
from waitress.server import create_server

from kobold_api.app import create_app
from kobold_api.server import waitress_options
from kobold_api.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SETTINGS = {"user_name": "Sam", "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "rep_pen": 1.1,
            "max_length": 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="kobold-shots-"))
    # The model cache is the repository's (shared with `kobold-api serve`); the chats are throwaway.
    settings = replace(Settings(), model=args.model, data_dir=str(data), threads=8,
                       cache_dir=str(ROOT / "data" / "models"))
    app = create_app(settings)
    server = create_server(app, host="127.0.0.1", port=0, **waitress_options(settings))
    url = f"http://127.0.0.1:{server.effective_port}"
    threading.Thread(target=server.run, daemon=True).start()
    conversation = ""

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for scheme in ("light", "dark"):
            context = browser.new_context(viewport=DESKTOP, color_scheme=scheme)
            context.add_init_script(f"localStorage.setItem('kobold_api.settings', {json.dumps(json.dumps(SETTINGS))});")
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(url + "/" + (conversation if scheme == "dark" else ""))
            page.wait_for_selector("body[data-ready=true]")
            if scheme == "light":
                page.locator("button.character", has_text="Mira Vance").click()
                page.wait_for_selector("#input:not([disabled])")
                page.fill("#input", "Hi Mira! What are you working on tonight?")
                page.press("#input", "Enter")
                page.wait_for_selector("body:not([data-busy])")
                page.locator(".message.character .regenerate").last.click()
                page.wait_for_selector("body:not([data-busy])")
                conversation = page.evaluate("location.hash")
            else:
                page.wait_for_selector(".message.user")
            page.screenshot(path=str(out / f"chat-desktop-{scheme}.png"))
            if scheme == "light":
                page.click("#open-settings")
                page.screenshot(path=str(out / "chat-desktop-settings.png"))
            context.close()
        context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/" + conversation)
        page.wait_for_selector(".message.user")
        page.screenshot(path=str(out / "chat-phone.png"))
        page.click("#open-sidebar")
        page.wait_for_timeout(400)  # the sidebar slides in
        page.screenshot(path=str(out / "chat-phone-sidebar.png"))
        context.close()
        browser.close()
    server.close()
    print("wrote", ", ".join(sorted(p.name for p in out.glob("chat-*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
