"""Shared fixtures: a tiny random model built at test time, engines, and real waitress servers."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from waitress.server import create_server

from kobold_api.app import create_app
from kobold_api.engine.engine import Engine
from kobold_api.engine.prepare import prepare_model
from kobold_api.server import waitress_options
from kobold_api.settings import Settings

from tiny_model import build_tiny_hf_model

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Shared with `kobold-api serve` (default data dir), so a test run also warms the server's cache.
DEFAULT_MODEL_CACHE = REPO_ROOT / "data" / "models"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model through the real `prepare` path (HF folder -> builder int4 graph)."""
    root = tmp_path_factory.mktemp("tiny-model")
    hf_dir = build_tiny_hf_model(root / "hf")
    return prepare_model(str(hf_dir), "cpu", root / "cache")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct from the PyPI wheel, prepared once (about 30 s) and cached."""
    return prepare_model("default", "cpu", DEFAULT_MODEL_CACHE, progress=print)


def make_engine(model_dir: Path, **kwargs: Any) -> Engine:
    """An engine on a prepared model; one request at a time unless ``max_batch_size`` says otherwise."""
    kwargs.setdefault("max_batch_size", 1)
    return Engine.load(str(model_dir), "cpu", model_dir.parent, cpu_threads=2, **kwargs)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = make_engine(tiny_model_dir, prefix_cache_mb=0)
    yield engine
    engine.shutdown()


@pytest.fixture
def test_settings(tmp_path: Path) -> Settings:
    """Default settings with the data dir (and so the user's characters) under ``tmp_path``."""
    return replace(Settings(), host="127.0.0.1", port=5000, data_dir=str(tmp_path / "data"), threads=8)


class LiveServer:
    """A real waitress server on a free loopback port, in a background thread."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self._server = create_server(app, host="127.0.0.1", port=0, **waitress_options(settings))
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """waitress's own run() loop cannot be stopped from another thread without racing its
        select() on closed sockets, so loop in small steps and close from this thread."""
        while not self._stop.is_set():
            self._server.asyncore.loop(timeout=0.05, map=self._server._map, count=1)
        self._server.close()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, timeout=60, **kwargs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()


def module_server(engine: Engine, root: Path) -> LiveServer:
    """A server with default settings under ``root``, for a module-scoped fixture (closing a
    waitress server takes about a second, which would dominate a module's run time)."""
    settings = replace(Settings(), host="127.0.0.1", port=5000, data_dir=str(root / "data"), threads=8)
    return LiveServer(create_app(settings, engine), settings)


def close_server(server: LiveServer) -> None:
    server.close()
    server.app.extensions["kobold_api"].chat.conversations.close()


@pytest.fixture
def start_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``start_server(engine, settings)``; every server is closed after the test."""
    servers: list[LiveServer] = []

    def start(engine: Engine, settings: Settings) -> LiveServer:
        server = LiveServer(create_app(settings, engine), settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        server.app.extensions["kobold_api"].chat.conversations.close()


@pytest.fixture
def server(start_server: Callable[..., LiveServer], tiny_engine: Engine, test_settings: Settings) -> LiveServer:
    """A server on the tiny model with default settings."""
    return start_server(tiny_engine, test_settings)
