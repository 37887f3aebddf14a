"""Shared fixtures: a tiny random model built at test time, engines, and real waitress servers."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
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

#: Tiers a developer can run alone (README, "Tests"), set here so the modules stay as they are.
#: ``fast`` is everything but the other tiers: unit tests and API tests on the tiny model.
TIER_MARKERS = {
    "e2e": "the real default model (downloads its wheel from PyPI once)",
    "browser": "Chromium driving the chat page",
    "postgres": "a PostgreSQL server of their own",
    "cluster": "replicas behind HAProxy on PostgreSQL (deploy/local-cluster.sh)",
    "slow": "long property and fuzz runs, and importer builds of every family",
    "gpu": "an NVIDIA GPU (skipped without one)",
    "fast": "none of the above: unit tests and API tests on the tiny model",
}
#: Modules by tier; single tests join a tier by the fixtures they use (see below).
_MODULE_TIERS = {
    "test_chat_page": ("browser",), "test_cluster": ("cluster", "postgres"), "test_store_postgres": ("postgres",),
    "test_database_restart": ("postgres",), "test_openapi_fuzz": ("slow",), "test_no_5xx": ("slow",),
    "test_importer": ("slow",), "test_cuda": ("gpu",),
}
_FIXTURE_TIERS = {"default_model_dir": "e2e", "postgres_server": "postgres", "postgres_url": "postgres"}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in TIER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tiers = set(_MODULE_TIERS.get(item.module.__name__, ()) if item.module else ())
        tiers.update(tier for fixture, tier in _FIXTURE_TIERS.items() if fixture in item.fixturenames)
        tiers.update(marker.name for marker in item.iter_markers() if marker.name in TIER_MARKERS)
        for tier in tiers - {marker.name for marker in item.iter_markers()}:
            item.add_marker(tier)
        if not tiers:
            item.add_marker("fast")


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


_DATABASE_NUMBERS = itertools.count(1)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the session (unix socket only, in a temp dir): the
    socket's folder."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start PostgreSQL as another user")
        run_as = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="kobold-pg-"))
    if run_as:
        shutil.chown(root, user="nobody")
    data = root / "data"
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "kobold"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", f"-k {root} -h ''", "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True, timeout=60)
    try:
        yield str(root)
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL, as a SQLAlchemy URL."""
    import psycopg2

    name = f"test_{os.getpid()}_{next(_DATABASE_NUMBERS)}"
    connection = psycopg2.connect(dbname="postgres", user="kobold", host=postgres_server)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return f"postgresql+psycopg2://kobold@/{name}?host={postgres_server}"
