"""The conversation database restarting, and away for a while, under a running server.

A PostgreSQL of this module's own (so stopping it cannot disturb other tests) is restarted with
``pg_ctl restart -m fast`` between chat turns: the next turn is answered, not a 500 from a pooled
connection the restart closed. While it is stopped every route that needs it answers 503 with
``Retry-After`` in its family's shape and ``/health`` says the database is unreachable; once it is
back service resumes and every acknowledged turn is stored exactly once. ``pg_ctl -w`` returns
once the server accepts connections (or is gone), so the test synchronises on those states.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import sqlalchemy as sa
from flask import Flask

from conftest import LiveServer, _binary
from kobold_api.api.errors import domain_error, error_response
from kobold_api.chat.conversations import ConversationStore
from kobold_api.chat.store_errors import DatabaseUnavailable
from kobold_api.engine.engine import Engine
from kobold_api.settings import Settings


class Postgres:
    """A throwaway PostgreSQL cluster (unix socket only) that a test may stop and start."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if not (initdb and self.pg_ctl):
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            if not shutil.which("runuser"):
                pytest.skip("running as root without runuser to start PostgreSQL as another user")
            self.run_as = ["runuser", "-u", "nobody", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="kobold-pg-restart-"))
        if self.run_as:
            shutil.chown(self.root, user="nobody")
        self.data = self.root / "data"
        # --no-sync: nothing here must survive a crash of the machine, and fsyncs are slow.
        subprocess.run([*self.run_as, initdb, "-D", str(self.data), "-A", "trust", "-U", "kobold", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.url = f"postgresql+psycopg2://kobold@/postgres?host={self.root}"

    def ctl(self, *args: str) -> None:
        """``pg_ctl -w``: returns once the server accepts connections (start, restart) or is gone (stop)."""
        options = ["-o", f"-k {self.root} -h '' -c fsync=off"] if args[0] in ("start", "restart") else []
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), *options, "-l", str(self.root / "log"),
                        "-w", "-t", "60", *args], check=True, capture_output=True, timeout=90)

    def close(self) -> None:
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    server = Postgres()
    try:
        server.ctl("start")
        yield server
    finally:
        server.close()


