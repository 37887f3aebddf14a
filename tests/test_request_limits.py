"""Bounded work per request: at most ``max_request_choices`` generations (prompts x n), and
several generations clamped to their share of ``max_request_tokens``, on every route that
runs more than one; a single one is held only by the context, as KoboldCpp holds it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kobold_api.settings import Settings, SettingsError, load_settings


@pytest.fixture
def limited(start_server: Any, tiny_engine: Any, test_settings: Settings) -> Any:
    return start_server(tiny_engine, replace(test_settings, max_request_choices=6, max_request_tokens=96))


def test_more_generations_than_allowed_is_a_clear_4xx_in_each_shape(limited: Any) -> None:
    response = limited.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "max_request_choices" in error["message"] and "8 generations" in \
        error["message"]
    response = limited.post("/v1/completions", json={"prompt": ["a"] * 7, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    # At the limit it runs: six results.
    response = limited.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 6
    # A list of 2,048 prompts is refused before any of them is tokenized.
    response = limited.post("/v1/completions", json={"prompt": ["a long prompt " * 50] * 2048, "max_tokens": 1})
    assert response.status_code == 400


def test_several_results_share_the_request_token_budget(limited: Any) -> None:
    """n = 4 of max_length 1,000 each: 96 // 4 = 24 tokens each (EOS banned, so all are used)."""
    body = {"prompt": "Once", "max_length": 1000, "n": 4, "ban_eos_token": True, "temperature": 1.0}
    results = limited.post("/api/v1/generate", json=body).json()["results"]
    assert [result["completion_tokens"] for result in results] == [24] * 4
    assert all(result["finish_reason"] == "length" for result in results)
    choices = limited.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 500,
                                                    "ignore_eos": True}).json()["choices"]
    assert len(choices) == 4 and all(choice["finish_reason"] == "length" for choice in choices)
    usage = limited.post("/v1/completions", json={"prompt": "a", "n": 3, "max_tokens": 500,
                                                  "ignore_eos": True}).json()["usage"]
    assert usage["completion_tokens"] == 3 * 32
    # One result keeps what it asked for, up to the context (KoboldCpp's clamp).
    single = limited.post("/api/v1/generate", json={**body, "n": 1, "max_length": 150}).json()["results"][0]
    assert single["completion_tokens"] == 150


def test_limits_are_settings_checked_at_start() -> None:
    assert load_settings(environ={}, overrides={"max_request_choices": 2, "max_request_tokens": 64}) \
        .max_request_tokens == 64
    with pytest.raises(SettingsError, match="max_request_tokens"):
        load_settings(environ={}, overrides={"max_request_choices": 32, "max_request_tokens": 100})
    with pytest.raises(SettingsError, match="max_request_choices"):
        load_settings(environ={}, overrides={"max_request_choices": 0})
