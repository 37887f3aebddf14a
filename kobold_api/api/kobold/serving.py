"""The logic behind the Kobold routes; routes only parse the request and call in here."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ... import __version__
from ...engine.engine import Engine, GenerationFailed, Job
from ...engine.json_gbnf import SchemaConversionError, schema_to_gbnf
from ...engine.generation import CancelToken, GenerationResult
from ...settings import Settings
from .. import jobs
from ..errors import ApiError, ValidationError
from ..logprobs import LogprobFormatter
from ..sse import EventStream, sse_event
from ..tools import Toolset
from .schemas import DetokenizeBody, GenkeyBody, JsonToGrammarBody, KoboldGenerationInput, SoftPromptBody, TokenCountBody

if TYPE_CHECKING:
    from ...horde.worker import HordeWorker

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
        self.logprobs = LogprobFormatter(engine.tokenizer)
        #: The AI Horde worker, when one runs (its state is part of /api/extra/perf).
        self.horde: "HordeWorker | None" = None

    # --- probes -----------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return f"koboldcpp/{self.engine.model_name}"

    @property
    def context_size(self) -> int:
        return jobs.context_size(self.settings, self.engine)

    def version_info(self) -> dict[str, Any]:
        """KoboldCpp's version and capability flags, each true only where this server has it:
        text generation with a jinja chat template; no images, audio, embeddings, CFG guidance,
        KoboldCpp saves or its admin routes (model switching)."""
        return {"result": "KoboldCpp", "version": KOBOLDCPP_COMPAT_VERSION,
                "protected": bool(self.settings.api_key), "llm": True, "txt2img": False, "vision": False,
                "audio": False, "transcribe": False, "multiplayer": False, "websearch": False, "tts": False,
                "embeddings": False, "savedata": False, "admin": 0, "guidance": True, "jinja": True,
                "music": False, "router": False, "mcp": False, "server": "kobold_api", "server_version": __version__}

    def props(self, chat_template: str | None) -> dict[str, Any]:
        """llama.cpp's ``/props`` as KoboldCpp serves it: SillyTavern's Text Completion mode reads
        the chat template (to pick its own) and the context size."""
        context = self.default_max_context_length()
        return {"chat_template": chat_template, "id": 0, "id_task": -1, "total_slots": self.engine.max_batch_size,
                "modalities": {"vision": False, "audio": False}, "model_path": self.engine.model_name,
                "n_ctx": context, "default_generation_settings": {"n_ctx": context}}

    def service_info(self, root_url: str) -> dict[str, Any]:
        """``/.well-known/serviceinfo``: what this server is and which APIs it speaks, where."""
        return {"version": "0.2",
                "software": {"name": "kobold_api", "version": __version__, "repository": "", "homepage": root_url,
                             "logo": ""},
                "api": {"koboldai": {"name": "KoboldAI API", "rel_url": "/api", "documentation": root_url + "api/docs",
                                     "version": KOBOLD_API_VERSION},
                        "openai": {"name": "OpenAI API", "rel_url": "/v1",
                                   "documentation": "https://platform.openai.com/docs/api-reference",
                                   "version": "1"}}}

    def default_max_length(self) -> int:
        return self.settings.generation.max_length

    def default_max_context_length(self) -> int:
        return min(self.settings.generation.max_context_length, self.context_size)

    def perf(self) -> dict[str, Any]:
        """KoboldCpp's figures of the last generation, from the engine's protocol-free stats; with the
        AI Horde worker on, its state as ``horde`` and its error pauses as ``hordeexitcounter``."""
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
            "idle": 0 if self.engine.busy else 1,
            "hordeexitcounter": self.horde.failure_pauses if self.horde else 0,
            "uptime": round(now - self.started_at, 1),
            "idletime": 0.0 if self.engine.busy else round(now - stats.last_finished_at, 1), "quiet": False,
            **({"horde": self.horde.status()} if self.horde else {}),
        }

    # --- generation -------------------------------------------------------------------
    def generate(self, parsed: KoboldGenerationInput, disconnected: Callable[[], bool]) -> dict[str, Any]:
        """``{"results": [{"text", "finish_reason"}, ...]}``, one result per ``n``.

        The ``n`` jobs are submitted together (so they decode as one batch) and share one
        cancel token, so aborting the request's genkey stops all of them.
        """
        submitted = jobs.JobWaves(self.engine, self.settings, [parsed.to_request(index) for index in range(parsed.n)],
                                  parsed.genkey, CancelToken())
        try:
            results = [jobs.wait(job, disconnected) for job in submitted]
        finally:
            submitted.cancel()
        return {"results": [self._result(r, parsed) for r in results]}

    def _result(self, result: GenerationResult, parsed: KoboldGenerationInput) -> dict[str, Any]:
        body: dict[str, Any] = {"text": result.text, "finish_reason": result.finish_reason,
                                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        calls = parsed.toolset.parse(result.text) if parsed.toolset is not None else None
        if calls:
            body.update(tool_calls=calls, finish_reason="tool_calls")
        if parsed.logprobs:
            body["logprobs"] = self.logprobs.kobold(result.token_logprobs)
        return body

    def last_logprobs(self, body: dict[str, Any]) -> dict[str, Any]:
        """KoboldCpp's ``/api/extra/last_logprobs``: a finished generation's logprobs, only for
        the genkey that started it (so one user cannot read another's), null otherwise."""
        genkey = GenkeyBody.parse(body).genkey
        job = self.engine.find(genkey) if genkey else None
        if job is None or job.result is None or job.request.logprobs is None:
            return {"logprobs": None}
        return {"logprobs": self.logprobs.kobold(job.result.token_logprobs)}

    def stream(self, parsed: KoboldGenerationInput, disconnected: Callable[[], bool]) -> EventStream:
        """KoboldCpp SSE: ``event: message`` / ``data: {"token", "finish_reason"}`` per piece of text.

        The job is submitted before the response starts, so a full queue is still a 503.
        """
        job = jobs.submit(self.engine, parsed.to_request(), parsed.genkey)
        formatter = self.logprobs if parsed.logprobs else None
        return EventStream(_kobold_events(job, disconnected, formatter, parsed.toolset),
                           on_close=lambda: jobs.cancel_unfinished([job]))

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

    def json_to_grammar(self, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON schema as GBNF, for the ``grammar`` field (KoboldCpp's route); a schema the
        converter cannot express faithfully is a 422 naming the place."""
        try:
            return {"result": schema_to_gbnf(JsonToGrammarBody.read(body)), "success": True}
        except SchemaConversionError as exc:
            raise ValidationError({"schema": [str(exc)]}) from None

    # --- tokenizer --------------------------------------------------------------------
    def tokencount(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self.engine.tokenizer.encode(TokenCountBody.parse(body).prompt or "", add_special_tokens=False)
        return {"value": len(ids), "ids": ids}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = DetokenizeBody.parse(body).ids or []
        if any(i >= self.engine.tokenizer.vocab_size for i in ids):
            raise ApiError(400, {"msg": "token id out of range", "type": "bad_input"})
        return {"result": self.engine.tokenizer.decode(ids, skip_special_tokens=False), "success": True}


def _kobold_events(job: Job, disconnected: Callable[[], bool], logprobs: LogprobFormatter | None,
                   toolset: Toolset | None) -> Iterator[bytes]:
    """One event per piece of text; with ``logprobs`` each carries those of its own tokens; with
    tools the last event names the calls the text made."""
    offset = 0
    try:
        for chunk in job.chunks(disconnected):
            if chunk.result is None and not chunk.text:
                continue
            event: dict[str, Any] = {"token": chunk.text, "finish_reason": None}
            if chunk.result is not None:
                event = {"token": "", "finish_reason": chunk.result.finish_reason}
                calls = toolset.parse(chunk.result.text) if toolset is not None else None
                if calls:
                    event.update(finish_reason="tool_calls", tool_calls=calls)
            if logprobs is not None:
                event["logprobs"] = logprobs.kobold(chunk.logprobs, offset)
                offset += len(chunk.text)
            yield sse_event(event, "message")
    except GenerationFailed as exc:  # headers are sent: say so in the stream, as valid JSON
        yield sse_event({"token": "", "finish_reason": "error", "error": jobs.stream_failure(exc)}, "message")
