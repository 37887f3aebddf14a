"""The AI Horde text worker against a stand-in Horde (tests/horde_standin.py), on a real server."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from kobold_api import __version__
from kobold_api.engine.engine import Engine
from kobold_api.horde import worker as worker_module
from kobold_api.horde.client import HordeError
from kobold_api.horde.payload import InvalidPayload, OutputFormat, WorkerLimits, parse_job
from kobold_api.horde.worker import STATES, HordeWorker, Pacing
from kobold_api.settings import GenerationDefaults, Settings

from conftest import LiveServer, make_engine
from horde_standin import HordeStandin
from model_probe import ModelProbe

#: Every wait shortened; three failures in a row are "many".
FAST = Pacing(quiet_seconds=1.0, local_check_seconds=0.05, idle_waits=(0.05, 0.1, 0.2, 0.3), failure_wait=0.05,
              failure_wait_cap=0.4, loud_after=3, submit_attempts=3, engine_attempts=3, http_timeout=5.0,
              stop_submit_timeout=2.0)
LIMITS = WorkerLimits(max_length=16, max_context_length=512)
#: A job this worker's limits take (the Horde skips a worker for a job asking more).
SMALL = {"prompt": "Hello", "max_length": 16, "max_context_length": 512}


@pytest.fixture(scope="module")
def standin() -> Iterator[HordeStandin]:
    horde = HordeStandin()
    yield horde
    horde.close()


@pytest.fixture
def start_worker(start_server: Callable[..., LiveServer], tiny_engine: Engine, test_settings: Settings,
                 standin: HordeStandin, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Factory: a server whose settings turn the Horde worker on (pointed at the stand-in, with
    ``FAST`` waits unless told otherwise); ``(server, worker)``. Workers stop after the test."""
    workers: list[HordeWorker] = []

    def start(pacing: Pacing = FAST, reset: bool = True, **changes: Any) -> tuple[LiveServer, HordeWorker]:
        if reset:
            standin.reset()
        monkeypatch.setattr(worker_module, "DEFAULT_PACING", pacing)
        settings = replace(test_settings, horde_key=standin.api_key, horde_name="test-worker", horde_url=standin.url,
                           horde_max_length=16, horde_max_context=512)
        server = start_server(tiny_engine, replace(settings, **changes))
        worker = server.app.extensions["kobold_api"].horde
        workers.append(worker)
        return server, worker

    yield start
    for worker in workers:
        worker.stop()


def submitted(standin: HordeStandin, job_id: str) -> Callable[[], Any]:
    """A wait condition: the accepted submit of ``job_id``."""
    return lambda: next((call for call in standin.accepted() if call.body["id"] == job_id), None)


