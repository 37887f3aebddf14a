"""The engine the web layer holds: a model, its tokenizer, a bounded queue and one worker.

Generation requests wait in a bounded queue and one worker thread runs them (several
at once, batched), so the model never runs from two threads at once. Each submitted
request becomes a :class:`Job` whose chunks the HTTP thread reads as they are produced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .generation import CancelToken, GenerationChunk, GenerationRequest, GenerationResult, Sequence, TextGenerator
from .decode_batch import DecodeBatch, new_decode_batch
from .kv_slots import plan_slots
from .layouts import DEFAULT_PREFILL_CHUNK
from .onnx_model import OnnxCausalLM, WrongDevice, resolved_device
from .context_shift import ContextShifter
from .shift_graph import ShiftGraphs
from .prefix_cache import PrefixCache
from .prepare import PrepareError, prepare_model
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
_DONE = object()
_POLL_SECONDS = 0.2
#: Finished jobs stay findable by genkey for /generate/check for a while.
_RECENT_JOBS = 64
#: How long shutdown waits for the worker to finish its current step.
SHUTDOWN_WAIT_SECONDS = 30.0

#: Minimum seconds between a stream's events while several generations share the batch.
_BUSY_STREAM_INTERVAL = 0.02


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue holds."""


class GenerationFailed(RuntimeError):
    """The worker raised while running a job; the message is the cause."""


