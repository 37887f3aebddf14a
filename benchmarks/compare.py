#!/usr/bin/env python3
"""Comparative benchmark: kobold_api (over HTTP) vs llama.cpp vs optimum, same model, one machine.

A command, not a test. In one invocation it

* starts our server (``python -m kobold_api serve``) as a subprocess and measures it over HTTP,
  the way SillyTavern uses it (``/api/extra/generate/stream``, ``/api/v1/generate``,
  ``/api/extra/perf``);
* runs llama.cpp through ``llama-cpp-python`` on the same GGUF in a worker subprocess (the bench
  venv's python, ``n_threads=2``, ``n_ctx=4096``);
* runs optimum's ``ORTModelForCausalLM.generate`` on an optimum export of the same model (the
  GGUF de-quantized to fp32 with ``kobold_api.engine.prepare._gguf_to_hf``, exported once into
  ``data/bench-cache/``) in a worker subprocess (the project venv's python);

and prints ours/theirs ratios beside the raw figures, then writes ``benchmarks/results/latest.md``,
``latest.json`` and ``latest.png``.

Run it with the bench venv (``benchmarks/requirements.txt``)::

    /work/bench-venv/bin/python benchmarks/compare.py [--quick] [--skip-llama] [--skip-optimum] [--tokens N]

The engines run one after the other (never at the same time), each with 2 CPU threads. This file
is also the workers' program (``--worker llama|optimum|optimum-export``); the orchestrator part
needs only the standard library (plus matplotlib for the chart), so any python can run it.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DATA_DIR = REPO / "data"
GGUF_PATH = DATA_DIR / "models" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
OPTIMUM_DIR = DATA_DIR / "bench-cache" / "SmolLM2-135M-Instruct-optimum-fp32"
OPTIMUM_DONE = "bench_export_done.json"

THREADS = 2
N_CTX = 4096
SEED = 1234
EOS_IDS = [2]  # <|im_end|>: what our server bans with ban_eos_token (genai_config eos_token_id)
#: SillyTavern's default Kobold samplers (the brief: temp 0.7, top_p 0.9, min_p 0.05,
#: rep_pen 1.1 over 1024 tokens, top_k off), with a fixed seed.
ST = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "rep_pen": 1.1, "rep_pen_range": 1024, "top_k": 0}
DECODE_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nTell me a long story about a lighthouse keeper and her cat.<|im_end|>\n"
                 "<|im_start|>assistant\n")
OVERHEAD_PROMPT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"

_WORDS = """the lighthouse keeper walked along harbour every morning before boats left and counted gulls
on rocks while wind carried salt over cliffs she wrote letters to her brother who lived inland
among fields of barley where rivers bend slowly past mills stone bridges and quiet villages
nobody remembered storm that broke the old lamp years ago except fisherman named Tomas sailed
north each spring with nets mended by hand his daughter painted small boats blue red green sold
them market square near church whose bell rang noon travellers stopped buy bread cheese apples
cider then continued road toward mountains snow lingered late summer wolves howled distant
forests under pale moon children listened stories about giants sleeping beneath hills dragons
guarding copper gold deep caves merchants argued prices wool copper tin silver coins clinked
tavern tables musicians played fiddles flutes drums until candles burned low window shutters
rattled rain dripped roof tiles cat curled beside fire dreaming mice ships sails clocks ticking
""".split()


# =============================================================================================
# Prompts (built once in the orchestrator, so every engine gets exactly the same text)
# =============================================================================================

def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?", ","])


def _text(rng: random.Random, n_words: int) -> str:
    parts, count = [], 0
    while count < n_words:
        sentence = _sentence(rng)
        parts.append(sentence)
        count += sentence.count(" ") + 1
    return " ".join(parts)


class PromptBuilder:
    """Exact token counts through the server's own tokenizer (the GGUF's vocabulary, so the same ids)."""

    def __init__(self, client: "KoboldClient", seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)

    def plain(self, n_tokens: int) -> str:
        """Random text of ``n_tokens`` tokens; each call starts differently, so no prefix cache helps."""
        ids = self.client.tokenize(_text(self.rng, int(n_tokens * 1.3) + 20))[:n_tokens]
        return self.client.detokenize(ids)

    def chat_history(self, n_tokens: int) -> str:
        """ChatML turns adding up to about ``n_tokens``, ending with a finished assistant turn."""
        history = f"<|im_start|>system\nYou are {self.rng.choice(['Mira', 'Bramble', 'Tomas'])}, " \
                  f"a storyteller. {_text(self.rng, 30)}<|im_end|>\n"
        role = "user"
        while True:
            turn = f"<|im_start|>{role}\n{_text(self.rng, self.rng.randint(50, 90))}<|im_end|>\n"
            role = "assistant" if role == "user" else "user"
            if len(self.client.tokenize(history + turn)) > n_tokens and role == "user":
                # stop after an assistant turn once we are past the target
                return history + turn
            history += turn
            if len(self.client.tokenize(history)) >= n_tokens and role == "user":
                return history

    def new_message(self) -> str:
        return f"<|im_start|>user\n{_text(self.rng, 7)}<|im_end|>\n<|im_start|>assistant\n"


def trim_last_reply(history: str) -> str:
    """``history`` with the last third of its final assistant turn cut off, as a client does that
    trims or edits the previous reply: the same history up to a point inside that reply."""
    tag, end = "<|im_start|>assistant\n", "<|im_end|>\n"
    start = history.rindex(tag) + len(tag)
    reply = history[start:-len(end)]
    return history[:start] + reply[:len(reply) * 2 // 3].rstrip() + end


def build_spec(client: "KoboldClient", args: argparse.Namespace) -> dict:
    builder = PromptBuilder(client, SEED)
    reps = 1 if args.quick else 3
    # the concurrency rows are short (about a second each for us) and the shared machine drifts
    # by +-15%, so they get more repetitions than the TTFT rows
    concurrency_reps = 2 if args.quick else 7
    n_overhead = 10 if args.quick else 30
    followups = []
    for _ in range(reps):
        history = builder.chat_history(1500)
        followups.append({"history": history, "followup": history + builder.new_message()})
    branches = []  # other histories: the follow-ups above leave theirs in the prefix caches
    for _ in range(reps):
        history = builder.chat_history(1500)
        branches.append({"history": history, "branch": trim_last_reply(history) + builder.new_message()})
    levels = [1, 4, 8]
    return {
        "new_tokens": args.tokens,
        "decode_repeats": 1 if args.quick else 5,
        "decode_prompt": DECODE_PROMPT,
        "fresh_1024": [builder.plain(1024) for _ in range(reps)],
        "fresh_50": [builder.plain(50) for _ in range(2 if args.quick else 5)],
        "followups": followups,
        "branches": branches,
        "concurrency_levels": levels,
        "concurrency_tokens": args.concurrency_tokens,
        # one list of prompts per repetition and level, none sent twice: a repeat must not be a
        # prefix-cache hit where the first run was a cold prefill
        "concurrency_prompts": {str(n): [[f"<|im_start|>user\n{_text(builder.rng, 12)}<|im_end|>\n"
                                          f"<|im_start|>assistant\n" for _ in range(n)]
                                         for _ in range(concurrency_reps)]
                                for n in levels},
        # all different, starting differently, so no engine's prefix reuse turns a request into a no-op
        "overhead_prompts": [f"{i}. {_text(builder.rng, 6)}\n{OVERHEAD_PROMPT}" for i in range(n_overhead + 3)],
        "eos_ids": EOS_IDS,
        "threads": THREADS,
        "n_ctx": N_CTX,
        "seed": SEED,
        "gguf": str(GGUF_PATH),
        "optimum_dir": str(OPTIMUM_DIR),
    }


# =============================================================================================
# The measurements, shared by all three engines (an engine has stream() and one_token())
# =============================================================================================

class StreamRecord:
    """What one streamed generation looked like from the caller's side."""

    def __init__(self, t_send: float) -> None:
        self.t_send = t_send
        self.t_first_any: float | None = None  # the first event of any kind (TTFT)
        self.token_times: list[float] = []     # arrival of each event that carried text
        self.finish_reason: str | None = None
        self.tokens: int | None = None          # exact generated-token count, where the engine says
        self.prompt_tokens: int | None = None

    def event(self, has_text: bool) -> None:
        now = time.perf_counter()
        if self.t_first_any is None:
            self.t_first_any = now
        if has_text:
            self.token_times.append(now)

    @property
    def ttft(self) -> float:
        return (self.t_first_any or time.perf_counter()) - self.t_send

    @property
    def decode_rate(self) -> float:
        """(n - 1) / (t_last - t_first) over the events that carried tokens."""
        times = self.token_times
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ttft_runs(engine, prompts: list[str]) -> tuple[list[float], list[int | None]]:
    """Time to first token (and prompt size) of a 1-token generation for each prompt."""
    records = [engine.stream(prompt, 1, "greedy") for prompt in prompts]
    return [rec.ttft for rec in records], [rec.prompt_tokens for rec in records]


