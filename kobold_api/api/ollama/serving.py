"""Ollama's API on the same engine, queue and abort as the other route families.

The official ``ollama`` client and Open WebUI read these shapes: model listings (``/api/tags``,
``/api/ps``, ``/api/show``) describe the one loaded model under ``<name>:latest``; generation
(``/api/generate``, ``/api/chat``) streams NDJSON by default, one object per line, the last with
``done: true``, the counts and the durations in nanoseconds.

Any ``model`` name is served by the loaded model, as KoboldCpp's emulation does. ``num_predict``
of -1 (Ollama's default) means what it means in Ollama: until the model stops, up to the end of
the context.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from flask import Response

from ...chat.templates import ChatTemplate, ChatTemplateError, render_open_turn
from ...engine.constraints import Constraint
from ...engine.engine import Engine, GenerationFailed, Job
from ...engine.generation import GenerationRequest, GenerationResult, token_budget
from ...engine.prepare import read_manifest
from ...settings import Settings
from .. import jobs
from ..errors import ApiError, bad_input_error
from ..logprobs import LogprobFormatter
from ..reasoning import ReasoningSplitter, split_reasoning, template_variables
from ..sse import SSE_HEADERS, EventStream
from ..tools import Toolset, with_instructions, with_tool_calls
from .schemas import OllamaChatBody, OllamaGenerateBody, OllamaBody, OllamaShowBody

#: What KoboldCpp's emulation reports; clients gate features on it.
OLLAMA_VERSION = "0.7.0"
NDJSON = "application/x-ndjson"
#: ``expires_at`` of a model that is never unloaded (Ollama shows a far date for keep_alive -1).
NEVER = "2318-01-01T00:00:00Z"
_PARAMETER_SIZE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*([mMbB])(?![a-zA-Z])")


def now() -> str:
    """Ollama's ``created_at``: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ndjson_line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")


def ndjson_response(lines: EventStream) -> Response:
    """A streamed response that waitress sends line by line."""
    return Response(lines, status=200, mimetype=NDJSON, headers=SSE_HEADERS, direct_passthrough=True)


def _nanoseconds(seconds: float, at_least: int = 0) -> int:
    return max(at_least, int(seconds * 1e9))


@dataclass
class _Run:
    """One generation as the route asked for it: what to send, and how to answer."""

    model: str
    request: GenerationRequest
    logprobs: bool
    #: A streamed piece's fields (None: nothing to send yet).
    piece: Callable[[str], dict[str, Any] | None]
    #: The last object's fields, from the result and the calls it made (with tools).
    final: Callable[[GenerationResult, list[dict[str, Any]] | None], dict[str, Any]]
    toolset: Toolset | None = None


