"""How preparing a GGUF scales with model size: prepare time, peak memory, model size, and
decode speed against llama.cpp on the same file.

Writes random-weight llama-architecture GGUFs at ~135M (SmolLM2's shape), ~0.5B and ~1B
parameters (engine_notes §6's recipe, with SmolLM2's tokenizer copied from the default
model's GGUF), in Q4_1 like the default model, then for each one:

- runs ``kobold-api prepare FILE`` in a fresh process under ``/usr/bin/time -v`` (wall time
  and peak RSS of the whole preparation);
- decodes 128 greedy tokens with our engine (in process, no HTTP) and with llama.cpp
  (llama-cpp-python in the bench venv, in process), 2 threads each.

    .venv/bin/python benchmarks/prepare_scaling.py [--llama-python .bench/bin/python] [--sizes 135M,0.5B,1B]
    # 3B/8B shapes in K-quants made by llama.cpp from a random F16 file written a tensor at a time:
    .venv/bin/python benchmarks/prepare_scaling.py --sizes 3B,8B --types Q4_K_M,Q8_0 --out benchmarks/results/prepare_3b_8b.json
    # and through each engine's HTTP server (ours; llama.cpp's llama_cpp.server) at a 4k and an 8k context:
    .venv/bin/python benchmarks/prepare_scaling.py --sizes 3B --types Q4_K_M --serve 4096,8192

With ``--serve CONTEXTS`` each engine's server is started once per context (room for the context
plus a 256-token reply): decode through HTTP (greedy, streamed, the better of two runs), the time
of one prompt of that many tokens (prompt processing), and the server's resident memory after it
(model + keys at that context; llama.cpp allocates its keys for the whole context when it starts,
ours as they are written). The engines run one after the other, never together.

With ``--precisions int4,int8,fp32`` it measures the default model (the real SmolLM2 GGUF)
instead, once per precision, adding perplexity on the team's ``chat_and_cards.md`` (as
``benchmarks/perplexity.py``) and llama.cpp's perplexity on the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, layers, heads, kv heads, ffn (vocab 49,152, tied embeddings)
    "135M": (576, 30, 9, 3, 1536),
    "0.5B": (1536, 16, 12, 4, 4096),
    "1B": (2048, 16, 32, 8, 8192),
    "3B": (3072, 28, 24, 8, 8192),  # Llama 3.2 3B's dimensions
    "8B": (4096, 32, 32, 8, 14336),  # Llama 3.1 8B's (with SmolLM2's smaller vocabulary)
}
VOCAB = 49152
#: llama.cpp's ``llama_ftype`` numbers for the types made here.
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}

MAKE_TYPE = r"""
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""

PROMPT = "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"

LLAMA_DECODE = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
prompt = llm.tokenize(sys.argv[3].encode(), special=True)
rates = []
for _ in range(2):
    llm.reset()
    llm.eval(prompt)
    started = time.perf_counter()
    for _ in range(int(sys.argv[4])):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    rates.append(int(sys.argv[4]) / (time.perf_counter() - started))
print(json.dumps({"tok_s": max(rates)}))
"""


def _llama_writer(path: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                  tokenizer_from: Path, file_type: int):
    """A GGUF writer with a llama header of these dimensions and ``tokenizer_from``'s tokenizer."""
    import gguf
    from gguf import GGUFReader

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(file_type)
    for key, field in GGUFReader(str(tokenizer_from)).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    return writer


def write_random_gguf(path: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                      tokenizer_from: Path) -> None:
    """Random Q4_1 weights, norms of one, and the tokenizer fields of ``tokenizer_from``."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    writer = _llama_writer(path, hidden, layers, heads, kv_heads, ffn, tokenizer_from, gguf.LlamaFileType.MOSTLY_Q4_1)

    def matrix(name: str, rows: int, cols: int, kind: GGMLQuantizationType) -> None:
        values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        writer.add_tensor(name, quants.quantize(values, kind), raw_dtype=kind)

    matrix("token_embd.weight", VOCAB, hidden, GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", heads * head_dim, hidden), ("attn_k", kv_heads * head_dim, hidden),
                                 ("attn_v", kv_heads * head_dim, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            matrix(f"blk.{i}.{name}.weight", rows, cols, GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_random_f16_gguf(path: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                          tokenizer_from: Path) -> None:
    """Random F16 weights written a tensor at a time (an 8B file is ~15 GB: never all in memory),
    for llama.cpp's quantizer to turn into each type."""
    import gguf

    rng = np.random.default_rng(0)
    writer = _llama_writer(path, hidden, layers, heads, kv_heads, ffn, tokenizer_from, gguf.LlamaFileType.MOSTLY_F16)
    head_dim = hidden // heads
    tensors = [("token_embd.weight", (VOCAB, hidden)), ("output_norm.weight", (hidden,))]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.ffn_norm.weight", (hidden,))]
        tensors += [(f"blk.{i}.{name}.weight", shape) for name, shape in (
            ("attn_q", (heads * head_dim, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)))]
    for name, shape in tensors:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in tensors:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))
        else:
            writer.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    writer.close()