def measure_all(engine, spec: dict, log) -> dict:
    """Run every measurement of the brief against ``engine``; returns the raw and summary figures."""
    out: dict = {}
    new_tokens = spec["new_tokens"]

    # 1. decode tok/s, greedy and SillyTavern samplers, EOS banned
    for mode in ("greedy", "sillytavern"):
        # warm-up: one full-length run (allocators and thread pools settle; warms any prefix cache too)
        engine.stream(spec["decode_prompt"], new_tokens, mode)
        rates, events, tokens = [], [], []
        for _ in range(spec["decode_repeats"]):
            rec = engine.stream(spec["decode_prompt"], new_tokens, mode)
            rates.append(rec.decode_rate)
            events.append(len(rec.token_times))
            tokens.append(rec.tokens)
        out[f"decode_{mode}"] = {"tok_s": _median(rates), "runs_tok_s": rates, "events": events,
                                 "tokens": tokens, "new_tokens": new_tokens}
        extra = getattr(engine, "last_engine_rate", None)
        if extra is not None:
            out[f"decode_{mode}"]["engine_reported_tok_s"] = extra
        log(f"decode {mode}: {out[f'decode_{mode}']['tok_s']:.1f} tok/s (runs {[round(r, 1) for r in rates]}, "
            f"events {events}, tokens {tokens})")

    # 2. TTFT, fresh 1,024-token prompts (all different)
    times, counts = _ttft_runs(engine, spec["fresh_1024"])
    out["ttft_fresh_1024"] = {"s": _median(times), "runs_s": times, "prompt_tokens": counts}
    log(f"TTFT fresh 1024: {out['ttft_fresh_1024']['s']:.3f} s (runs {[round(t, 3) for t in times]}, "
        f"prompt tokens {counts})")

    # 3. TTFT of a chat follow-up (history sent once, then history + new message) and of a fresh 50
    times, warm, counts = [], [], []
    for pair in spec["followups"]:
        warm.append(engine.stream(pair["history"], 1, "greedy").ttft)
        rec = engine.stream(pair["followup"], 1, "greedy")
        times.append(rec.ttft)
        counts.append(rec.prompt_tokens)
    out["ttft_followup"] = {"s": _median(times), "runs_s": times, "warmup_runs_s": warm, "prompt_tokens": counts}
    log(f"TTFT follow-up: {out['ttft_followup']['s']:.3f} s (runs {[round(t, 3) for t in times]}, "
        f"first send of the history {[round(t, 3) for t in warm]}, prompt tokens {counts})")
    times, counts = _ttft_runs(engine, spec["fresh_50"])
    out["ttft_fresh_50"] = {"s": _median(times), "runs_s": times, "prompt_tokens": counts}
    out["followup_over_fresh_50"] = out["ttft_followup"]["s"] / out["ttft_fresh_50"]["s"]
    log(f"TTFT fresh 50: {out['ttft_fresh_50']['s']:.3f} s; follow-up / fresh-50 = "
        f"{out['followup_over_fresh_50']:.2f}x")
    # 3b. a follow-up that branches inside the cached history: the previous reply trimmed
    times, counts = [], []
    for pair in spec.get("branches", []):
        engine.stream(pair["history"], 1, "greedy")
        rec = engine.stream(pair["branch"], 1, "greedy")
        times.append(rec.ttft)
        counts.append(rec.prompt_tokens)
    if times:
        out["ttft_branch"] = {"s": _median(times), "runs_s": times, "prompt_tokens": counts}
        out["branch_over_fresh_50"] = out["ttft_branch"]["s"] / out["ttft_fresh_50"]["s"]
        log(f"TTFT branch: {out['ttft_branch']['s']:.3f} s (runs {[round(t, 3) for t in times]}); branch / "
            f"fresh-50 = {out['branch_over_fresh_50']:.2f}x")

    # 4. aggregate tok/s with 1, 4, 8 concurrent streaming clients; the levels take turns in each
    # repetition, so a slow spell on the shared machine does not land on one level only
    runs: dict[str, list[dict]] = {str(level): [] for level in spec["concurrency_levels"]}
    for rep in range(len(spec["concurrency_prompts"][str(spec["concurrency_levels"][0])])):
        for level in spec["concurrency_levels"]:
            run = _concurrent_run(engine, spec["concurrency_prompts"][str(level)][rep], spec["concurrency_tokens"])
            runs[str(level)].append(run)
            log(f"{level} clients: {run['agg_tok_s']:.1f} tok/s aggregate ({run['tokens']} tokens in "
                f"{run['wall_s']:.2f} s)")
    out["concurrency"] = {}
    for level, level_runs in runs.items():
        middle = sorted(level_runs, key=lambda run: run["agg_tok_s"])[len(level_runs) // 2]
        out["concurrency"][level] = {**middle, "runs_agg_tok_s": [run["agg_tok_s"] for run in level_runs]}
    one = out["concurrency"].get("1", {}).get("agg_tok_s")
    for level, figures in out["concurrency"].items():
        figures["over_one_stream"] = figures["agg_tok_s"] / one if one else None
        # the same ratio within each repetition (the levels ran seconds apart), for the notes
        figures["over_one_stream_per_rep"] = [run["agg_tok_s"] / first["agg_tok_s"]
                                              for run, first in zip(runs[level], runs.get("1", []))]

    # 5. per-request overhead of a 1-token generation: wall minus the engine's own compute time
    walls, engine_times = [], []
    for prompt in spec["overhead_prompts"][:3]:
        engine.one_token(prompt)  # warm-up
    for prompt in spec["overhead_prompts"][3:]:
        wall, engine_s = engine.one_token(prompt)
        walls.append(wall)
        engine_times.append(engine_s)
    overheads = [w - e for w, e in zip(walls, engine_times) if e is not None]
    out["overhead"] = {"wall_p50_ms": 1000 * _median(walls),
                       "engine_p50_ms": 1000 * _median([e for e in engine_times if e is not None]),
                       "overhead_p50_ms": 1000 * _median(overheads) if overheads else float("nan"),
                       "requests": len(walls)}
    log(f"1-token request: wall p50 {out['overhead']['wall_p50_ms']:.2f} ms, engine p50 "
        f"{out['overhead']['engine_p50_ms']:.2f} ms, overhead p50 {out['overhead']['overhead_p50_ms']:.2f} ms")
    return out


def _concurrent_run(engine, prompts: list[str], max_tokens: int) -> dict:
    """One streaming client per prompt, all released at once; aggregate tok/s over the wall time."""
    records: list[StreamRecord | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(index: int) -> None:
        try:
            barrier.wait()
            records[index] = engine.stream(prompts[index], max_tokens, "greedy")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(prompts)} concurrent clients: {errors[0]!r}")
    total = sum(r.tokens if r.tokens is not None else len(r.token_times) for r in records)
    return {"agg_tok_s": total / wall, "wall_s": wall, "tokens": total,
            "ttft_p50_s": _median([r.ttft for r in records]),
            # tokens over the request's whole life (under load one event carries several tokens,
            # so an event rate would undercount)
            "per_stream_tok_s_p50": _median([(r.tokens or len(r.token_times)) / (r.token_times[-1] - r.t_send)
                                             for r in records if r.token_times])}


# =============================================================================================
# Engine 1: our server, over HTTP
# =============================================================================================

class KoboldClient:
    def __init__(self, port: int) -> None:
        self.port = port
        self.last_engine_rate: list[float] = []

    def _conn(self, timeout: float = 900) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 900) -> dict:
        conn = self._conn(timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def tokenize(self, text: str) -> list[int]:
        return self.request("POST", "/api/extra/tokenize", {"prompt": text})["ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.request("POST", "/api/extra/detokenize", {"ids": ids})["result"]

    @staticmethod
    def body(prompt: str, max_tokens: int, mode: str) -> dict:
        body = {"prompt": prompt, "max_length": max_tokens, "max_context_length": N_CTX, "ban_eos_token": True,
                "sampler_seed": SEED, "top_a": 0, "tfs": 1, "typical": 1}
        if mode == "greedy":
            body.update(temperature=0, top_k=0, top_p=1, min_p=0, rep_pen=1.0)
        else:
            body.update(ST)
        return body

    def stream(self, prompt: str, max_tokens: int, mode: str) -> StreamRecord:
        conn = self._conn()
        try:
            payload = json.dumps(self.body(prompt, max_tokens, mode)).encode()
            rec = StreamRecord(time.perf_counter())
            conn.request("POST", "/api/extra/generate/stream", body=payload,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"stream: HTTP {response.status}: {response.read()[:300]!r}")
            while True:
                line = response.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                rec.event(bool(event.get("token")))
                if event.get("finish_reason"):
                    rec.finish_reason = event["finish_reason"]
                    if event["finish_reason"] == "error":
                        raise RuntimeError(f"stream error: {event}")
            response.read()
        finally:
            conn.close()
        if max_tokens > 1 and rec.finish_reason == "length":
            # "length" means exactly max_tokens were generated; under load one event may carry
            # several tokens, so events are not a token count.
            rec.tokens = max_tokens
        return rec

    def perf(self) -> dict:
        return self.request("GET", "/api/extra/perf")

    def one_token(self, prompt: str) -> tuple[float, float]:
        body = self.body(prompt, 1, "greedy")
        started = time.perf_counter()
        self.request("POST", "/api/v1/generate", body)
        wall = time.perf_counter() - started
        perf = self.perf()
        return wall, perf["last_process"] + perf["last_eval"]


class OursOnHttp(KoboldClient):
    """Adds the server's own counts (from /api/extra/perf) to the sequential measurements."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self._sequential = True

    def stream(self, prompt: str, max_tokens: int, mode: str) -> StreamRecord:
        rec = super().stream(prompt, max_tokens, mode)
        if self._sequential:
            perf = self.perf()
            rec.prompt_tokens = perf.get("last_input_count")
            rec.tokens = perf.get("last_token_count")
            if max_tokens > 8 and perf.get("last_eval"):
                self.last_engine_rate.append(round(perf["last_token_count"] / perf["last_eval"], 1))
        return rec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_mb(pid: int, field: str = "VmHWM") -> float | None:
    """A process's peak (``VmHWM``) or current (``VmRSS``) resident memory in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class ServerProcess:
    """An HTTP server in its own process (session) on a free port, its output in a log file;
    ready once ``ready_path`` answers 200."""

    def __init__(self, command: Callable[[int], list[str]], ready_path: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.ready_path = ready_path
        self.log = tempfile.NamedTemporaryFile(prefix="kobold-bench-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(command(self.port), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 600) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", self.ready_path)
                if conn.getresponse().status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Server(ServerProcess):
    """Our server (``python -m kobold_api serve``) on the data dir's default model, or as ``extra`` says."""

    def __init__(self, python: str, extra: tuple[str, ...] = (), env: dict | None = None) -> None:
        super().__init__(lambda port: [python, "-m", "kobold_api", "serve", "--port", str(port), "--host", "127.0.0.1",
                                       "--data-dir", str(DATA_DIR), *extra], "/api/v1/model", env)


# =============================================================================================
# Engine 2: llama.cpp through llama-cpp-python (worker process)
# =============================================================================================

class SerialEngine:
    """One generation at a time, always on the same thread (a single-worker executor is the lock).

    The same thread matters for llama.cpp: its OpenMP pool belongs to the calling thread, and on
    this machine calling it from a new thread after the main thread had used it decoded at ~60
    tok/s instead of ~165. Running everything on one worker thread avoids charging that to it.
    """

    def __init__(self, spec: dict) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._executor.submit(self._load, spec).result()  # loaded on the thread that will run it

    def _load(self, spec: dict) -> None:
        raise NotImplementedError

    def stream(self, prompt: str, max_tokens: int, mode: str) -> StreamRecord:
        rec = StreamRecord(time.perf_counter())  # queueing behind other clients counts in their TTFT
        self._executor.submit(self._stream, rec, prompt, max_tokens, mode).result()
        return rec

    def one_token(self, prompt: str) -> tuple[float, float]:
        return self._executor.submit(self._one_token, prompt).result()


class LlamaEngine(SerialEngine):
    """Like llama-cpp-python's own server: one Llama object, one request at a time."""

    name = "llama.cpp"

    def _load(self, spec: dict) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.llama_cpp = llama_cpp
        self.llm = Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], seed=spec["seed"], last_n_tokens_size=ST["rep_pen_range"],
                         verbose=False)
        vocab = self.llm._model.vocab
        # Ban every end-of-generation token (llama-cpp-python stops on any of them), EOS included.
        eog = [i for i in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        self.banned = sorted(set(eog) | set(spec["eos_ids"]))
        self.bias = {i: float("-inf") for i in self.banned}
        self.version = llama_cpp.__version__

    def _kwargs(self, mode: str) -> dict:
        if mode == "greedy":
            return {"temperature": 0.0, "repeat_penalty": 1.0}
        return {"temperature": ST["temperature"], "top_p": ST["top_p"], "min_p": ST["min_p"],
                "repeat_penalty": ST["rep_pen"], "top_k": ST["top_k"], "seed": SEED}

    def _stream(self, rec: StreamRecord, prompt: str, max_tokens: int, mode: str) -> None:
        for chunk in self.llm.create_completion(prompt, max_tokens=max_tokens, stream=True,
                                                logit_bias=self.bias, **self._kwargs(mode)):
            choice = chunk["choices"][0]
            rec.event(bool(choice["text"]))
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        # The context holds the prompt and every generated token but the last sampled one,
        # which is never evaluated.
        rec.prompt_tokens = int(self.llm.n_tokens) - (max_tokens - 1)
        rec.tokens = max_tokens if rec.finish_reason == "length" else len(rec.token_times)

    def _one_token(self, prompt: str) -> tuple[float, float]:
        lc = self.llama_cpp
        lc.llama_perf_context_reset(self.llm._ctx.ctx)
        started = time.perf_counter()
        self.llm.create_completion(prompt, max_tokens=1, logit_bias=self.bias, temperature=0.0)
        wall = time.perf_counter() - started
        data = lc.llama_perf_context(self.llm._ctx.ctx)
        return wall, (data.t_p_eval_ms + data.t_eval_ms) / 1000


# =============================================================================================
# Engine 3: optimum ORTModelForCausalLM.generate (worker process)
# =============================================================================================

def optimum_export(spec: dict, log) -> None:
    """De-quantize the GGUF to an HF fp32 folder (the project's own step) and export it with optimum."""
    out_dir = Path(spec["optimum_dir"])
    if (out_dir / OPTIMUM_DONE).is_file():
        log(f"optimum export cached in {out_dir}")
        return
    sys.path.insert(0, str(REPO))
    from optimum.exporters.onnx import main_export

    from kobold_api.engine.prepare import _gguf_to_hf

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optimum-export-", dir=out_dir.parent) as work:
        hf_dir = _gguf_to_hf(Path(spec["gguf"]), Path(work) / "hf", log)
        staging = Path(work) / "onnx"
        log("exporting with optimum (text-generation-with-past, fp32) ...")
        main_export(str(hf_dir), output=str(staging), task="text-generation-with-past")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(str(staging), out_dir)
    (out_dir / OPTIMUM_DONE).write_text(json.dumps({"gguf": spec["gguf"], "seconds": time.monotonic() - started}))
    log(f"optimum export done in {time.monotonic() - started:.0f} s: {out_dir}")


class OptimumEngine(SerialEngine):
    """transformers' generate() over optimum's ORT model; one request at a time."""

    name = "optimum"

    def _load(self, spec: dict) -> None:
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer
        from transformers.generation.streamers import BaseStreamer

        import optimum.version

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        self.model = ORTModelForCausalLM.from_pretrained(spec["optimum_dir"], provider="CPUExecutionProvider",
                                                         session_options=options)
        self.tokenizer = AutoTokenizer.from_pretrained(spec["optimum_dir"])
        self.eos = spec["eos_ids"]
        self.version = f"optimum {optimum.version.__version__}, onnxruntime {ort.__version__}"
        self.session_seconds = 0.0
        session = self.model.session
        original_run = session.run

        def timed_run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original_run(*args, **kwargs)
            finally:
                self.session_seconds += time.perf_counter() - started

        session.run = timed_run  # instance attribute: counts ORT compute time for the overhead figure

        class Recorder(BaseStreamer):
            def __init__(self, rec: StreamRecord) -> None:
                self.rec = rec
                self.prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:  # generate() first puts the prompt ids
                    self.prompt_seen = True
                    return
                self.rec.event(True)

            def end(self) -> None:
                pass

        self.Recorder = Recorder

    def _generate(self, prompt: str, max_tokens: int, mode: str, streamer=None):
        inputs = self.tokenizer(prompt, return_tensors="pt")
        kwargs = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "eos_token_id": self.eos,
                  "pad_token_id": self.eos[0], "streamer": streamer}
        if mode == "greedy":
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            self.torch.manual_seed(SEED)
            kwargs.update(do_sample=True, temperature=ST["temperature"], top_p=ST["top_p"], min_p=ST["min_p"],
                          repetition_penalty=ST["rep_pen"], top_k=ST["top_k"])
        output = self.model.generate(**inputs, **kwargs)
        return int(inputs["input_ids"].shape[1]), int(output.shape[1] - inputs["input_ids"].shape[1])

    def _stream(self, rec: StreamRecord, prompt: str, max_tokens: int, mode: str) -> None:
        rec.prompt_tokens, rec.tokens = self._generate(prompt, max_tokens, mode, self.Recorder(rec))
        rec.finish_reason = "length"

    def _one_token(self, prompt: str) -> tuple[float, float]:
        self.session_seconds = 0.0
        started = time.perf_counter()
        self._generate(prompt, 1, "greedy")
        return time.perf_counter() - started, self.session_seconds


def run_worker(kind: str, spec_path: Path, out_path: Path) -> None:
    def log(message: str) -> None:
        print(f"  [{kind}] {message}", file=sys.stderr, flush=True)

    spec = json.loads(spec_path.read_text())
    if kind == "optimum-export":
        optimum_export(spec, log)
        return
    started = time.monotonic()
    engine = LlamaEngine(spec) if kind == "llama" else OptimumEngine(spec)
    load_s = time.monotonic() - started
    log(f"loaded in {load_s:.1f} s ({engine.version})")
    result = measure_all(engine, spec, log)
    result["load_s"] = load_s
    result["version"] = engine.version
    if kind == "llama":
        result["banned_ids"] = engine.banned
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine._executor.shutdown()
    out_path.write_text(json.dumps(result, indent=2))


# =============================================================================================
# Orchestrator
# =============================================================================================

def _python_with(candidates: list[str | None], module: str) -> str | None:
    seen = set()
    for candidate in candidates:
        if not candidate or candidate in seen or not Path(candidate).exists():
            continue
        seen.add(candidate)
        # from /, so the checkout's own kobold_api folder does not count as installed
        probe = subprocess.run([candidate, "-c", f"import {module}"], capture_output=True, cwd="/")
        if probe.returncode == 0:
            return candidate
    return None


def _venv_candidates(*names: str) -> list[str]:
    return [str(base / name / "bin" / "python") for name in names for base in (REPO, REPO.parent)]


def run_ours(args: argparse.Namespace, spec_path: Path, log) -> tuple[dict, dict]:
    server = Server(args.server_python)
    try:
        ready_s = server.wait_ready()
        log(f"server up on port {server.port} in {ready_s:.1f} s (pid {server.proc.pid})")
        client = OursOnHttp(server.port)
        spec = build_spec(client, args)
        spec["history_tokens"] = [len(client.tokenize(f["history"])) for f in spec["followups"]]
        spec_path.write_text(json.dumps(spec))
        log(f"prompts: fresh 1024 = {[len(client.tokenize(p)) for p in spec['fresh_1024']]} tokens, "
            f"fresh 50 = {[len(client.tokenize(p)) for p in spec['fresh_50']]}, history = "
            f"{[len(client.tokenize(f['history'])) for f in spec['followups']]}, follow-up = "
            f"{[len(client.tokenize(f['followup'])) for f in spec['followups']]}")
        result = {}
        wrapped = _SequentialSwitch(client)
        result = measure_all(wrapped, spec, lambda m: log(f"[ours] {m}"))
        result["decode_engine_reported_tok_s"] = client.last_engine_rate
        result["load_s"] = ready_s
        result["version"] = client.request("GET", "/api/extra/version").get("server", "kobold_api")
        result["peak_rss_mb"] = process_mb(server.proc.pid)
        result["perf_fields"] = sorted(client.perf())
        return result, spec
    except BaseException:
        log("server log tail:\n" + server.log_tail())
        raise
    finally:
        server.stop()


class _SequentialSwitch:
    """Our client, with the /api/extra/perf read-back turned off while clients run concurrently
    (perf describes only the last finished generation, so it cannot be attributed then)."""

    def __init__(self, client: OursOnHttp) -> None:
        self.client = client
        self._active = 0
        self._lock = threading.Lock()

    def stream(self, prompt: str, max_tokens: int, mode: str) -> StreamRecord:
        with self._lock:
            self._active += 1
            concurrent = self._active > 1 or threading.current_thread() is not threading.main_thread()
        try:
            if concurrent:
                return KoboldClient.stream(self.client, prompt, max_tokens, mode)
            return self.client.stream(prompt, max_tokens, mode)
        finally:
            with self._lock:
                self._active -= 1

    def one_token(self, prompt: str) -> tuple[float, float]:
        return self.client.one_token(prompt)


def run_worker_process(python: str, kind: str, spec_path: Path, log, timeout: float) -> dict | None:
    out_path = spec_path.with_name(f"{kind}-result.json")
    command = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path),
               "--out", str(out_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(command, cwd=REPO, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        log(f"{kind} worker timed out after {timeout:.0f} s")
        return None
    if proc.returncode != 0:
        log(f"{kind} worker failed with exit code {proc.returncode}")
        return None
    return json.loads(out_path.read_text()) if out_path.is_file() else {}


# --- report ---------------------------------------------------------------------------------

ROWS = [
    # key path, label, unit, higher is better, format
    (("decode_greedy", "tok_s"), "Decode, greedy, {tokens} new tokens", "tok/s", True, "{:.1f}"),
    (("decode_sillytavern", "tok_s"), "Decode, SillyTavern samplers, {tokens} new tokens", "tok/s", True, "{:.1f}"),
    (("ttft_fresh_1024", "s"), "TTFT, fresh 1,024-token prompt", "s", False, "{:.3f}"),
    (("ttft_followup", "s"), "TTFT, chat follow-up (~1,500 history + ~20 new)", "s", False, "{:.3f}"),
    (("ttft_fresh_50", "s"), "TTFT, fresh 50-token prompt", "s", False, "{:.3f}"),
    (("followup_over_fresh_50",), "Follow-up TTFT / fresh-50 TTFT (target <= 1.5)", "x", False, "{:.2f}"),
    (("ttft_branch", "s"), "TTFT, chat branch (last reply trimmed, ~20 new)", "s", False, "{:.3f}"),
    (("branch_over_fresh_50",), "Branch TTFT / fresh-50 TTFT (target <= 1.5)", "x", False, "{:.2f}"),
    (("concurrency", "1", "agg_tok_s"), "Aggregate, 1 streaming client, {ctokens} tokens", "tok/s", True, "{:.1f}"),
    (("concurrency", "4", "agg_tok_s"), "Aggregate, 4 concurrent clients", "tok/s", True, "{:.1f}"),
    (("concurrency", "8", "agg_tok_s"), "Aggregate, 8 concurrent clients", "tok/s", True, "{:.1f}"),
    (("concurrency", "8", "over_one_stream"), "8 clients / 1 client (target >= 2.5)", "x", True, "{:.2f}"),
    (("overhead", "overhead_p50_ms"), "Per-request overhead, 1-token generation, p50 (*)", "ms", False, "{:.2f}"),
    (("overhead", "wall_p50_ms"), "1-token request wall time, p50 (*)", "ms", False, "{:.2f}"),
    (("peak_rss_mb",), "Peak resident memory of the process", "MB", False, "{:.0f}"),
]
ENGINES = [("ours", "kobold_api"), ("llama", "llama.cpp"), ("optimum", "optimum")]


def _get(result: dict | None, path: tuple) -> float | None:
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) and value == value else None


def table_rows(results: dict, meta: dict) -> list[dict]:
    rows = []
    for path, label, unit, higher, fmt in ROWS:
        row = {"metric": label.format(tokens=meta["new_tokens"], ctokens=meta["concurrency_tokens"]),
               "unit": unit, "better": "higher" if higher else "lower", "values": {}, "ratios": {}, "fmt": fmt,
               "path": list(path)}
        for key, _ in ENGINES:
            row["values"][key] = _get(results.get(key), path)
        ours = row["values"]["ours"]
        for key in ("llama", "optimum"):
            theirs = row["values"][key]
            row["ratios"][key] = ours / theirs if ours is not None and theirs else None
        rows.append(row)
    return rows


def _counts(results: dict, key: str) -> list:
    return list((results.get("ours") or {}).get(key, {}).get("prompt_tokens") or [])


def _per_rep(results: dict, level: str) -> str:
    ratios = ((results.get("ours") or {}).get("concurrency", {}).get(level, {}).get("over_one_stream_per_rep") or [])
    return ", ".join(f"{ratio:.2f}" for ratio in ratios) or "n/a"


def markdown_table(rows: list[dict], results: dict) -> str:
    def cell(value, fmt):
        return fmt.format(value) if value is not None else "n/a"

    def ratio(value, higher):
        if value is None:
            return "n/a"
        good = value >= 1 if higher else value <= 1
        return f"{value:.2f}x {'✓' if good else '✗'}"

    head = ["Metric", "Unit", "Better", "kobold_api", "llama.cpp", "optimum", "ours/llama.cpp", "ours/optimum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|"]
    for row in rows:
        higher = row["better"] == "higher"
        values = [cell(row["values"][k], row["fmt"]) for k, _ in ENGINES]
        ratios = [ratio(row["ratios"][k], higher) for k in ("llama", "optimum")]
        lines.append("| " + " | ".join([row["metric"], row["unit"], row["better"], *values, *ratios]) + " |")
    return "\n".join(lines)


def render_chart(report: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {tuple(r["path"]): r for r in report["rows"]}
    colors = {"ours": "#2a7ab9", "llama": "#e08a2c", "optimum": "#6a9f58"}
    names = dict(ENGINES)
    panels = [
        ("Decode speed (tok/s, higher is better)", [("decode_greedy", "tok_s"), ("decode_sillytavern", "tok_s")],
         ["greedy", "SillyTavern"]),
        ("Time to first token (s, lower is better)",
         [("ttft_fresh_1024", "s"), ("ttft_followup", "s"), ("ttft_fresh_50", "s")],
         ["fresh 1,024", "follow-up\n1,500+20", "fresh 50"]),
        ("Aggregate tok/s, concurrent streams (higher is better)",
         [("concurrency", "1", "agg_tok_s"), ("concurrency", "4", "agg_tok_s"), ("concurrency", "8", "agg_tok_s")],
         ["1 client", "4 clients", "8 clients"]),
        ("1-token request (ms, lower is better)", [("overhead", "wall_p50_ms"), ("overhead", "overhead_p50_ms")],
         ["wall p50", "overhead p50"]),
        ("Peak resident memory (MB, lower is better)", [("peak_rss_mb",)], ["peak RSS"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.ravel()
    for ax, (title, paths, labels) in zip(axes, panels):
        width = 0.8 / len(ENGINES)
        for index, (key, _) in enumerate(ENGINES):
            values = [rows[p]["values"][key] for p in paths]
            xs = [i + (index - 1) * width for i in range(len(paths))]
            bars = ax.bar(xs, [v or 0 for v in values], width, label=names[key], color=colors[key])
            for bar, value in zip(bars, values):
                text = "n/a" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.3g}")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(labels, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=9)
    # Last panel: advantage of ours per metric (>1 = ours better), on a log scale
    ax = axes[5]
    labels, adv = [], {"llama": [], "optimum": []}
    short = ["decode greedy", "decode ST", "TTFT 1024", "TTFT follow-up", "TTFT fresh 50", "follow-up/fresh50",
             "TTFT branch", "branch/fresh50", "agg 1", "agg 4", "agg 8", "agg 8 / 1", "overhead", "1-tok wall", "peak RSS"]
    for label, row in zip(short, report["rows"]):
        labels.append(label)
        for key in adv:
            r = row["ratios"][key]
            adv[key].append(None if not r else (r if row["better"] == "higher" else 1 / r))
    ys = list(range(len(labels)))
    for offset, key in ((-0.2, "llama"), (0.2, "optimum")):  # bars grow from 1 to the value
        ax.barh([y + offset for y in ys], [(v - 1) if v else 0 for v in adv[key]], 0.4, color=colors[key],
                label=f"vs {names[key]}", left=1)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Advantage of kobold_api (x, > 1 = ours better, log)", fontsize=10)
    ax.legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"kobold_api vs llama.cpp vs optimum — SmolLM2-135M-Instruct, {meta['cpu_count']} CPUs, "
                 f"{meta['date']}", fontsize=12)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def write_chart(report: dict, json_path: Path, png_path: Path, pythons: list[str | None], log) -> bool:
    try:
        render_chart(report, png_path)
        return True
    except ImportError:
        pass
    other = _python_with([p for p in pythons if p != sys.executable], "matplotlib")
    if other is None:
        log("matplotlib is not installed in any known python; no PNG written (pip install matplotlib)")
        return False
    proc = subprocess.run([other, str(Path(__file__).resolve()), "--render", str(json_path), str(png_path)])
    return proc.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (1 per decode/TTFT figure)")
    parser.add_argument("--skip-llama", action="store_true", help="do not run llama.cpp")
    parser.add_argument("--skip-optimum", action="store_true", help="do not run optimum")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per decode run (default 200)")
    parser.add_argument("--concurrency-tokens", type=int, default=100, help="new tokens per concurrent client")
    parser.add_argument("--server-python", help="python with kobold_api installed (default: found)")
    parser.add_argument("--llama-python", help="python with llama-cpp-python installed (default: found)")
    parser.add_argument("--optimum-python", help="python with optimum-onnx installed (default: found)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where latest.{md,json,png} go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--render", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.worker, Path(args.spec), Path(args.out))
        return 0
    if args.render:
        render_chart(json.loads(Path(args.render[0]).read_text()), Path(args.render[1]))
        return 0

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    venvs = _venv_candidates("venv", ".venv")
    args.server_python = args.server_python or _python_with([sys.executable, *venvs], "kobold_api.server")
    if args.server_python is None:
        print("no python with kobold_api found; pass --server-python", file=sys.stderr)
        return 2
    if not args.skip_llama:
        args.llama_python = args.llama_python or _python_with(
            [sys.executable, *_venv_candidates("bench-venv", ".bench-venv"), args.server_python], "llama_cpp")
        if args.llama_python is None:
            log("llama-cpp-python not found in any known python (see benchmarks/requirements.txt): skipping llama.cpp")
            args.skip_llama = True
    if not args.skip_optimum:
        args.optimum_python = args.optimum_python or _python_with([args.server_python, sys.executable, *venvs],
                                                                  "optimum.onnxruntime")
        if args.optimum_python is None:
            log("optimum-onnx not found in any known python: skipping optimum")
            args.skip_optimum = True
    log(f"server python {args.server_python}; llama python {args.llama_python}; optimum python "
        f"{args.optimum_python}")
    if not GGUF_PATH.is_file() and not (args.skip_llama and args.skip_optimum):
        log(f"{GGUF_PATH} is missing; it appears after the server's first start (it prepares the default model)")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    results: dict = {}
    notes: list[str] = []
    phase_load: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kobold-bench-") as work:
        spec_path = Path(work) / "spec.json"
        log("== kobold_api (HTTP) ==")
        phase_load["ours"] = [round(x, 2) for x in os.getloadavg()]
        results["ours"], spec = run_ours(args, spec_path, log)
        if not args.skip_llama:
            log("== llama.cpp (llama-cpp-python) ==")
            phase_load["llama"] = [round(x, 2) for x in os.getloadavg()]
            results["llama"] = run_worker_process(args.llama_python, "llama", spec_path, log, 1200)
            if results["llama"] is None:
                notes.append("llama.cpp worker failed: see the console output.")
        if not args.skip_optimum:
            log("== optimum (ORTModelForCausalLM) ==")
            export = run_worker_process(args.optimum_python, "optimum-export", spec_path, log, 1200)
            if export is None:
                notes.append("optimum export failed: see the console output.")
            else:
                phase_load["optimum"] = [round(x, 2) for x in os.getloadavg()]
                results["optimum"] = run_worker_process(args.optimum_python, "optimum", spec_path, log, 1500)
                if results["optimum"] is None:
                    notes.append("optimum worker failed: see the console output.")

    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "loadavg_at_phase_start": phase_load,
        "new_tokens": args.tokens, "concurrency_tokens": args.concurrency_tokens, "quick": args.quick,
        "threads": THREADS, "n_ctx": N_CTX, "seed": SEED, "samplers_sillytavern": ST,
        "versions": {k: (v or {}).get("version") for k, v in results.items()},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    rows = table_rows(results, meta)
    history_tokens = spec.get("history_tokens", [])
    report = {"meta": meta, "rows": rows, "results": results, "notes": notes}
    table = markdown_table(rows, results)
    footnotes = [
        "Ratios are ours / theirs; ✓ marks where kobold_api is better (ratio > 1 for higher-is-better rows, "
        "< 1 for lower-is-better rows).",
        "(*) kobold_api: HTTP wall time of `POST /api/v1/generate` (max_length 1) minus `last_process + last_eval` "
        "from `/api/extra/perf`. llama.cpp and optimum have no HTTP server here: their row is the in-process "
        "library call (`create_completion` / `generate`) minus the engine's own compute time "
        "(llama.cpp: `llama_perf_context` t_p_eval + t_eval; optimum: time inside `InferenceSession.run`).",
        "Decode: kobold_api streamed over SSE, (n-1)/(t_last - t_first) on the client; llama.cpp: the same over "
        "`create_completion(stream=True)` chunks; optimum: the same over `generate()` streamer callbacks. EOS banned "
        "(ban_eos_token / logit_bias -inf / min_new_tokens).",
        "Samplers: each engine's own implementation. SillyTavern's set maps to kobold_api's fields as sent by "
        "SillyTavern; llama.cpp: temperature/top_p/min_p/top_k=0/repeat_penalty with `last_n_tokens_size=1024` "
        "as the penalty range; optimum: transformers' temperature/top_p/min_p/top_k=0/repetition_penalty, which "
        "has no range (it penalizes the whole context). Seed 1234 everywhere.",
        "Prompt sizes (kobold_api's tokenizer, which like llama.cpp adds no BOS to this GGUF's prompts): "
        f"fresh {_counts(results, 'ttft_fresh_1024')}, "
        f"fresh-50 {_counts(results, 'ttft_fresh_50')}, follow-up {_counts(results, 'ttft_followup')} "
        f"(history {history_tokens} + {[f - h for f, h in zip(_counts(results, 'ttft_followup'), history_tokens)]} "
        "new: a ~20-token message plus its ChatML tags).",
        "llama.cpp and optimum serve one request at a time, as their servers do: their clients queue for one "
        "engine thread (a single-worker executor), so the 4- and 8-client figures are their 1-client rate. "
        f"Concurrency figures are the median of {len(spec['concurrency_prompts']['1'])} repetitions (the levels "
        "take turns), each with prompts never sent before, so every client pays a cold prefill. "
        f"kobold_api's 8-client / 1-client ratio within each repetition: {_per_rep(results, '8')}.",
        "TTFT: time from sending the request to its first streamed event (max_length 1). llama-cpp-python reuses "
        "the KV cache of its previous prompt's common prefix (as KoboldCpp does); optimum has no prefix reuse.",
        f"Shared 2-core machine: 1-minute load average {load_start[0]:.2f} at start, "
        + ", ".join(f"{dict(ENGINES)[k]} phase {v[0]:.2f}" for k, v in phase_load.items())
        + f", {meta['loadavg_end'][0]:.2f} at end (our own processes included); other work on the machine makes "
        "absolute figures noisy (llama.cpp's spinning OpenMP threads suffer most when a core is taken); figures "
        "are medians, every run is in latest.json.",
    ]
    md = (f"# kobold_api vs llama.cpp vs optimum ({meta['date']})\n\n"
          f"SmolLM2-135M-Instruct (kobold_api: its importer's ONNX graph, quant "
          f"{os.environ.get('KOBOLD_API_QUANT', 'auto (mixed for this model)')}; llama.cpp: GGUF Q4_1; optimum: fp32 "
          f"export of the de-quantized GGUF), {os.cpu_count()} CPUs, {THREADS} threads each. "
          f"Versions: {json.dumps(meta['versions'])}.\n\n{table}\n\n"
          + "\n".join(f"- {note}" for note in footnotes + notes) + "\n")
    json_path, md_path, png_path = out_dir / "latest.json", out_dir / "latest.md", out_dir / "latest.png"
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(md)
    chart = write_chart(report, json_path, png_path, [args.llama_python, *_venv_candidates("bench-venv", ".bench-venv"),
                                                      args.server_python, args.optimum_python], log)
    print()
    print(md)
    log(f"wrote {md_path}, {json_path}" + (f", {png_path}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
