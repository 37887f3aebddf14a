"""Running engine jobs for a request: the mappings every area shares.

A full queue is a 503 ``service_unavailable``, a failed generation a 500, and the usable
context is the smaller of the setting and the model's: written once here, used by the
Kobold, OpenAI and chat services alike.
"""

from __future__ import annotations

from typing import Callable

from ..engine.engine import Engine, GenerationFailed, Job, QueueFullError
from ..engine.generation import CancelToken, GenerationRequest, GenerationResult
from ..settings import Settings
from .errors import ApiError, busy_error


def submit(engine: Engine, request: GenerationRequest, genkey: str = "",
           cancel_token: CancelToken | None = None) -> Job:
    try:
        return engine.submit(request, genkey, cancel_token)
    except QueueFullError:
        raise busy_error() from None


def generation_failed(error: BaseException) -> ApiError:
    return ApiError(500, {"msg": f"Generation failed: {error}", "type": "generation_error"},
                    openai_type="server_error")


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