class OllamaService:
    def __init__(self, engine: Engine, settings: Settings, template: ChatTemplate) -> None:
        self.engine = engine
        self.settings = settings
        self.template = template
        self.logprobs = LogprobFormatter(engine.tokenizer)
        self._model: dict[str, Any] | None = None

    # --- listings -----------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        name = self.engine.model_name
        return name if ":" in name else f"{name}:latest"

    def version(self) -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    def _describe(self) -> dict[str, Any]:
        """The loaded model's listing entry, read from its folder once."""
        if self._model is None:
            folder = getattr(self.engine.generator.model, "model_dir", None)
            manifest = read_manifest(folder) if folder is not None else {}
            files = [path for path in Path(folder).iterdir() if path.is_file()] if folder is not None else []
            size = sum(path.stat().st_size for path in files)
            modified = max((path.stat().st_mtime for path in files), default=time.time())
            architecture = str(manifest.get("architecture") or "unknown")
            match = _PARAMETER_SIZE.search(self.engine.model_name)
            identity = json.dumps({"name": self.engine.model_name, "manifest": manifest, "size": size},
                                  sort_keys=True, default=str)
            self._model = {
                "name": self.model_name, "model": self.model_name,
                "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z"),
                "size": size, "digest": hashlib.sha256(identity.encode("utf-8")).hexdigest(),
                "details": {"parent_model": "", "format": "onnx", "family": architecture, "families": [architecture],
                            "parameter_size": f"{match.group(1)}{match.group(2).upper()}" if match else "",
                            "quantization_level": str(manifest.get("quant") or "")},
            }
        return self._model

    def tags(self) -> dict[str, Any]:
        return {"models": [self._describe()]}

    def ps(self) -> dict[str, Any]:
        entry = self._describe()
        on_gpu = getattr(self.engine.generator.model, "device", "cpu") == "cuda"
        return {"models": [{**entry, "expires_at": NEVER, "size_vram": entry["size"] if on_gpu else 0,
                            "context_length": self._server_context()}]}

    def show(self, body: OllamaShowBody) -> dict[str, Any]:
        """Any ``model`` name describes the loaded model (as the generation routes serve it)."""
        entry = self._describe()
        architecture = entry["details"]["family"]
        context = self._server_context()
        stops = "".join(f"stop {json.dumps(stop)}\n" for stop in self.template.stop_strings)
        parameters = f"num_ctx {context}\n{stops}"
        template = str(getattr(self.template, "source", ""))
        return {
            "license": "",
            "modelfile": f"# Served by kobold_api\nFROM {self.model_name}\n"
                         + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
            "parameters": parameters,
            "template": template,
            "details": entry["details"],
            "model_info": {"general.architecture": architecture, f"{architecture}.context_length": context},
            "capabilities": ["completion", "tools"],
            "modified_at": entry["modified_at"],
        }

    # --- generation ---------------------------------------------------------------------
    def generate(self, body: OllamaGenerateBody, disconnected: Callable[[], bool]) -> dict[str, Any] | EventStream:
        started = time.perf_counter()
        model = body.model or self.model_name
        prefix = list(body.context or ())
        if not body.prompt and not prefix:
            return self._load_reply(model, body, {"response": ""})
        if body.raw:
            prompt, stops = body.prompt, []
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            prompt = self._render([*messages, {"role": "user", "content": body.prompt}])
            stops = self.template.stop_strings
        request = self._request(body, prompt, prefix, stops)

        def final(result: GenerationResult, calls: list[dict[str, Any]] | None, text: str = "") -> dict[str, Any]:
            """``context``: the prompt's ids and the reply's, for the client to send back."""
            reply = self.engine.tokenizer.encode(result.text, add_special_tokens=False)
            return {"response": text, **self._done(result, started, context=[*(request.prompt_ids or ()), *reply])}

        run = _Run(model, request, body.logprobs is True, lambda text: {"response": text}, final)
        if body.streaming:
            return self._stream(run, disconnected)
        result = self._wait(run, disconnected)
        return {"model": model, "created_at": now(), **final(result, None, result.text),
                **self._logprobs(run, result)}

    def chat(self, body: OllamaChatBody, disconnected: Callable[[], bool]) -> dict[str, Any] | EventStream:
        started = time.perf_counter()
        model = body.model or self.model_name
        if not body.messages:
            return self._load_reply(model, body, {"message": {"role": "assistant", "content": ""}})
        toolset = body.toolset()
        native = toolset is not None and bool(getattr(self.template, "renders_tools", False))
        messages = [message.as_dict(native) for message in body.messages]
        if toolset is not None and not native:
            messages = with_instructions(messages, toolset.instructions())
        tools = [{"type": "function", "function": function} for function in toolset.offered] if native else None
        # ``think``: false switches thinking off (an empty block where the template can, else a
        # block closed at once), a level bounds it as reasoning_effort does; true or absent: free.
        effort = "none" if body.think is False else body.think if body.think in ("low", "medium", "high") else ""
        variables = template_variables(None, effort)
        if messages[-1]["role"] == "assistant":  # Ollama continues a last assistant message
            last = messages.pop()
            prompt = self._render(messages, continue_with=last["content"], variables=variables)
        else:
            prompt = self._render(messages, tools=tools, variables=variables)
        constraint = toolset.constraint() if toolset is not None else None
        request = self._request(body, prompt, [], self.template.stop_strings, constraint)
        if effort:
            request.sampling = replace(request.sampling, reasoning_effort=effort)
        think = self.engine.generator.think
        opened = think.opened_by(prompt)
        splitter = ReasoningSplitter(think, opened)

        def message(content: str, thinking: str | None = None) -> dict[str, Any]:
            said: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                said["thinking"] = thinking
            return {"message": said}

        def piece(text: str) -> dict[str, Any] | None:
            thought, said = splitter.feed(text)
            return message(said, thought) if thought or said else None

        def final(result: GenerationResult, calls: list[dict[str, Any]] | None, text: str = "") -> dict[str, Any]:
            if calls:  # Ollama's shape: the arguments as an object, no ids
                return {"message": {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": call["function"]["name"],
                                  "arguments": json.loads(call["function"]["arguments"])}} for call in calls]},
                        **self._done(result, started)}
            if text:  # the whole reply (not streamed)
                thought, said = split_reasoning(text, think, opened)
            else:  # the end of a stream: what the splitter still held
                thought, said = splitter.finish()
            return {**message(said, thought), **self._done(result, started)}

        run = _Run(model, request, body.logprobs is True, piece, final, toolset)
        if body.streaming:
            return self._stream(run, disconnected)
        result = self._wait(run, disconnected)
        calls = toolset.parse(result.text) if toolset is not None else None
        return {"model": model, "created_at": now(), **final(result, calls, result.text),
                **self._logprobs(run, result)}

    # --- shared -------------------------------------------------------------------------
    def _server_context(self) -> int:
        return jobs.context_size(self.settings, self.engine)

    def _load_reply(self, model: str, body: OllamaBody, empty: dict[str, Any]) -> dict[str, Any]:
        """An empty prompt (or no messages) is Ollama's load request: the model is always loaded."""
        return {"model": model, "created_at": now(), **empty, "done": True,
                "done_reason": "unload" if body.unloading else "load"}

    def _render(self, messages: list[dict[str, Any]], continue_with: str | None = None,
                tools: list[dict[str, Any]] | None = None, variables: dict[str, Any] | None = None) -> str:
        try:
            if continue_with is not None:
                return render_open_turn(self.template, messages, "assistant", continue_with)
            return self.template.render(messages, add_generation_prompt=True, tools=tools, variables=variables)
        except ChatTemplateError as exc:  # e.g. a template that only accepts alternating roles
            raise ApiError(400, {"msg": f"The model's chat template rejected the messages: {exc}",
                                 "type": "invalid_messages"}) from exc

    def _request(self, body: OllamaBody, prompt: str, prefix: list[int], template_stops: list[str],
                 constraint: Constraint | None = None) -> GenerationRequest:
        """The engine request: the prompt cut to the context (oldest tokens first, as the other
        routes do), and the reply's limit: ``num_predict``, or the rest of the context."""
        options = body.sampler_options
        context = min(options.num_ctx or self._server_context(), self._server_context())
        if prefix and max(prefix) >= self.engine.tokenizer.vocab_size:
            raise bad_input_error(f"context: token id {max(prefix)} is outside the vocabulary.")
        wanted = options.max_tokens()
        # "Until the context is full" still keeps the usual reply room when the prompt must be cut.
        reply = token_budget(wanted or self.settings.generation.max_length, context)[0]
        ids = [*prefix, *self.engine.tokenizer.encode(prompt, add_special_tokens=False)] if prefix else None
        probe = GenerationRequest(prompt=None if prefix else prompt, prompt_ids=ids, max_new_tokens=reply,
                                  max_context_length=context)
        ids = self.engine.generator.prompt_ids(probe)[0]
        return GenerationRequest(
            prompt_ids=ids, max_new_tokens=reply if wanted else max(1, context - len(ids)),
            max_context_length=context, sampling=options.ollama_sampling(self.settings.generation),
            stop_strings=list(dict.fromkeys([*options.stop_strings, *template_stops])), trim_stop=True,
            ban_eos=options.ban_eos, banned_phrases=options.banned_phrases,
            constraint=constraint or body.constraint(),
            logprobs=body.top_logprob_count(),
        )

    def _done(self, result: GenerationResult, started: float,
              context: list[int] | None = None) -> dict[str, Any]:
        """The last object's fields: why it ended, the counts and the durations (ns)."""
        done: dict[str, Any] = {"done": True, "done_reason": result.finish_reason}
        if context is not None:
            done["context"] = context
        return {**done, "total_duration": _nanoseconds(time.perf_counter() - started, 1), "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens,
                "prompt_eval_duration": _nanoseconds(result.prefill_seconds, 1),
                "eval_count": result.completion_tokens, "eval_duration": _nanoseconds(result.decode_seconds, 1)}

    def _wait(self, run: _Run, disconnected: Callable[[], bool]) -> GenerationResult:
        job = jobs.submit(self.engine, run.request)
        try:
            return jobs.wait(job, disconnected)
        finally:
            jobs.cancel_unfinished([job])

    def _stream(self, run: _Run, disconnected: Callable[[], bool]) -> EventStream:
        """Queue the job now (a full queue is a 503 before any byte is sent), then stream it; a
        client that leaves cancels it."""
        job = jobs.submit(self.engine, run.request)
        return EventStream(self._lines(run, job, disconnected), on_close=lambda: jobs.cancel_unfinished([job]))

    def _lines(self, run: _Run, job: Job, disconnected: Callable[[], bool]) -> Iterator[bytes]:
        try:
            for chunk, calls in with_tool_calls(job.chunks(disconnected), run.toolset):
                extra = {"logprobs": self.logprobs.content(chunk.logprobs)} if run.logprobs and chunk.logprobs else {}
                if chunk.result is not None:
                    yield ndjson_line({"model": run.model, "created_at": now(), **run.final(chunk.result, calls),
                                       **extra})
                elif chunk.text and (piece := run.piece(chunk.text)) is not None:
                    yield ndjson_line({"model": run.model, "created_at": now(), **piece, "done": False, **extra})
        except GenerationFailed as exc:  # headers are sent: report it in the stream, as Ollama does
            yield ndjson_line({"error": jobs.stream_failure(exc)})

    def _logprobs(self, run: _Run, result: GenerationResult) -> dict[str, Any]:
        """Ollama's logprobs: OpenAI chat's entries (token, logprob, bytes, top_logprobs)."""
        return {"logprobs": self.logprobs.content(result.token_logprobs)} if run.logprobs else {}
