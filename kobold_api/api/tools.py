"""Function calling: OpenAI's ``tools`` and ``tool_choice`` in, ``tool_calls`` out (OpenAI chat
completions, Ollama's chat and, as KoboldCpp does, the Kobold generate routes).

The model is told about the functions (through its chat template when the template renders
``tools``, else in a system message of ours) and the output is held to a grammar: with
``tool_choice`` ``required`` or a named function it must be one call, a JSON object
``{"name": ..., "arguments": {...}}`` whose arguments follow that function's ``parameters``
schema; with ``auto`` it is either such a call or plain text that does not start with ``{``.
A reply that is a call comes back as ``tool_calls`` with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal

from pydantic import Field

from ..engine.constraints import Constraint, ConstraintError, with_json_options
from ..engine.generation import GenerationChunk
from .errors import ValidationError
from .request_model import Bool, JsonSchema, RequestModel

#: Text that is not a call: anything that does not open with "{" (after no whitespace).
_FREE_TEXT = r"/[^{\s][\s\S]*/"


class FunctionSpec(RequestModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: JsonSchema | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolFields(RequestModel):
    """What a generating body takes to offer functions."""

    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = Field(None, description="accepted; one call per reply here")

    def toolset(self) -> "Toolset | None":
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, RequestModel) else self.tool_choice
        return Toolset.from_request([tool.model_dump(exclude_none=True) for tool in self.tools or ()], choice)


@dataclass(frozen=True)
class Toolset:
    """The functions a request offers and how the model may use them."""

    functions: tuple[dict[str, Any], ...]
    #: ``auto``, ``required``, or the one function's name.
    choice: str

    @classmethod
    def from_request(cls, tools: list[dict[str, Any]] | None, tool_choice: Any) -> "Toolset | None":
        """None when there are no tools or ``tool_choice`` is ``none``; a 400 for a choice that
        names a function not offered."""
        functions = tuple(tool["function"] for tool in tools or ())
        if not functions or tool_choice == "none":
            return None
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            if name not in {function["name"] for function in functions}:
                raise ValidationError({"tool_choice": [f"No tool named {name!r} was offered."]})
            return cls(functions, name)
        return cls(functions, tool_choice or "auto")

    @property
    def offered(self) -> tuple[dict[str, Any], ...]:
        """The functions the model may call now."""
        if self.choice in ("auto", "required"):
            return self.functions
        return tuple(function for function in self.functions if function["name"] == self.choice)

    def constraint(self) -> Constraint:
        calls = [{"type": "object", "properties": {"name": {"const": function["name"]},
                                                   "arguments": function.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for function in self.offered]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        try:
            if self.choice != "auto":
                return Constraint.from_json_schema(schema)
            call = json.dumps(with_json_options(schema))
            return Constraint.from_lark(f"start: free | call\nfree: {_FREE_TEXT}\ncall: %json {call}\n")
        except ConstraintError as exc:
            raise ValidationError({"tools": [str(exc)]}) from None

    def instructions(self) -> str:
        """A system message for templates that do not render tools themselves."""
        listed = json.dumps([{key: function[key] for key in ("name", "description", "parameters") if key in function}
                             for function in self.offered], ensure_ascii=False)
        must = "You must call one of them" if self.choice != "auto" else "When one helps, call it"
        return (f"You can call these functions: {listed}\n{must} by replying with only a JSON object "
                '{"name": <function name>, "arguments": {<argument values>}}.')

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The reply as OpenAI ``tool_calls`` (``arguments`` as JSON text), or None when it is
        plain text."""
        stripped = text.strip()
        if not stripped.startswith("{"):
            return None
        try:
            call = json.loads(stripped)
        except ValueError:
            return None
        names = {function["name"] for function in self.offered}
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]


def call_text(tool_calls: list[dict[str, Any]]) -> str:
    """An earlier assistant turn's calls, written back the way the model was asked to write them."""
    parts = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = arguments
        parts.append(json.dumps({"name": function.get("name"), "arguments": parsed}, ensure_ascii=False))
    return "\n".join(parts)


def with_instructions(messages: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    """``instructions`` at the head of the system message (one made when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{instructions}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def with_tool_calls(chunks: Iterator[GenerationChunk],
                    toolset: Toolset | None) -> Iterator[tuple[GenerationChunk, list[dict[str, Any]] | None]]:
    """A stream's chunks, and with tools on the calls found at the end: text that may be a call
    (it opens with "{") is held back, and dropped for the calls when it is one."""
    if toolset is None:
        for chunk in chunks:
            yield chunk, None
        return
    held: list[GenerationChunk] | None = []
    for chunk in chunks:
        if chunk.result is None and held is None:
            yield chunk, None
        elif chunk.result is None:
            held.append(chunk)
            text = "".join(piece.text for piece in held)
            if text.strip() and not text.lstrip().startswith("{"):  # plain text: send it on
                yield GenerationChunk(text, logprobs=[item for piece in held for item in piece.logprobs]), None
                held = None
        else:
            text = "".join(piece.text for piece in held or ())
            calls = toolset.parse(text) if held is not None else None
            if held and calls is None:
                yield GenerationChunk(text, logprobs=[item for piece in held for item in piece.logprobs]), None
            yield chunk, calls
