"""Server-side chat: the logic behind /api/v1/chat, characters and conversations.

The server holds the character and (with ``conversation_id``) the history, builds the
prompt with the one :class:`PromptBuilder`, stops at the right place and stores the
turn. Without a conversation id it behaves like text-generation-webui's stateless chat
API: the client sends ``history`` and gets the updated history back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping

from ...chat.cards import character_to_v2_dict
from ...chat.character import Character
from ...chat.characters import SHIPPED_CHARACTERS, CharacterExistsError, CharacterStore, UnsafeNameError
from ...chat.prompt import BuiltPrompt, ChatMessage, PromptBuilder, PromptRequest, clean_reply
from ...chat.conversations import ConversationStore, TurnBusy, TurnTicket
from ...chat.templates import ChatTemplate, get_named_template
from ...engine.engine import Engine, GenerationFailed, Job
from ...engine.generation import STOP_ABORT, GenerationRequest, GenerationResult, token_budget
from ...engine.thinking import ThinkFormat
from ...settings import Settings
from .. import jobs
from ..errors import DOMAIN_ERRORS, ApiError, admin_error, domain_error, not_found_error, origin_error
from ..reasoning import split_reasoning
from ..sse import EventStream, sse_event
from .history import history_dict, is_greeting_row, rows_to_messages, stored_history, stored_rows, with_reply
from .schemas import (
    DEFAULT_CHARACTER, DEFAULT_USER, ChatInput, MessageEditBody, NewConversationBody, RenameBody, parse_chat_input,
)

#: How long a turn waits for an earlier turn on the same conversation before giving up.
TURN_WAIT_SECONDS = 300.0
#: The longest ``Idempotency-Key`` kept (Stripe's and the IETF draft's keys are far shorter).
MAX_IDEMPOTENCY_KEY = 255

log = logging.getLogger(__name__)


class TurnClaim:
    """A conversation held for one turn or edit: this process's lock plus the database lease
    (``ticket``; None for a stateless chat). ``release`` is idempotent and ends the lease unless
    the turn was stored (``stored``)."""

    def __init__(self, ticket: TurnTicket | None, store: ConversationStore | None = None,
                 lock: threading.Lock | None = None) -> None:
        self.ticket = ticket
        self.stored = False
        self._store, self._lock = store, lock
        self._released = threading.Event()

    @property
    def replay(self) -> Mapping[str, Any] | None:
        """What a finished turn with the same idempotency key answered; None when this one runs."""
        return self.ticket.replay if self.ticket is not None else None

    def release(self) -> None:
        if self._released.is_set():
            return
        self._released.set()
        try:
            if self._store is not None and self.ticket is not None and not self.stored:
                self._store.release_turn(self.ticket)
        except Exception:  # its lease runs out on its own; the lock must not stay taken
            log.warning("could not end the lease of a chat turn on %s", self.ticket.conversation_id, exc_info=True)
        finally:
            if self._lock is not None:
                self._lock.release()


@dataclass
class TurnPlan:
    """What one chat call will do: the prompt, how to tidy the generated text, and how
    to store/return it. ``clean`` is used for the stream too, so a client is shown
    exactly the text that gets stored."""

    prompt: BuiltPrompt
    request: GenerationRequest
    clean: Callable[[str], str]
    #: Stores the reply (with the claim's ticket, whose turn it completes with the outcome).
    commit: Callable[[str, TurnTicket | None, Mapping[str, Any]], dict[str, Any]]
    speaker: str
    #: The history rows (text-generation-webui's shape) as ``commit`` will leave them with
    #: this reply, without storing anything: what a legacy stream shows while the reply grows.
    preview: Callable[[str], dict[str, list[list[str]]]]
    #: A reasoning model's tags and whether the prompt opened its block: its thoughts are then
    #: split off before ``clean`` (None: the text is the reply as it is, e.g. a continuation).
    reasoning: tuple[ThinkFormat, bool] | None = None

    def parts(self, raw: str) -> tuple[str | None, str]:
        """The thoughts in generated ``raw`` (None: the model did not think) and the reply, cleaned."""
        thoughts, answer = split_reasoning(raw, *self.reasoning) if self.reasoning is not None else (None, raw)
        return thoughts, self.clean(answer)

    def stream_preview(self, raw: str) -> str:
        """The part of the final reply already certain after ``raw`` was generated.

        While the text could still turn into the ``"{speaker}:"`` prefix that ``clean`` strips,
        or the opening tag of a think block, nothing is certain yet.
        """
        head = raw.lstrip().casefold()
        opening = self.reasoning[0].start.casefold() if self.reasoning is not None else ""
        if head and (f"{self.speaker}:".casefold().startswith(head) or opening.startswith(head)):
            return ""
        return self.parts(raw)[1]


@dataclass
class TurnEvent:
    """One step of a streamed turn: new text, the turn's result (last: see ``ChatService.turn``),
    or an error (last)."""

    text: str = ""
    result: dict[str, Any] | None = None
    finish_reason: str | None = None
    error: str | None = None
    #: The HTTP status the error would have had before the headers went out.
    error_status: int = 500
    #: With ``stream_turn(..., with_history=True)``: the whole history so far, on text events.
    history: dict[str, list[list[str]]] | None = None


def _kobold_events(events: Iterator[TurnEvent]) -> Iterator[bytes]:
    """KoboldCpp's SSE shape; the final event also carries the turn's stored result."""
    for event in events:
        if event.error is not None:
            yield sse_event({"token": "", "finish_reason": "error", "error": event.error}, "message")
        elif event.result is not None:
            yield sse_event({"token": "", "finish_reason": event.finish_reason, "results": [event.result]}, "message")
        else:
            yield sse_event({"token": event.text, "finish_reason": None}, "message")


class ChatService:
    """Characters, conversations and chat turns.

    ``untrusted_origin`` names the browser page the current request comes from when that page
    may not touch stored data (None otherwise); such a chat turn is refused when it names a
    conversation or a character that is not one of the shipped ones. The character and
    conversation routes are refused before they get here."""

    def __init__(self, engine: Engine, settings: Settings, characters: CharacterStore,
                 conversations: ConversationStore, model_template: ChatTemplate,
                 untrusted_origin: Callable[[], str | None] = lambda: None) -> None:
        self.engine = engine
        self.settings = settings
        self.characters = characters
        self.conversations = conversations
        self.model_template = model_template
        self.untrusted_origin = untrusted_origin
        self.builder = PromptBuilder(engine.tokenizer.count, self.model_template)

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings, model_template: ChatTemplate,
                      untrusted_origin: Callable[[], str | None] = lambda: None) -> "ChatService":
        return cls(engine, settings,
                   CharacterStore(settings.characters_path, max_bytes=settings.max_upload_mb * 2**20,
                                  shipped=SHIPPED_CHARACTERS),
                   ConversationStore(settings.resolved_database_url, owner=settings.resolved_replica_name,
                                     lease_seconds=settings.turn_lease_seconds),
                   model_template, untrusted_origin)

    # --- characters -------------------------------------------------------------------
    def list_characters(self) -> dict[str, Any]:
        pictures = self.characters.picture_ids()
        return {"results": [{**_character_summary(stem, c), "avatar": stem in pictures}
                            for stem, c in self.characters.entries()]}

    def character_picture(self, name: str) -> bytes:
        """A PNG card's image; a 404 for a character without one (or no such character)."""
        self._character(name)
        picture = self.characters.picture(name)
        if picture is None:
            raise not_found_error(f"The character {name!r} has no picture (only PNG cards carry one).")
        return picture

    def get_character(self, name: str) -> dict[str, Any]:
        return {"result": character_to_v2_dict(self._character(name))}

    def upload_character(self, data: bytes, name: str | None, overwrite: bool,
                         may_replace: bool = True) -> dict[str, Any]:
        """Store a card; replacing one (``overwrite``) also needs ``may_replace`` (the admin key
        where one is set), asked only when the name is taken."""
        try:
            stem, character = self.characters.save(data, name or None, overwrite=overwrite and may_replace)
        except CharacterExistsError:
            if overwrite and not may_replace:
                raise admin_error("Replacing a character") from None
            raise
        return {"result": _character_summary(stem, character)}

    def delete_character(self, name: str) -> dict[str, Any]:
        self._character(name)
        self.characters.delete(name)
        return {"success": True}

    def _character(self, name: str) -> Character:
        """The character ``name``; a 404 when there is none, a name no file can have included."""
        try:
            return self.characters.get(name)
        except (KeyError, UnsafeNameError):
            raise not_found_error(f"No character named {name!r}.") from None

    # --- conversations ----------------------------------------------------------------
    def create_conversation(self, body: Mapping[str, Any]) -> dict[str, Any]:
        parsed = NewConversationBody.parse(body)
        character = self._character(parsed.character or DEFAULT_CHARACTER)
        user_name = parsed.user_name or DEFAULT_USER
        title, greeting_index = parsed.title, parsed.greeting_index or 0
        greetings = [clean_reply(g, character.display_name, user_name) for g in character.greetings]
        if greetings and greeting_index >= len(greetings):  # the request is fine; the character has fewer
            raise ApiError(409, {"msg": f"greeting_index: {character.name} has {len(greetings)} greetings.",
                                 "type": "conflict"}, param="greeting_index")
        greetings = greetings[greeting_index:] + greetings[:greeting_index]
        conversation = self.conversations.create(character.name, user_name, greetings, title)
        return {"result": conversation.to_dict()}

    def list_conversations(self, character: str | None) -> dict[str, Any]:
        if character:  # the stored name is the card's; accept any spelling the character routes accept
            try:
                character = self.characters.get(character).name
            except (KeyError, UnsafeNameError):
                pass
        return {"results": [c.to_dict(include_messages=False) for c in self.conversations.list(character)]}

    def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        return {"result": self.conversations.get(conversation_id).to_dict()}

    def rename_conversation(self, conversation_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        title = RenameBody.parse(body).title
        return {"result": self.conversations.rename(conversation_id, title).to_dict()}

    def delete_conversation(self, conversation_id: str) -> dict[str, Any]:
        self.conversations.delete(conversation_id)
        return {"success": True}

    def export_conversation(self, conversation_id: str) -> dict[str, Any]:
        return self.conversations.export(conversation_id)

    def edit_message(self, conversation_id: str, index: int, body: Mapping[str, Any]) -> dict[str, Any]:
        edit = MessageEditBody.parse(body)
        text, swipe_id = edit.text, edit.swipe_id
        claim = self._claim(conversation_id, lambda: False, kind="edit")
        try:
            if swipe_id is not None:
                self.conversations.set_swipe(conversation_id, index, swipe_id)
            if text is not None:
                self.conversations.edit_message(conversation_id, index, text)
        finally:
            claim.release()
        return self.get_conversation(conversation_id)

    def delete_message(self, conversation_id: str, index: int) -> dict[str, Any]:
        claim = self._claim(conversation_id, lambda: False, kind="edit")
        try:
            self.conversations.delete_message(conversation_id, index)
        finally:
            claim.release()
        return self.get_conversation(conversation_id)

    # --- /api/v1/chat -----------------------------------------------------------------
    def parse(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> ChatInput:
        """The chat body; with a conversation, ``idempotency_key`` (the ``Idempotency-Key`` header)
        makes a retried turn answered once (see :mod:`kobold_api.chat.turns`)."""
        return self.keyed(parse_chat_input(body, self.settings.generation), body, idempotency_key)

    def keyed(self, parsed: ChatInput, body: Mapping[str, Any], idempotency_key: str | None) -> ChatInput:
        """``parsed`` with the request's ``Idempotency-Key`` and a hash of the whole ``body`` it came
        with (the same key with another body is refused); unchanged without a key or a conversation."""
        if idempotency_key is None or not parsed.conversation_id:
            return parsed  # a stateless chat stores nothing: a retry is simply a new generation
        if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable() \
                or not idempotency_key.isascii():
            raise ApiError(400, {"msg": f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
                                 "type": "bad_input"}, param="Idempotency-Key")
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return replace(parsed, idempotency_key=idempotency_key,
                       fingerprint=hashlib.sha256(canonical.encode()).hexdigest())

    def chat(self, parsed: ChatInput, disconnected: Callable[[], bool]) -> dict[str, Any]:
        """``/api/v1/chat``'s answer: ``{"results": [turn]}``."""
        return {"results": [self.turn(parsed, disconnected)]}

    def turn(self, parsed: ChatInput, disconnected: Callable[[], bool]) -> dict[str, Any]:
        """One chat turn, stored when it is a conversation's: ``text``, ``history``, the token
        counts, ``finish_reason`` (and ``conversation_id``/``conversation`` for a stored one).
        Other APIs (OpenAI's character extension) call this with a :class:`ChatInput` they built."""
        claim = self._claim_turn(parsed, disconnected)
        try:
            if claim.replay is not None:
                return self._replayed(parsed, claim.replay)
            plan = self._plan(parsed)
            result = jobs.wait(jobs.submit(self.engine, plan.request), disconnected)
            return self._finish(plan, result, claim)
        finally:
            claim.release()

    def chat_stream(self, parsed: ChatInput, disconnected: Callable[[], bool]) -> EventStream:
        """SSE: ``{"token"}`` deltas, then a final event with the stored/updated history."""
        events, close = self.stream_turn(parsed, disconnected)
        return EventStream(_kobold_events(events), on_close=close)

    def stream_turn(self, parsed: ChatInput, disconnected: Callable[[], bool],
                    with_history: bool = False) -> tuple[Iterator[TurnEvent], Callable[[], None]]:
        """A turn as it happens (text deltas, then the stored result), and the ``close`` to call
        when the response ends, however it ends. ``with_history`` adds the whole history so far
        to each text event (text-generation-webui's legacy chat stream sends that).

        The conversation stays locked until ``close`` (even if the events are never read), so
        the turn is stored before the next one starts.
        """
        claim = self._claim_turn(parsed, disconnected)
        try:
            if claim.replay is not None:
                body = self._replayed(parsed, claim.replay)
                replayed = [TurnEvent(text=body["text"], history=body["history"] if with_history else None),
                            TurnEvent(result=body, finish_reason=body.get("finish_reason"))]
                return iter(replayed), claim.release
            plan = self._plan(parsed)
            job = jobs.submit(self.engine, plan.request)
        except BaseException:
            claim.release()
            raise

        def close() -> None:
            jobs.cancel_unfinished([job])
            claim.release()

        return self._turn_events(plan, job, claim, disconnected, with_history), close

    def _claim_turn(self, parsed: ChatInput, disconnected: Callable[[], bool]) -> TurnClaim:
        """A page that may not touch stored data is refused first (a replayed turn is stored data too)."""
        origin = self.untrusted_origin()
        if origin is not None and (parsed.conversation_id or not self.characters.is_shipped(parsed.character)):
            raise origin_error(origin)
        return self._claim(parsed.conversation_id, disconnected, key=parsed.idempotency_key,
                           fingerprint=parsed.fingerprint)

    def _claim(self, conversation_id: str | None, disconnected: Callable[[], bool], *, kind: str = "turn",
               key: str | None = None, fingerprint: str = "") -> TurnClaim:
        """Hold a conversation for one turn (or edit): first this process's lock, then the
        database lease that keeps other replicas out (see :mod:`kobold_api.chat.turns`).

        Waiting gives up when the client leaves or after TURN_WAIT_SECONDS (409), so stuck
        retries cannot pile up and take every server thread.
        """
        if not conversation_id:
            return TurnClaim(None)
        self.conversations.require(conversation_id)  # 404 before a lock is made for it
        lock = self.conversations.lock(conversation_id)
        deadline = time.monotonic() + TURN_WAIT_SECONDS

        def still_waiting() -> None:
            if disconnected():
                raise ApiError(409, {"msg": "The client left while waiting for the previous turn.",
                                     "type": "aborted"})
            if time.monotonic() > deadline:
                raise ApiError(409, {"msg": "Another turn on this conversation is still running; try again.",
                                     "type": "turn_in_progress"})

        while not lock.acquire(timeout=0.2):
            still_waiting()
        try:
            pause = 0.05
            while True:  # another replica's turn: poll the database, backing off to half a second
                try:
                    ticket = self.conversations.claim_turn(conversation_id, kind=kind, key=key,
                                                           fingerprint=fingerprint)
                    break
                except TurnBusy:
                    still_waiting()
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
        except BaseException:
            lock.release()
            raise
        if ticket.replay is not None:
            lock.release()
            return TurnClaim(ticket)
        return TurnClaim(ticket, self.conversations, lock)

    def _replayed(self, parsed: ChatInput, outcome: Mapping[str, Any]) -> dict[str, Any]:
        """A finished turn's answer again, for a retry with its idempotency key (the history as
        it is now)."""
        conversation_id = parsed.conversation_id or ""
        stored = self.conversations.get(conversation_id)
        return {"text": outcome.get("text", ""), "conversation_id": conversation_id,
                "history": stored_history(stored), "conversation": stored.to_dict(),
                **{k: v for k, v in outcome.items() if k != "text"}, "idempotent_replay": True}

    def _turn_events(self, plan: TurnPlan, job: Job, claim: TurnClaim, disconnected: Callable[[], bool],
                     with_history: bool = False) -> Iterator[TurnEvent]:
        """Text as it forms (cleaned as the stored reply will be), ending exactly at the stored text."""
        raw, sent = "", ""

        def text_event(delta: str, so_far: str) -> TurnEvent:
            return TurnEvent(text=delta, history=plan.preview(so_far) if with_history else None)

        try:
            for chunk in job.chunks(disconnected):
                if chunk.result is not None:
                    body = self._finish(plan, chunk.result, claim)
                    final = body["text"]
                    if final.startswith(sent) and len(final) > len(sent):
                        yield text_event(final[len(sent):], final)
                    yield TurnEvent(result=body, finish_reason=chunk.result.finish_reason)
                elif chunk.text:
                    raw += chunk.text
                    preview = plan.stream_preview(raw)
                    if preview.startswith(sent) and len(preview) > len(sent):
                        yield text_event(preview[len(sent):], preview)
                        sent = preview
        except GenerationFailed as exc:  # headers are sent: report it in the stream
            yield TurnEvent(error=jobs.stream_failure(exc))
        except ApiError as exc:
            yield TurnEvent(error=exc.message, error_status=exc.status)
        except DOMAIN_ERRORS as exc:  # e.g. the conversation was deleted while the reply formed
            error = domain_error(exc)
            yield TurnEvent(error=error.message, error_status=error.status)

    def _finish(self, plan: TurnPlan, result: GenerationResult, claim: TurnClaim) -> dict[str, Any]:
        if result.stop_reason == STOP_ABORT:
            raise ApiError(409, {"msg": "Generation was aborted; nothing was stored.", "type": "aborted"})
        thoughts, reply = plan.parts(result.text)
        figures = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                   "dropped_turns": plan.prompt.dropped_turns, "dropped_examples": plan.prompt.dropped_examples,
                   "finish_reason": result.finish_reason}
        if thoughts is not None:
            figures["reasoning"] = thoughts
        body = plan.commit(reply, claim.ticket, {"text": reply, **figures})
        claim.stored = claim.ticket is not None
        body.update(figures)
        return body

    def _plan(self, parsed: ChatInput) -> TurnPlan:
        if parsed.conversation_id:
            return self._plan_stored(parsed)
        return self._plan_stateless(parsed)

    def _template(self, parsed: ChatInput) -> ChatTemplate | None:
        if not parsed.template_name or parsed.template_name == "None":
            return None
        return get_named_template(parsed.template_name)  # the name was checked with the request

    def _build(self, parsed: ChatInput, character: Character, user_name: str, history: list[ChatMessage],
               user_input: str | None) -> tuple[BuiltPrompt, GenerationRequest]:
        """The prompt and engine request; when impersonating, ``user_input`` starts the user's line."""
        context = min(parsed.max_context_length, jobs.context_size(self.settings, self.engine))
        max_new, budget = token_budget(parsed.max_new_tokens, context)
        # The builder counts text only; the engine adds the tokenizer's specials (a BOS) on top.
        budget = max(0, budget - self.engine.tokenizer.added_per_prompt)
        prompt = self.builder.build(PromptRequest(
            character, user_name, history, None if parsed.continue_last else user_input,
            max_prompt_tokens=budget, mode=parsed.mode,
            continue_last=parsed.continue_last, impersonate=parsed.impersonate,
            chat_instruct_command=parsed.chat_instruct_command, template=self._template(parsed),
            extra_stop_strings=parsed.stop_strings,
        ))
        request = GenerationRequest(
            prompt=prompt.text, max_new_tokens=max_new, max_context_length=context,
            sampling=parsed.sampling, stop_strings=prompt.stop_strings, trim_stop=True,
            ban_eos=parsed.ban_eos, banned_phrases=parsed.banned_phrases, constraint=parsed.constraint,
        )
        return prompt, request

    def _plan_stateless(self, parsed: ChatInput) -> TurnPlan:
        character = self._character(parsed.character)
        rows = [list(row) for row in parsed.history]
        user_input: str | None = parsed.user_input or None
        if (parsed.regenerate or parsed.continue_last) and (not rows or not rows[-1][1] or (
                parsed.regenerate and len(rows) == 1 and is_greeting_row(rows[0]))):
            raise ApiError(409, {"msg": "Nothing to regenerate or continue: the history has no reply yet.",
                                 "type": "conflict"})
        if parsed.regenerate:
            user_input = rows.pop()[0] or None
        history = rows_to_messages(rows)
        prompt, request = self._build(parsed, character, parsed.user_name, history, user_input)

        def preview(reply: str) -> dict[str, list[list[str]]]:
            return history_dict(with_reply(rows, parsed, user_input, reply))

        def commit(reply: str, _ticket: TurnTicket | None, _outcome: Mapping[str, Any]) -> dict[str, Any]:
            return {"text": reply, "history": preview(reply)}

        return self._turn(parsed, character, parsed.user_name, prompt, request, user_input, commit, preview)

    def _plan_stored(self, parsed: ChatInput) -> TurnPlan:
        conversation_id = parsed.conversation_id or ""
        conversation = self.conversations.get(conversation_id)
        character = self._character(conversation.character)
        user_name = conversation.user_name
        messages = list(conversation.messages)
        user_input: str | None = parsed.user_input or None
        if parsed.regenerate or parsed.continue_last:
            if not messages or messages[-1].role != "character" or (parsed.regenerate and len(messages) == 1):
                raise ApiError(409, {"msg": "The last message is not a reply that can be regenerated or continued.",
                                     "type": "conflict"})
        prompt_messages = messages[:-1] if parsed.regenerate else messages
        history = [ChatMessage("user" if m.role == "user" else "character", m.text)
                   for m in prompt_messages if m.role in ("user", "character")]
        if parsed.regenerate:
            user_input = None
        # A new turn with an empty user_input stores no user message: the character speaks again.
        prompt, request = self._build(parsed, character, user_name, history, user_input)
        last_index = messages[-1].index if messages else 0
        rows_before = stored_rows(conversation)

        def preview(reply: str) -> dict[str, list[list[str]]]:
            return history_dict(with_reply(rows_before, parsed, user_input, reply))

        def commit(reply: str, ticket: TurnTicket | None, outcome: Mapping[str, Any]) -> dict[str, Any]:
            if parsed.regenerate:
                self.conversations.add_swipe(conversation_id, last_index, reply, turn=ticket, outcome=outcome)
            elif parsed.continue_last:
                self.conversations.append_to_message(conversation_id, last_index, reply, turn=ticket,
                                                     outcome=outcome)
            elif not parsed.impersonate:
                self.conversations.add_turn(conversation_id, user_input, reply, character.display_name,
                                            turn=ticket, outcome=outcome)
            elif ticket is not None:  # an impersonated line is a suggestion, not a stored turn
                self.conversations.finish_turn(ticket, outcome)
            stored = self.conversations.get(conversation_id)
            return {"text": reply, "conversation_id": conversation_id, "history": stored_history(stored),
                    "conversation": stored.to_dict()}

        return self._turn(parsed, character, user_name, prompt, request, user_input, commit, preview)

    def _turn(self, parsed: ChatInput, character: Character, user_name: str, prompt: BuiltPrompt,
              request: GenerationRequest, user_input: str | None,
              commit: Callable[[str, TurnTicket | None, Mapping[str, Any]], dict[str, Any]],
              preview: Callable[[str], dict[str, list[list[str]]]]) -> TurnPlan:
        """How generated text becomes the reply: continued text is kept as generated, an
        impersonated line starts with what the user typed, a reply is tidied by clean_reply. A
        reasoning model's thoughts are left out of the reply (and so out of later prompts), as
        SillyTavern does; the turn's answer returns them as ``reasoning``."""
        char_name = character.display_name
        if parsed.continue_last:
            return TurnPlan(prompt, request, lambda text: text, commit, "", preview)
        reasoning = (self.engine.generator.think, self.engine.generator.think.opened_by(prompt.text))
        if parsed.impersonate:
            typed = user_input or ""
            return TurnPlan(prompt, request,
                            lambda text: clean_reply(typed + text, char_name, user_name, speaker=user_name),
                            commit, user_name, preview, reasoning)
        return TurnPlan(prompt, request, lambda text: clean_reply(text, char_name, user_name), commit,
                        char_name, preview, reasoning)


def _character_summary(stem: str, character: Character) -> dict[str, Any]:
    """``id``: the card's file stem, which finds exactly this card where ``name`` may be shared."""
    return {"id": stem, "name": character.name, "description": character.description[:300],
            "greetings": len(character.greetings), "tags": character.tags, "format": character.source_format,
            "has_lorebook": bool(character.character_book and character.character_book.entries)}
