"""Two replicas on one PostgreSQL behind HAProxy, started by ``deploy/local-cluster.sh`` on loopback.

What a user who outgrows one process relies on: a conversation keeps the replica whose KV cache is
warm, a card uploaded to one replica is seen by all, two clients on different replicas never
interleave turns on one conversation, and a replica killed mid-stream loses no acknowledged turn
(its lease runs out, the other replica carries on, an ``Idempotency-Key`` retry is answered once).

Skipped, saying why, where PostgreSQL's server binaries or HAProxy cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from free_ports import PORT_IN_USE, free_ports

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "local-cluster.sh"
#: Short, so the kill test's waiting turn gets the conversation within seconds.
LEASE_SECONDS = 3
#: Conversation ids that HAProxy's consistent hash sends to both of two replicas.
SPREAD_KEYS = [f"conversation-{i}" for i in range(8)]
#: local-cluster.sh's exit status when the Debian packages are missing and cannot be installed.
NO_PACKAGES = 3

pytest.importorskip("psycopg2", reason="psycopg2 is not installed")


class Cluster:
    def __init__(self, state: Path, env: dict[str, str]) -> None:
        values = dict(line.split("=", 1) for line in (state / "cluster.env").read_text().splitlines())
        self.state = state
        self.env = env
        self.proxy = values["PROXY_URL"]
        self.replicas = {f"r{i + 1}": url for i, url in enumerate(values["REPLICA_URLS"].strip('"').split())}
        self.database_url = values["DATABASE_URL"]

    def pid(self, replica: str) -> int:
        return int((self.state / f"replica-{replica[1:]}.pid").read_text())

    def turn_rows(self, conversation_id: str) -> list[dict[str, Any]]:
        import psycopg2

        host = self.database_url.split("host=", 1)[1]
        with psycopg2.connect(dbname="postgres", user="kobold", host=host) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT idempotency_key, status, owner, attempt, started_at, finished_at FROM turns "
                           "WHERE conversation_id = %s ORDER BY started_at", (conversation_id,))
            names = [c.name for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[Cluster]:
    if not shutil.which("bash"):
        pytest.skip("no bash to run deploy/local-cluster.sh")
    # Directly under the temp folder and world-traversable: as root, PostgreSQL runs as another user.
    state = Path(tempfile.mkdtemp(prefix="kc-"))
    os.chmod(state, 0o755)
    data = Path(tempfile.mkdtemp(prefix="kc-data-"))
    env = {**os.environ, "PYTHON": sys.executable, "KOBOLD_API_TURN_LEASE_SECONDS": str(LEASE_SECONDS),
           "KOBOLD_API_LOG_LEVEL": "WARNING"}
    for attempt in range(3):  # a port taken after all between the pick and the bind: pick again
        base = free_ports(3)  # the proxy and two replicas
        started = subprocess.run([str(SCRIPT), "up", "--replicas", "2", "--port", str(base), "--model",
                                  str(tiny_model_dir), "--data-dir", str(data), "--dir", str(state)],
                                 env=env, capture_output=True, text=True, timeout=600)
        if started.returncode in (0, NO_PACKAGES) or PORT_IN_USE not in _logs(state):
            break
        subprocess.run([str(SCRIPT), "down", "--dir", str(state)], env=env, capture_output=True, timeout=120)
    try:
        if started.returncode == NO_PACKAGES:
            pytest.skip(f"the cluster's Debian packages are missing: {started.stderr.strip()[-300:]}")
        assert started.returncode == 0, started.stderr[-3000:]
        assert started.stdout.strip() == f"http://127.0.0.1:{base}"
        yield Cluster(state, env)
    finally:
        subprocess.run([str(SCRIPT), "down", "--dir", str(state)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def _logs(state: Path) -> str:
    """What a failed start-up left in its logs (the replicas' and HAProxy's)."""
    return "".join(log.read_text(errors="replace") for log in state.glob("*.log"))


def _new_conversation(url: str) -> str:
    created = requests.post(f"{url}/api/v1/conversations", json={"character": "Mira Vance"}, timeout=30)
    assert created.status_code == 201, created.text
    return created.json()["result"]["id"]


def _turn(url: str, conversation_id: str, text: str, headers: dict[str, str] | None = None,
          **extra: Any) -> requests.Response:
    body = {"conversation_id": conversation_id, "user_input": text, "max_new_tokens": 6, **extra}
    return requests.post(f"{url}/api/v1/chat", json=body, headers=headers or {}, timeout=120)


def _messages(url: str, conversation_id: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{url}/api/v1/conversations/{conversation_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]["messages"]


def test_health_metrics_and_the_replica_header(cluster: Cluster) -> None:
    for name, url in cluster.replicas.items():
        health = requests.get(f"{url}/health", timeout=10)
        assert health.status_code == 200
        assert health.headers["X-Kobold-Replica"] == name
        assert health.json() | {"check_seconds": 0} == {
            "status": "ok", "replica": name, "model": health.json()["model"], "model_loaded": True,
            "database": "ok", "requests_waiting": 0, "requests_running": 0, "check_seconds": 0}
    through = requests.post(f"{cluster.proxy}/api/v1/generate", json={"prompt": "The lamp", "max_length": 5},
                            timeout=60)
    assert through.status_code == 200
    replica = through.headers["X-Kobold-Replica"]
    gauges = ("kobold_api_requests_waiting", "kobold_api_requests_running", "kobold_api_kv_cache_usage_ratio",
              "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
    # Idle again: the engine tidies its batch (and so the KV gauge) just after the client has its
    # answer, so the gauges are waited for rather than read once.
    deadline = time.monotonic() + 60
    while True:
        metrics = requests.get(f"{cluster.replicas[replica]}/metrics", timeout=10)
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.text.splitlines() if line and not line.startswith("#")}
        if all(values[gauge] == 0 for gauge in gauges):
            break
        assert time.monotonic() < deadline, {gauge: values[gauge] for gauge in gauges}
        time.sleep(0.05)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert values["kobold_api_generation_tokens_total"] >= 5
    assert values["kobold_api_time_to_first_token_seconds_count"] >= 1
    assert values["kobold_api_decode_tokens_per_second_count"] >= 1
    assert f'kobold_api_replica_info{{model="{Path(str(health.json()["model"])).name}",replica="{replica}"}}' \
        in metrics.text


def test_a_conversation_keeps_its_replica(cluster: Cluster) -> None:
    for _ in range(6):
        conversation_id = _new_conversation(cluster.proxy)
        header = {"X-Conversation-Id": conversation_id}
        replicas = set()
        for index in range(2):
            answer = _turn(cluster.proxy, conversation_id, f"turn {index}", header)
            assert answer.status_code == 200, answer.text
            replicas.add(answer.headers["X-Kobold-Replica"])
        # Without the header, the body's conversation_id and the conversation routes' path agree.
        replicas.add(_turn(cluster.proxy, conversation_id, "no header").headers["X-Kobold-Replica"])
        replicas.add(requests.get(f"{cluster.proxy}/api/v1/conversations/{conversation_id}",
                                  timeout=30).headers["X-Kobold-Replica"])
        assert len(replicas) == 1, replicas
    # The hash spreads conversations: these ids (fixed, so the check holds on every run; HAProxy's
    # consistent hash places the replicas by their order, not their ports) go to both replicas.
    spread = {key: requests.get(f"{cluster.proxy}/health", headers={"X-Conversation-Id": key},
                                timeout=30).headers["X-Kobold-Replica"] for key in SPREAD_KEYS}
    assert set(spread.values()) == {"r1", "r2"}, spread
    # A Kobold client that names no conversation stays with its prompt's first 256 bytes (a chat's
    # system prompt and card), whatever the turns after them say.
    for opening in ("You are Mira, keeper of the lighthouse. ", "A tale of two ships. ", "System: be brief. "):
        where = {requests.post(f"{cluster.proxy}/api/v1/generate",
                               json={"prompt": opening * 20 + f"\nUser: turn {i}\nMira:", "max_length": 3},
                               timeout=60).headers["X-Kobold-Replica"] for i in range(3)}
        assert len(where) == 1, (opening, where)


def test_a_card_uploaded_to_one_replica_is_seen_by_all(cluster: Cluster) -> None:
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Harbour Master Osei", "description": "Keeps the ledger of every ship.",
                     "first_mes": "Name and cargo?", "personality": "", "scenario": "", "mes_example": ""}}
    uploaded = requests.post(f"{cluster.replicas['r1']}/api/v1/characters", data=json.dumps(card),
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert uploaded.status_code == 201, uploaded.text
    on_r2 = requests.get(f"{cluster.replicas['r2']}/api/v1/characters/Harbour Master Osei", timeout=30)
    assert on_r2.status_code == 200
    assert on_r2.json()["result"]["data"]["first_mes"] == "Name and cargo?"
    created = requests.post(f"{cluster.replicas['r2']}/api/v1/conversations",
                            json={"character": "Harbour Master Osei"}, timeout=30)
    assert created.json()["result"]["messages"][0]["text"] == "Name and cargo?"


def test_two_clients_on_different_replicas_take_turns(cluster: Cluster) -> None:
    conversation_id = _new_conversation(cluster.proxy)
    failures: list[str] = []

    def client(name: str, url: str) -> None:
        for index in range(4):
            answer = _turn(url, conversation_id, f"{name}{index}", max_new_tokens=12)
            if answer.status_code != 200:
                failures.append(f"{name}{index}: {answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=client, args=(name, cluster.replicas[replica]))
               for name, replica in (("A", "r1"), ("B", "r2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert failures == []
    messages = _messages(cluster.proxy, conversation_id)[1:]  # after the greeting
    assert [m["role"] for m in messages] == ["user", "character"] * 8  # each reply right after its message
    users = [m["text"] for m in messages if m["role"] == "user"]
    assert sorted(users) == [f"{n}{i}" for n in "AB" for i in range(4)]
    for name in "AB":  # each client's own turns in its order
        assert [u for u in users if u.startswith(name)] == [f"{name}{i}" for i in range(4)]
    rows = cluster.turn_rows(conversation_id)
    assert [r["status"] for r in rows] == ["done"] * 8
    assert {r["owner"].split("/")[0] for r in rows} == {"r1", "r2"}
    for earlier, later in zip(rows, rows[1:]):  # the database's leases never overlapped
        assert earlier["finished_at"] <= later["started_at"]


def test_a_replica_killed_mid_stream_loses_no_acknowledged_turn(cluster: Cluster) -> None:
    conversation_id = _new_conversation(cluster.proxy)
    header = {"X-Conversation-Id": conversation_id}
    for index in range(2):
        assert _turn(cluster.proxy, conversation_id, f"kept {index}", header).status_code == 200
    acknowledged = _messages(cluster.proxy, conversation_id)
    owner = _turn(cluster.proxy, conversation_id, "where am I?", header).headers["X-Kobold-Replica"]
    acknowledged = _messages(cluster.proxy, conversation_id)

    # Long enough to be running when the replica dies: no end of text, and a grammar without the
    # newline that chat stop strings (and a random model's output) would end it with.
    doomed = {"conversation_id": conversation_id, "user_input": "a long story, please", "max_new_tokens": 2500,
              "max_context_length": 4096, "ban_eos_token": True, "grammar": "root ::= [a-z ]+"}
    retry_headers = {**header, "Idempotency-Key": "story-1"}
    stream = requests.post(f"{cluster.proxy}/api/v1/chat/stream", json=doomed, headers=retry_headers,
                           stream=True, timeout=60)
    assert stream.headers["X-Kobold-Replica"] == owner
    lines = stream.iter_lines()
    assert any(line.startswith(b"data:") and b'"token"' in line for line in lines)  # it is generating
    os.kill(cluster.pid(owner), signal.SIGKILL)
    with pytest.raises(requests.exceptions.RequestException):
        for line in lines:
            assert b'"results"' not in line  # the turn never finished
    other = "r2" if owner == "r1" else "r1"

    # The conversation carries on on the other replica once the dead one's lease ran out.
    after = _turn(cluster.proxy, conversation_id, "still there?", header)
    assert after.status_code == 200, after.text
    assert after.headers["X-Kobold-Replica"] == other
    messages = _messages(cluster.proxy, conversation_id)
    assert messages[:len(acknowledged)] == acknowledged
    assert [m["text"] for m in messages[len(acknowledged):] if m["role"] == "user"] == ["still there?"]
    rows = cluster.turn_rows(conversation_id)
    killed = [r for r in rows if r["idempotency_key"] == "story-1"]
    assert [(r["status"], r["attempt"]) for r in killed] == [("failed", 1)]

    # The client's retry with the same key runs the turn once; a second retry is answered from the store.
    retried = requests.post(f"{cluster.proxy}/api/v1/chat", json=doomed, headers=retry_headers, timeout=300)
    assert retried.status_code == 200, retried.text
    first = retried.json()["results"][0]
    assert "idempotent_replay" not in first
    again = requests.post(f"{cluster.proxy}/api/v1/chat", json=doomed, headers=retry_headers, timeout=60)
    second = again.json()["results"][0]
    assert second["idempotent_replay"] is True
    assert second["text"] == first["text"]
    final = _messages(cluster.proxy, conversation_id)
    assert [m["text"] for m in final if m["role"] == "user"].count("a long story, please") == 1
    assert final[-1]["text"] == first["text"]
    assert [(r["status"], r["attempt"]) for r in cluster.turn_rows(conversation_id)
            if r["idempotency_key"] == "story-1"] == [("done", 2)]
    # The same key with another request is refused, and nothing is stored for it.
    reused = requests.post(f"{cluster.proxy}/api/v1/chat", json={**doomed, "user_input": "something else"},
                           headers=retry_headers, timeout=60)
    assert reused.status_code == 422
    assert reused.json()["detail"]["type"] == "idempotency_key_reused"
    assert len(_messages(cluster.proxy, conversation_id)) == len(final)
