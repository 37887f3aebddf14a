"""OpenAI-compatible completions on the same engine, queue and abort as the Kobold routes."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ...chat.templates import ChatTemplate, ChatTemplateError
from ...engine.engine import Engine, GenerationFailed
from ...engine.generation import GenerationRequest, GenerationResult, TokenLogprob, token_budget
from ...settings import Settings
from .. import jobs
from ..errors import ApiError
from ..logprobs import LogprobFormatter
from ..reasoning import ReasoningSplitter, split_reasoning
from ..sse import EventStream, sse_event
from ..tools import Toolset, with_instructions, with_tool_calls
from .schemas import ChatCompletionInput, CompletionInput, OpenAIInput, parse_chat_completion

if TYPE_CHECKING:
    from ..chat.serving import ChatService, TurnEvent


#: What a chat completion may carry for the server-side chat (the extension): everything else
#: (messages, samplers, limits) is read as the OpenAI route reads it.
CHAT_EXTENSION_FIELDS = ("character", "conversation_id", "mode", "your_name", "name1", "user_name",
                         "instruction_template", "chat_instruct_command", "chat-instruct_command")


class OpenAIService:
    def __init__(self, engine: Engine, settings: Settings, template: ChatTemplate) -> None:
        self.engine = engine
        self.settings = settings
        self.template = template
        self.created = int(time.time())
        self.logprobs = LogprobFormatter(engine.tokenizer)

    # --- models -----------------------------------------------------------------------
    @property
    def model_ids(self) -> list[str]:
        name = self.engine.model_name
        return [f"koboldcpp/{name}", name]

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": self.model_ids[0], "object": "model", "created": self.created, "owned_by": "kobold_api",
             "permission": [], "root": self.model_ids[0]}]}

    def _response_model(self) -> str:
        """The id responses name. Any requested ``model`` is served by the one loaded model, as
        KoboldCpp does: clients with a hard-coded name (``gpt-3.5-turbo``) keep working."""
        return self.model_ids[0]

    # --- completions ------------------------------------------------------------------
    def completion(self, parsed: CompletionInput, disconnected: Callable[[], bool]) -> dict[str, Any] | EventStream:
        model = self._response_model()
        jobs.check_choices(self.settings, len(parsed.prompts) * parsed.n, "prompt" if len(parsed.prompts) > 1 else "n")
        prompts_ids = [self._prompt_ids(prompt, parsed) for prompt in parsed.prompts]
        prompt_texts = [p if isinstance(p, str) else self.engine.tokenizer.decode(p, skip_special_tokens=False)
                        for p in parsed.prompts]
        plans = [(p_index, ids, c) for p_index, ids in enumerate(prompts_ids) for c in range(parsed.n)]
        # echo + logprobs: the prompt is scored too (evaluation harnesses read it).
        parsed.prompt_logprobs = parsed.echo and parsed.logprobs is not None
        if parsed.stream:
            return self._stream(parsed, plans, model, "text_completion", disconnected,
                                lambda index, text: {"text": text, "index": index, "logprobs": None,
                                                     "finish_reason": None},
                                echo=[prompt_texts[p] for p, _, _ in plans] if parsed.echo else None,
                                logprobs=self.logprobs.legacy)
        choices, usage = [], _Usage()
        for index, ((p_index, ids, copy), result) in enumerate(zip(plans, self._run_all(parsed, plans, disconnected))):
            usage.add(result, count_prompt=copy == 0)
            prefix = prompt_texts[p_index] if parsed.echo else ""
            choices.append({"text": prefix + result.text, "index": index, "finish_reason": result.finish_reason,
                            "logprobs": self._completion_logprobs(result, ids, prefix)
                            if parsed.logprobs is not None else None})
        return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage.as_dict()}

    def chat_completions(self, body: dict[str, Any], chat: "ChatService", disconnected: Callable[[], bool],
                         idempotency_key: str | None = None) -> dict[str, Any] | EventStream:
        """Plain chat completions, or (extension) a server-side character/conversation turn, where
        ``idempotency_key`` answers a retried turn once."""
        if body.get("character") is not None or body.get("conversation_id") is not None:
            return self.character_chat_completion(body, chat, disconnected, idempotency_key)
        parsed = parse_chat_completion(body, self.settings.generation, self._renders_tools)
        return self.chat_completion(parsed, disconnected)

    @property
    def _renders_tools(self) -> bool:
        return bool(getattr(self.template, "renders_tools", False))

    def chat_completion(self, parsed: ChatCompletionInput,
                        disconnected: Callable[[], bool]) -> dict[str, Any] | EventStream:
        model = self._response_model()
        toolset = parsed.toolset
        variables = parsed.template_variables
        try:
            if toolset is not None and self._renders_tools:
                prompt = self.template.render(parsed.messages, True, tools=[
                    {"type": "function", "function": function} for function in toolset.offered], variables=variables)
            elif toolset is not None:
                prompt = self.template.render(with_instructions(parsed.messages, toolset.instructions()), True,
                                              variables=variables)
            else:
                prompt = self.template.render(parsed.messages, add_generation_prompt=True, variables=variables)
        except ChatTemplateError as exc:  # e.g. a template that only accepts alternating roles
            raise ApiError(400, {"msg": f"The model's chat template rejected the messages: {exc}",
                                 "type": "invalid_messages"}, param="messages") from exc
        ids = self._prompt_ids(prompt, parsed)
        parsed.stop = [*parsed.stop, *self.template.stop_strings]
        plans = [(0, ids, copy) for copy in range(parsed.n)]
        think, opened = self.engine.generator.think, self.engine.generator.think.opened_by(prompt)
        if parsed.stream:
            return self._stream(parsed, plans, model, "chat.completion.chunk", disconnected,
                                lambda index, text: {"index": index, "delta": {"content": text},
                                                     "logprobs": None, "finish_reason": None},
                                first=lambda index: {"index": index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None},
                                logprobs=lambda items, _: {"content": self.logprobs.content(items)}, toolset=toolset,
                                reasoning=lambda: ReasoningSplitter(think, opened))
        choices, usage = [], _Usage()
        for index, ((_, _, copy), result) in enumerate(zip(plans, self._run_all(parsed, plans, disconnected))):
            usage.add(result, count_prompt=copy == 0)
            calls = toolset.parse(result.text) if toolset is not None else None
            reasoning, content = split_reasoning(result.text, think, opened)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
            choices.append({"index": index, "message": message,
                            "logprobs": {"content": self.logprobs.content(result.token_logprobs)}
                            if parsed.logprobs is not None else None,
                            "finish_reason": "tool_calls" if calls else result.finish_reason})
        return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices, "usage": usage.as_dict()}

    def character_chat_completion(self, body: dict[str, Any], chat: "ChatService", disconnected: Callable[[], bool],
                                  idempotency_key: str | None = None) -> dict[str, Any] | EventStream:
        """Extension: ``character`` and/or ``conversation_id`` route the turn through the server-side chat.

        The last user message is the new input; with ``conversation_id`` the stored history
        is used (and the turn stored), otherwise earlier messages become the history. A last
        message of the assistant's is continued (OpenAI clients' "prefill"), as ``_continue``;
        with no user or assistant message the character speaks first.
        """
        model = self._response_model()
        parsed = parse_chat_completion(body, self.settings.generation)
        turns = [m for m in parsed.messages if m["role"] in ("user", "assistant")]
        while turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()  # an empty assistant message asks for a reply, like none at all
        continuing = bool(turns) and turns[-1]["role"] == "assistant"
        rows: list[list[str]] = []
        for message in turns if continuing else turns[:-1]:
            if message["role"] == "user" or not rows or rows[-1][1]:
                rows.append(["", ""])
            rows[-1][0 if message["role"] == "user" else 1] = message["content"]
        # The chat fields of the body (which character, mode, template...), then this request's
        # own turn, samplers and limits, as the OpenAI route read them (its defaults included).
        chat_fields = chat.parse({key: body[key] for key in CHAT_EXTENSION_FIELDS if key in body})
        chat_input = replace(
            chat_fields, user_input="" if continuing or not turns else turns[-1]["content"], history=rows,
            continue_last=continuing, sampling=parsed.sampling, stop_strings=parsed.stop, ban_eos=parsed.ban_eos,
            banned_phrases=parsed.banned_phrases, max_new_tokens=parsed.max_tokens or chat_fields.max_new_tokens,
            max_context_length=parsed.truncation_length or chat_fields.max_context_length)
        chat_input = chat.keyed(chat_input, body, idempotency_key)
        if parsed.stream:
            events, close = chat.stream_turn(chat_input, disconnected)
            return EventStream(self._turn_chunks(events, model, parsed.include_usage), on_close=close)
        result = chat.turn(chat_input, disconnected)
        message: dict[str, Any] = {"role": "assistant", "content": result["text"]}
        if "reasoning" in result:
            message["reasoning_content"] = result["reasoning"]
        if "conversation_id" in result:
            message["conversation_id"] = result["conversation_id"]
        return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                             "finish_reason": result["finish_reason"]}],
                "usage": _turn_usage(result)}

    def _turn_chunks(self, events: Iterator["TurnEvent"], model: str, include_usage: bool) -> Iterator[bytes]:
        """A server-side chat turn as ``chat.completion.chunk`` events; the last chunk's delta
        names the ``conversation_id`` the turn was stored in."""
        writer = _ChunkWriter("chat.completion.chunk", model, include_usage)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return writer.choice({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})

        yield chunk({"role": "assistant", "content": ""})
        for event in events:
            if event.error is not None:
                yield writer.error(event.error)
                return
            if event.result is None:
                yield chunk({"content": event.text})
                continue
            result = event.result
            delta = {"conversation_id": result["conversation_id"]} if "conversation_id" in result else {}
            if "reasoning" in result:  # the thoughts, which the text streamed above left out
                delta["reasoning_content"] = result["reasoning"]
            yield chunk(delta, event.finish_reason)
            if include_usage:
                yield writer.usage(_turn_usage(result))
        yield sse_event("[DONE]")

    # --- shared -----------------------------------------------------------------------
    def _max_tokens(self, parsed: OpenAIInput) -> int:
        """``max_tokens`` (or the default), kept below the context so some prompt always fits."""
        return token_budget(parsed.max_tokens or self.settings.generation.max_length, self._context(parsed))[0]

    def _context(self, parsed: OpenAIInput) -> int:
        """The server's context, or less where the client's ``truncation_length`` asks for less."""
        context = jobs.context_size(self.settings, self.engine)
        return min(parsed.truncation_length or context, context)

    def _completion_logprobs(self, result: GenerationResult, prompt_ids: list[int], prefix: str) -> dict[str, Any]:
        """The completions shape; with echo the prompt's tokens come first (the first one null)."""
        generated = self.logprobs.legacy(result.token_logprobs, len(prefix))
        if result.prompt_logprobs is None:
            return generated
        scored = self.logprobs.legacy(result.prompt_logprobs, 0, token_ids=prompt_ids)
        return {key: scored[key] + generated[key] for key in generated}

    def _prompt_ids(self, prompt: str | list[int], parsed: OpenAIInput) -> list[int]:
        """Tokenize, cutting the oldest tokens when prompt + max_tokens exceed the context: what
        KoboldCpp does, and what SillyTavern's KoboldCpp mode relies on when its own context
        setting is larger than the server's."""
        if isinstance(prompt, list) and max(prompt) >= self.engine.tokenizer.vocab_size:
            raise ApiError(400, {"msg": f"Token id {max(prompt)} is outside the vocabulary.",
                                 "type": "invalid_token"}, param="prompt")
        request = GenerationRequest(prompt_ids=prompt if isinstance(prompt, list) else None,
                                    prompt=prompt if isinstance(prompt, str) else None,
                                    max_new_tokens=self._max_tokens(parsed), max_context_length=self._context(parsed))
        return self.engine.generator.prompt_ids(request)[0]

    def _request(self, ids: list[int], parsed: OpenAIInput, copy: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=ids, max_new_tokens=self._max_tokens(parsed),
                                 max_context_length=self._context(parsed),
                                 sampling=parsed.sampling.for_copy(copy), stop_strings=parsed.stop,
                                 trim_stop=True, ban_eos=parsed.ban_eos, logprobs=parsed.logprobs,
                                 banned_phrases=parsed.banned_phrases, constraint=parsed.constraint,
                                 prompt_logprobs=parsed.prompt_logprobs)

    def _submit_all(self, parsed: OpenAIInput, plans: list[tuple[int, list[int], int]]) -> jobs.JobWaves:
        """Every choice is queued at once (they decode as one batch), or in waves when there are
        more than the queue holds (see :class:`jobs.JobWaves`)."""
        return jobs.JobWaves(self.engine, self.settings, [self._request(ids, parsed, copy) for _, ids, copy in plans])

    def _run_all(self, parsed: OpenAIInput, plans: list[tuple[int, list[int], int]],
                 disconnected: Callable[[], bool]) -> list[GenerationResult]:
        submitted = self._submit_all(parsed, plans)
        try:
            return [jobs.wait(job, disconnected) for job in submitted]
        finally:
            submitted.cancel()

    def _stream(self, parsed: OpenAIInput, plans: list[tuple[int, list[int], int]], model: str, kind: str,
                disconnected: Callable[[], bool], piece: Callable[[int, str], dict],
                first: Callable[[int], dict] | None = None, echo: list[str] | None = None,
                logprobs: Callable[[list[TokenLogprob], int], Any] | None = None,
                toolset: Toolset | None = None,
                reasoning: Callable[[], ReasoningSplitter] | None = None) -> EventStream:
        """Queue every choice now (so a full queue is a 503 before any byte is sent), then stream
        the choices one after another; with logprobs on, each chunk carries its own tokens'
        (``logprobs(items, text offset)`` shapes them); with ``reasoning`` (chat), a thinking
        model's thoughts go out as ``reasoning_content`` deltas."""
        submitted = self._submit_all(parsed, plans)
        shape = logprobs if parsed.logprobs is not None else None
        events = self._events(parsed, plans, submitted, model, kind, disconnected, piece, first, echo, shape,
                              toolset, reasoning)
        return EventStream(events, on_close=submitted.cancel)

    def _events(self, parsed: OpenAIInput, plans: list[tuple[int, list[int], int]], submitted: jobs.JobWaves,
                model: str, kind: str, disconnected: Callable[[], bool], piece: Callable[[int, str], dict],
                first: Callable[[int], dict] | None, echo: list[str] | None,
                logprobs: Callable[[list[TokenLogprob], int], Any] | None,
                toolset: Toolset | None, reasoning: Callable[[], ReasoningSplitter] | None) -> Iterator[bytes]:
        writer, usage = _ChunkWriter(kind, model, parsed.include_usage), _Usage()
        envelope = writer.choice

        try:
            for index, ((_, ids, copy), job) in enumerate(zip(plans, submitted)):
                splitter = reasoning() if reasoning is not None else None
                if first is not None:
                    yield envelope(first(index))
                offset = 0
                # The echoed prompt waits for its scores when they were asked for (they come with
                # the first chunk); they are in the completions shape, the first token's null.
                echo_waits = echo is not None and logprobs is not None
                if echo is not None and not echo_waits:
                    yield envelope(piece(index, echo[index]))
                    offset = len(echo[index])
                for chunk, calls in with_tool_calls(job.chunks(disconnected), toolset):
                    if echo_waits:
                        assert echo is not None
                        echoed = piece(index, echo[index])
                        echoed["logprobs"] = self.logprobs.legacy(chunk.prompt_logprobs or [], 0, token_ids=ids)
                        yield envelope(echoed)
                        offset, echo_waits = len(echo[index]), False
                    if chunk.result is not None:
                        if splitter is not None and any(rest := splitter.finish()):
                            yield envelope(_split_delta(piece(index, ""), *rest))
                        usage.add(chunk.result, count_prompt=copy == 0)
                        final = piece(index, "")
                        if "delta" in final:
                            final["delta"] = {}
                        final["finish_reason"] = chunk.result.finish_reason
                        if calls:
                            yield envelope({"index": index, "delta": {"tool_calls": [
                                {"index": number, **call} for number, call in enumerate(calls)]},
                                "logprobs": None, "finish_reason": None})
                            final["finish_reason"] = "tool_calls"
                    elif chunk.text and splitter is not None:
                        thought, said = splitter.feed(chunk.text)
                        if not (thought or said or logprobs):
                            continue  # a tag, or whitespace, not settled yet
                        final = _split_delta(piece(index, ""), thought, said)
                    elif chunk.text:
                        final = piece(index, chunk.text)
                    else:
                        continue
                    if logprobs is not None:
                        final["logprobs"] = logprobs(chunk.logprobs, offset)
                        offset += len(chunk.text)
                    yield envelope(final)
            if parsed.include_usage:
                yield writer.usage(usage.as_dict())
            yield sse_event("[DONE]")
        except GenerationFailed as exc:  # headers are sent: report it in the stream
            yield writer.error(jobs.stream_failure(exc))
        except ApiError as exc:  # a later wave found the queue full (see jobs.JobWaves)
            yield writer.error(exc.message)


