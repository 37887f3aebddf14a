"""The AI Horde text worker: this server also generates for the AI Horde while its own users are idle.

One thread loops: wait while local users are active (or were, in the last ``quiet_seconds``),
pop a job, run it on the engine like any request (tagged with :data:`HORDE_OWNER`), submit the
text, log it. Local users come first: the worker never pops while the engine runs or queues
anyone else's job, holds at most one Horde job, and a local request that arrives meanwhile joins
the batch beside it (or, with ``max_batch_size`` 1, waits for that one job only).

Waiting: an empty pop waits 1 s, then 2 s after ten empty pops in a row, 3 s after twenty-five
(KoboldCpp's embedded worker's pace); a failure (no answer, a 5xx) waits 2, 4, 8... s up to five
minutes. After ``loud_after`` failures in a row it logs an error (and /api/extra/perf's
``hordeexitcounter`` counts these) but never stops: a Horde outage or a key fixed on the website
should not need a server restart, and a poll every five minutes costs nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .. import __version__
from ..engine.engine import Engine, GenerationFailed, Job, QueueFullError
from ..engine.generation import STOP_ABORT, GenerationResult
from ..settings import GenerationDefaults, Settings
from .client import HordeClient, HordeError
from .payload import HordeTask, InvalidPayload, WorkerLimits, parse_job

log = logging.getLogger(__name__)

#: The engine's ``owner`` of the worker's jobs: every other owner is a local user.
HORDE_OWNER = "ai-horde"
#: Our own bridge name (a bridge is named by its authors; the Horde's validated list is theirs to extend).
BRIDGE_NAME = "kobold_api"
BRIDGE_CONTACT = ""
#: The Horde's answers for a job it no longer holds: aborted as stale (400) or gone (404)
#: (AI-Horde ``horde/exceptions.py``, ``JobSubmitTemplate.validate``).
JOB_GONE_RCS = frozenset({"AbortedGen", "InvalidJobID"})
#: A submit the Horde already has (our earlier try went through but its answer was lost).
DUPLICATE_RC = "DuplicateGen"
#: The ``ttl`` the Horde gives a text job when a pop answer names none (``set_job_ttl``).
DEFAULT_TTL = 150
#: What a faulted job's ``generation`` says (the Horde requires the field).
FAULTED_TEXT = "Faulted"

STATES = ("starting", "idle", "waiting_for_local", "popping", "generating", "submitting", "backing_off", "failing",
          "stopped")


@dataclass(frozen=True)
class Pacing:
    """Every wait of the worker, in seconds (tests shorten them)."""

    #: No pop until this long after a local user's last job.
    quiet_seconds: float = 20.0
    #: How often to look again while local users are active.
    local_check_seconds: float = 1.0
    #: The wait after the n-th empty pop in a row (the last repeats).
    idle_waits: tuple[float, ...] = (1.0,) * 10 + (2.0,) * 15 + (3.0,)
    #: The first wait after a failure; it doubles with each failure in a row, up to the cap.
    failure_wait: float = 2.0
    failure_wait_cap: float = 300.0
    #: Failures in a row before the worker logs an error (and again at each multiple).
    loud_after: int = 5
    #: Tries of one submit, and of handing a job to a full engine queue (one second apart).
    submit_attempts: int = 5
    engine_attempts: int = 5
    #: Each call to the Horde; a submit while stopping gets at most ``stop_submit_timeout``.
    http_timeout: float = 30.0
    stop_submit_timeout: float = 5.0

    def idle_wait(self, empty_pops: int) -> float:
        """The wait after ``empty_pops`` (>= 1) empty pops in a row."""
        return self.idle_waits[min(max(empty_pops, 1), len(self.idle_waits)) - 1]

    def failure_backoff(self, failures: int) -> float:
        """The wait after ``failures`` (>= 1) failures in a row."""
        return min(self.failure_wait_cap, self.failure_wait * 2 ** min(max(failures, 1) - 1, 30))


DEFAULT_PACING = Pacing()


@dataclass
class WorkerStats:
    """The worker's counters and state, as /api/extra/perf shows them."""

    state: str = "starting"
    jobs_popped: int = 0
    jobs_done: int = 0
    jobs_faulted: int = 0
    jobs_expired: int = 0
    #: Generated, but the submit failed (the Horde times the job out and gives it to another worker).
    jobs_lost: int = 0
    kudos: float = 0.0
    empty_pops: int = 0
    consecutive_failures: int = 0
    #: Times ``loud_after`` failures in a row were reached (KoboldCpp's ``hordeexitcounter``).
    failure_pauses: int = 0
    wait_seconds: float = 0.0
    last_error: str | None = None
    last_job: dict[str, Any] | None = None
    #: The last empty pop's ``skipped``: waiting jobs this worker was passed over for, by reason
    #: (``max_context_length``, ``max_length``, ``models``...): a hint to raise the limits.
    skipped: dict[str, Any] | None = None


