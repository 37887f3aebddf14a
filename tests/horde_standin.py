"""A stand-in for the AI Horde's two text-worker endpoints, for tests.

Written from the Horde's published models (horde-sdk ``TextGenerateJobPopRequest`` /
``TextGenerateJobPopResponse`` / ``TextGenerationJobSubmitRequest`` / ``JobSubmitResponse``) and
its server (AI-Horde ``horde/apis/models/v2.py`` ``job_pop_parser`` and ``job_submit_parser``,
``horde/apis/models/kobold_v2.py``, ``JobSubmitTemplate.validate``, ``horde/exceptions.py``):

- ``POST /api/v2/generate/text/pop``: the ``apikey`` header and ``name`` are required; a wrong
  key is 401 ``InvalidAPIKey``; the answer is ``GenerationPayloadKobold`` (``id`` null and
  ``ids`` empty when there is no job); a job is given only to a worker whose ``max_length``,
  ``max_context_length`` and ``models`` fit it (else it counts under ``skipped``).
- ``POST /api/v2/generate/text/submit``: ``id`` and ``generation`` are required, ``state`` one of
  ok/censored/faulted/csam, ``gen_metadata`` entries only ``{"type": "censorship", "value":
  "csam"}`` (the text model's enums); an unknown id is 404 ``InvalidJobID``, a second submit 400
  ``DuplicateGen``, a submit after the job's ttl (the Horde has aborted it) 400 ``AbortedGen``
  unless it is itself ``faulted`` (then ``{"reward": 0}``).

Errors are ``{"message", "rc"}`` like the Horde's. Everything it sees is recorded.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask, jsonify, request
from waitress.server import create_server

POP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "models": list, "max_length": int, "max_context_length": int, "softprompts": list,
    "priority_usernames": list, "nsfw": bool, "bridge_agent": str, "threads": int, "amount": int,
    "require_upfront_kudos": bool, "extra_slow_worker": bool,
}
STATES = ("ok", "censored", "faulted", "csam")


@dataclass
class StandinJob:
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    ttl: int = 150
    #: The request's models ([] = any worker).
    models: list[str] = field(default_factory=list)
    #: Given whatever the worker's limits (the real Horde would skip it; tests of clamping use this).
    force: bool = False
    #: The Horde aborts it as stale before the worker submits (a late submit).
    abort_before_submit: bool = False
    #: The Horde forgets it (the job was deleted): submits get 404 InvalidJobID.
    vanish: bool = False
    reward: float = 5.0
    popped_at: float | None = None
    submitted: bool = False


@dataclass
class Call:
    at: float
    headers: dict[str, str]
    body: Any
    status: int = 200
    answer: Any = None


class HordeStandin:
    """The stand-in, served by waitress on a free loopback port in a thread."""

    def __init__(self, api_key: str = "standin-key") -> None:
        self.api_key = api_key
        self.jobs: list[StandinJob] = []
        self.pops: list[Call] = []
        self.submits: list[Call] = []
        self._failures = {"pop": [], "submit": []}  # statuses to answer next, in order
        self._lock = threading.Lock()
        self.app = self._build()
        self._server = create_server(self.app, host="127.0.0.1", port=0, threads=4)
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # --- control ----------------------------------------------------------------------
    def add_job(self, payload: dict[str, Any], **options: Any) -> StandinJob:
        job = StandinJob(payload=payload, **options)
        with self._lock:
            self.jobs.append(job)
        return job

    def fail_next(self, endpoint: str, *statuses: int) -> None:
        """Answer the next calls to ``endpoint`` ("pop" or "submit") with these error statuses."""
        with self._lock:
            self._failures[endpoint].extend(statuses)

    def reset(self) -> None:
        with self._lock:
            self.jobs.clear()
            self.pops.clear()
            self.submits.clear()
            for pending in self._failures.values():
                pending.clear()

    def accepted(self) -> list[Call]:
        """Submits answered 200."""
        with self._lock:
            return [call for call in self.submits if call.status == 200]

    def wait_for(self, condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; pops={len(self.pops)} submits={self.submits}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._server.asyncore.loop(timeout=0.05, map=self._server._map, count=1)
        self._server.close()

    # --- the endpoints ----------------------------------------------------------------
    def _build(self) -> Flask:
        app = Flask("horde_standin")

        @app.post("/api/v2/generate/text/pop")
        def pop():  # type: ignore[no-untyped-def]
            call = self._record(self.pops)
            status, answer = self._pop(call.body)
            call.status, call.answer = status, answer
            return jsonify(answer), status

        @app.post("/api/v2/generate/text/submit")
        def submit():  # type: ignore[no-untyped-def]
            call = self._record(self.submits)
            status, answer = self._submit(call.body)
            call.status, call.answer = status, answer
            return jsonify(answer), status

        return app

    def _record(self, calls: list[Call]) -> Call:
        call = Call(time.monotonic(), {key.lower(): value for key, value in request.headers.items()},
                    request.get_json(silent=True))
        with self._lock:
            calls.append(call)
        return call

    def _auth(self) -> tuple[int, dict[str, Any]] | None:
        key = request.headers.get("apikey")
        if not key:
            return 400, {"message": {"apikey": "The API Key corresponding to a registered user. Missing required "
                                               "parameter in the HTTP headers"}}
        if key != self.api_key:
            return 401, {"message": "No user matching sent API Key.", "rc": "InvalidAPIKey"}
        return None

    def _injected(self, endpoint: str) -> tuple[int, dict[str, Any]] | None:
        with self._lock:
            if self._failures[endpoint]:
                return self._failures[endpoint].pop(0), {"message": "Internal Server Error"}
        return None

    def _pop(self, body: Any) -> tuple[int, dict[str, Any]]:
        refused = self._auth() or self._injected("pop")
        if refused:
            return refused
        if not isinstance(body, dict):
            return 400, {"message": "Input payload validation failed", "rc": "BadRequest"}
        wrong = {name: f"not a {kind}" for name, kind in POP_FIELDS.items()
                 if name in body and not _is(body[name], kind)}
        if "name" not in body:
            wrong["name"] = "Missing required parameter in the JSON body"
        if not 1 <= body.get("amount", 1) <= 20 or not 1 <= body.get("threads", 1) <= 50:
            wrong["amount"] = "out of range"
        if wrong:
            return 400, {"message": wrong}
        skipped: dict[str, int] = {}
        with self._lock:
            for job in self.jobs:
                if job.popped_at is not None:
                    continue
                reason = None if job.force else _skip_reason(job, body)
                if reason:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                job.popped_at = time.monotonic()
                model = (body.get("models") or [None])[0]
                return 200, {"payload": {**job.payload, "n": 1}, "id": job.id, "ids": [job.id], "messages": [],
                             "ttl": job.ttl, "extra_source_images": None, "skipped": {}, "softprompt": None,
                             "model": model}
        return 200, {"payload": {}, "id": None, "ids": [], "messages": [], "ttl": None, "extra_source_images": None,
                     "skipped": skipped, "softprompt": None, "model": None}

    def _submit(self, body: Any) -> tuple[int, dict[str, Any]]:
        refused = self._auth() or self._injected("submit")
        if refused:
            return refused
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) \
                or not isinstance(body.get("generation"), str):
            return 400, {"message": {"id": "required", "generation": "required"}}
        state = body.get("state", "ok")
        if state not in STATES:
            return 400, {"message": f"'{state}' is not one of {list(STATES)}", "rc": "BadRequest"}
        for entry in body.get("gen_metadata") or []:
            if not isinstance(entry, dict) or entry.get("type") != "censorship" or entry.get("value") != "csam":
                return 400, {"message": "Input payload validation failed", "rc": "BadRequest"}
        if "seed" in body and not isinstance(body["seed"], int):
            return 400, {"message": {"seed": "invalid literal for int()"}}
        with self._lock:
            job = next((job for job in self.jobs if job.id == body["id"] and job.popped_at is not None), None)
            if job is None or job.vanish:
                return 404, {"message": f"Processing Job with ID {body['id']} does not exist.", "rc": "InvalidJobID"}
            if job.submitted:
                return 400, {"message": f"Processing Generation with ID {job.id} already submitted.",
                             "rc": "DuplicateGen"}
            aborted = job.abort_before_submit or time.monotonic() - job.popped_at > job.ttl
            if aborted and state != "faulted":
                return 400, {"message": f"Processing Generation with ID {job.id} took too long to process and has "
                                        "been aborted!", "rc": "AbortedGen"}
            job.submitted = True
            return 200, {"reward": 0 if state == "faulted" else job.reward}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if kind is int and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _skip_reason(job: StandinJob, worker: dict[str, Any]) -> str | None:
    """Why the Horde would not give ``job`` to this worker (``TextWorker.can_generate``)."""
    if job.models and not set(job.models) & set(worker.get("models") or []):
        return "models"
    if job.payload.get("max_context_length", 2048) > worker.get("max_context_length", 2048):
        return "max_context_length"
    if job.payload.get("max_length", 80) > worker.get("max_length", 512):
        return "max_length"
    return None
