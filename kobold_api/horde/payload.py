"""A Horde job's ``payload`` as an engine request, and the Horde's output formatting.

The payload is a KoboldAI generate body (the Horde's ``ModelPayloadKobold``: prompt, samplers,
``sampler_order``, ``stop_sequence``, ``use_default_badwordsids``...), so it goes through the very
parser ``/api/v1/generate`` uses: every setting means here what it means there. What differs:

- the lengths are held to this worker's limits (the Horde should never send more, but a job is
  run within what the worker said it takes);
- ``n`` is ignored: the Horde splits a request for ``n`` texts into ``n`` jobs, each with ``n: 1``
  (AI-Horde ``horde/classes/kobold/waiting_prompt.py``), and one job is one text;
- a missing ``max_length`` is the Horde's default, 80 (horde-sdk ``ModelPayloadRootKobold``);
- the output-formatting flags KoboldAI United applies on its server (``singleline``,
  ``frmttriminc``, ``frmtrmblln``, ``frmtrmspch``) are applied here, as the Horde's field
  descriptions define them; ``frmtadsnsp`` (a space before the user's next action) has no
  meaning for a finished job and is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..api.errors import ValidationError
from ..api.kobold.schemas import parse_generation_input
from ..engine.generation import GenerationRequest
from ..settings import GenerationDefaults

#: horde-sdk ``ModelPayloadRootKobold``: ``max_length`` 80 and ``max_context_length`` 2048 when unsent.
HORDE_DEFAULT_MAX_LENGTH = 80
HORDE_DEFAULT_MAX_CONTEXT = 2048
#: Body keys that are the worker's business, not the job's (a Horde payload carries none of them).
_NOT_FROM_THE_JOB = frozenset({"n", "genkey", "logprobs", "tools", "tool_choice"})
#: frmtrmspch: "removes #/@%}{+=~|\^<> from the output".
_SPECIAL_CHARS = re.compile(r"[#/@%}{+=~|\\^<>]")
#: frmttriminc: a sentence ends at . ! ? (and any closing quotes or brackets after it).
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]*]*")


class InvalidPayload(ValueError):
    """The job's payload is not a generate body this server can run: the job is faulted."""


@dataclass(frozen=True)
class WorkerLimits:
    """What the worker tells the Horde it takes, and holds every job to."""

    max_length: int
    max_context_length: int


@dataclass(frozen=True)
class OutputFormat:
    """The Horde's output-formatting options of one job."""

    singleline: bool = False
    trim_incomplete: bool = False
    remove_blank_lines: bool = False
    remove_special_chars: bool = False

    def apply(self, text: str) -> str:
        if self.singleline:
            text = text.split("\n", 1)[0]
        if self.trim_incomplete:
            text = trim_incomplete_sentence(text)
        if self.remove_blank_lines:
            text = re.sub(r"\n{2,}", "\n", text)
        if self.remove_special_chars:
            text = _SPECIAL_CHARS.sub("", text)
        return text


@dataclass(frozen=True)
class HordeTask:
    """One job made ready: what the engine runs and how its text is finished."""

    request: GenerationRequest
    output: OutputFormat


def parse_job(payload: Any, defaults: GenerationDefaults, limits: WorkerLimits) -> HordeTask:
    """The engine request for a job's ``payload``; raises InvalidPayload naming what is wrong."""
    if not isinstance(payload, dict):
        raise InvalidPayload("the job has no payload object")
    if not isinstance(payload.get("prompt"), str):
        raise InvalidPayload("the job's payload has no prompt")
    body = {key: value for key, value in payload.items() if key not in _NOT_FROM_THE_JOB}
    horde_defaults = replace(defaults, max_length=HORDE_DEFAULT_MAX_LENGTH,
                             max_context_length=HORDE_DEFAULT_MAX_CONTEXT)
    try:
        parsed = parse_generation_input(body, horde_defaults)
    except ValidationError as exc:
        raise InvalidPayload(exc.message) from None
    output = OutputFormat(singleline=body.get("singleline") is True, trim_incomplete=body.get("frmttriminc") is True,
                          remove_blank_lines=body.get("frmtrmblln") is True,
                          remove_special_chars=body.get("frmtrmspch") is True)
    context = min(parsed.max_context_length, limits.max_context_length)
    parsed = replace(parsed, max_length=max(1, min(parsed.max_length, limits.max_length, context - 1)),
                     max_context_length=context)
    if output.singleline and "\n" not in parsed.stop_strings:  # the first line is all that is kept: stop there
        parsed = replace(parsed, stop_strings=[*parsed.stop_strings, "\n"])
    return HordeTask(parsed.to_request(), output)


def trim_incomplete_sentence(text: str) -> str:
    """``text`` up to the end of its last whole sentence; unchanged when it has none."""
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else text