def test_a_restart_costs_no_request_and_an_outage_answers_503(
        postgres: Postgres, start_server: Callable[..., LiveServer], tiny_engine: Engine,
        test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, database_url=postgres.url))
    answers: list[requests.Response] = []

    def call(method: str, path: str, **kwargs: Any) -> requests.Response:
        answer = server.request(method, path, **kwargs)
        answers.append(answer)
        return answer

    conversation = call("POST", "/api/v1/conversations", json={"character": "Assistant"}).json()["result"]["id"]

    def turn(text: str) -> requests.Response:
        return call("POST", "/api/v1/chat", json={"conversation_id": conversation, "user_input": text,
                                                   "max_new_tokens": 3}, headers={"Idempotency-Key": text})

    # Several turns, so the pool holds connections the restart will close.
    for n in range(3):
        assert turn(f"before {n}").status_code == 200
        assert call("GET", f"/api/v1/conversations/{conversation}").status_code == 200

    postgres.ctl("restart", "-m", "fast")
    first = turn("after the restart")  # before anything else could have noticed the closed connections
    assert first.status_code == 200, first.text
    assert call("GET", "/health").status_code == 200

    postgres.ctl("stop", "-m", "fast")
    try:
        # The chat routes (Kobold's shape), the OpenAI extension (OpenAI's), /health.
        down = [turn("while it is down"),
                call("POST", "/api/v1/chat/stream", json={"conversation_id": conversation, "user_input": "x",
                                                          "max_new_tokens": 3}),
                call("GET", f"/api/v1/conversations/{conversation}"),
                call("GET", "/api/v1/conversations"),
                call("POST", "/api/v1/conversations", json={"character": "Assistant"}),
                call("PATCH", f"/api/v1/conversations/{conversation}/messages/-1", json={"text": "edited"})]
        for answer in down:
            assert answer.status_code == 503, (answer.request.method, answer.request.url, answer.text)
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["detail"]["type"] == "database_unavailable", answer.text
        openai = call("POST", "/v1/chat/completions", json={
            "model": "x", "conversation_id": conversation, "max_tokens": 3,
            "messages": [{"role": "user", "content": "while it is down"}]})
        assert openai.status_code == 503, openai.text
        assert int(openai.headers["Retry-After"]) >= 1
        error = openai.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "database_unavailable")
        assert "database" in error["message"]
        health = call("GET", "/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert health.json()["database"].startswith("unreachable")
        # What needs no database still works.
        stateless = call("POST", "/api/v1/chat", json={"user_input": "hi", "max_new_tokens": 2,
                                                       "history": {"internal": [], "visible": []}})
        assert stateless.status_code == 200, stateless.text
    finally:
        postgres.ctl("start")

    assert call("GET", "/health").status_code == 200
    retried = turn("while it is down")  # the client retries the refused turn with its key: it runs now
    assert retried.status_code == 200, retried.text
    assert "idempotent_replay" not in retried.json()["results"][0]
    replayed = turn("after the restart")  # a lost answer retried: answered from the store
    assert replayed.json()["results"][0]["idempotent_replay"] is True
    assert turn("last").status_code == 200

    assert not [a for a in answers if a.status_code >= 500 and a.status_code != 503], \
        [(a.request.method, a.request.url, a.status_code, a.text) for a in answers if a.status_code >= 500]
    messages = call("GET", f"/api/v1/conversations/{conversation}").json()["result"]["messages"]
    expected = ["before 0", "before 1", "before 2", "after the restart", "while it is down", "last"]
    assert [m["text"] for m in messages if m["role"] == "user"] == expected
    assert [m["role"] for m in messages[1:]] == ["user", "character"] * len(expected)  # one reply each
    engine = sa.create_engine(postgres.url)
    try:
        with engine.connect() as conn:
            keys = conn.execute(sa.text("SELECT idempotency_key, status FROM turns WHERE conversation_id = :c"),
                                {"c": conversation}).all()
    finally:
        engine.dispose()
    assert sorted(keys) == sorted((key, "done") for key in expected)


def _terminate(postgres: Postgres, dbapi_connection: Any) -> None:
    """End the backend behind ``dbapi_connection`` and wait until it is gone."""
    import psycopg2

    admin = psycopg2.connect(dbname="postgres", user="kobold", host=str(postgres.root))
    try:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s, 10000)", (dbapi_connection.get_backend_pid(),))
    finally:
        admin.close()


def test_a_transaction_that_lost_its_connection_runs_again_once(postgres: Postgres) -> None:
    """A connection lost after the pool checked it (between the ping and the first statement) costs
    nothing: the transaction never committed, so it runs again on a new connection, once."""
    store = ConversationStore(postgres.url)
    try:
        conversation = store.create("Assistant", "User", ["Hi"])
        victims: list[int] = []

        @sa.event.listens_for(store.engine, "checkout")
        def _kill_first(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            if not victims:
                victims.append(dbapi_connection.get_backend_pid())
                _terminate(postgres, dbapi_connection)

        store.add_turn(conversation.id, "hello", "hi there")
        assert len(victims) == 1
        texts = [m.text for m in store.get(conversation.id).messages]
        assert texts == ["Hi", "hello", "hi there"]  # stored once

        # Lost while committing, the outcome is unknown: not retried, answered as unavailable.
        sa.event.remove(store.engine, "checkout", _kill_first)
        commits: list[int] = []

        @sa.event.listens_for(store.engine, "commit")
        def _kill_at_commit(conn: Any) -> None:
            commits.append(1)
            _terminate(postgres, conn.connection.dbapi_connection)

        with pytest.raises(DatabaseUnavailable):
            store.add_message(conversation.id, "user", "lost")
        assert len(commits) == 1
        sa.event.remove(store.engine, "commit", _kill_at_commit)
        assert [m.text for m in store.get(conversation.id).messages] == texts  # the server rolled it back
    finally:
        store.close()


@pytest.mark.parametrize("path, body", [
    ("/api/v1/chat", {"detail": {"msg": "M", "type": "database_unavailable"}}),
    ("/v1/chat/completions", {"error": {"message": "M", "type": "server_error", "param": None,
                                        "code": "database_unavailable"}}),
    ("/api/chat", {"error": "M"}),
])
def test_database_unavailable_in_each_route_familys_shape(path: str, body: dict[str, Any]) -> None:
    with Flask(__name__).test_request_context(path):
        response = error_response(domain_error(DatabaseUnavailable("M")))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.get_json() == body