@dataclass
class Job:
    """One queued or running generation, visible to any thread by its ``genkey``."""

    request: GenerationRequest
    genkey: str
    cancel_token: CancelToken = field(default_factory=CancelToken)
    #: Internal and unique (a client may reuse a genkey).
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Who submitted it (the web layer passes the client's address): a check or abort that names
    #: no genkey reaches only the same owner's jobs.
    owner: str = ""
    submitted_at: float = field(default_factory=time.monotonic)
    #: When its first output (text or not) left the engine: its time to first token.
    first_output_at: float | None = None
    _chunks: "queue.SimpleQueue[object]" = field(default_factory=queue.SimpleQueue)
    _parts: list[str] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None
    #: Seconds a reader waits after passing on text (set by the engine; 0 = every token at once).
    pace: Callable[[], float] = field(default=lambda: 0.0)
    #: Whether the engine's worker still runs (set by the engine), so readers never wait forever.
    worker_alive: Callable[[], bool] = field(default=lambda: True)

    @property
    def partial_text(self) -> str:
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancel_token.cancel()

    def chunks(self, disconnected: Callable[[], bool] | None = None) -> Iterator[GenerationChunk]:
        """Chunks as the worker produces them; raises GenerationFailed if it failed.

        ``disconnected`` is polled while waiting; once it says the client is gone the
        job is cancelled, so an abandoned request stops within one step.
        """
        next_check = time.monotonic() + _POLL_SECONDS
        while True:
            try:
                item = self._chunks.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                item = None
            if disconnected is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + _POLL_SECONDS
                if disconnected():
                    self.cancel()
            if item is None:
                if self._done.is_set() and self._chunks.empty():  # an earlier reader took the end
                    item = _DONE
                elif not self.worker_alive():
                    raise GenerationFailed("the generation worker stopped")
                else:
                    continue
            # Under load several chunks wait by the time this thread runs: merge their text into
            # one, so a busy server sends fewer, larger events instead of falling behind.
            text_parts: list[str] = []
            logprobs: list = []
            prompt_logprobs = None
            while isinstance(item, GenerationChunk) and item.result is None:
                text_parts.append(item.text)
                logprobs.extend(item.logprobs)
                prompt_logprobs = prompt_logprobs or item.prompt_logprobs
                try:
                    item = self._chunks.get_nowait()
                except queue.Empty:
                    item = None
                    break
            if text_parts:
                yield GenerationChunk("".join(text_parts), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                pause = self.pace()
                if pause and item is None:
                    self._done.wait(pause)
            if item is None:
                continue
            if item is _DONE:
                if self.error is not None:
                    raise GenerationFailed(str(self.error)) from self.error
                return
            yield item  # type: ignore[misc]

    def wait(self, disconnected: Callable[[], bool] | None = None) -> GenerationResult:
        """Block until done and return the result (the chunks are consumed)."""
        for _ in self.chunks(disconnected):
            pass
        assert self.result is not None
        return self.result

    # worker side
    def _emit(self, chunk: GenerationChunk) -> None:
        if chunk.text:
            self._parts.append(chunk.text)
        if chunk.result is not None:
            self.result = chunk.result
        self._chunks.put(chunk)

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()
        self._chunks.put(_DONE)


@dataclass
class EngineStats:
    """Counters and the last finished generation; each API turns them into its own figures
    (KoboldCpp's /api/extra/perf), so the engine stays protocol-free."""

    total_generations: int = 0
    last_result: GenerationResult | None = None
    last_finished_at: float = field(default_factory=time.time)
    #: Tokens held in the running rows' KV caches after the last step (what /metrics reports).
    kv_tokens_in_use: int = 0
    #: Called with each finished job and its result, on the engine's worker (keep them quick).
    observers: list[Callable[["Job", GenerationResult], None]] = field(default_factory=list)




class JobQueue:
    """The bounded FIFO of jobs waiting for a batch row.

    Unlike ``queue.Queue`` it lets the worker take cancelled jobs out from the middle, so an
    aborted request that is still waiting ends within one decode step and frees its place,
    even while every batch row is busy.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._changed:
            if self._closed:
                raise QueueFullError("The server is shutting down.")
            if len(self._jobs) >= self.capacity:
                raise QueueFullError("Server is busy; please try again later.")
            self._jobs.append(job)
            self._changed.notify()

    def take(self, block: bool) -> Job | None:
        """The oldest job; None when there is none (and ``block`` is false) or once closed."""
        with self._changed:
            while block and not self._jobs and not self._closed:
                self._changed.wait()
            return self._jobs.popleft() if self._jobs and not self._closed else None

    def take_cancelled(self) -> list[Job]:
        with self._changed:
            cancelled = [job for job in self._jobs if job.cancel_token.cancelled]
            for job in cancelled:
                self._jobs.remove(job)
            return cancelled

    def snapshot(self) -> list[Job]:
        with self._changed:
            return list(self._jobs)

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker, and hand back the ones still waiting."""
        with self._changed:
            self._closed = True
            left, self._jobs = list(self._jobs), deque()
            self._changed.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed


class Engine:
    """Owns the generator and the single worker thread; thread-safe to call from routes.

    The worker runs continuous batching: every step advances all running sequences in
    one session run, new requests join between steps (after their own prefill) and
    finished ones leave. ``max_batch_size=1`` gives strictly one request at a time.
    """

    def __init__(self, generator: TextGenerator, model_name: str, queue_size: int = 16,
                 max_batch_size: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.generator = generator
        self.model_name = model_name
        self.max_batch_size = max_batch_size if generator.model.supports_batching else 1
        #: Prompt tokens per run (0: all): a joining request's part between two steps of the
        #: running ones, and a lone prompt's part (it bounds the attention's scratch memory).
        self.prefill_chunk = prefill_chunk
        #: The job whose prompt runs part by part between steps (the worker's own state).
        self._filling: tuple[Job, Sequence] | None = None
        self._queue = JobQueue(queue_size)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._running: dict[str, Job] = {}
        self.stats = EngineStats()
        self._worker = threading.Thread(target=self._run, name="kobold-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        model: str,
        provider: str,
        cache_dir: Path,
        cpu_threads: int = 0,
        queue_size: int = 16,
        prefix_cache_mb: int = 256,
        max_batch_size: int = 8,
        progress: Callable[[str], None] | None = None,
        quant: str = "auto",
        context_shift: bool = True,
        context_size: int = 0,
        kv_cache_mb: int = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_layout: str = "auto",
        cuda_graphs: bool = False,
    ) -> "Engine":
        """Prepare (or find in the cache) the model, then open it.

        Each batch row gets a key/value slot of ``context_size`` positions (the model's context
        at most); ``kv_cache_mb`` (0: no limit) bounds rows x slot: fewer rows first, then a
        shorter context if even one row does not fit."""
        model_dir = prepare_model(model, resolved_device(provider), cache_dir, progress, quant)
        try:
            onnx_model = OnnxCausalLM(model_dir, provider, cpu_threads, kv_layout=kv_layout, cuda_graphs=cuda_graphs)
        except WrongDevice as exc:  # CUDA is listed but failed to start: a CPU graph, not a CUDA one on the CPU
            log.warning("%s; preparing the model for the CPU", exc)
            try:
                model_dir = prepare_model(model, "cpu", cache_dir, progress, quant)
            except PrepareError:  # a precision only CUDA runs (fp16): the CPU's own choice
                model_dir = prepare_model(model, "cpu", cache_dir, progress, "auto")
            onnx_model = OnnxCausalLM(model_dir, "cpu", cpu_threads, kv_layout=kv_layout)
        tokenizer = Tokenizer(model_dir)
        shifter = None
        if context_shift and onnx_model.rotary is not None:
            graphs = ShiftGraphs(onnx_model.rotary, onnx_model.kv_shape[1], np.dtype(onnx_model.kv_shape[2]),
                                 onnx_model.device, onnx_model.helpers) \
                if onnx_model.decode_layout == "device-slots" else None
            shifter = ContextShifter(onnx_model.rotary, onnx_model.device, graphs)
        name = _display_name(model, model_dir)
        context = min(context_size or onnx_model.info.context_length, onnx_model.info.context_length)
        if kv_cache_mb > 0:
            max_batch_size, context = plan_slots(onnx_model.kv_bytes_per_token, max_batch_size, context,
                                                 kv_cache_mb * 2**20)
            log.info("key/value slots: %d rows of %d positions in %d MB", max_batch_size, context, kv_cache_mb)
        # The pool holds at least one whole context's keys: a chat's history must survive a
        # request in between (a swipe's fresh neighbour, another user) on any model size.
        pool_bytes = max(prefix_cache_mb * 2**20, context * onnx_model.kv_bytes_per_token)
        prefix_cache = PrefixCache(pool_bytes, shifter=shifter) if prefix_cache_mb > 0 else None
        generator = TextGenerator(onnx_model, tokenizer, prefix_cache, context)
        return cls(generator, name, queue_size, max_batch_size, prefill_chunk)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.generator.tokenizer

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    @property
    def busy(self) -> bool:
        return bool(self._running) or bool(len(self._queue))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queue_capacity(self) -> int:
        """How many jobs may wait at once (more is :class:`QueueFullError`)."""
        return self._queue.capacity

    @property
    def alive(self) -> bool:
        """Whether the model's worker runs and takes jobs (what /health reports)."""
        return self._worker_alive() and not self._queue.closed

    @property
    def running(self) -> int:
        """Jobs in the batch now (a prefill included)."""
        return len(self._running)

    def active_jobs(self) -> list[Job]:
        """The running and waiting jobs, a snapshot: whose work the model has now (by ``owner``)."""
        return [*list(self._running.values()), *self._queue.snapshot()]

    def submit(self, request: GenerationRequest, genkey: str = "", cancel_token: CancelToken | None = None,
               owner: str = "") -> Job:
        """Queue a request; raises QueueFullError when the queue is full.

        Jobs given the same ``cancel_token`` (the ``n`` results of one request) stop together.
        """
        job = Job(request, genkey or f"KCPP{uuid.uuid4().hex[:8].upper()}", cancel_token or CancelToken(),
                  owner=owner, pace=self._stream_pace, worker_alive=self._worker_alive)
        if self._queue.closed or not self._worker_alive():
            raise QueueFullError("The server is shutting down.")
        with self._jobs_lock:
            self._queue.put(job)
            self._jobs[job.genkey] = job
            while len(self._jobs) > _RECENT_JOBS + self._queue.capacity:
                oldest = next(iter(self._jobs.values()))
                if not oldest.finished:
                    break
                self._jobs.popitem(last=False)
        return job

    def _worker_alive(self) -> bool:
        return self._worker.is_alive()

    def _stream_pace(self) -> float:
        """How long a streaming reader waits between events: nothing for a lone stream (every
        token goes out at once), a little when several run, so each event carries a few tokens
        and the HTTP threads stop competing with the decode loop for the CPU."""
        return _BUSY_STREAM_INTERVAL if len(self._running) > 1 else 0.0

    def find(self, genkey: str | None, owner: str | None = None) -> Job | None:
        """The job with ``genkey``; without one, the most recently started running job (of
        ``owner``, when given)."""
        if not genkey:
            running = self._running_of(owner)
            return running[-1] if running else None
        with self._jobs_lock:
            return self._jobs.get(genkey)

    def abort(self, genkey: str | None = None, owner: str | None = None) -> bool:
        """Cancel by genkey (queued or running) or, without one, every running or waiting job
        (of ``owner``, when given). A waiting job ends within one decode step.

        Without a genkey KoboldCpp aborts "the" running generation; with batching there may be
        several, and a client that sends no genkey (SillyTavern) cannot say which is its own:
        its own are those it submitted, so other users' generations keep running.
        """
        waiting = [job for job in self._queue.snapshot() if owner is None or job.owner == owner]
        jobs = [self.find(genkey)] if genkey else [*self._running_of(owner), *waiting]
        live = [job for job in jobs if job is not None and not job.finished]
        for job in live:
            job.cancel()
        return bool(live)

    def _running_of(self, owner: str | None) -> list[Job]:
        return [job for job in list(self._running.values()) if owner is None or job.owner == owner]

    def shutdown(self) -> None:
        """Stop the worker; running and queued jobs end (aborted) rather than hang."""
        waiting = self._queue.close()  # refuses new jobs from here on
        for job in list(self._jobs.values()):
            job.cancel()
        for job in waiting:  # never started: ended here, the worker never sees them
            job.error = RuntimeError("server is shutting down")
            self._end(job)
        # The worker ends after its current step: wait for it, so the model's buffers and helper
        # sessions are released on it before the interpreter goes (a process exiting with the
        # worker still tearing down device buffers aborts: "terminate called without an active
        # exception").
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=SHUTDOWN_WAIT_SECONDS)

    # --- the worker -------------------------------------------------------------------
    def _run(self) -> None:
        batch = self._new_batch()
        rows: list[tuple[Job, Sequence]] = []  # in the batch's row order
        pending: list[int] = []
        while True:
            try:
                if not self._admit(batch, rows, pending):
                    break
                if rows:
                    self._step(batch, rows, pending)
                if self._filling is not None:  # a part of a long prompt after each step
                    self._fill(batch, rows, pending)
            except BaseException as exc:  # never let the worker die: fail what ran, start afresh
                log.exception("generation step failed")
                self._fail_all(rows, exc)
                rows, pending = [], []
                batch = self._new_batch()
        self._fail_all(rows, RuntimeError("server is shutting down"))

    def _new_batch(self) -> DecodeBatch:
        return new_decode_batch(self.generator.model, self.max_batch_size, self.generator.context_length)

    def _admit(self, batch: DecodeBatch, rows: list[tuple[Job, Sequence]], pending: list[int]) -> bool:
        """Between steps: end waiting jobs that were cancelled, then take queued jobs into free
        rows (blocking only when idle), while no prompt is filling part-way. False = stop."""
        for job in self._queue.take_cancelled():
            self._start(job, batch, rows, pending)  # a cancelled job ends at once, without a prefill or a row
        while len(rows) < self.max_batch_size and self._filling is None:
            job = self._queue.take(block=not rows)
            if job is None:
                return not self._queue.closed
            self._start(job, batch, rows, pending)
        return True

    def _step(self, batch: DecodeBatch, rows: list[tuple[Job, Sequence]], pending: list[int]) -> None:
        """One decode step for every row; finished rows leave the batch."""
        logits = batch.step_rows(pending)
        for row in reversed(range(len(rows))):
            job, sequence = rows[row]
            try:
                chunks, token = sequence.step(logits[row])
            except Exception as exc:  # one request's failure (a sampler error) ends only that request
                chunks, token = [], None
                job.error = exc
            self._deliver(job, chunks)
            if token is None:
                self._end(job)  # the client hears first; tidying the batch can wait for it
                self.generator.release(batch.release(row))
                _swap_remove(rows, row)
                _swap_remove(pending, row)
            else:
                batch.truncate(row, sequence.cache_length)
                pending[row] = token
        self.stats.kv_tokens_in_use = sum(sequence.cache_length for _, sequence in rows)

    def _start(self, job: Job, batch: DecodeBatch, rows: list[tuple[Job, Sequence]], pending: list[int]) -> None:
        """Prefill a new job into ``batch`` and take its first token. While other rows decode, a
        long prompt runs ``prefill_chunk`` tokens at a time between their steps (:meth:`_fill`
        goes on with it), so it does not hold every running stream up for its whole prefill.
        Alone, it runs in parts of the same size too, which bounds the attention's scratch."""
        self._running[job.id] = job
        sequence = None
        try:
            sequence = Sequence(self.generator, job.request, job.cancel_token)
            logits = sequence.prefill(batch, self.prefill_chunk)
        except BaseException as exc:  # its row, if it got one, goes (not another job's filling row)
            self._fail_start(job, batch, exc, began=sequence is not None and sequence.filling)
            return
        if sequence.filling:
            self._filling = (job, sequence)
        else:
            self._first_token(job, sequence, logits, batch, rows, pending)

    def _fill(self, batch: DecodeBatch, rows: list[tuple[Job, Sequence]], pending: list[int]) -> None:
        """The next part of the filling prompt."""
        assert self._filling is not None
        job, sequence = self._filling
        try:
            if job.cancel_token.cancelled:
                batch.abandon()
                self._filling = None
                self._first_token(job, sequence, None, batch, rows, pending)
                return
            logits = sequence.fill(batch, self.prefill_chunk)
        except BaseException as exc:
            self._filling = None
            self._fail_start(job, batch, exc, began=True)
            return
        if not sequence.filling:
            self._filling = None
            self._first_token(job, sequence, logits, batch, rows, pending)

    def _first_token(self, job: Job, sequence: Sequence, logits: np.ndarray | None, batch: DecodeBatch,
                     rows: list[tuple[Job, Sequence]], pending: list[int]) -> None:
        """A prefilled job's first token: it joins ``rows``, or ends here (and leaves the batch)."""
        try:
            chunks, token = sequence.step(logits)
        except BaseException as exc:
            log.exception("generation failed")
            job.error = exc
            chunks, token = [], None
        if token is not None:  # its keys count before its first token goes out (a client may look at once)
            self.stats.kv_tokens_in_use += sequence.cache_length
        self._deliver(job, chunks)
        if token is None:
            self._end(job)
            if logits is not None:
                self.generator.release(batch.release(batch.size - 1))
            return
        rows.append((job, sequence))
        pending.append(token)

    def _fail_start(self, job: Job, batch: DecodeBatch, exc: BaseException, began: bool) -> None:
        log.exception("generation failed")
        if began:
            batch.abandon()
        job.error = exc
        self._end(job)

    def _deliver(self, job: Job, chunks: list[GenerationChunk]) -> None:
        """Pass chunks on; the perf figures are updated before the final chunk goes out, so a
        client reading /api/extra/perf right after its stream ends sees its own generation."""
        if chunks and job.first_output_at is None:
            job.first_output_at = time.monotonic()
        for chunk in chunks:
            if chunk.result is not None:
                self._record(chunk.result)
                for observe in self.stats.observers:
                    try:
                        observe(job, chunk.result)
                    except Exception:  # figures are never worth a generation
                        log.exception("a generation observer failed")
            job._emit(chunk)

    def _end(self, job: Job) -> None:
        self._running.pop(job.id, None)
        job._finish(job.error)

    def _fail_all(self, rows: list[tuple[Job, Sequence]], error: BaseException) -> None:
        filling, self._filling = self._filling, None
        for job, _ in rows + ([filling] if filling is not None else []):
            if not job.finished:
                job.error = error
                self._end(job)

    def _record(self, result: GenerationResult | None) -> None:
        if result is None:
            return
        self.stats.total_generations += 1
        self.stats.last_result = result
        self.stats.last_finished_at = time.time()


def _swap_remove(items: list, index: int) -> None:
    """Remove ``items[index]`` the way DecodeBatch.release removes a row: the last takes its place."""
    last = items.pop()
    if index < len(items):
        items[index] = last


def _display_name(spec: str, model_dir: Path) -> str:
    from .prepare import DEFAULT_MODEL_NAME

    if spec in ("", "default"):
        return DEFAULT_MODEL_NAME
    return Path(spec).name or model_dir.name
