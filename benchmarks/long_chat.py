#!/usr/bin/env python3
"""Long chats: time to first token of a turn once a SillyTavern-style chat has filled its window.

The client keeps a character card (~350 tokens) as the system turn and drops the oldest
messages so that the prompt fits ``max_context_length`` 2,048 with an 80-token reply, as
SillyTavern does: once the window is full, every turn's prompt loses its oldest messages right
after the card. Each turn sends a pre-written user message (~45 tokens) and streams the
engine's own reply (80 tokens, SillyTavern's samplers, EOS banned); the reply goes into the
history. Compared against the TTFT of fresh 50-token prompts (nothing to reuse).

Engines, one after the other, 2 CPU threads each: our server over HTTP with context shifting
(the default) and without (``KOBOLD_API_CONTEXT_SHIFT=false``), and llama.cpp through
llama-cpp-python (its own prefix reuse; it has no context shift, KoboldCpp's ContextShift is
not in it). Run with the bench venv (``benchmarks/requirements.txt``)::

    .bench/bin/python benchmarks/long_chat.py [--turns 24] [--skip-llama]

Prints a table and writes ``benchmarks/results/long_chat.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the shared engines, server runner and word list)

RESULTS = compare.RESULTS_DIR / "long_chat.json"
CONTEXT, REPLY = 2048, 80
SEED = 11


def build_spec(turns: int) -> dict:
    rng = random.Random(SEED)
    card = ("You are Mira Vance, a lighthouse keeper on a northern island. " + compare._text(rng, 260))
    users = [compare._text(rng, 32) for _ in range(turns)]
    fresh = [f"{i}. {compare._text(rng, 34)}" for i in range(6)]
    return {"card": card, "users": users, "fresh_50": fresh, "context": CONTEXT, "reply": REPLY,
            "gguf": str(compare.GGUF_PATH), "threads": compare.THREADS, "seed": SEED,
            "n_ctx": compare.N_CTX, "eos_ids": compare.EOS_IDS}


def render(card: str, messages: list[tuple[str, str]]) -> str:
    text = f"<|im_start|>system\n{card}<|im_end|>\n"
    for role, content in messages:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def run_chat(stream, count_tokens, spec: dict, log) -> dict:
    """The chat: ``stream(prompt, max_tokens) -> (StreamRecord, text)``, ``count_tokens(text)``."""
    messages: list[tuple[str, str]] = []
    turns = []
    for number, user in enumerate(spec["users"]):
        messages.append(("user", user))
        first_kept = 0
        while count_tokens(render(spec["card"], messages[first_kept:])) > spec["context"] - spec["reply"]:
            first_kept += 1
        prompt = render(spec["card"], messages[first_kept:])
        rec, reply = stream(prompt, spec["reply"])
        messages.append(("assistant", reply.strip()))
        turn = {"turn": number, "ttft_s": rec.ttft, "dropped_messages": first_kept,
                "prompt_tokens": count_tokens(prompt)}
        turns.append(turn)
        log(f"turn {number}: {turn['prompt_tokens']} prompt tokens, {first_kept} messages dropped, "
            f"TTFT {rec.ttft:.3f} s")
    full = [t["ttft_s"] for t in turns if t["dropped_messages"] > 0]
    fresh = [stream(prompt, 1)[0].ttft for prompt in spec["fresh_50"]]
    out = {"turns": turns, "full_window_ttft_s": statistics.median(full) if full else None,
           "full_window_turns": len(full), "fresh_50_ttft_s": statistics.median(fresh[1:]),
           "fresh_50_runs_s": fresh}
    if full:
        out["ratio"] = out["full_window_ttft_s"] / out["fresh_50_ttft_s"]
    return out


# ---------------------------------------------------------------------------------- ours

def ours(spec: dict, python: str, context_shift: bool, log) -> dict:
    env_before = os.environ.get("KOBOLD_API_CONTEXT_SHIFT")
    os.environ["KOBOLD_API_CONTEXT_SHIFT"] = "true" if context_shift else "false"
    server = compare.Server(python)
    try:
        server.wait_ready()
        client = compare.KoboldClient(server.port)

        def stream(prompt: str, max_tokens: int):
            body = {**client.body(prompt, max_tokens, "sillytavern"), "max_context_length": spec["context"]}
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
            rec, text = compare.StreamRecord(time.perf_counter()), ""
            conn.request("POST", "/api/extra/generate/stream", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            for line in response:
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    rec.event(bool(event.get("token")))
                    text += event.get("token", "")
            conn.close()
            return rec, text

        def count(text: str) -> int:
            return int(client.request("POST", "/api/extra/tokencount", {"prompt": text})["value"])

        result = run_chat(stream, count, spec, log)
        result["perf"] = client.perf()
        return result
    finally:
        server.stop()
        if env_before is None:
            os.environ.pop("KOBOLD_API_CONTEXT_SHIFT", None)
        else:
            os.environ["KOBOLD_API_CONTEXT_SHIFT"] = env_before


# ---------------------------------------------------------------------------------- llama.cpp

def llama_worker(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())

    def log(message: str) -> None:
        print(f"  [llama.cpp] {message}", file=sys.stderr, flush=True)

    engine = compare.LlamaEngine(spec)

    def stream(prompt: str, max_tokens: int):
        rec, parts = compare.StreamRecord(time.perf_counter()), []

        def run() -> None:
            for chunk in engine.llm.create_completion(prompt, max_tokens=max_tokens, stream=True,
                                                      logit_bias=engine.bias, **engine._kwargs("sillytavern")):
                text = chunk["choices"][0]["text"]
                rec.event(bool(text))
                parts.append(text)

        engine._executor.submit(run).result()
        return rec, "".join(parts)

    def count(text: str) -> int:
        return len(engine.llm.tokenize(text.encode(), add_bos=False, special=True))

    result = run_chat(stream, count, spec, log)
    result["version"] = engine.version
    engine._executor.shutdown()
    out_path.write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=24, help="user turns (the window fills after about 12)")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        llama_worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    venvs = compare._venv_candidates(".venv", "venv")
    server_python = compare._python_with([sys.executable, *venvs], "kobold_api.server")
    if server_python is None:
        log("no python with kobold_api installed")
        return 1
    spec = build_spec(args.turns)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "spec": {k: spec[k] for k in ("context", "reply")}}
    for shift in (True, False):
        name = "ours" if shift else "ours, context_shift off"
        log(f"== {name}")
        results[name] = ours(spec, server_python, shift, lambda m, n=name: log(f"  [{n}] {m}"))
    if not args.skip_llama:
        llama_python = compare._python_with([sys.executable, *compare._venv_candidates("bench-venv", ".bench")],
                                            "llama_cpp")
        if llama_python is None:
            log("llama-cpp-python not found; skipping llama.cpp")
        else:
            log("== llama.cpp")
            spec_path, out_path = Path("/tmp/long_chat_spec.json"), Path("/tmp/long_chat_llama.json")
            spec_path.write_text(json.dumps(spec))
            env = dict(os.environ, OMP_NUM_THREADS=str(compare.THREADS))
            subprocess.run([llama_python, __file__, "--worker", str(spec_path), str(out_path)], check=True, env=env)
            results["llama.cpp"] = json.loads(out_path.read_text())
    RESULTS.write_text(json.dumps(results, indent=2))
    print("\n| engine | TTFT, full-window turn (median) | TTFT, fresh 50-token prompt | ratio | full-window turns |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        if not isinstance(result, dict) or "fresh_50_ttft_s" not in result:
            continue
        full = result["full_window_ttft_s"]
        print(f"| {name} | {full:.3f} s | {result['fresh_50_ttft_s']:.3f} s | {result.get('ratio', float('nan')):.1f}x "
              f"| {result['full_window_turns']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
