"""KoboldAI GenerationInput: every field, its aliases, defaults and validation.

Ranges follow KoboldAI United's schema (so 422 bodies look like United's), the extra
keys follow KoboldCpp, and text-generation-webui's names are accepted as aliases.
Unknown keys are ignored, as United does since API 1.2.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...engine.generation import GenerationRequest
from ...engine.sampling import SamplingParams
from ...settings import GenerationDefaults
from ..fields import FieldReader
from ..generation_fields import read_ban_eos, read_banned_phrases, read_n, read_sampling, read_stop_strings


@dataclass
class KoboldGenerationInput:
    """A validated /api/v1/generate body."""

    prompt: str
    memory: str
    max_length: int
    max_context_length: int
    sampling: SamplingParams
    stop_strings: list[str]
    trim_stop: bool
    ban_eos: bool
    n: int
    genkey: str
    banned_phrases: list[str]

    def to_request(self, copy: int = 0) -> GenerationRequest:
        """The engine request for result number ``copy`` of ``n``."""
        return GenerationRequest(
            prompt=self.prompt,
            memory=self.memory,
            max_new_tokens=self.max_length,
            max_context_length=self.max_context_length,
            sampling=self.sampling.for_copy(copy),
            stop_strings=self.stop_strings,
            trim_stop=self.trim_stop,
            ban_eos=self.ban_eos,
            banned_phrases=self.banned_phrases,
        )


def parse_generation_input(
    body: Mapping[str, Any], defaults: GenerationDefaults, require_prompt: bool = True
) -> KoboldGenerationInput:
    """Validate a Kobold generate body; raises ValidationError (422) listing every bad field."""
    reader = FieldReader(body)
    prompt = reader.string("prompt", required=require_prompt, default="") or ""
    parsed = KoboldGenerationInput(
        prompt=prompt,
        memory=reader.string("memory", default="") or "",
        max_length=reader.integer("max_length", "max_new_tokens", "max_tokens", default=defaults.max_length,
                                  minimum=1),
        max_context_length=reader.integer("max_context_length", "truncation_length",
                                          default=defaults.max_context_length, minimum=1),
        sampling=read_sampling(reader, defaults),
        stop_strings=read_stop_strings(reader),
        trim_stop=reader.boolean("trim_stop", default=defaults.trim_stop),
        ban_eos=read_ban_eos(reader),
        n=read_n(reader),
        genkey=reader.string("genkey", default="") or "",
        banned_phrases=read_banned_phrases(reader),
    )
    # Validated for the shape of a 422, otherwise without effect here (memory/world info are client-side).
    for flag in ("quiet", "use_story", "use_memory", "use_authors_note", "use_world_info", "use_userscripts",
                 "singleline", "frmttriminc", "frmtrmblln", "frmtrmspch", "frmtadsnsp",
                 "disable_input_formatting", "sampler_full_determinism"):
        reader.boolean(flag, default=False)
    reader.raise_if_errors()
    return parsed
