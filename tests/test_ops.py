"""``/health``, ``/metrics`` and the ``X-Kobold-Replica`` header on a real server."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import requests

from conftest import LiveServer, make_engine
from model_probe import ModelProbe
from kobold_api.api.ops.serving import OpsService
from kobold_api.settings import Settings


def _values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_health_metrics_and_replica_header_need_no_key(start_server, tiny_engine, test_settings) -> None:
    server: LiveServer = start_server(tiny_engine, replace(test_settings, api_key="secret", replica_name="east-1"))
    health = server.get("/health")
    assert health.status_code == 200
    assert health.headers["X-Kobold-Replica"] == "east-1"
    assert health.json()["status"] == "ok" and health.json()["database"] == "ok"
    assert server.get("/api/v1/model").status_code == 200  # a probe
    assert server.post("/api/v1/generate", json={"prompt": "x"}).status_code == 401
    assert server.post("/api/v1/generate", json={"prompt": "x"}).headers["X-Kobold-Replica"] == "east-1"
    before = _values(server.get("/metrics").text)
    generated = server.post("/api/v1/generate", json={"prompt": "Once", "max_length": 7, "temperature": 0},
                            headers={"Authorization": "Bearer secret"})
    assert generated.status_code == 200
    after = _values(server.get("/metrics").text)
    tokens = generated.json()["results"][0]["completion_tokens"]
    assert after["kobold_api_generation_tokens_total"] - before["kobold_api_generation_tokens_total"] == tokens
    assert after["kobold_api_time_to_first_token_seconds_count"] == \
        before["kobold_api_time_to_first_token_seconds_count"] + 1
    assert sum(v for k, v in after.items() if k.startswith("kobold_api_generations_total")) == \
        sum(v for k, v in before.items() if k.startswith("kobold_api_generations_total")) + 1


def test_metrics_show_a_running_generation(start_server, tiny_engine, test_settings) -> None:
    server: LiveServer = start_server(tiny_engine, test_settings)
    body = {"prompt": "A long tale", "max_length": 400, "max_context_length": 1024,
            "use_default_badwordsids": True, "genkey": "KCPPMETRICS"}
    with ModelProbe(tiny_engine) as probe:
        # The generation stops inside its third model run (after its prefill and first decode step)
        # until /metrics has been read: it is running then, however fast the tiny model is.
        probe.hold(after=2)
        with requests.post(server.url + "/api/extra/generate/stream", json=body, stream=True, timeout=60) as stream:
            probe.wait_held()
            running = _values(server.get("/metrics").text)
            assert server.post("/api/extra/abort", json={"genkey": "KCPPMETRICS"}).json()["success"] == "true"
            probe.release()
            payloads = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith(b"data:")]
    assert payloads[-1]["finish_reason"] == "stop"  # aborted, not run to its 400 tokens
    assert running["kobold_api_requests_running"] == 1 == running["vllm:num_requests_running"]
    assert running["kobold_api_kv_cache_tokens"] > 0
    assert 0 < running["kobold_api_kv_cache_usage_ratio"] == running["vllm:kv_cache_usage_perc"] <= 1


def test_health_is_503_without_database_or_model(tiny_model_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, prefix_cache_mb=0)
    settings = replace(Settings(), replica_name="r9")

    def unreachable() -> None:
        raise ConnectionRefusedError("no database")

    try:
        body, status = OpsService(engine, settings, unreachable).health()
        assert status == 503
        assert body["status"] == "unavailable" and body["database"] == "unreachable (ConnectionRefusedError)"
        assert body["model_loaded"] is True
        healthy = OpsService(engine, settings, lambda: None)
        assert healthy.health()[1] == 200
    finally:
        engine.shutdown()
    body, status = healthy.health()
    assert status == 503 and body["model_loaded"] is False and body["database"] == "ok"