@dataclass
class _Outcome:
    """How running one job ended: ``result`` to submit as ok, or a reason to fault or drop it."""

    result: GenerationResult | None = None
    fault: str | None = None
    expired: bool = False
    seconds: float = 0.0


class HordeWorker:
    """Pops, generates and submits AI Horde text jobs on ``engine``, in its own thread."""

    def __init__(self, engine: Engine, client: HordeClient, name: str, limits: WorkerLimits,
                 defaults: GenerationDefaults, pacing: Pacing = DEFAULT_PACING, nsfw: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.client = client
        self.name = name
        self.limits = limits
        self.defaults = defaults
        self.pacing = pacing
        self.nsfw = nsfw
        self.model = f"koboldcpp/{engine.model_name}"
        self.bridge_agent = client.client_agent
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = WorkerStats()
        self._last_local = -math.inf
        self._current: Job | None = None
        self._seen_messages: set[str] = set()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine, pacing: Pacing | None = None) -> "HordeWorker":
        """The worker ``settings.horde_*`` describe; limits held to the server's usable context."""
        context = min(settings.horde_max_context, settings.context_size, engine.context_length)
        client = HordeClient(settings.horde_url, settings.horde_key, bridge_agent(),
                             timeout=(pacing or DEFAULT_PACING).http_timeout)
        return cls(engine, client, settings.horde_name, WorkerLimits(min(settings.horde_max_length, context), context),
                   settings.generation, pacing or DEFAULT_PACING)

    # --- control ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self.engine.stats.observers.append(self._observe)
        self._thread = threading.Thread(target=self._run, name="kobold-horde", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop popping; a job in hand is cancelled and handed back as faulted (so the Horde
        gives it to another worker at once), within about ``stop_submit_timeout``."""
        self._stop.set()
        job = self._current
        if job is not None:
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.engine.stats.observers.remove(self._observe)
        except ValueError:
            pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        """The ``horde`` object of /api/extra/perf (never the key)."""
        with self._lock:
            stats = self._stats
            return {"enabled": True, "worker_name": self.name, "horde_url": self.client.base_url,
                    "model": self.model, "bridge_agent": self.bridge_agent, "max_length": self.limits.max_length,
                    "max_context_length": self.limits.max_context_length, "state": stats.state,
                    "jobs_popped": stats.jobs_popped, "jobs_done": stats.jobs_done,
                    "jobs_faulted": stats.jobs_faulted, "jobs_expired": stats.jobs_expired,
                    "jobs_lost": stats.jobs_lost, "kudos": round(stats.kudos, 2), "empty_pops": stats.empty_pops,
                    "consecutive_failures": stats.consecutive_failures, "failure_pauses": stats.failure_pauses,
                    "wait_seconds": stats.wait_seconds, "last_error": stats.last_error,
                    "last_job": dict(stats.last_job) if stats.last_job else None,
                    "skipped": dict(stats.skipped) if stats.skipped else {}}

    @property
    def failure_pauses(self) -> int:
        return self._stats.failure_pauses

    # --- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        log.info("AI Horde worker %r started: %s for %s (up to %d tokens, %d context), as %s", self.name,
                 self.model, self.client.base_url, self.limits.max_length, self.limits.max_context_length,
                 self.bridge_agent)
        try:
            while not self._stopping():
                try:
                    self._turn()
                except Exception as exc:  # a bug must not end the worker silently: count it, wait, go on
                    log.exception("AI Horde worker: unexpected error")
                    self._failed("worker", HordeError(f"unexpected {type(exc).__name__}: {exc}"))
        finally:
            self._update(state="stopped", wait_seconds=0.0)
            log.info("AI Horde worker %r stopped", self.name)

    def _turn(self) -> None:
        """One round: wait for local users, or pop and run what comes."""
        if self._local_in_use():
            self._update(state="waiting_for_local", wait_seconds=self.pacing.local_check_seconds)
            self._sleep(self.pacing.local_check_seconds)
            return
        self._update(state="popping", wait_seconds=0.0)
        try:
            answer = self.client.pop(self._pop_body())
        except HordeError as exc:
            self._failed("pop", exc)
            return
        self._recovered()
        self._show_messages(answer)
        ids = _job_ids(answer)
        if not ids:
            self._idle(answer)
            return
        with self._lock:
            self._stats.empty_pops = 0
        for job_id in ids:
            self._work(job_id, answer)

    def _pop_body(self) -> dict[str, Any]:
        """PopInputKobold (horde-sdk ``_PopInputKobold`` / AI-Horde ``job_pop_parser``)."""
        return {"name": self.name, "models": [self.model], "max_length": self.limits.max_length,
                "max_context_length": self.limits.max_context_length, "softprompts": [], "priority_usernames": [],
                "nsfw": self.nsfw, "bridge_agent": self.bridge_agent, "threads": 1, "amount": 1,
                "require_upfront_kudos": False, "extra_slow_worker": False}

    def _work(self, job_id: str, answer: dict[str, Any]) -> None:
        """Run one popped job and submit what came of it."""
        popped_at = self._clock()
        ttl = answer.get("ttl")
        ttl = ttl if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 else DEFAULT_TTL
        payload = answer.get("payload")
        with self._lock:
            self._stats.jobs_popped += 1
        wants = payload if isinstance(payload, dict) else {}
        log.info("AI Horde job %s popped (%s tokens, %s context, ttl %ss)", job_id, wants.get("max_length", "?"),
                 wants.get("max_context_length", "?"), ttl)
        if self._stopping():
            self._hand_back(job_id, "the server is stopping")
            return
        try:
            task = parse_job(payload, self.defaults, self.limits)
        except InvalidPayload as exc:
            self._fault(job_id, f"invalid payload: {exc}")
            return
        self._update(state="generating")
        outcome = self._generate(task, popped_at + ttl)
        if outcome.expired:
            self._expired(job_id, f"still generating after its ttl ({ttl}s)")
            self._hand_back(job_id, "timed out")
        elif outcome.fault is not None:
            if self._stopping():
                self._hand_back(job_id, outcome.fault)
            else:
                self._fault(job_id, outcome.fault)
        else:
            assert outcome.result is not None
            self._deliver(job_id, task, outcome)

    def _generate(self, task: HordeTask, deadline: float) -> _Outcome:
        """Run ``task`` on the engine; past ``deadline`` (the job's ttl) it is cancelled."""
        started = self._clock()
        job = None
        for attempt in range(self.pacing.engine_attempts):
            try:
                job = self.engine.submit(task.request, genkey=f"HORDE{uuid.uuid4().hex}", owner=HORDE_OWNER)
                break
            except QueueFullError:
                if self._stopping() or attempt + 1 == self.pacing.engine_attempts:
                    break
                self._sleep(1.0)
        if job is None:
            return _Outcome(fault="the server's queue stayed full")
        self._current = job
        try:
            result = job.wait(disconnected=lambda: self._stopping() or self._clock() > deadline)
        except GenerationFailed as exc:
            return _Outcome(fault=f"generation failed: {exc}")
        finally:
            self._current = None
        seconds = self._clock() - started
        if result.stop_reason == STOP_ABORT:
            if self._clock() > deadline and not self._stopping():
                return _Outcome(expired=True, seconds=seconds)
            return _Outcome(fault="cancelled", seconds=seconds)
        return _Outcome(result=result, seconds=seconds)

    def _deliver(self, job_id: str, task: HordeTask, outcome: _Outcome) -> None:
        result = outcome.result
        assert result is not None
        body: dict[str, Any] = {"id": job_id, "generation": task.output.apply(result.text), "state": "ok"}
        if result.seed is not None and 0 <= result.seed < 2**63:  # the Horde stores it as a BigInteger
            body["seed"] = result.seed
        self._update(state="submitting")
        answer = self._submit(body)
        job = {"id": job_id, "tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
               "seconds": round(outcome.seconds, 2), "state": "ok", "reward": None}
        if answer == "gone":
            self._expired(job_id, "the Horde refused the late submit", job)
            return
        if answer is None:
            with self._lock:
                self._stats.jobs_lost += 1
                self._stats.last_job = {**job, "state": "lost"}
            return
        reward = _reward(answer)
        with self._lock:
            stats = self._stats
            stats.jobs_done += 1
            stats.kudos += reward
            stats.last_job = {**job, "reward": reward}
            done, kudos = stats.jobs_done, stats.kudos
        log.info("AI Horde job %s done: %d tokens in %.1f s, reward %.2f kudos (this session: %d jobs, %.2f kudos)",
                 job_id, result.completion_tokens, outcome.seconds, reward, done, kudos)

    def _fault(self, job_id: str, reason: str) -> None:
        """Tell the Horde this job cannot be done here (it goes to another worker)."""
        log.warning("AI Horde job %s faulted: %s", job_id, reason)
        self._update(state="submitting")
        answer = self._submit({"id": job_id, "generation": FAULTED_TEXT, "state": "faulted"})
        with self._lock:
            self._stats.jobs_faulted += 1
            self._stats.last_job = {"id": job_id, "state": "faulted", "reason": reason,
                                    "reward": _reward(answer) if isinstance(answer, dict) else None}

    def _expired(self, job_id: str, reason: str, job: dict[str, Any] | None = None) -> None:
        log.warning("AI Horde job %s expired: %s", job_id, reason)
        with self._lock:
            self._stats.jobs_expired += 1
            self._stats.last_job = {**(job or {"id": job_id}), "state": "expired", "reason": reason}

    def _hand_back(self, job_id: str, reason: str) -> None:
        """Best effort, one short try: a job we will not finish, submitted as faulted so the Horde
        need not wait for its ttl."""
        try:
            self.client.submit({"id": job_id, "generation": FAULTED_TEXT, "state": "faulted"},
                               timeout=self.pacing.stop_submit_timeout)
            log.info("AI Horde job %s handed back (%s)", job_id, reason)
        except HordeError as exc:
            log.info("AI Horde job %s dropped (%s); handing it back failed: %s", job_id, reason, exc)

    def _submit(self, body: dict[str, Any]) -> dict[str, Any] | str | None:
        """The Horde's answer; ``"gone"`` when it no longer holds the job; None when every try failed."""
        job_id = body["id"]
        for attempt in range(1, self.pacing.submit_attempts + 1):
            try:
                answer = self.client.submit(body)
            except HordeError as exc:
                if exc.rc in JOB_GONE_RCS:
                    log.warning("AI Horde job %s: the Horde no longer holds it (%s)", job_id, exc)
                    return "gone"
                if exc.rc == DUPLICATE_RC:  # an earlier try got through; its answer was lost
                    log.info("AI Horde job %s was already submitted (%s)", job_id, exc)
                    return {"reward": 0}
                if not exc.transient or attempt == self.pacing.submit_attempts or self._stopping():
                    log.error("AI Horde job %s: submit failed after %d tries, the job is lost: %s", job_id, attempt,
                              exc)
                    self._failed("submit", exc)
                    return None
                wait = self.pacing.failure_backoff(attempt)
                log.warning("AI Horde job %s: submit failed (%s); trying again in %.0f s", job_id, exc, wait)
                self._note_error(f"submit: {exc}")
                self._sleep(wait)
                continue
            self._recovered()
            return answer
        return None

    # --- waiting ----------------------------------------------------------------------
    def _idle(self, answer: dict[str, Any]) -> None:
        with self._lock:
            self._stats.empty_pops += 1
            empty = self._stats.empty_pops
        wait = self.pacing.idle_wait(empty)
        if empty == 20:
            log.info("AI Horde worker: no jobs lately; asking every %.0f s", self.pacing.idle_waits[-1])
        skipped = answer.get("skipped")
        skipped = {reason: count for reason, count in skipped.items() if count} if isinstance(skipped, dict) else {}
        if skipped:
            log.debug("AI Horde worker: no job for this worker; passed over for %s", skipped)
        self._update(state="idle", wait_seconds=wait, skipped=skipped)
        self._sleep(wait)

    def _failed(self, what: str, exc: HordeError) -> None:
        """Count a failure and wait: doubling from ``failure_wait``, at the cap for a refusal that
        needs the owner (a bad key, maintenance mode)."""
        with self._lock:
            stats = self._stats
            stats.consecutive_failures += 1
            failures = stats.consecutive_failures
            stats.last_error = f"{what}: {exc}"
            loud = failures % self.pacing.loud_after == 0
            if loud:
                stats.failure_pauses += 1
        wait = self.pacing.failure_backoff(failures) if exc.transient else self.pacing.failure_wait_cap
        if exc.retry_after is not None:
            wait = min(max(wait, exc.retry_after), self.pacing.failure_wait_cap)
        if not exc.transient:
            log.error("AI Horde worker: the Horde refused the %s (%s); check the key and worker name (and the "
                      "worker's maintenance mode on the Horde's site); trying again in %.0f s", what, exc, wait)
        elif loud:
            log.error("AI Horde worker: %d failures in a row (last: %s: %s); it keeps trying, every %.0f s at most",
                      failures, what, exc, self.pacing.failure_wait_cap)
        else:
            log.warning("AI Horde worker: %s failed (%s); trying again in %.0f s", what, exc, wait)
        self._update(state="failing" if failures >= self.pacing.loud_after or not exc.transient else "backing_off",
                     wait_seconds=wait)
        self._sleep(wait)

    def _recovered(self) -> None:
        with self._lock:
            if self._stats.consecutive_failures:
                log.info("AI Horde worker: the Horde answers again")
            self._stats.consecutive_failures = 0

    def _note_error(self, message: str) -> None:
        with self._lock:
            self._stats.last_error = message

    def _sleep(self, seconds: float) -> None:
        """Wait, waking at once on stop and within a second when the engine shuts down."""
        end = self._clock() + seconds
        while not self._stopping():
            left = end - self._clock()
            if left <= 0:
                return
            self._stop.wait(min(left, 0.5))

    def _stopping(self) -> bool:
        return self._stop.is_set() or not self.engine.alive

    # --- local users ------------------------------------------------------------------
    def _local_in_use(self) -> bool:
        """Whether anyone else's job runs or waits, or ended less than ``quiet_seconds`` ago."""
        now = self._clock()
        if any(job.owner != HORDE_OWNER for job in self.engine.active_jobs()):
            self._last_local = now
        return now - self._last_local < self.pacing.quiet_seconds

    def _observe(self, job: Job, result: GenerationResult) -> None:
        """Engine observer: a local job just finished (even one too short for the poll to see)."""
        if job.owner != HORDE_OWNER:
            self._last_local = self._clock()

    # --- misc -------------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._stats, name, value)

    def _show_messages(self, answer: dict[str, Any]) -> None:
        """The Horde's messages to this worker (from its moderators), each logged once."""
        for message in answer.get("messages") or ():
            if isinstance(message, dict) and message.get("message"):
                key = str(message.get("id") or message["message"])
                if key not in self._seen_messages:
                    self._seen_messages.add(key)
                    log.warning("AI Horde message to worker %r: %s", self.name, str(message["message"])[:1000])


def bridge_agent() -> str:
    """``name:version:contact``, the Horde's ``bridge_agent`` and ``Client-Agent`` form."""
    return f"{BRIDGE_NAME}:{__version__}:{BRIDGE_CONTACT}"


def _job_ids(answer: dict[str, Any]) -> list[str]:
    """The popped jobs' ids: ``ids`` (several when ``amount`` > 1), else ``id``; none when idle."""
    ids = [job_id for job_id in answer.get("ids") or () if isinstance(job_id, str) and job_id]
    if not ids and isinstance(answer.get("id"), str) and answer["id"]:
        ids = [answer["id"]]
    return ids


def _reward(answer: dict[str, Any] | str | None) -> float:
    try:
        return float(answer.get("reward", 0.0)) if isinstance(answer, dict) else 0.0
    except (TypeError, ValueError):
        return 0.0
