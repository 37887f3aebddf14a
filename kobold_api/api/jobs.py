"""Running engine jobs for a request: the mappings every area shares.

A full queue is a 503 ``service_unavailable``, a failed generation a 500, and the usable
context is the smaller of the setting and the model's: written once here, used by the
Kobold, OpenAI and chat services alike.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

from flask import has_request_context, request

from ..engine.engine import Engine, GenerationFailed, Job, QueueFullError
from ..engine.generation import CancelToken, GenerationRequest, GenerationResult
from ..settings import Settings
from .errors import ApiError, ValidationError, busy_error, internal_error


def submit(engine: Engine, generation: GenerationRequest, genkey: str = "",
           cancel_token: CancelToken | None = None) -> Job:
    """Queue ``generation`` as the current client's job (see :func:`client_address`)."""
    try:
        return engine.submit(generation, genkey, cancel_token, owner=client_address())
    except QueueFullError:
        raise busy_error() from None


def check_choices(settings: Settings, count: int, field: str = "n") -> None:
    """A request may ask for at most ``max_request_choices`` generations (a 4xx under ``field``)."""
    if count > settings.max_request_choices:
        raise ValidationError({field: [
            f"This request asks for {count} generations (prompts x n); this server takes at most "
            f"{settings.max_request_choices} per request (max_request_choices)."]})


class JobWaves:
    """One request's generations (the ``n`` results, a list of prompts), queued together so they
    decode as one batch, in waves of at most the queue's capacity: the first wave at once (a full
    queue is a 503 before anything is sent), each next one when the caller has read the wave
    before to its end. Iterate the jobs in order, each to its end; :meth:`cancel` stops the rest.
    ``genkey`` names the first job.

    The request's bounds hold here, for every route: at most ``max_request_choices``
    generations, and each of several clamped to its share of ``max_request_tokens``."""

    def __init__(self, engine: Engine, settings: Settings, generations: list[GenerationRequest], genkey: str = "",
                 cancel_token: CancelToken | None = None) -> None:
        check_choices(settings, len(generations))
        self._engine, self._cancel_token = engine, cancel_token
        share = settings.max_request_tokens // max(1, len(generations))
        self._pending = [generation if len(generations) == 1 or generation.max_new_tokens <= share
                         else replace(generation, max_new_tokens=share) for generation in generations]
        self.submitted: list[Job] = []
        self._queue_wave(genkey)

    def _queue_wave(self, genkey: str = "") -> None:
        wave, self._pending = self._pending[:self._engine.queue_capacity], self._pending[self._engine.queue_capacity:]
        start = len(self.submitted)
        try:
            for index, generation in enumerate(wave):
                self.submitted.append(submit(self._engine, generation, genkey if index == 0 else "",
                                             self._cancel_token))
        except ApiError:  # the queue filled part way: the request ends here
            self.cancel()
            del self.submitted[start:]
            raise

    def __iter__(self) -> Iterator[Job]:
        index = 0
        while index < len(self.submitted):
            yield self.submitted[index]
            index += 1
            if index == len(self.submitted) and self._pending:
                self._queue_wave()

    def cancel(self) -> None:
        """Stop every job not finished, and queue no more."""
        self._pending = []
        cancel_unfinished(self.submitted)


def client_address() -> str:
    """Who is asking: the client's address, so a check or abort without a genkey reaches only
    that client's generations (behind a proxy such as SillyTavern's server, all of its users)."""
    return (request.remote_addr or "") if has_request_context() else ""


def generation_failed(error: BaseException) -> ApiError:
    request_id, message = internal_error(error, "Generation failed")
    return ApiError(500, {"msg": message, "type": "generation_error", "request_id": request_id},
                    openai_type="server_error")


def stream_failure(error: BaseException) -> str:
    """What a stream whose headers are already sent says about a failed generation."""
    return internal_error(error, "Generation failed")[1]


def wait(job: Job, disconnected: Callable[[], bool]) -> GenerationResult:
    try:
        return job.wait(disconnected)
    except GenerationFailed as exc:
        raise generation_failed(exc) from exc


def cancel_unfinished(jobs: list[Job]) -> None:
    """Jobs nobody will read any more (the client left, or a sibling failed) stop now."""
    for job in jobs:
        if not job.finished:
            job.cancel()


def context_size(settings: Settings, engine: Engine) -> int:
    """Tokens a prompt plus its reply may use: the setting, capped by the model."""
    return min(settings.context_size, engine.context_length)
