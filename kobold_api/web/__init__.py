"""The chat page at ``/`` and its assets, shipped in the package (no build step, nothing
fetched at run time), and the files of the interactive API reference at ``/api/docs``.

The page is plain HTML, CSS and JavaScript; it talks to the server-side chat API from the
server's own origin, so the Origin checks of :mod:`kobold_api.api.security` pass as they are.
Neither the page nor its assets are behind the API key: the page asks for the key itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flask import Blueprint, Response, abort, send_from_directory

WEB_DIR = Path(__file__).resolve().parent
#: Strict: only this origin's scripts, styles and connections; no inline code, no frames.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: Swagger UI sets inline styles and shows data: images; still no inline or foreign scripts.
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: The page's own files that may be served.
_ASSETS = {"app.js", "style.css", "docs.js", "favicon.svg"}

page = Blueprint("page", __name__)


def swagger_dist() -> Path | None:
    """The folder of Swagger UI's files from the ``flask-swagger-ui`` package, if installed."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.origin:
        return None
    dist = Path(spec.origin).parent / "dist"
    return dist if (dist / "swagger-ui-bundle.js").is_file() else None


def _secured(response: Response, csp: str = PAGE_CSP) -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@page.route("/", methods=["GET"])
def index() -> Response:
    return _secured(send_from_directory(WEB_DIR, "index.html", mimetype="text/html", max_age=0))


@page.route("/assets/<name>", methods=["GET"])
def asset(name: str) -> Response:
    if name not in _ASSETS:
        abort(404)
    return _secured(send_from_directory(WEB_DIR, name, max_age=0))


@page.route("/assets/swagger/<name>", methods=["GET"])
def swagger_asset(name: str) -> Response:
    dist = swagger_dist()
    if dist is None or name not in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "favicon-32x32.png"):
        abort(404)
    return _secured(send_from_directory(dist, name, max_age=3600), DOCS_CSP)