def wait_status(worker: HordeWorker, condition: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = worker.status()
        if condition(status):
            return status
        time.sleep(0.02)
    raise AssertionError(f"timed out; the worker's status is {worker.status()}")


# --- the job cycle -------------------------------------------------------------------------
def test_a_job_is_popped_generated_and_submitted(start_worker, standin: HordeStandin, tiny_engine: Engine) -> None:
    server, worker = start_worker()
    # More than the worker takes (the real Horde would not send it): held to the worker's 16 tokens
    # and 512 context; EOS is banned (use_default_badwordsids), so all 16 are generated.
    job = standin.add_job({"prompt": "Once upon a time", "max_length": 64, "max_context_length": 4096,
                           "use_default_badwordsids": True, "temperature": 0.7, "rep_pen": 1.1,
                           "sampler_order": [6, 0, 1, 3, 4, 2, 5]}, force=True)
    call = standin.wait_for(submitted(standin, job.id), what="the submit")

    agent = f"kobold_api:{__version__}:"
    pop = standin.pops[0]
    assert pop.headers["apikey"] == standin.api_key and pop.headers["client-agent"] == agent
    assert pop.body == {"name": "test-worker", "models": [f"koboldcpp/{tiny_engine.model_name}"], "max_length": 16,
                        "max_context_length": 512, "softprompts": [], "priority_usernames": [], "nsfw": True,
                        "bridge_agent": agent, "threads": 1, "amount": 1, "require_upfront_kudos": False,
                        "extra_slow_worker": False}
    assert call.headers["apikey"] == standin.api_key
    assert call.body["state"] == "ok" and call.body["generation"] and isinstance(call.body["seed"], int)
    assert set(call.body) == {"id", "generation", "state", "seed"}

    status = wait_status(worker, lambda s: s["jobs_done"] == 1)
    assert status["last_job"]["tokens"] == 16 and status["last_job"]["reward"] == 5.0
    perf = server.get("/api/extra/perf").json()
    horde = perf["horde"]
    assert horde["enabled"] is True and horde["worker_name"] == "test-worker" and horde["state"] in STATES
    assert horde["jobs_done"] == 1 and horde["kudos"] == 5.0 and horde["jobs_faulted"] == horde["jobs_expired"] == 0
    assert horde["model"] == f"koboldcpp/{tiny_engine.model_name}" and horde["bridge_agent"] == agent
    assert perf["hordeexitcounter"] == 0
    assert standin.api_key not in json.dumps(perf)


def test_the_generation_obeys_the_payload(start_worker, standin: HordeStandin, tiny_engine: Engine) -> None:
    """top_k 1 makes the text predictable: the same job, run here first, says where a stop
    sequence cuts it; singleline also cuts at the first newline."""
    payload = {"prompt": "Once upon a time", "max_length": 16, "max_context_length": 512, "top_k": 1,
               "use_default_badwordsids": True}
    text = tiny_engine.submit(parse_job(payload, GenerationDefaults(), LIMITS).request, owner="test").wait().text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)].split("\n", 1)[0]
    _, worker = start_worker()
    job = standin.add_job({**payload, "stop_sequence": [stop], "singleline": True})
    assert standin.wait_for(submitted(standin, job.id)).body["generation"] == expected
    assert wait_status(worker, lambda s: s["jobs_done"] == 1)["last_job"]["tokens"] < 16


def test_without_jobs_the_worker_keeps_asking_ever_more_slowly(start_worker, standin: HordeStandin) -> None:
    _, worker = start_worker()
    standin.add_job({"prompt": "Hello", "max_length": 16, "max_context_length": 4096})  # more than it takes
    pops = standin.wait_for(lambda: standin.pops if len(standin.pops) >= 7 else None, what="seven pops")
    gaps = [later.at - earlier.at for earlier, later in zip(pops, pops[1:])]
    for empty, gap in enumerate(gaps[:6], start=1):  # each wait at least the schedule's (0.05, 0.1, 0.2, 0.3...)
        assert gap >= FAST.idle_wait(empty) * 0.9, (empty, gaps)
    assert all(pop.status == 200 and pop.answer["id"] is None for pop in pops)
    status = worker.status()
    assert status["empty_pops"] >= 6 and status["consecutive_failures"] == 0
    assert status["skipped"] == {"max_context_length": 1}  # what the Horde passed it over for
    # A job ends the idle streak.
    job = standin.add_job(SMALL)
    standin.wait_for(submitted(standin, job.id))


def test_a_bad_payload_is_submitted_as_faulted(start_worker, standin: HordeStandin) -> None:
    _, worker = start_worker()
    no_prompt = standin.add_job({"max_length": 16, "max_context_length": 512})
    bad_sampler = standin.add_job({**SMALL, "sampler_order": [9, 9]})
    good = standin.add_job(SMALL)
    standin.wait_for(submitted(standin, good.id))
    states = {call.body["id"]: (call.body["state"], call.body["generation"]) for call in standin.accepted()}
    assert states[no_prompt.id] == states[bad_sampler.id] == ("faulted", "Faulted")
    assert states[good.id][0] == "ok"
    status = wait_status(worker, lambda s: s["jobs_done"] == 1)
    assert status["jobs_faulted"] == 2 and status["consecutive_failures"] == 0


