"""Safe defaults, with real requests: who may reach the server (Host), which browser pages may
touch stored characters and conversations (Origin), the admin key, the default bind address and
the start-up warning. Clients' usual setups (no Origin: curl, SillyTavern's server, the Horde
worker, the OpenAI SDK; a LAN address with a key) keep working."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest
import requests
from websockets.sync.client import connect

from free_ports import PORT_IN_USE, free_ports
from kobold_api.api.access import AccessPolicy, exposure_warnings, is_loopback, split_host
from kobold_api.api.textgen.websocket import WebSocketServer
from kobold_api.settings import Settings, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
CHARS = "/api/v1/characters"
CONVS = "/api/v1/conversations"
EVIL = {"Origin": "http://evil.example"}
CARD = {"name": "Secret Sue", "description": "Sue keeps the user's secrets.", "personality": "", "scenario": "",
        "first_mes": "Hi, it's Sue.", "mes_example": ""}
GENERATE = {"prompt": "Once upon a time", "max_length": 2}


def upload(server: Any, card: dict[str, Any] = CARD, headers: dict[str, str] | None = None,
           **params: str) -> requests.Response:
    return server.post(CHARS, data=json.dumps(card), params=params, headers=headers or {})


def new_conversation(server: Any, headers: dict[str, str] | None = None) -> str:
    response = server.post(CONVS, json={"character": "Assistant", "user_name": "Sam"}, headers=headers or {})
    assert response.status_code == 201, response.text
    return response.json()["result"]["id"]


def message_count(server: Any, conversation_id: str, headers: dict[str, str] | None = None) -> int:
    response = server.get(f"{CONVS}/{conversation_id}", headers=headers or {})
    assert response.status_code == 200, response.text
    return len(response.json()["result"]["messages"])


def acao(response: requests.Response) -> str | None:
    return response.headers.get("Access-Control-Allow-Origin")


# --------------------------------------------------------------------------------------
# Origin: any page may generate; only trusted pages may touch stored data
# --------------------------------------------------------------------------------------
def test_foreign_origin_cannot_read_or_change_conversations(server: Any) -> None:
    conversation_id = new_conversation(server)
    assert upload(server).status_code == 201
    for method, path in (("GET", CONVS), ("GET", f"{CONVS}/{conversation_id}"), ("GET", f"{CONVS}/{conversation_id}/export"),
                         ("GET", CHARS), ("GET", f"{CHARS}/Secret Sue"), ("DELETE", f"{CONVS}/{conversation_id}"),
                         ("PATCH", f"{CONVS}/{conversation_id}"), ("DELETE", f"{CONVS}/{conversation_id}/messages/0"),
                         ("DELETE", f"{CHARS}/Secret Sue"), ("POST", CONVS)):
        response = server.request(method, path, headers=EVIL, json={"title": "pwned"})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["detail"]["type"] == "forbidden_origin"
        assert "cors_origins" in response.json()["detail"]["msg"]
        assert acao(response) is None, (method, path)  # the page cannot even read the refusal
    # A "simple" cross-origin POST (text/plain: no preflight) is refused too, not just unreadable.
    created = server.post(CONVS, data=json.dumps({"character": "Assistant"}),
                          headers={**EVIL, "Content-Type": "text/plain"})
    assert created.status_code == 403
    # Nothing was lost or added: the same data, read without an Origin (curl, SillyTavern's server).
    listing = server.get(CONVS).json()["results"]
    assert [c["id"] for c in listing] == [conversation_id]
    assert listing[0]["title"] != "pwned" and message_count(server, conversation_id) == 1
    assert server.get(f"{CHARS}/Secret Sue").status_code == 200


def test_foreign_origin_still_generates(server: Any) -> None:
    generated = server.post("/api/v1/generate", json=GENERATE, headers=EVIL)
    assert generated.status_code == 200 and acao(generated) == "*"
    for path in ("/api/v1/model", "/api/extra/version", "/v1/models", "/api/extra/true_max_context_length"):
        response = server.get(path, headers=EVIL)
        assert response.status_code == 200 and acao(response) == "*", path
    completion = server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=EVIL)
    assert completion.status_code == 200 and acao(completion) == "*"
    # Stateless chat with a shipped character is generation too (text-generation-webui's example body).
    turn = server.post("/api/v1/chat", json={"user_input": "Hi", "character": "Example", "max_new_tokens": 2},
                       headers=EVIL)
    assert turn.status_code == 200, turn.text
    # Kobold Lite on its own site, in Chrome: a preflight that asks for private-network access.
    preflight = server.request("OPTIONS", "/api/extra/generate/stream", headers={
        "Origin": "https://lite.koboldai.net", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type", "Access-Control-Request-Private-Network": "true"})
    assert preflight.status_code == 200 and acao(preflight) == "*"
    assert preflight.headers.get("Access-Control-Allow-Private-Network") == "true"


def test_preflight_for_stored_data_from_foreign_and_trusted_origins(server: Any) -> None:
    ask = {"Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "content-type"}
    refused = server.request("OPTIONS", f"{CHARS}/Assistant", headers={**EVIL, **ask})
    assert refused.status_code == 403 and acao(refused) is None
    local = {"Origin": "http://localhost:8000"}
    allowed = server.request("OPTIONS", f"{CHARS}/Assistant", headers={**local, **ask})
    assert allowed.status_code == 200
    assert acao(allowed) == "http://localhost:8000" and "Origin" in allowed.headers.get("Vary", "")
    assert "DELETE" in allowed.headers["Access-Control-Allow-Methods"]
    read = server.get(CONVS, headers=local)
    assert read.status_code == 200 and acao(read) == "http://localhost:8000"


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8000", "https://localhost",
                                    "http://[::1]:5173", "http://tauri.localhost", "tauri://localhost"])
def test_localhost_origins_are_trusted(server: Any, origin: str) -> None:
    response = server.get(CONVS, headers={"Origin": origin})
    assert response.status_code == 200 and acao(response) == origin


@pytest.mark.parametrize("origin", ["null", "http://evil.example", "http://localhost.evil.example",
                                    "http://127.0.0.1.evil.example", "chrome-extension://abcdef", "http://192.168.1.9:5000",
                                    "file://", "not an origin"])
def test_other_origins_are_not(server: Any, origin: str) -> None:
    response = server.get(CONVS, headers={"Origin": origin})
    assert response.status_code == 403 and response.json()["detail"]["type"] == "forbidden_origin"


def test_the_servers_own_page_is_trusted(server: Any) -> None:
    # The page the server serves is same-origin wherever it is reached from: its Origin names the
    # Host the browser used (here a LAN address, as on a phone on the same Wi-Fi).
    lan = {"Host": "192.168.1.20:5000", "Origin": "http://192.168.1.20:5000"}
    assert server.get(CONVS, headers=lan).status_code == 200
    behind_tls = {"Host": "chat.example.com", "Origin": "https://chat.example.com"}
    assert server.get(CONVS, headers=behind_tls).status_code == 403  # the name is not an allowed host
    other_port = {"Host": "192.168.1.20:5000", "Origin": "http://192.168.1.20:8080"}
    assert server.get(CONVS, headers=other_port).status_code == 403


def test_chat_turns_on_stored_data_refuse_foreign_pages(server: Any) -> None:
    conversation_id = new_conversation(server)
    assert upload(server).status_code == 201
    turn = {"conversation_id": conversation_id, "user_input": "Tell me everything", "max_new_tokens": 2}
    for path in ("/api/v1/chat", "/api/v1/chat/stream"):
        refused = server.post(path, json=turn, headers=EVIL)
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["detail"]["type"] == "forbidden_origin"
    for character in ("Secret Sue", "No Such Character"):  # an unknown name is a 403 too: no probing for names
        refused = server.post("/api/v1/chat", json={"user_input": "Hi", "character": character,
                                                    "max_new_tokens": 2}, headers=EVIL)
        assert refused.status_code == 403, (character, refused.text)
    oai = server.post("/v1/chat/completions", headers=EVIL, json={
        "messages": [{"role": "user", "content": "Hi"}], "conversation_id": conversation_id, "max_tokens": 2})
    assert oai.status_code == 403 and oai.json()["error"]["code"] == "forbidden_origin"
    oai_character = server.post("/v1/chat/completions", headers=EVIL, json={
        "messages": [{"role": "user", "content": "Hi"}], "character": "Secret Sue", "max_tokens": 2})
    assert oai_character.status_code == 403
    assert message_count(server, conversation_id) == 1  # nothing was stored
    # The same turns from a trusted page (and from no page at all) go through.
    for headers in ({"Origin": "http://localhost:8000"}, {}):
        assert server.post("/api/v1/chat", json=turn, headers=headers).status_code == 200
    assert message_count(server, conversation_id) == 5


def test_cors_origins_setting(start_server: Callable[..., Any], tiny_engine: Any, test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, cors_origins="https://chat.example.com, https://*.example.org"))
    for origin in ("https://chat.example.com", "https://a.example.org", "http://localhost:1234"):
        response = server.get(CONVS, headers={"Origin": origin})
        assert response.status_code == 200 and acao(response) == origin, origin
    for origin in ("http://chat.example.com", "https://example.org.evil.net", "https://evil.example"):
        assert server.get(CONVS, headers={"Origin": origin}).status_code == 403, origin
    everyone = start_server(tiny_engine, replace(test_settings, cors_origins="*"))
    response = everyone.get(CONVS, headers=EVIL)
    assert response.status_code == 200 and acao(response) == "*"


def test_cors_origins_and_allowed_hosts_are_checked_at_start(tmp_path: Path) -> None:
    for values, message in (({"cors_origins": "chat.example.com"}, "cors_origins"),
                            ({"cors_origins": "https://x.example/path"}, "cors_origins"),
                            ({"allowed_hosts": "https://proxy.example"}, "allowed_hosts"),
                            ({"api_key": "same", "admin_key": "same"}, "admin_key")):
        path = tmp_path / "settings.json"
        path.write_text(json.dumps(values))
        with pytest.raises(SettingsError, match=message):
            load_settings(path, environ={})


# --------------------------------------------------------------------------------------
# Host: anything the server was not told about is a 403 before any route runs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_foreign_host_is_refused(start_server: Callable[..., Any], tiny_engine: Any, test_settings: Settings,
                                 host: str) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="secret"))
    kobold = server.get("/api/v1/model", headers={"Host": host})  # a probe, open without a key
    assert kobold.status_code == 403 and kobold.json()["detail"]["type"] == "forbidden_host"
    assert "allowed_hosts" in kobold.json()["detail"]["msg"]
    oai = server.post("/v1/chat/completions", headers={"Host": host, "Authorization": "Bearer secret"},
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert oai.status_code == 403 and oai.json()["error"]["code"] == "forbidden_host"
    for method, path in (("GET", "/"), ("OPTIONS", CONVS), ("POST", "/api/v1/generate")):  # before auth, routing
        assert server.request(method, path, headers={"Host": host}).status_code == 403, (method, path)


@pytest.mark.parametrize("host", ["localhost:5000", "LOCALHOST", "127.0.0.1:5000", "[::1]:5000", "192.168.1.20:5000",
                                  "10.0.0.7", "[fe80::1]", "mypc.local", "app.localhost:5173", "box.internal"])
def test_local_hosts_are_answered(server: Any, host: str) -> None:
    response = server.get("/api/v1/model", headers={"Host": host})
    assert response.status_code == 200, (host, response.text)


def test_allowed_hosts_setting(start_server: Callable[..., Any], tiny_engine: Any, test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, allowed_hosts="chat.proxy.net, .example.com"))
    for host in ("chat.proxy.net", "chat.proxy.net:443", "example.com", "a.b.example.com"):
        assert server.get("/api/v1/model", headers={"Host": host}).status_code == 200, host
    for host in ("proxy.net", "example.com.evil.net", "notexample.com"):
        assert server.get("/api/v1/model", headers={"Host": host}).status_code == 403, host
    open_server = start_server(tiny_engine, replace(test_settings, allowed_hosts="*"))
    assert open_server.get("/api/v1/model", headers={"Host": "anything.example"}).status_code == 200


def test_machine_name_and_configured_host_are_answered() -> None:
    policy = AccessPolicy.from_settings(replace(Settings(), host="kobold.lan"), machine_name="Studio.fritz.box")
    for host in ("studio", "studio.fritz.box", "kobold.lan:5000"):
        assert policy.host_allowed(host), host
    assert not policy.host_allowed("fritz.box")
    assert split_host("[::1]:5000") == ("::1", 5000) and split_host("Example.COM.") == ("example.com", None)


@pytest.fixture
def ws_url(server: Any) -> Iterator[str]:
    websockets = WebSocketServer(server.app, "127.0.0.1", 0)
    yield f"ws://127.0.0.1:{websockets.port}"
    websockets.close()


def _raw_handshake(url: str, host: str) -> str:
    """A websocket upgrade with a chosen Host header; returns the status line."""
    address = url.removeprefix("ws://")
    name, port = address.rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((name, int(port)), timeout=10) as sock:
        sock.sendall((f"GET /api/v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        return sock.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def test_websocket_port_follows_the_same_rules(server: Any, ws_url: str) -> None:
    assert " 403 " in _raw_handshake(ws_url, "evil.example")
    assert " 101 " in _raw_handshake(ws_url, "localhost")
    assert upload(server).status_code == 201

    def events(path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        with connect(ws_url + path, origin="http://evil.example", open_timeout=10) as websocket:  # type: ignore[arg-type]
            websocket.send(json.dumps(body))
            return [json.loads(message) for message in websocket]

    streamed = events("/api/v1/stream", {"prompt": "Hi", "max_new_tokens": 2})
    assert streamed[-1]["event"] == "stream_end"  # any page may stream a generation
    refused = events("/api/v1/chat-stream", {"user_input": "Hi", "character": "Secret Sue", "max_new_tokens": 2})
    assert refused == [{"event": "error", "message_num": 0, "status": 403, "detail": refused[0]["detail"]}]
    assert refused[0]["detail"]["type"] == "forbidden_origin"
    shipped = events("/api/v1/chat-stream", {"user_input": "Hi", "character": "Example", "max_new_tokens": 2})
    assert shipped[-1]["event"] == "stream_end"


# --------------------------------------------------------------------------------------
# The admin key
# --------------------------------------------------------------------------------------
def test_admin_routes_refuse_the_plain_key(start_server: Callable[..., Any], tiny_engine: Any,
                                           test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="user-key", admin_key="admin-key"))
    user, admin = {"Authorization": "Bearer user-key"}, {"X-Api-Key": "admin-key"}
    assert upload(server, headers=user).status_code == 201  # a new card: a user's right
    changed = dict(CARD, description="Rewritten by someone else.")
    replaced = upload(server, changed, headers=user, overwrite="true")
    assert replaced.status_code == 403 and replaced.json()["detail"]["type"] == "admin_required"
    assert server.get(f"{CHARS}/Secret Sue", headers=user).json()["result"]["data"]["description"] == CARD["description"]
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), (user, 403)):
        deleted = server.request("DELETE", f"{CHARS}/Secret Sue", headers=headers)
        assert deleted.status_code == status, (headers, deleted.text)
    assert server.request("DELETE", f"{CHARS}/Assistant", headers=user).status_code == 403  # a shipped one too
    assert server.get(f"{CHARS}/Secret Sue", headers=user).status_code == 200
    # Deleting conversations stays a user's right (a chat client deletes its own chats).
    conversation_id = new_conversation(server, user)
    assert server.request("DELETE", f"{CONVS}/{conversation_id}", headers=user).status_code == 200
    # The admin key does everything the plain key does, and the admin routes.
    assert server.post("/api/v1/generate", json=GENERATE, headers=admin).status_code == 200
    assert upload(server, changed, headers=admin, overwrite="true").status_code == 201
    assert server.get(f"{CHARS}/Secret Sue", headers=admin).json()["result"]["data"]["description"] == changed["description"]
    assert server.request("DELETE", f"{CHARS}/Secret Sue", headers=admin).status_code == 200
    assert server.get(f"{CHARS}/Secret Sue", headers=admin).status_code == 404


def test_admin_key_without_api_key(start_server: Callable[..., Any], tiny_engine: Any,
                                   test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, admin_key="admin-key"))
    assert server.post("/api/v1/generate", json=GENERATE).status_code == 200  # open as before
    assert upload(server).status_code == 201
    assert server.request("DELETE", f"{CHARS}/Secret Sue").status_code == 401
    wrong = server.request("DELETE", f"{CHARS}/Secret Sue", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 403
    assert server.request("DELETE", f"{CHARS}/Secret Sue", headers={"Authorization": "Bearer admin-key"}).status_code == 200


def test_without_admin_key_the_api_key_administers(start_server: Callable[..., Any], tiny_engine: Any,
                                                   test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, api_key="user-key"))
    user = {"Authorization": "Bearer user-key"}
    assert upload(server, headers=user).status_code == 201
    assert upload(server, headers=user, overwrite="true").status_code == 201
    assert server.request("DELETE", f"{CHARS}/Secret Sue", headers=user).status_code == 200


# --------------------------------------------------------------------------------------
# Clients on their usual setups: the same machine, or --host 0.0.0.0 --api-key over the LAN
# --------------------------------------------------------------------------------------
def test_clients_over_the_lan_with_a_key(start_server: Callable[..., Any], tiny_engine: Any,
                                         test_settings: Settings) -> None:
    server = start_server(tiny_engine, replace(test_settings, host="0.0.0.0", api_key="k"))
    lan = {"Host": "192.168.1.20:5000", "Authorization": "Bearer k"}
    # SillyTavern's server (KoboldCpp mode): status probe, then generate and token count; no Origin.
    assert server.get("/api/extra/version", headers={"Host": "192.168.1.20:5000"}).json()["result"] == "KoboldCpp"
    assert server.post("/api/v1/generate", json=GENERATE, headers=lan).status_code == 200
    assert server.post("/api/extra/tokencount", json={"prompt": "Hi"}, headers=lan).status_code == 200
    # The AI Horde worker: /api/latest with a trailing slash.
    assert server.post("/api/latest/generate/", json=GENERATE, headers=lan).status_code == 200
    # Server-side chat from a script on another machine (no Origin): stored data is reachable with the key.
    created = server.post(CONVS, json={"character": "Assistant"}, headers=lan)
    assert created.status_code == 201
    turn = server.post("/api/v1/chat", headers=lan, json={"conversation_id": created.json()["result"]["id"],
                                                           "user_input": "Hi", "max_new_tokens": 2})
    assert turn.status_code == 200
    assert server.get(CONVS, headers={"Host": "192.168.1.20:5000"}).status_code == 401  # the key is still needed
    # The OpenAI SDK with the key as its api_key.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_exposure_warnings() -> None:
    assert exposure_warnings(Settings()) == []
    assert exposure_warnings(replace(Settings(), host="0.0.0.0", api_key="k")) == []
    lan = exposure_warnings(replace(Settings(), host="0.0.0.0"))
    assert len(lan) == 1 and "NO API KEY" in lan[0]
    assert len(exposure_warnings(replace(Settings(), cors_origins="*", allowed_hosts="*"))) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.2")


def test_default_bind_address_is_loopback() -> None:
    assert Settings().host == "127.0.0.1"
    assert load_settings(REPO_ROOT / "settings.json", environ={}).host == "127.0.0.1"
    assert load_settings(REPO_ROOT / "settings.json", environ={}).cors_origins == ""


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


class _Process:
    """``kobold-api serve`` as a real process, its output gathered."""

    def __init__(self, model: Path, data: Path, *flags: str) -> None:
        data.parent.mkdir(parents=True, exist_ok=True)
        self._command = [sys.executable, "-m", "kobold_api", "serve", "--model", str(model), "--ws-port", "0",
                         "--data-dir", str(data), "--provider", "cpu", *flags]
        self._cwd = data.parent
        self._start()

    def _start(self) -> None:
        self.port = free_ports()
        self.process = subprocess.Popen([*self._command, "--port", str(self.port)], cwd=self._cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self) -> None:
        """Until it answers; a start that lost its port to someone else is retried on another."""
        deadline = time.monotonic() + 120  # an upper bound: the model loads in seconds
        retries = 2
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{self.port}/api/v1/model", timeout=10)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None:
                    out = self.output()
                    assert PORT_IN_USE in out and retries, out
                    retries -= 1
                    self._start()
                time.sleep(0.1)
        pytest.fail("the server did not start listening")

    def output(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out


def test_serve_listens_on_loopback_and_warns_when_exposed(tiny_model_dir: Path, tmp_path: Path) -> None:
    lan = _lan_address()
    quiet = _Process(tiny_model_dir, tmp_path / "a" / "data")
    try:
        quiet.wait_ready()
        if lan is not None:  # loopback only: this machine's network address does not answer
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://{lan}:{quiet.port}/api/v1/model", timeout=5)
    finally:
        out = quiet.output()
    # The server's own banner (waitress may warn of a queued task on a loaded machine).
    assert f"http://127.0.0.1:{quiet.port}" in out and "!! WARNING" not in out, out

    exposed = _Process(tiny_model_dir, tmp_path / "b" / "data", "--listen")
    try:
        exposed.wait_ready()
        if lan is not None:  # on the network, reached by its address (the Host is that address)
            assert requests.get(f"http://{lan}:{exposed.port}/api/v1/model", timeout=5).status_code == 200
    finally:
        out = exposed.output()
    assert "!! WARNING: Listening on 0.0.0.0" in out and "NO API KEY" in out, out

    keyed = _Process(tiny_model_dir, tmp_path / "c" / "data", "--host", "0.0.0.0", "--api-key", "k")
    try:
        keyed.wait_ready()
        if lan is not None:
            url = f"http://{lan}:{keyed.port}/api/v1/generate"
            assert requests.post(url, json=GENERATE, timeout=30).status_code == 401
            assert requests.post(url, json=GENERATE, headers={"Authorization": "Bearer k"}, timeout=30).status_code == 200
    finally:
        out = keyed.output()
    assert "!! WARNING" not in out, out
