"""Settings resolve as defaults < settings.json < environment < command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kobold_api.cli import build_parser
from kobold_api.settings import Settings, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(values))
    return path


def test_shipped_settings_json_is_the_documented_defaults() -> None:
    shipped = load_settings(REPO_ROOT / "settings.json", environ={})
    assert shipped == Settings()
    assert shipped.port == 5000 and shipped.model == "default"


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path, {"port": 6000, "model": "from-file", "threads": 3, "generation": {"temperature": 0.2}})
    env = {"KOBOLD_API_PORT": "7000", "KOBOLD_API_THREADS": "5"}
    settings = load_settings(path, environ=env, overrides={"port": 8000, "model": None})
    assert settings.port == 8000          # CLI beats environment and file
    assert settings.threads == 5          # environment beats file
    assert settings.model == "from-file"  # file beats defaults; a CLI None means "not given"
    assert settings.generation.temperature == 0.2
    assert settings.generation.top_p == Settings().generation.top_p


def test_environment_names_the_settings_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"queue_size": 3})
    assert load_settings(environ={"KOBOLD_API_SETTINGS": str(path)}).queue_size == 3


@pytest.mark.parametrize("values, message", [
    ({"port": "abc"}, "port"),
    ({"nonsense": 1}, "unknown setting 'nonsense'"),
    ({"provider": "tpu"}, "provider must be one of"),
    ({"quant": "int3"}, "quant must be one of"),
    ({"generation": {"temperature": "hot"}}, "temperature"),
    ({"open_probes": "maybe"}, "open_probes"),
    ({"kv_layout": "paged"}, "kv_layout must be one of"),
    ({"kv_cache_mb": -1}, "kv_cache_mb"),
    ({"prefill_chunk_tokens": 4}, "prefill_chunk_tokens"),
])
def test_bad_values_are_clear_errors(tmp_path: Path, values: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(write(tmp_path, values), environ={})


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings(bad, environ={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.json", environ={})


def test_boolean_and_tuple_coercion_from_environment(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"generation": {"sampler_order": [0, 1, 2, 3, 4, 5, 6]}}),
                             environ={"KOBOLD_API_OPEN_PROBES": "false"})
    assert settings.open_probes is False
    assert settings.generation.sampler_order == (0, 1, 2, 3, 4, 5, 6)


def test_cli_flags_parse() -> None:
    args = build_parser().parse_args(["serve", "--port", "5050", "--provider", "cpu", "--model", "x.gguf",
                                      "--data-dir", "d", "--host", "127.0.0.1"])
    assert (args.port, args.provider, args.model, args.data_dir, args.host) == (5050, "cpu", "x.gguf", "d", "127.0.0.1")
    assert build_parser().parse_args(["prepare", "some/model"]).model == "some/model"
    assert build_parser().parse_args(["prepare", "m.gguf", "--quant", "int8"]).quant == "int8"
    assert load_settings(environ={"KOBOLD_API_QUANT": "fp32"}, overrides={"quant": "int4"}).quant == "int4"


def test_derived_paths(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"data_dir": str(tmp_path / "d")}), environ={})
    assert settings.cache_path == tmp_path / "d" / "models"
    assert settings.resolved_database_url.endswith("/d/conversations.db")