def test_timed_out_jobs_are_counted_and_the_worker_goes_on(start_worker, standin: HordeStandin) -> None:
    """The Horde refuses a late submit (400 AbortedGen) or no longer knows the job (404
    InvalidJobID); a job still generating at its ttl is cancelled and handed back as faulted."""
    _, worker = start_worker(horde_max_length=3000, horde_max_context=4096)
    aborted = standin.add_job(SMALL, abort_before_submit=True)
    vanished = standin.add_job(SMALL, vanish=True)
    # 3000 tokens take the tiny model far longer than this (shortened) ttl.
    slow = standin.add_job({"prompt": "Hello", "max_length": 3000, "max_context_length": 4096,
                            "use_default_badwordsids": True}, ttl=0.1)
    good = standin.add_job(SMALL)
    standin.wait_for(submitted(standin, good.id))
    answers = [(call.body["id"], call.body["state"], call.status, (call.answer or {}).get("rc"))
               for call in standin.submits]
    assert (aborted.id, "ok", 400, "AbortedGen") in answers and (vanished.id, "ok", 404, "InvalidJobID") in answers
    assert (slow.id, "faulted", 200, None) in answers  # handed back: the Horde reassigns it at once
    assert sum(call.body["id"] in (aborted.id, vanished.id) for call in standin.submits) == 2  # not retried
    status = wait_status(worker, lambda s: s["jobs_done"] == 1)
    assert status["jobs_expired"] == 3 and status["consecutive_failures"] == 0 and status["jobs_lost"] == 0


