"""A chat branch through HTTP, as SillyTavern sends one (#30): a ~1,380-token history once, then
three follow-ups that replace the last reply with other text and add a new message (~50 new
tokens after ~1,320 reused), each against a fresh ~50-token prompt: the time to the first
SSE event of /api/extra/generate/stream, and what the server says it reused and processed.

It starts our server itself (the default model, or ``--model FILE`` with ``--cache-dir`` where
``prepare_scaling.py`` keeps its prepared models):

    .venv/bin/python benchmarks/branch_followups.py [--model data/scaling/random-3B.Q4_K_M.gguf
        --cache-dir data/scaling/cache] [--out benchmarks/results/branch_followups.json]

A branch's new tokens attend to every cached position while a fresh prompt's attend only to
each other, so the ratio measures that attention (and any copying of the cache, which there
should be none of).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

WORDS = "the sea lighthouse keeper storm night ship light rock wave wind old man boat harbor".split()


def first_event(port: int, prompt: str, tokens: int = 1) -> tuple[float, dict]:
    """Seconds to the first SSE event for ``prompt``, and /api/extra/perf after the reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_length": tokens, "temperature": 0, "top_k": 1,
                       "max_context_length": 4096})
    started = time.perf_counter()
    conn.request("POST", "/api/extra/generate/stream", body, {"Content-Type": "application/json"})
    first = None
    for line in conn.getresponse():
        if line.startswith(b"data:") and first is None:
            first = time.perf_counter() - started
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/extra/perf")
    perf = json.loads(conn.getresponse().read())
    conn.close()
    return first, perf


def run(port: int, rounds: int) -> dict:
    rng = random.Random(1)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    history = "".join(f"User: {text(40)}\nBot: {text(60)}\n" for _ in range(13))
    base = history[:history.rfind("Bot:")]
    first_event(port, f"User: {text(45)}\nBot:")  # warm-up
    seconds, perf = first_event(port, history, 4)
    result = {"history_s": seconds, "history_tokens": perf.get("last_input_count"), "rounds": []}
    for _ in range(rounds):
        branch, branch_perf = first_event(port, base + f"Bot: {text(25)}\nUser: {text(20)}\nBot:")
        fresh, fresh_perf = first_event(port, f"User: {text(45)}\nBot:")  # ~50 tokens, as the branch's new ones
        result["rounds"].append({"branch_s": branch, "fresh_s": fresh, "ratio": branch / fresh,
                                 "branch_tokens": branch_perf.get("last_input_count"),
                                 "branch_reused": branch_perf.get("last_reused_count"),
                                 "fresh_tokens": fresh_perf.get("last_input_count")})
        print(json.dumps(result["rounds"][-1]), flush=True)
    result["median_ratio"] = statistics.median(r["ratio"] for r in result["rounds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a GGUF (default: the default model)")
    parser.add_argument("--cache-dir", help="where its prepared model is (KOBOLD_API_CACHE_DIR)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    from compare import Server

    extra = ("--model", args.model, "--ws-port", "0") if args.model else ("--ws-port", "0")
    env = {"KOBOLD_API_CPU_THREADS": "2", **({"KOBOLD_API_CACHE_DIR": args.cache_dir} if args.cache_dir else {})}
    server = Server(sys.executable, extra, env)
    try:
        server.wait_ready(1800)
        result = {"model": args.model or "default", **run(server.port, args.rounds)}
    finally:
        server.stop()
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
