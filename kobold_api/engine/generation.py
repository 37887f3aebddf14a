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

from .constraints import Constraint, GrammarVocabulary
from .decode_batch import DecodeBatch, new_decode_batch
from .guidance import Guidance, check_guidance_scale
from .onnx_model import KVCache, OnnxCausalLM
from .phrase_bans import HeldToken, PhraseBanGuard
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenSampler
from .sampling.candidates import RowLogits
from .stopping import StopMatcher
from .thinking import ThinkFormat, ThinkLimit, think_budget
from .tokenizer import IncrementalDecoder, Tokenizer

#: Prompt tokens kept after the longest ``memory`` (KoboldCpp keeps a few too).
MIN_PROMPT_TOKENS = 4

#: Why a generation ended. ``finish_reason`` on the wire is derived from these.
STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_ABORT = "eos", "stop_string", "length", "abort"
#: The grammar allows no token that the bans (EOS and phrase bans) leave: the output ends where it is.
STOP_GRAMMAR = "grammar"


@dataclass
class GenerationRequest:
    """One completion. Either ``prompt`` (text) or ``prompt_ids`` must be given."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    #: Text before ``prompt`` that survives left-truncation (Kobold's ``memory``): when the whole
    #: does not fit, the oldest prompt tokens go first.
    memory: str = ""
    max_new_tokens: int = 200
    max_context_length: int = 2048
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: list[str] = field(default_factory=list)
    trim_stop: bool = True
    ban_eos: bool = False
    add_special_tokens: bool = True
    #: Record the chosen token's log-probability and this many alternatives (None = off).
    logprobs: int | None = None
    #: Text the model may never write (KoboldCpp's ``banned_strings``; case-insensitive).
    banned_phrases: list[str] = field(default_factory=list)
    #: A grammar or JSON schema every generated token must fit (None = free text).
    constraint: Constraint | None = None
    #: Also score the prompt: the log-probability of each prompt token after the ones before it
    #: (OpenAI completions' ``echo`` with ``logprobs``); uses ``logprobs`` alternatives.
    prompt_logprobs: bool = False


@dataclass
class TokenLogprob:
    """The model's log-probability of a generated token, with the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: With ``prompt_logprobs``: one entry per prompt token, the first None (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finish_reason(self) -> str:
        """OpenAI/Kobold wording: EOS and stop strings are both a natural "stop"."""
        return "length" if self.stop_reason == STOP_LENGTH else "stop"