def test_failures_are_retried_with_backoff(start_worker, standin: HordeStandin, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kobold_api.horde.worker")
    standin.reset()
    standin.fail_next("pop", 500, 502, 503)
    standin.fail_next("submit", 500, 503)
    job = standin.add_job(SMALL)
    server, worker = start_worker(reset=False)
    call = standin.wait_for(submitted(standin, job.id))
    assert [pop.status for pop in standin.pops[:4]] == [500, 502, 503, 200]
    assert [submit.status for submit in standin.submits] == [500, 503, 200] and call.body["state"] == "ok"
    status = wait_status(worker, lambda s: s["jobs_done"] == 1)
    assert status["failure_pauses"] == 1 and status["consecutive_failures"] == 0 and "HTTP 503" in status["last_error"]
    assert server.get("/api/extra/perf").json()["hordeexitcounter"] == 1
    assert "3 failures in a row" in caplog.text


def test_a_refused_key_waits_long_and_says_so(start_worker, standin: HordeStandin) -> None:
    _, worker = start_worker(horde_key="not-the-key")
    status = wait_status(worker, lambda s: s["state"] == "failing")
    assert "InvalidAPIKey" in status["last_error"] and status["wait_seconds"] == FAST.failure_wait_cap
    assert all(pop.status == 401 for pop in standin.pops)


class MovableClock:
    """The worker's clock: real time plus whatever the test adds. Counts its reads, so a test can
    wait for the worker to go round its loop."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.monotonic() + self.offset


def test_local_users_come_first(start_worker, standin: HordeStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pop while a local request runs or during the quiet period after it. The quiet period is
    longer than any test run, and ended by moving the worker's clock, not by waiting for it."""
    quiet = 3600.0
    server, worker = start_worker(pacing=replace(FAST, quiet_seconds=quiet))
    clock = MovableClock()
    monkeypatch.setattr(worker, "_clock", clock)
    standin.wait_for(lambda: len(standin.pops) >= 2, what="idle pops")
    replies: list[Any] = []
    local = threading.Thread(target=lambda: replies.append(server.post(
        "/api/v1/generate", json={"prompt": "Hello", "max_length": 16, "use_default_badwordsids": True})))
    with ModelProbe(server.app.extensions["kobold_api"].engine) as probe:
        probe.hold()  # the local request stays in its prefill while the worker is watched
        local.start()
        probe.wait_held()
        began = len(standin.pops)
        wait_status(worker, lambda s: s["state"] == "waiting_for_local")
        during = len(standin.pops)
        assert during - began <= 1  # at most a pop already on its way when the request began
        probe.release()
        local.join(60)
    assert replies and replies[0].status_code == 200
    reads = clock.reads
    standin.wait_for(lambda: clock.reads >= reads + 30, what="the worker to go round its loop again")
    assert worker.status()["state"] == "waiting_for_local" and len(standin.pops) == during  # no pop meanwhile
    job = standin.add_job(SMALL)
    clock.offset += quiet  # the quiet period is over
    standin.wait_for(submitted(standin, job.id))
    assert len(standin.pops) > during


def test_stopping_hands_a_job_in_hand_back(start_worker, standin: HordeStandin) -> None:
    _, worker = start_worker(horde_max_length=3000, horde_max_context=4096)
    job = standin.add_job({"prompt": "Hello", "max_length": 3000, "max_context_length": 4096,
                           "use_default_badwordsids": True})
    wait_status(worker, lambda s: s["state"] == "generating")
    worker.stop()
    assert not worker.running and worker.status()["state"] == "stopped"
    assert [(call.body["id"], call.body["state"]) for call in standin.accepted()] == [(job.id, "faulted")]


def test_the_worker_stops_with_its_engine(tiny_model_dir: Path, test_settings: Settings,
                                          standin: HordeStandin) -> None:
    standin.reset()
    engine = make_engine(tiny_model_dir, prefix_cache_mb=0)
    settings = replace(test_settings, horde_key=standin.api_key, horde_name="test-worker", horde_url=standin.url)
    worker = HordeWorker.from_settings(settings, engine, FAST)
    worker.start()
    try:
        standin.wait_for(lambda: standin.pops, what="a pop")
        engine.shutdown()
        wait_status(worker, lambda s: s["state"] == "stopped")
    finally:
        worker.stop()
    assert not worker.running and worker._observe not in engine.stats.observers


def test_perf_has_no_horde_object_without_the_worker(server: LiveServer) -> None:
    perf = server.get("/api/extra/perf").json()
    assert "horde" not in perf and perf["hordeexitcounter"] == 0


# --- the pieces ------------------------------------------------------------------------------
def test_a_payload_maps_to_the_request_the_kobold_route_would_make() -> None:
    task = parse_job({"prompt": "Hi", "n": 3, "genkey": "X", "max_length": 500, "max_context_length": 9000,
                      "temperature": 0.5, "top_k": 7, "rep_pen": 1.2, "stop_sequence": ["\n\n", "You:"],
                      "sampler_order": [6, 0, 1, 3, 4, 2, 5], "use_default_badwordsids": True, "singleline": True,
                      "frmtrmspch": True}, GenerationDefaults(), LIMITS)
    request = task.request
    assert (request.max_new_tokens, request.max_context_length) == (16, 512)  # the worker's limits
    assert request.sampling.temperature == 0.5 and request.sampling.top_k == 7 and request.sampling.rep_pen == 1.2
    assert request.stop_strings == ["\n\n", "You:", "\n"] and request.ban_eos is True
    assert task.output == OutputFormat(singleline=True, remove_special_chars=True)
    default = parse_job({"prompt": "Hi"}, GenerationDefaults(), WorkerLimits(512, 2048)).request
    assert (default.max_new_tokens, default.max_context_length) == (80, 2048)  # the Horde's defaults
    for bad in (None, {"max_length": 16}, {"prompt": "Hi", "sampler_order": [9]}, {"prompt": "Hi", "top_p": 7}):
        with pytest.raises(InvalidPayload):
            parse_job(bad, GenerationDefaults(), LIMITS)


def test_output_formatting() -> None:
    assert OutputFormat(singleline=True).apply("one\ntwo") == "one"
    assert OutputFormat(trim_incomplete=True).apply('He said "Hi." Then he le') == 'He said "Hi."'
    assert OutputFormat(trim_incomplete=True).apply("no sentence end") == "no sentence end"
    assert OutputFormat(remove_blank_lines=True).apply("a\n\n\nb\nc") == "a\nb\nc"
    assert OutputFormat(remove_special_chars=True).apply("a#b/c@d%e{f}g+h=i~j|k\\l^m<n>o") == "abcdefghijklmno"
    assert OutputFormat().apply("as is\n\n#") == "as is\n\n#"


def test_the_default_pacing_is_koboldcpps() -> None:
    pacing = Pacing()
    assert [pacing.idle_wait(n) for n in (1, 10, 11, 25, 26, 1000)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert [pacing.failure_backoff(n) for n in (1, 2, 3, 8, 9, 100)] == [2.0, 4.0, 8.0, 256.0, 300.0, 300.0]
    assert pacing.quiet_seconds == 20.0


def test_which_errors_are_worth_retrying() -> None:
    assert HordeError("refused").transient and HordeError("x", 503).transient and HordeError("x", 429).transient
    assert not HordeError("x", 401, "InvalidAPIKey").transient and not HordeError("x", 400, "AbortedGen").transient
    assert str(HordeError("gone", 404, "InvalidJobID")) == "HTTP 404 InvalidJobID: gone"