def llama_quantize(python: str, source: Path, out: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama-cpp-python in the bench venv) makes ``kind`` from ``source``."""
    subprocess.run([python, "-c", MAKE_TYPE, str(source), str(out), str(FTYPES[kind])], check=True,
                   capture_output=True)


def timed_prepare(gguf_path: Path, cache: Path, quant: str) -> dict:
    """``kobold-api prepare`` in a fresh process: wall seconds, peak RSS, output folder."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "kobold_api", "prepare", str(gguf_path),
               "--provider", "cpu", "--quant", quant]
    env = {**os.environ, "KOBOLD_API_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    model_dir = Path(result.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    return {"prepare_s": wall, "peak_rss_mb": peak_kb / 1024, "model_mb": size / 1e6, "model_dir": str(model_dir)}


def our_decode(model_dir: str, tokens: int, threads: int) -> float:
    from kobold_api.engine.generation import GenerationRequest, TextGenerator
    from kobold_api.engine.onnx_model import OnnxCausalLM
    from kobold_api.engine.sampling import SamplingParams
    from kobold_api.engine.tokenizer import Tokenizer

    generator = TextGenerator(OnnxCausalLM(Path(model_dir), "cpu", threads), Tokenizer(Path(model_dir)))
    rates = []
    for _ in range(2):
        result = generator.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=tokens, ban_eos=True,
                                                      sampling=SamplingParams(temperature=0)))
        rates.append(result.completion_tokens / result.decode_seconds)
    return max(rates)


def llama_cpp_decode(python: str, gguf_path: Path, tokens: int, threads: int) -> float | None:
    if not Path(python).is_file():
        return None
    result = subprocess.run([python, "-c", LLAMA_DECODE, str(gguf_path), str(threads), PROMPT, str(tokens)],
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["tok_s"] if result.returncode == 0 else None


LLAMA_READY = "/v1/models"


def _post(port: int, path: str, body: dict, stream: bool = False) -> tuple[float, list[float], dict]:
    """POST ``body``; (wall seconds, the arrival time of each streamed event with text, the last
    JSON object read)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"POST {path}: HTTP {response.status}: {response.read()[:300]!r}")
    arrivals, last = [], {}
    if not stream:
        last = json.loads(response.read())
    else:
        for line in response:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            last = json.loads(line[5:])
            text = last.get("token") if "token" in last else last.get("choices", [{}])[0].get("text")
            if text:
                arrivals.append(time.perf_counter())
    conn.close()
    return time.perf_counter() - started, arrivals, last


class _Api:
    """One engine's HTTP routes: ours (Kobold) or llama.cpp's server (OpenAI completions)."""

    def __init__(self, engine: str, port: int, context: int) -> None:
        self.engine, self.port, self.context = engine, port, context

    def generate(self, prompt: str, tokens: int, stream: bool) -> tuple[float, list[float], dict]:
        if self.engine == "ours":
            body = {"prompt": prompt, "max_length": tokens, "max_context_length": self.context, "ban_eos_token": True,
                    "temperature": 0, "top_k": 0, "top_p": 1, "min_p": 0, "rep_pen": 1}
            return _post(self.port, "/api/extra/generate/stream" if stream else "/api/v1/generate", body, stream)
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": stream,
                "logit_bias": {"0": -100, "1": -100, "2": -100}}  # SmolLM2's end tokens: every reply runs to length
        return _post(self.port, "/v1/completions", body, stream)


def serve_measure(engine: str, gguf_path: Path, cache: Path, quant: str, context: int, long_prompt: str,
                  args: argparse.Namespace) -> dict:
    """One engine's server on ``gguf_path`` with a context of ``context`` (+256 for the reply):
    decode through HTTP (``args.tokens`` greedy tokens streamed, twice), then one ``context``-token
    prompt (its prompt processing), and the server's memory then: model + keys at that context."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare import Server, ServerProcess, process_mb

    room = context + 256
    if engine == "ours":
        server = Server(sys.executable, ("--model", str(gguf_path), "--quant", quant, "--ws-port", "0"),
                        {"KOBOLD_API_CACHE_DIR": str(cache), "KOBOLD_API_CONTEXT_SIZE": str(room),
                         "KOBOLD_API_CPU_THREADS": str(args.threads)})
    else:
        server = ServerProcess(lambda port: [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf_path),
                                             "--n_ctx", str(room), "--n_threads", str(args.threads),
                                             "--n_threads_batch", str(args.threads), "--host", "127.0.0.1",
                                             "--port", str(port)], LLAMA_READY)
    try:
        server.wait_ready(1800)
        api = _Api(engine, server.port, room)
        api.generate(PROMPT, 8, stream=False)  # warm-up
        rates = []
        for _ in range(2):
            _, arrivals, _ = api.generate(PROMPT, args.tokens, stream=True)
            rates.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        idle_mb = process_mb(server.proc.pid, "VmRSS")
        wall, _, _ = api.generate(long_prompt, 1, stream=False)
        return {"engine": engine, "context": context, "http_tok_s": max(rates), "prompt_s": wall,
                "prompt_tok_s": context / wall, "rss_idle_mb": idle_mb,
                "rss_mb": process_mb(server.proc.pid, "VmRSS"), "peak_rss_mb": process_mb(server.proc.pid)}
    finally:
        server.stop()