@dataclass
class GenerationChunk:
    """A piece of streamed text; the final chunk has ``result`` set.

    ``logprobs``: with logprobs on, those of the tokens whose text this chunk completes (the
    final chunk carries any left, such as a trimmed stop string's), so a stream's logprobs line
    up with its text.
    """

    text: str
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: On a sequence's first chunk, with ``prompt_logprobs``: the scored prompt (a stream can
    #: send it with the echoed prompt, before the reply).
    prompt_logprobs: list[TokenLogprob | None] | None = None


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

    def __init__(self, model: OnnxCausalLM, tokenizer: Tokenizer, prefix_cache: PrefixCache | None = None,
                 context_length: int = 0) -> None:
        self.model = model
        #: The longest sequence (prompt and reply) a request may hold: the model's context, or
        #: less where the server caps it (a decode slot is this long).
        self.context_length = min(context_length or model.info.context_length, model.info.context_length)
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.grammar_vocabulary = GrammarVocabulary(tokenizer, model.vocab_size, model.info.eos_token_ids)
        self.think = ThinkFormat.for_model(tokenizer.chat_template,
                                           lambda text: tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Tokenize and left-truncate to ``max_context_length - max_new_tokens``; return (ids, cut).

        A leading BOS survives the cut (the model expects it first). ``memory`` survives too,
        up to all but the last ``MIN_PROMPT_TOKENS`` of the room (it and the prompt are then
        tokenized apart), as KoboldCpp keeps a few prompt tokens after even the longest memory.
        """
        context = min(request.max_context_length, self.context_length)
        _, budget = token_budget(request.max_new_tokens, context)
        bos = self.model.info.bos_token_id
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
        else:
            ids = self._encode(request.memory + (request.prompt or ""), request.add_special_tokens)
            if len(ids) > budget and request.memory:
                memory_ids = self._encode(request.memory, request.add_special_tokens)
                rest = self.tokenizer.encode(request.prompt or "", add_special_tokens=False)
                memory_kept, _ = keep_tail(memory_ids, budget - min(MIN_PROMPT_TOKENS, budget - 1), bos)
                room = budget - len(memory_kept)
                kept = memory_kept + rest[max(0, len(rest) - room):]
                return kept, len(memory_ids) + len(rest) - len(kept)
        ids, cut = keep_tail(ids, budget, bos)
        if not ids:  # an empty prompt still needs one position to predict from
            ids = [bos if bos is not None else (self.model.info.eos_token_ids or [0])[0]]
        return ids, cut

    def guidance_for(self, request: GenerationRequest, prompt_ids: list[int], budget: int) -> Guidance | None:
        """The negative context of a request with ``guidance_scale`` other than 1 (None otherwise):
        ``negative_prompt`` tokenized as the prompt is and cut to ``budget`` tokens like it; an
        empty one is the prompt's last token (transformers' unconditional context)."""
        scale = check_guidance_scale(request.sampling.guidance_scale)
        if scale == 1.0:
            return None
        negative = request.sampling.negative_prompt
        ids = self._encode(negative, request.add_special_tokens) if negative else []
        ids = keep_tail(ids, max(1, budget), self.model.info.bos_token_id)[0] if ids else prompt_ids[-1:]
        return Guidance(self.model, ids, scale, self.context_length)

    def think_limit_for(self, request: GenerationRequest, prompt_ids: list[int], max_new: int) -> ThinkLimit | None:
        """The reasoning budget of a request that sets one (None otherwise, and under a grammar,
        which decides every token itself); whether the prompt opened the block is read from its end."""
        budget = think_budget(request.sampling.reasoning_effort, request.sampling.thinking_budget_tokens, max_new)
        if budget is None or request.constraint is not None:
            return None
        tail = self.tokenizer.decode(prompt_ids[-2 * len(self.think.start_ids) - 8:], skip_special_tokens=False)
        return ThinkLimit(self.think, budget, self.think.opened_by(tail))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        bos = self.model.info.bos_token_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos:  # the prompt spelled out the BOS we also added
            ids = ids[1:]
        return ids

    def stream(self, request: GenerationRequest, cancel: CancelToken | None = None) -> Iterator[GenerationChunk]:
        """Run one request alone (a batch of one): prefill, then one step per token."""
        batch = new_decode_batch(self.model, capacity=self.context_length)
        sequence = Sequence(self, request, cancel or CancelToken())
        logits = sequence.prefill(batch)
        while True:
            chunks, token = sequence.step(logits)
            yield from chunks
            if token is None:
                break
            batch.truncate(0, sequence.cache_length)
            logits = batch.step([token])[0]
        if batch.size:
            self.release(batch.release(0))

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None) -> GenerationResult:
        result = None
        for chunk in self.stream(request, cancel):
            result = chunk.result or result
        assert result is not None
        return result

    def cache_for(self, prompt_ids: list[int]) -> tuple[KVCache | None, int]:
        """A cached prefix of the prompt to continue from, and how many tokens of it are usable."""
        if self.prefix_cache is None:
            return None, 0
        return self.prefix_cache.take(prompt_ids)

    def release(self, cache: KVCache) -> None:
        """A finished sequence's cache goes back to the pool for later prompts to reuse."""
        if self.prefix_cache is not None:
            self.prefix_cache.put(cache)

    def score_prompt(self, prompt_ids: list[int], top: int) -> tuple[KVCache, list[TokenLogprob | None]]:
        """Each prompt token's log-probability after the tokens before it, and a cache of all but
        the last prompt token (the graphs give only the last position's logits, so the prompt
        runs one token per step: a scoring request costs one step per prompt token)."""
        cache = self.model.new_cache()
        scores: list[TokenLogprob | None] = [None]
        for index in range(1, len(prompt_ids)):
            logits = self.model.forward([prompt_ids[index - 1]], cache)
            scores.append(_logprob_of(logits, prompt_ids[index], top))
        return cache, scores


