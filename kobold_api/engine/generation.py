"""Our own decode loop: prefill, then one token per step, streaming text as it forms.

Nothing here knows about HTTP: a request comes in as :class:`GenerationRequest`, text
goes out as :class:`GenerationChunk` objects whose last one carries the
:class:`GenerationResult`.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from .onnx_model import KVCache, OnnxCausalLM
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenSampler
from .stopping import StopMatcher
from .tokenizer import IncrementalDecoder, Tokenizer

#: Why a generation ended. ``finish_reason`` on the wire is derived from these.
STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_ABORT = "eos", "stop_string", "length", "abort"


@dataclass
class GenerationRequest:
    """One completion. Either ``prompt`` (text) or ``prompt_ids`` must be given."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = 200
    max_context_length: int = 2048
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: list[str] = field(default_factory=list)
    trim_stop: bool = True
    ban_eos: bool = False
    add_special_tokens: bool = True


@dataclass
class GenerationResult:
    """What happened, for responses (usage, finish_reason) and /api/extra/perf."""

    text: str
    stop_reason: str
    prompt_tokens: int
    completion_tokens: int
    truncated_tokens: int
    reused_tokens: int
    prefill_seconds: float
    decode_seconds: float
    seed: int | None

    @property
    def finish_reason(self) -> str:
        """OpenAI/Kobold wording: EOS and stop strings are both a natural "stop"."""
        return "length" if self.stop_reason == STOP_LENGTH else "stop"


@dataclass
class GenerationChunk:
    """A piece of streamed text; the final chunk has ``result`` set."""

    text: str
    result: GenerationResult | None = None


class CancelToken:
    """Set from any thread; the loop checks it before every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class TextGenerator:
    """Runs one request at a time on a model; the scheduler decides which and when."""

    def __init__(self, model: OnnxCausalLM, tokenizer: Tokenizer, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Tokenize and left-truncate to ``max_context_length - max_new_tokens``; return (ids, cut)."""
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
        else:
            ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens)
            bos = self.model.info.bos_token_id
            if len(ids) >= 2 and ids[0] == ids[1] == bos:  # the prompt spelled out the BOS we also added
                ids = ids[1:]
        context = min(request.max_context_length, self.model.info.context_length)
        budget = max(1, context - request.max_new_tokens)
        cut = max(0, len(ids) - budget)
        ids = ids[cut:]
        if not ids:  # an empty prompt still needs one position to predict from
            fallback = self.model.info.bos_token_id
            ids = [fallback if fallback is not None else (self.model.info.eos_token_ids or [0])[0]]
        return ids, cut

    def stream(self, request: GenerationRequest, cancel: CancelToken | None = None) -> Iterator[GenerationChunk]:
        cancel = cancel or CancelToken()
        sampling = resolve_sampling(request.sampling, self.model.info.eos_token_ids if request.ban_eos else [])
        sampler = TokenSampler(sampling)
        prompt_ids, cut = self.prompt_ids(request)
        context_length = min(request.max_context_length, self.model.info.context_length)
        max_new = max(0, min(request.max_new_tokens, context_length - len(prompt_ids)))
        eos_ids = set(self.model.info.eos_token_ids)
        matcher = StopMatcher(request.stop_strings, request.trim_stop)
        decoder = IncrementalDecoder(self.tokenizer)
        context = np.empty(len(prompt_ids) + max_new, dtype=np.int64)
        context[: len(prompt_ids)] = prompt_ids
        length = len(prompt_ids)

        started = time.perf_counter()
        cache, reused = self._cache_for(prompt_ids)
        logits = self.model.forward(prompt_ids[cache.length:], cache)
        prefill_done = time.perf_counter()

        text_parts: list[str] = []
        stop_reason = STOP_LENGTH
        generated = 0
        while True:
            if cancel.cancelled:
                stop_reason = STOP_ABORT
                break
            if generated >= max_new:
                break
            token = sampler(logits, context[:length])
            if token in eos_ids:
                stop_reason = STOP_EOS
                break
            context[length] = token
            length += 1
            generated += 1
            match = matcher.feed(decoder.add(token))
            if match.text:
                text_parts.append(match.text)
                yield GenerationChunk(match.text)
            if match.stop_string is not None:
                stop_reason = STOP_STRING
                break
            if generated < max_new and not cancel.cancelled:
                logits = self.model.forward([token], cache)

        if stop_reason != STOP_STRING:
            tail = matcher.feed(decoder.flush())
            if tail.stop_string is not None:
                stop_reason = STOP_STRING
            tail_text = tail.text + ("" if tail.stop_string is not None else matcher.flush())
            if tail_text:
                text_parts.append(tail_text)
                yield GenerationChunk(tail_text)
        if self.prefix_cache is not None:
            self.prefix_cache.put(cache)
        finished = time.perf_counter()
        yield GenerationChunk("", GenerationResult(
            text="".join(text_parts),
            stop_reason=stop_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=generated,
            truncated_tokens=cut,
            reused_tokens=reused,
            prefill_seconds=prefill_done - started,
            decode_seconds=finished - prefill_done,
            seed=sampling.seed,
        ))

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None) -> GenerationResult:
        result = None
        for chunk in self.stream(request, cancel):
            result = chunk.result or result
        assert result is not None
        return result

    def _cache_for(self, prompt_ids: list[int]) -> tuple[KVCache, int]:
        if self.prefix_cache is None:
            return self.model.new_cache(), 0
        cache = self.prefix_cache.take(prompt_ids, self.model)
        return cache, cache.length


def resolve_sampling(params: SamplingParams, extra_banned: list[int]) -> SamplingParams:
    """Fix a random seed up front (so it can be reported and replayed) and add EOS bans."""
    seed = params.seed if params.seed is not None and params.seed >= 0 else secrets.randbits(32)
    banned = list(dict.fromkeys([*params.banned_token_ids, *extra_banned]))
    return replace(params, seed=seed, banned_token_ids=banned)
