#!/usr/bin/env python3
"""Through HAProxy: aggregate tok/s with 1 and 2 replicas, and a follow-up turn's time to first
token with and without cache affinity.

Starts ``deploy/local-cluster.sh`` on the default model (SmolLM2-135M-Instruct, int4, CPU), then:

* **aggregate**: ``--clients`` concurrent Kobold clients, each with its own long prompt, send
  ``--requests`` generations of 64 tokens (EOS banned) through the proxy; the figure is all
  completion tokens over the wall time. On a 2-core machine two replicas share the same two cores
  (by default each replica's ONNX Runtime gets cores / replicas threads; ``--oversubscribe`` gives each
  all of them), so the figure shows the proxy's and the split's overhead, not scaling; with one
  machine per replica it would scale.
* **affinity**: chats of ``--turns`` turns with a long card; the next turn goes once to the replica
  that served the chat (through the proxy, ``X-Conversation-Id``: its prefix cache holds the chat)
  and once, for a twin conversation with the same history, straight to the other replica (cold).
  The figure is the time from the request to the first streamed token, the median over ``--chats``.

    .venv/bin/python benchmarks/cluster.py [--clients 4] [--requests 24] [--chats 6] [--turns 4]

Prints a table and writes ``benchmarks/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local-cluster.sh"
RESULTS = ROOT / "benchmarks" / "results" / "cluster.json"
STORY = ("The lighthouse keeper kept a ledger of every ship that passed the point, the hour, the weather and "
         "the colour of its sails, and on winter nights she read the old entries aloud to the cat. ")


def free_base_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base < 60000:
            return base


def cluster(replicas: int, port: int, state: Path, cpu_threads: int) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "KOBOLD_API_LOG_LEVEL": "WARNING",
           "KOBOLD_API_CPU_THREADS": str(cpu_threads)}
    started = subprocess.run([str(SCRIPT), "up", "--replicas", str(replicas), "--port", str(port), "--dir",
                              str(state), "--data-dir", str(ROOT / "data")], env=env, capture_output=True,
                             text=True, timeout=900)
    if started.returncode != 0:
        raise SystemExit(f"local-cluster.sh up failed:\n{started.stderr}")
    return started.stdout.strip()


def down(state: Path) -> None:
    subprocess.run([str(SCRIPT), "down", "--dir", str(state)], capture_output=True, timeout=120)


def aggregate(proxy: str, clients: int, total: int) -> dict[str, float]:
    def one(index: int) -> int:
        prompt = f"Client {index % clients}. " + STORY * 3 + f"\nEntry {index}:"
        answer = requests.post(f"{proxy}/api/v1/generate", json={"prompt": prompt, "max_length": 64,
                                                                  "use_default_badwordsids": True,
                                                                  "temperature": 0.7}, timeout=600)
        answer.raise_for_status()
        return int(answer.json()["results"][0]["completion_tokens"])

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: one per client
        started = time.perf_counter()
        tokens = sum(pool.map(one, range(total)))
        seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds, 1)}


def first_token_seconds(url: str, conversation_id: str, text: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    with requests.post(f"{url}/api/v1/chat/stream", json={"conversation_id": conversation_id, "user_input": text,
                                                          "max_new_tokens": 16, "temperature": 0.7},
                       headers=headers, stream=True, timeout=600) as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if line.startswith(b"data:") and json.loads(line[5:]).get("token"):
                elapsed = time.perf_counter() - started
                for _ in stream.iter_lines():
                    pass
                return elapsed
    raise RuntimeError("the stream sent no token")


def affinity(proxy: str, replicas: dict[str, str], chats: int, turns: int) -> dict[str, float]:
    warm, cold = [], []
    for chat in range(chats):
        created = requests.post(f"{proxy}/api/v1/conversations", json={"character": "Mira Vance"}, timeout=60)
        conversation_id = created.json()["result"]["id"]
        header = {"X-Conversation-Id": conversation_id}
        owner = ""
        for turn in range(turns):
            answer = requests.post(f"{proxy}/api/v1/chat", json={
                "conversation_id": conversation_id, "user_input": f"Chat {chat}, turn {turn}: " + STORY,
                "max_new_tokens": 48}, headers=header, timeout=600)
            answer.raise_for_status()
            owner = answer.headers["X-Kobold-Replica"]
        other = next(name for name in replicas if name != owner)
        # The same history for the other replica: a twin conversation built on the owner (so the
        # other replica has never seen it) from this one's messages.
        twin = requests.post(f"{replicas[owner]}/api/v1/conversations", json={"character": "Mira Vance"},
                             timeout=60)
        twin_id = twin.json()["result"]["id"]
        messages = requests.get(f"{proxy}/api/v1/conversations/{conversation_id}", timeout=60).json()
        _copy_history(replicas[owner], twin_id, messages["result"]["messages"])
        follow_up = f"Chat {chat}: and then?"
        warm.append(first_token_seconds(proxy, conversation_id, follow_up, header))
        cold.append(first_token_seconds(replicas[other], twin_id, follow_up, {}))
    return {"warm_ttft_s": round(statistics.median(warm), 3), "cold_ttft_s": round(statistics.median(cold), 3),
            "warm_all": [round(x, 3) for x in warm], "cold_all": [round(x, 3) for x in cold]}


def _copy_history(url: str, conversation_id: str, messages: list[dict]) -> None:
    """Rebuild ``messages`` (after the shared greeting) in another conversation, through ``url``:
    each user message as a 1-token turn whose reply is then edited to the original's."""
    rows = messages[1:]
    for user, reply in zip(rows[0::2], rows[1::2]):
        answer = requests.post(f"{url}/api/v1/chat", json={
            "conversation_id": conversation_id, "user_input": user["text"], "max_new_tokens": 1}, timeout=600)
        answer.raise_for_status()
        requests.patch(f"{url}/api/v1/conversations/{conversation_id}/messages/-1",
                       json={"text": reply["text"]}, timeout=60).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--chats", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--oversubscribe", action="store_true",
                        help="every replica uses all cores (default: the cores are split between the replicas)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results: dict[str, dict] = {}
    for replicas in (1, 2):
        state = Path(tempfile.mkdtemp(prefix="kc-bench-"))
        os.chmod(state, 0o755)
        try:
            threads = cores if args.oversubscribe else max(1, cores // replicas)
            proxy = cluster(replicas, free_base_port(), state, threads)
            env = dict(line.split("=", 1) for line in (state / "cluster.env").read_text().splitlines())
            urls = {f"r{i + 1}": u for i, u in enumerate(env["REPLICA_URLS"].strip('"').split())}
            results[f"{replicas}_replicas"] = {"aggregate": aggregate(proxy, args.clients, args.requests),
                                               "cpu_threads_per_replica": threads}
            if replicas == 2:
                results["2_replicas"]["affinity"] = affinity(proxy, urls, args.chats, args.turns)
        finally:
            down(state)
    results["setup"] = {"model": "SmolLM2-135M-Instruct int4 (CPU)", "cpus": cores,
                        "clients": args.clients, "requests": args.requests, "max_length": 64,
                        "chats": args.chats, "turns": args.turns}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    aff = results["2_replicas"]["affinity"]
    print(f"| replicas | ONNX Runtime threads each | aggregate tok/s ({args.clients} clients, "
          f"{args.requests} x 64 tokens) |")
    print("|---|---|---|")
    for name, figures in (("1", results["1_replicas"]), ("2", results["2_replicas"])):
        print(f"| {name} | {figures['cpu_threads_per_replica']} | {figures['aggregate']['tok_per_s']} |")
    print()
    print("| follow-up turn | median time to first token |")
    print("|---|---|")
    print(f"| same replica (affinity, warm KV) | {aff['warm_ttft_s']} s |")
    print(f"| other replica (no affinity, cold) | {aff['cold_ttft_s']} s |")


if __name__ == "__main__":
    main()