class Sequence:
    """One request in flight: its sampler, stop matcher, decoder and context.

    The single-stream loop and the batch scheduler both drive requests through this
    class, so sampling, stopping and streaming behave the same however requests are
    grouped: only the forward pass differs.
    """

    def __init__(self, generator: TextGenerator, request: GenerationRequest, cancel: CancelToken) -> None:
        self.generator = generator
        self.cancel = cancel
        info = generator.model.info
        self.sampling = resolve_sampling(request.sampling, info.eos_token_ids if request.ban_eos else [])
        self.sampler = TokenSampler(
            self.sampling, tokenize=lambda text: generator.tokenizer.encode(text, add_special_tokens=False))
        self.prompt_ids, self.truncated = generator.prompt_ids(request)
        context_length = min(request.max_context_length, generator.context_length)
        self.max_new = max(0, min(request.max_new_tokens, context_length - len(self.prompt_ids)))
        self.eos_ids = set(info.eos_token_ids)
        self.bans = PhraseBanGuard(request.banned_phrases)
        self.decoder = IncrementalDecoder(generator.tokenizer, context=self.prompt_ids)
        self.context = np.empty(len(self.prompt_ids) + self.max_new, dtype=np.int64)
        self.context[: len(self.prompt_ids)] = self.prompt_ids
        self.length = len(self.prompt_ids)
        self.generated = 0
        self.text_parts: list[str] = []
        self.reused = 0
        self.started = self.prefill_done = time.perf_counter()
        #: The prompt is in the batch part-way (see :meth:`prefill`).
        self.filling = False
        self.result: GenerationResult | None = None
        self.top_logprobs = request.logprobs
        self.token_logprobs: list[TokenLogprob] = []
        #: Characters of text after each generated token; the logprobs sent so far.
        self._token_ends: list[int] = []
        self._emitted_chars = self._sent_logprobs = 0
        self.score_prompt = request.prompt_logprobs
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._prompt_sent = False
        self.guide = generator.grammar_vocabulary.guide(request.constraint) if request.constraint else None
        # Under a grammar a stop string ends the output only where the grammar could end it.
        self.matcher = StopMatcher(request.stop_strings, request.trim_stop,
                                   None if self.guide is None else self._grammar_may_end)
        self.guidance = generator.guidance_for(request, self.prompt_ids, context_length - self.max_new)
        self.think_limit = generator.think_limit_for(request, self.prompt_ids, self.max_new)

    def prefill(self, batch: DecodeBatch, chunk: int = 0) -> np.ndarray | None:
        """Add this sequence to ``batch`` (reusing a cached prefix); return its first logits.

        ``None`` when it was aborted while queued: no row is added and no prefill spent. With
        ``chunk``, at most that many prompt tokens run: while :attr:`filling`, the logits are
        None and :meth:`fill` runs the rest.
        """
        self.started = time.perf_counter()
        if self.cancel.cancelled:
            self.prefill_done = self.started
            return None
        if self.score_prompt and len(self.prompt_ids) > 1:
            cached, self.prompt_logprobs = self.generator.score_prompt(self.prompt_ids, self.top_logprobs or 0)
            logits = batch.admit(self.prompt_ids, cached, len(self.prompt_ids) - 1)
        else:
            if self.score_prompt:
                self.prompt_logprobs = [None]
            cached, self.reused = self.generator.cache_for(self.prompt_ids)
            batch.begin(self.prompt_ids, cached, self.reused)
            self.filling = True
            return self.fill(batch, chunk)
        self.prefill_done = time.perf_counter()
        return logits

    def fill(self, batch: DecodeBatch, chunk: int = 0) -> np.ndarray | None:
        """Run the next ``chunk`` prompt tokens (0: the rest); the logits once the prompt is done."""
        logits = batch.fill(chunk)
        if logits is not None:
            self.filling = False
            self.prefill_done = time.perf_counter()
        return logits

    def step(self, logits: np.ndarray | RowLogits | None) -> tuple[list[GenerationChunk], int | None]:
        """Pick the next token from ``logits``; return the chunks to emit and the token to feed.

        The token is ``None`` once the sequence has finished (its last chunk has the result).
        With phrase bans a step may take tokens back (see :mod:`.phrase_bans`); the caller then
        cuts its cache to :attr:`cache_length` before feeding the token. A :class:`RowLogits`
        (a device batch's row) is sampled from its top candidates when they settle the token
        (:meth:`TokenSampler.sample_top`); its whole row is fetched otherwise.
        """
        if self.cancel.cancelled or logits is None:
            return self._finish(STOP_ABORT), None
        if self.generated >= self.max_new:
            return self._finish(STOP_LENGTH), None
        if isinstance(logits, RowLogits):
            token = self._from_candidates(logits)
            if token is not None:
                return self._take(token, logits)
            logits = logits.full()
        if self.guidance is not None:
            logits = self.guidance.apply(logits, self.context[len(self.prompt_ids):self.length])
        if self.guide is not None:
            if self.guide.finished:  # the grammar is complete: nothing may follow
                return self._finish(STOP_EOS), None
            logits = self.guide.mask(logits)
            if not self._any_allowed(logits):
                return self._finish(STOP_GRAMMAR), None
        forced = None if self.think_limit is None else \
            self.think_limit.forced_token(self.context[len(self.prompt_ids):self.length])
        token = forced if forced is not None else self.sampler(logits, self.context[: self.length])
        return self._take(token, logits)

    def _from_candidates(self, row: RowLogits) -> int | None:
        """The token from ``row``'s top candidates, when nothing but the sampler chain decides
        and the candidates settle it; None: the whole row is needed."""
        if self.guidance is not None or self.guide is not None or self.think_limit is not None \
                or self.top_logprobs is not None or self.bans.active or self.bans.held \
                or not self.sampler.claims_top(row.candidates.ids.size, row.candidates.lse is not None):
            return None
        return self.sampler.sample_top(row.candidates, self.context[: self.length])

    def _take(self, token: int, logits: np.ndarray | RowLogits) -> tuple[list[GenerationChunk], int | None]:
        """Append the sampled ``token`` (phrase bans may rewind and sample again)."""
        banned: set[int] = set()
        while True:
            if token in self.eos_ids:
                return self._finish(STOP_EOS), None
            if not self.bans.active and not self.bans.held:  # no bans, or no rewinds left
                delta = self._append(token, logits)
                break
            decoder_state = self.decoder.snapshot()
            delta = self._append(token, logits)
            rewind = self.bans.add(HeldToken(token, delta, np.array(logits, copy=True), decoder_state, banned))
            if rewind is None:
                stop_end = self.matcher.stop_end(self.bans.held_text)
                stop_at = None if stop_end is None else self.bans.token_ending_at(stop_end)
                if stop_at is not None:  # generation ends there: later tokens were never returned
                    self._take_back(stop_at + 1)
                delta = self.bans.release(final=stop_at is not None)
                break
            logits, banned = self._take_back(rewind.index).logits, rewind.banned
            logits = _without(logits, banned)
            if not self._any_allowed(logits):  # the grammar allows only what the bans took
                return self._finish(STOP_GRAMMAR), None
            token = self.sampler(logits, self.context[: self.length])
        match = self.matcher.feed(delta)
        chunks = self._emit(match.text)
        if match.stop_string is not None:
            return chunks + self._finish(STOP_STRING, flush=False), None
        if self.generated >= self.max_new:
            return chunks + self._finish(STOP_LENGTH), None
        return chunks, token

    def _any_allowed(self, logits: np.ndarray) -> bool:
        """Whether a token the grammar allows is left once the bans (EOS bans too) are applied."""
        allowed = np.isfinite(logits)
        banned = self.sampling.banned_token_ids
        if banned:
            allowed[[token for token in banned if token < allowed.size]] = False
        return bool(allowed.any())

    def _grammar_may_end(self, text: str) -> bool:
        return self.guide is not None and self.guide.accepts("".join(self.text_parts) + text)

    @property
    def cache_length(self) -> int:
        """Positions whose keys the cache should hold: all but the token about to be fed."""
        return self.length - 1

    def _append(self, token: int, logits: np.ndarray) -> str:
        """Make ``token`` part of the sequence; return its new text."""
        if self.top_logprobs is not None:
            self.token_logprobs.append(_logprob_of(logits, token, self.top_logprobs))
        if self.guide is not None and not self.guide.consume(token):
            raise RuntimeError(f"the grammar refused a token it allowed: {self.guide.failed}")
        self.context[self.length] = token
        self.length += 1
        self.generated += 1
        text = self.decoder.add(token)
        self._token_ends.append((self._token_ends[-1] if self._token_ends else 0) + len(text))
        return text

    def _take_back(self, index: int) -> HeldToken | None:
        """Undo the held tokens from ``index`` on; return the first of them (None if none)."""
        count = len(self.bans.held) - index
        if count <= 0:
            return None
        first = self.bans.take_back(index)
        self.length -= count
        self.generated -= count
        del self.token_logprobs[self.generated:]
        del self._token_ends[self.generated:]
        if self.guide is not None:
            self.guide.rollback(count)
        self.decoder.restore(first.decoder_state)
        return first

    def _emit(self, text: str) -> list[GenerationChunk]:
        if not text:
            return []
        self.text_parts.append(text)
        self._emitted_chars += len(text)
        return [self._first(GenerationChunk(text, logprobs=self._logprobs_up_to(self._emitted_chars)))]

    def _first(self, chunk: GenerationChunk) -> GenerationChunk:
        """The scored prompt rides on the sequence's first chunk."""
        if self.prompt_logprobs is not None and not self._prompt_sent:
            chunk.prompt_logprobs, self._prompt_sent = self.prompt_logprobs, True
        return chunk

    def _logprobs_up_to(self, chars: int | None) -> list[TokenLogprob]:
        """The logprobs not sent yet of tokens whose text ends within the first ``chars``
        characters (None: all of them); tokens a phrase ban may still take back wait."""
        if self.top_logprobs is None:
            return []
        last = len(self.token_logprobs) if chars is None else self.generated - len(self.bans.held)
        start = end = self._sent_logprobs
        while end < last and (chars is None or self._token_ends[end] <= chars):
            end += 1
        self._sent_logprobs = end
        return self.token_logprobs[start:end]

    def _finish(self, stop_reason: str, flush: bool = True) -> list[GenerationChunk]:
        chunks: list[GenerationChunk] = []
        if flush:  # held-back text (an unfinished character, a possible stop-string start) is output after all
            tail = self.matcher.feed(self.bans.release(final=True) + self.decoder.flush())
            if tail.stop_string is not None:
                stop_reason = STOP_STRING
                chunks = self._emit(tail.text)
            else:
                chunks = self._emit(tail.text + self.matcher.flush())
        if self.guide is not None:
            self.guide.close()
        if self.guidance is not None:
            self.guidance.close()
        finished = time.perf_counter()
        self.result = GenerationResult(
            text="".join(self.text_parts),
            stop_reason=stop_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.generated,
            truncated_tokens=self.truncated,
            reused_tokens=self.reused,
            prefill_seconds=self.prefill_done - self.started,
            decode_seconds=finished - self.prefill_done,
            seed=self.sampling.seed,
            token_logprobs=self.token_logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
        return chunks + [self._first(GenerationChunk("", self.result, logprobs=self._logprobs_up_to(None)))]


def token_budget(max_new_tokens: int, context: int) -> tuple[int, int]:
    """(reply tokens, prompt tokens) for a ``context``: the one rule every route uses for
    "prompt + reply must fit". The reply is capped so that ``min(context - 4, 16)`` prompt tokens
    always fit (KoboldCpp's rule, which SillyTavern relies on when it asks for more than the
    server has); the prompt gets the rest."""
    reply = max(1, min(max_new_tokens, context - min(max(context - 4, 0), 16)))
    return reply, max(1, context - reply)


def keep_tail(ids: list[int], budget: int, bos: int | None) -> tuple[list[int], int]:
    """The last ``budget`` ids and how many were cut; a leading ``bos`` stays in front."""
    if len(ids) <= budget:
        return ids, 0
    if bos is not None and ids and ids[0] == bos and budget >= 2:
        kept = [bos, *ids[len(ids) - (budget - 1):]]
    else:
        kept = ids[len(ids) - budget:] if budget > 0 else []
    return kept, len(ids) - len(kept)


def _without(logits: np.ndarray, banned: set[int]) -> np.ndarray:
    scores = np.array(logits, dtype=np.float32, copy=True)
    scores[list(banned)] = -np.inf
    return scores


def _logprob_of(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-softmax of the model's raw logits (before samplers), as OpenAI reports them."""
    shifted = logits.astype(np.float64) - float(logits.max())
    log_probs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-log_probs, top)[:top] if 0 < top < log_probs.size else np.arange(0)
    best = best[np.argsort(-log_probs[best])]
    return TokenLogprob(token, float(log_probs[token]), [(int(i), float(log_probs[i])) for i in best])


def resolve_sampling(params: SamplingParams, extra_banned: list[int]) -> SamplingParams:
    """Fix a random seed up front (so it can be reported and replayed) and add EOS bans."""
    seed = params.seed if params.seed is not None and params.seed >= 0 else secrets.randbits(32)
    banned = list(dict.fromkeys([*params.banned_token_ids, *extra_banned]))
    return replace(params, seed=seed, banned_token_ids=banned)