def long_prompt_text(model_dir: str, tokens: int) -> str:
    """Text of ``tokens`` tokens (by the prepared model's tokenizer) of varied words."""
    from kobold_api.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(model_dir))
    rng = np.random.default_rng(7)
    words = (REPO.parent / "shared" / "reference" / "chat_and_cards.md").read_text(encoding="utf-8").split()
    ids: list[int] = []
    while len(ids) < tokens:
        start = int(rng.integers(0, len(words) - 400))
        ids += tokenizer.encode(" ".join(words[start:start + 400]) + "\n")
    return tokenizer.decode(ids[:tokens])


def precision_table(args: argparse.Namespace, default_gguf: Path) -> None:
    """The default model at each precision, next to llama.cpp on the same GGUF."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from perplexity import mean_nll, score_onnx

    text = (REPO.parent / "shared" / "reference" / "chat_and_cards.md").read_text(encoding="utf-8")[:6000]
    rows = []
    for quant in args.precisions.split(","):
        cache = Path(args.work) / "precision-cache"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"quant": quant, **timed_prepare(default_gguf, cache, quant)}
        ids, logits = score_onnx(Path(row["model_dir"]), text, 700)
        row["perplexity"] = float(np.exp(mean_nll(logits, ids)))
        row["tok_s"] = our_decode(row["model_dir"], args.tokens, args.threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    llama = {"quant": "llama.cpp (the GGUF)", "model_mb": default_gguf.stat().st_size / 1e6,
             "tok_s": llama_cpp_decode(args.llama_python, default_gguf, args.tokens, args.threads)}
    if Path(args.llama_python).is_file():
        result = subprocess.run([args.llama_python, str(REPO / "benchmarks" / "perplexity.py"),
                                 str(REPO.parent / "shared" / "reference" / "chat_and_cards.md"),
                                 "--gguf", str(default_gguf)], capture_output=True, text=True, cwd=REPO)
        found = re.search(r"perplexity ([0-9.]+)", result.stdout)
        llama["perplexity"] = float(found.group(1)) if found else None
    rows.append(llama)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| weights | perplexity | decode tok/s | prepare s | peak RSS MB | size MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [f"{row[key]:.2f}" if key == "perplexity" and row.get(key) else
                 f"{row[key]:.1f}" if row.get(key) is not None else "-"
                 for key in ("perplexity", "tok_s", "prepare_s", "peak_rss_mb", "model_mb")]
        print(f"| {row['quant']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="135M,0.5B,1B")
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--types", default="Q4_1", help="GGUF types: Q4_1 written directly, the others "
                        "made by llama.cpp's quantizer from a random F16 file")
    parser.add_argument("--work", default=str(REPO / "data" / "scaling"))
    parser.add_argument("--llama-python", default=str(REPO / ".bench" / "bin" / "python"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-cache", action="store_true", help="reuse models prepared by an earlier run "
                        "(prepare time and memory are then not measured)")
    parser.add_argument("--serve", help="contexts (e.g. 4096,8192): also start each engine's HTTP server at "
                        "each and measure decode through HTTP, a prompt of that many tokens and the memory")
    parser.add_argument("--precisions", help="measure the default model at these precisions instead")
    parser.add_argument("--out", help="JSON results (default: benchmarks/results/prepare_scaling.json or "
                                      "precisions.json)")
    args = parser.parse_args()
    from kobold_api.engine.prepare import _fetch_default_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    default_gguf = _fetch_default_gguf(REPO / "data" / "models", print)
    results = REPO / "benchmarks" / "results"
    if args.precisions:
        args.out = args.out or str(results / "precisions.json")
        precision_table(args, default_gguf)
        return
    args.out = args.out or str(results / "prepare_scaling.json")
    rows = []
    for size, kind in [(size, kind) for size in args.sizes.split(",") for kind in args.types.split(",")]:
        gguf_path = work / f"random-{size}.{kind}.gguf"
        if not gguf_path.is_file() and kind == "Q4_1":
            print(f"writing {gguf_path.name} ...", flush=True)
            write_random_gguf(gguf_path, *SHAPES[size], tokenizer_from=default_gguf)
        elif not gguf_path.is_file():
            f16 = work / f"random-{size}.F16.gguf"
            if not f16.is_file():
                print(f"writing {f16.name} ...", flush=True)
                write_random_f16_gguf(f16, *SHAPES[size], tokenizer_from=default_gguf)
            print(f"quantizing {gguf_path.name} with llama.cpp ...", flush=True)
            llama_quantize(args.llama_python, f16, gguf_path, kind)
        cache = work / "cache"
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        row = {"size": size, "type": kind, "gguf_mb": gguf_path.stat().st_size / 1e6, "quant": args.quant}
        row.update(timed_prepare(gguf_path, cache, args.quant))
        row["prepared_before"] = args.keep_cache  # then prepare_s and its peak RSS only found the cache
        row["ours_tok_s"] = our_decode(row["model_dir"], args.tokens, args.threads)
        row["llama_cpp_tok_s"] = llama_cpp_decode(args.llama_python, gguf_path, args.tokens, args.threads)
        if args.serve:
            row["serve"] = []
            for context in [int(c) for c in args.serve.split(",")]:
                text = long_prompt_text(row["model_dir"], context)
                for engine in ("ours", "llama.cpp"):  # interleaved, one after the other
                    row["serve"].append(serve_measure(engine, gguf_path, cache, args.quant, context, text, args))
                    print(json.dumps(row["serve"][-1]), flush=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| model | type | GGUF MB | prepare s | peak RSS MB | ONNX MB | ONNX / GGUF | ours tok/s | llama.cpp tok/s | ours / llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        llama = row.get("llama_cpp_tok_s")
        print(f"| {row['size']} | {row['type']} | {row['gguf_mb']:.0f} | {row['prepare_s']:.1f} | {row['peak_rss_mb']:.0f} | "
              f"{row['model_mb']:.0f} | {row['model_mb'] / row['gguf_mb']:.2f}x | {row['ours_tok_s']:.1f} | "
              + (f"{llama:.1f} | {row['ours_tok_s'] / llama:.2f}x |" if llama else "- | - |"))
    served = [(row, entry) for row in rows for entry in row.get("serve", [])]
    if served:
        print("\n| model | type | engine | context | decode tok/s (HTTP) | prompt tok/s | RSS idle MB | RSS after the prompt MB | peak RSS MB |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for row, entry in served:
            print(f"| {row['size']} | {row['type']} | {entry['engine']} | {entry['context']} | {entry['http_tok_s']:.1f} | "
                  f"{entry['prompt_tok_s']:.1f} | {entry['rss_idle_mb']:.0f} | {entry['rss_mb']:.0f} | {entry['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
