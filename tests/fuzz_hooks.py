"""Schemathesis hooks for ``test_openapi_fuzz``: values of the formats our document declares
that a random string cannot stand for, and the cross-field facts the document states in words."""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from hypothesis import strategies as st

#: ``format: gbnf``: grammars (and a JSON schema as text, which the field also takes).
schemathesis.openapi.format("gbnf", st.sampled_from([
    "", 'root ::= "yes" | "no"', 'root ::= [a-z]+ "."', 'root ::= ("ab" | "cd")*',
    json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
]))


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    """A ``tool_choice`` naming a function names one the body offers (OpenAI refuses others)."""
    if isinstance(body, dict) and isinstance(body.get("tool_choice"), dict):
        tools = [tool for tool in body.get("tools") or () if isinstance(tool, dict)]
        if tools:
            body["tool_choice"]["function"]["name"] = tools[0]["function"]["name"]
        else:
            body["tool_choice"] = "auto"
    return body
