"""Running engine jobs for a request: the mappings every area shares.

A full queue is a 503 ``service_unavailable``, a failed generation a 500, and the usable
context is the smaller of the setting and the model's: written once here, used by the
Kobold, OpenAI and chat services alike.
"""

from __future__ import annotations

from typing import Callable

from flask import has_request_context, request

from ..engine.engine import Engine, GenerationFailed, Job, QueueFullError
from ..engine.generation import CancelToken, GenerationRequest, GenerationResult
from ..settings import Settings
from .errors import ApiError, busy_error, internal_error


def submit(engine: Engine, generation: GenerationRequest, genkey: str = "",
           cancel_token: CancelToken | None = None) -> Job:
    """Queue ``generation`` as the current client's job (see :func:`client_address`)."""
    try:
        return engine.submit(generation, genkey, cancel_token, owner=client_address())
    except QueueFullError:
        raise busy_error() from None


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
