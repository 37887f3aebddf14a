"""The logic behind the Kobold routes; routes only parse the request and call in here."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

from ...engine.engine import Engine, GenerationFailed, Job
from ...engine.generation import CancelToken
from ...settings import Settings
from .. import jobs
from ..errors import ApiError
from ..sse import EventStream, sse_event
from .schemas import DetokenizeBody, GenkeyBody, KoboldGenerationInput, SoftPromptBody, TokenCountBody

#: The KoboldAI United API level we implement (>= 1.2.2 enables stop_sequence in SillyTavern).
KOBOLD_API_VERSION = "1.2.5"
#: What /api/extra/version reports; "KoboldCpp" with a version >= 1.48 turns on
#: SillyTavern's streaming, abort, tokencount, min_p and stop sequences.
KOBOLDCPP_COMPAT_VERSION = "1.80"


#: KoboldCpp's numbers for why the last generation ended (/api/extra/perf ``stop_reason``).
_KOBOLD_STOP_REASON = {"length": 0, "eos": 1, "stop_string": 2, "abort": -1}


class KoboldService:
    """Kobold/KoboldCpp semantics on top of the engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.started_at = time.time()

    # --- probes -----------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return f"koboldcpp/{self.engine.model_name}"

    @property
    def context_size(self) -> int:
        return jobs.context_size(self.settings, self.engine)

    def version_info(self) -> dict[str, Any]:
        return {"result": "KoboldCpp", "version": KOBOLDCPP_COMPAT_VERSION,
                "protected": bool(self.settings.api_key), "txt2img": False, "vision": False,
                "transcribe": False, "multiplayer": False, "websearch": False, "tts": False,
                "embeddings": False, "llm": True, "server": "kobold_api"}

    def default_max_length(self) -> int:
        return self.settings.generation.max_length

    def default_max_context_length(self) -> int:
        return min(self.settings.generation.max_context_length, self.context_size)

    def perf(self) -> dict[str, Any]:
        """KoboldCpp's figures of the last generation, from the engine's protocol-free stats."""
        stats, now = self.engine.stats, time.time()
        last = stats.last_result
        process, decode = (last.prefill_seconds, last.decode_seconds) if last else (0.0, 0.0)
        tokens, prompt = (last.completion_tokens, last.prompt_tokens) if last else (0, 0)
        return {
            "last_process": round(process, 4), "last_eval": round(decode, 4),
            "last_token_count": tokens, "last_input_count": prompt,
            "last_reused_count": last.reused_tokens if last else 0,
            "last_seed": last.seed if last and last.seed is not None else -1,
            "total_gens": stats.total_generations,
            "stop_reason": _KOBOLD_STOP_REASON.get(last.stop_reason, -1) if last else -1,
            "total_img_gens": 0,  # KoboldCpp's image generations: none here
            "last_process_speed": round(prompt / process, 2) if process else 0,
            "last_eval_speed": round(tokens / decode, 2) if decode else 0.0, "queue": self.engine.queued,
            "idle": 0 if self.engine.busy else 1, "hordeexitcounter": 0, "uptime": round(now - self.started_at, 1),
            "idletime": 0.0 if self.engine.busy else round(now - stats.last_finished_at, 1), "quiet": False,
        }

    # --- generation -------------------------------------------------------------------
    def generate(self, parsed: KoboldGenerationInput, disconnected: Callable[[], bool]) -> dict[str, Any]:
        """``{"results": [{"text", "finish_reason"}, ...]}``, one result per ``n``.

        The ``n`` jobs are submitted together (so they decode as one batch) and share one
        cancel token, so aborting the request's genkey stops all of them.
        """
        cancel = CancelToken()
        submitted: list[Job] = []
        try:
            for index in range(parsed.n):
                submitted.append(jobs.submit(self.engine, parsed.to_request(index),
                                             parsed.genkey if index == 0 else "", cancel))
            results = [jobs.wait(job, disconnected) for job in submitted]
        finally:
            jobs.cancel_unfinished(submitted)
        return {"results": [{"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                             "completion_tokens": r.completion_tokens} for r in results]}

    def stream(self, parsed: KoboldGenerationInput, disconnected: Callable[[], bool]) -> EventStream:
        """KoboldCpp SSE: ``event: message`` / ``data: {"token", "finish_reason"}`` per piece of text.

        The job is submitted before the response starts, so a full queue is still a 503.
        """
        job = jobs.submit(self.engine, parsed.to_request(), parsed.genkey)
        return EventStream(_kobold_events(job, disconnected), on_close=lambda: jobs.cancel_unfinished([job]))

    def check(self, genkey: str | None) -> dict[str, Any]:
        job = self.engine.find(genkey, owner=jobs.client_address())
        return {"results": [{"text": job.partial_text if job else ""}]}

    def abort(self, genkey: str | None) -> dict[str, str]:
        aborted = self.engine.abort(genkey, owner=jobs.client_address())
        return {"success": "true" if aborted else "false", "done": "true"}

    def set_soft_prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        """Only "no soft prompt" exists here; naming one is a validation error, as in United."""
        SoftPromptBody.parse(body)
        return {}

    def abort_request(self, body: dict[str, Any]) -> dict[str, str]:
        return self.abort(GenkeyBody.parse(body).genkey)

    def check_request(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.check(GenkeyBody.parse(body).genkey)

    # --- tokenizer --------------------------------------------------------------------
    def tokencount(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self.engine.tokenizer.encode(TokenCountBody.parse(body).prompt or "", add_special_tokens=False)
        return {"value": len(ids), "ids": ids}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = DetokenizeBody.parse(body).ids or []
        if any(i >= self.engine.tokenizer.vocab_size for i in ids):
            raise ApiError(400, {"msg": "token id out of range", "type": "bad_input"})
        return {"result": self.engine.tokenizer.decode(ids, skip_special_tokens=False), "success": True}


def _kobold_events(job: Job, disconnected: Callable[[], bool]) -> Iterator[bytes]:
    try:
        for chunk in job.chunks(disconnected):
            if chunk.result is not None:
                yield sse_event({"token": "", "finish_reason": chunk.result.finish_reason}, "message")
            elif chunk.text:
                yield sse_event({"token": chunk.text, "finish_reason": None}, "message")
    except GenerationFailed as exc:  # headers are sent: say so in the stream, as valid JSON
        yield sse_event({"token": "", "finish_reason": "error", "error": jobs.stream_failure(exc)}, "message")
