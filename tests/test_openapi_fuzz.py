"""Schemathesis over our own /api/openapi.json, every phase it has (coverage, fuzzing, and the
stateful phase, which follows the document's links from a created conversation or character to
the routes that take it), against a real server: no server error, every status code and content
type documented, every schema-valid request accepted.

Bounded (25 examples per operation, about a minute on 2 cores); ``KOBOLD_API_FUZZ_EXAMPLES`` raises it
for a longer hunt, ``KOBOLD_API_FUZZ_LOG`` names a file for schemathesis's whole report.

A schema-valid request whose acceptance depends on stored data (a greeting, swipe or reply the
conversation lacks, a card too big for the context asked for) is answered 409, which the check
counts as accepted; everything else schema-valid must succeed.

``fuzz_hooks`` supplies values of the formats a random string cannot stand for (``gbnf``
grammars) and keeps a named ``tool_choice`` to a function the body offers.

What the run leaves out, and why: ``negative_data_rejection``: the document describes each
field's canonical form, and the readers also take the forms clients send on purpose
(KoboldAI's ``"False"`` strings, numbers as strings, JSON-encoded lists, ``null`` for "not
set", the unparsable body SillyTavern sends to abort), so "schema-invalid" data is sometimes
rightly accepted. And the check that a created character's picture exists: only PNG cards
have one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import LiveServer
from kobold_api.app import create_app
from kobold_api.settings import GenerationDefaults, Settings

CONFIG = """
[checks]
negative_data_rejection.enabled = false

# Only a PNG card has a picture: a character created from JSON rightly has none (404).
[[operations]]
include-path = "/api/v1/characters/{name}/avatar"
checks.ensure_resource_availability.enabled = false
"""


@pytest.fixture(scope="module")
def fuzz_server(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with a context big enough for the shipped characters' prompts, small enough that
    the longest reply a fuzzer can ask for stays short on the tiny model."""
    root = tmp_path_factory.mktemp("fuzz")
    settings = replace(Settings(), host="127.0.0.1", data_dir=str(root / "data"), context_size=1024,
                       queue_size=64, threads=8,
                       # Most fuzzed bodies name no length: 16 tokens instead of 200 keeps the
                       # run about shapes and status codes, not decoding.
                       generation=replace(GenerationDefaults(), max_length=16))
    server = LiveServer(create_app(settings, tiny_engine), settings)
    yield server
    server.close()
    server.app.extensions["kobold_api"].chat.conversations.close()


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(fuzz_server: LiveServer, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    examples = os.environ.get("KOBOLD_API_FUZZ_EXAMPLES", "25")
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
               f"{fuzz_server.url}/api/openapi.json", "--max-examples", examples, "--workers", "1",
               "--seed", "20261205", "--no-color"]
    environment = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                               os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=environment)
    output = result.stdout + result.stderr
    if os.environ.get("KOBOLD_API_FUZZ_LOG"):
        Path(os.environ["KOBOLD_API_FUZZ_LOG"]).write_text(output)
    assert result.returncode == 0, output[-6000:]
    assert "Stateful" in output and "Server error" not in output