def _split_delta(choice: dict[str, Any], thought: str, said: str) -> dict[str, Any]:
    """A chat chunk carrying ``thought`` as ``reasoning_content`` and ``said`` as ``content``."""
    delta: dict[str, Any] = {}
    if thought:
        delta["reasoning_content"] = thought
    if said or not thought:
        delta["content"] = said
    return {**choice, "delta": delta}


class _ChunkWriter:
    """One OpenAI stream's SSE events: choice chunks sharing an id, the usage chunk, an error."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = _new_id("chatcmpl" if "chat" in kind else "cmpl")
        self.created = int(time.time())

    def _body(self, choices: list[dict], usage: dict[str, int] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                                "choices": choices}
        if self.include_usage:  # OpenAI: null on every chunk but the last
            body["usage"] = usage
        return body

    def choice(self, choice: dict) -> bytes:
        return sse_event(self._body([choice], None))

    def usage(self, usage: dict[str, int]) -> bytes:
        return sse_event(self._body([], usage))

    @staticmethod
    def error(message: str) -> bytes:
        return sse_event({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


class _Usage:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, result: GenerationResult, count_prompt: bool) -> None:
        if count_prompt:
            self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _turn_usage(result: dict[str, Any]) -> dict[str, int]:
    usage = _Usage()
    usage.prompt_tokens, usage.completion_tokens = result["prompt_tokens"], result["completion_tokens"]
    return usage.as_dict()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
