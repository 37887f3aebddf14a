"""Watching and holding an engine's model runs from a test, so that what a test claims about the
engine's timing is observed instead of hoped for.

``ModelProbe(engine)`` wraps the two methods every session run goes through (``run_shared`` and
``run_concat``). It records how many rows each run carried (a decode step carries one row per
running request, so ``max_rows`` says how many requests really ran together), and its gate stops
the engine's worker inside its next run until the test lets it go: requests submitted meanwhile
are all waiting when it goes on, so they join one batch whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: An upper bound only (a test that failed elsewhere must not leave the worker stuck).
HOLD_LIMIT_SECONDS = 120.0


class ModelProbe:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model = engine.generator.model
        self.rows: list[int] = []
        #: (rows, new tokens per row) of every run: a decode step feeds one token per row.
        self.runs: list[tuple[int, int]] = []
        self._guard = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._held = threading.Event()
        self._passes = 0
        self._saved: dict[str, Any] = {}
        for name, ids_at in (("run_shared", 1), ("run_concat", 0)):
            original = getattr(self.model, name, None)
            if original is None:
                continue
            self._saved[name] = vars(self.model).get(name)  # a test's own wrapper (a throttle) stays under ours
            setattr(self.model, name, self._wrap(original, ids_at))
        assert self._saved, "the model has no run method to watch"

    def _wrap(self, original: Any, ids_at: int) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            rows = args[ids_at]  # run_shared: a row count (then the tokens); run_concat: the input ids
            shape = (rows, args[ids_at + 1]) if isinstance(rows, int) else (len(rows), len(rows[0]))
            with self._guard:
                self.rows.append(shape[0])
                self.runs.append(shape)
                stop = not self._open.is_set() and self._passes == 0
                if not stop and self._passes:
                    self._passes -= 1
            if stop:
                self._held.set()
                self._open.wait(HOLD_LIMIT_SECONDS)
            return original(*args, **kwargs)

        return run

    @property
    def max_rows(self) -> int:
        """The most rows one run carried: how many requests decoded together at the busiest step."""
        with self._guard:
            return max(self.rows, default=0)

    def hold(self, after: int = 0) -> None:
        """Close the gate: the worker stops inside its model run after the next ``after`` ones."""
        with self._guard:
            self._passes = after
            self._held.clear()
            self._open.clear()

    def wait_held(self) -> None:
        assert self._held.wait(HOLD_LIMIT_SECONDS), "the engine never ran the model"

    def release(self) -> None:
        with self._guard:
            self._passes = 0
            self._open.set()

    def close(self) -> None:
        self.release()
        for name, saved in self._saved.items():
            if saved is None:
                delattr(self.model, name)
            else:
                setattr(self.model, name, saved)

    def __enter__(self) -> ModelProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def submit_together(probe: ModelProbe, first: Any, rest: list[Any]) -> None:
    """Start ``first`` (a callable that gets a request to the engine), hold the engine inside its
    first model run, start ``rest``, wait until every one of them waits in the engine's queue,
    then let it go: all of them join the batch that ``first`` is running in."""
    probe.hold()
    first()
    probe.wait_held()
    for start in rest:
        start()
    wait_queued(probe.engine, len(rest))
    probe.release()


def wait_queued(engine: Any, count: int) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while engine.queued < count:
        assert time.monotonic() < deadline, f"only {engine.queued} of {count} requests reached the queue"
        time.sleep(0.005)
