"""The command line: `kobold-api prepare`, `python -m kobold_api`, and `kobold-api serve` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from free_ports import PORT_IN_USE, free_ports
from kobold_api.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_prepare_prints_the_ready_folder(tiny_model_dir: Path, capsys) -> None:
    assert main(["prepare", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tiny_model_dir)


def test_prepare_failure_is_a_clear_message(tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(tmp_path / "nothing-here"), "--data-dir", str(tmp_path)]) == 1
    assert "is not a .gguf file or a model folder" in capsys.readouterr().err


def test_bad_settings_exit_with_a_message(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"port": "many"}))
    assert main(["--settings", str(bad), "prepare"]) == 2
    assert "port" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "kobold_api", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout and "prepare" in result.stdout


def test_serve_starts_a_real_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    for _ in range(3):  # a port taken between the pick and the server's bind: pick others
        port = free_ports(2)
        ws_port = port + 1
        process = subprocess.Popen(
            [sys.executable, "-m", "kobold_api", "serve", "--model", str(tiny_model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--ws-port", str(ws_port), "--data-dir", str(tmp_path / "data"), "--provider",
             "cpu"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        response = _wait_listening(process, port)
        if response is not None:
            break
        output = process.stdout.read() if process.stdout else ""
        assert PORT_IN_USE in output, output
    else:
        pytest.fail("no free ports for the server")
    try:
        assert response.json()["result"].startswith("koboldcpp/")
        generated = requests.post(f"http://127.0.0.1:{port}/api/v1/generate",
                                  json={"prompt": "Hi", "max_length": 3, "ban_eos_token": True}, timeout=30)
        assert generated.status_code == 200 and generated.json()["results"][0]["completion_tokens"] == 3
        assert (tmp_path / "data" / "conversations.db").is_file()  # data dir from the flag
        with connect(f"ws://127.0.0.1:{ws_port}/api/v1/stream") as websocket:  # the legacy streaming port
            websocket.send(json.dumps({"prompt": "Hi", "max_new_tokens": 3, "ban_eos_token": True}))
            events = [json.loads(message) for message in websocket]
        assert [event["event"] for event in events] == ["text_stream"] * (len(events) - 1) + ["stream_end"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_listening(process: subprocess.Popen, port: int) -> requests.Response | None:
    """The server's first answer once it listens; None if the process exited first."""
    deadline = time.monotonic() + 120  # an upper bound: the model loads in seconds
    while time.monotonic() < deadline:
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/v1/model", timeout=10)
        except requests.ConnectionError:
            if process.poll() is not None:
                return None
            time.sleep(0.1)
    process.terminate()
    pytest.fail("the server did not start listening")


def test_bench_prints_every_figure(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """`kobold-api bench` runs end to end (on the tiny model, few tokens): a smoke test of the
    command; its numbers are for humans, so only their presence and sign are checked."""
    assert main(["bench", str(tiny_model_dir), "--data-dir", str(tmp_path), "--tokens", "8",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("decode, greedy", "prefill, 1,024-token prompt", "follow-up", "decode steps alone",
                  "8 concurrent requests"):
        assert label in out
    assert "(1000 tokens reused)" in out
