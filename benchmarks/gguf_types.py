"""What each GGUF type becomes when prepared: bytes against the file, perplexity against
llama.cpp on the same file, decode speed of both.

The default model's GGUF (Q4_1) is de-quantized into an F32 GGUF, and llama.cpp's own
quantizer (``llama_model_quantize`` in the bench venv's llama-cpp-python) makes each type from
it, as a user's download would have been made. For each file:

- ``kobold-api prepare FILE`` (``--quant`` as given, ``fit`` by default) in a fresh cache:
  prepared size (``model.onnx`` + data) and its ratio to the GGUF;
- perplexity of the prepared model (the engine's own decode path, ``benchmarks/perplexity.py``)
  and of llama.cpp on the same GGUF, on the same text and tokens;
- greedy decode tok/s, ours and llama.cpp's, 2 threads.

    .venv/bin/python benchmarks/gguf_types.py [--types Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_1] [--quant fit]

The 135M default model is 576 wide, not a multiple of the K-quants' 256-value super-blocks, so
llama.cpp's K-quant files hold its fallbacks (Q5_0, Q5_1, Q8_0) for most tensors; the type mix
of each file is printed with its row.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from perplexity import mean_nll, score_onnx  # noqa: E402
from prepare_scaling import llama_cpp_decode, llama_quantize, our_decode, timed_prepare  # noqa: E402

LLAMA_PERPLEXITY = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
text = open(sys.argv[2], encoding="utf-8").read()[: int(sys.argv[3])]
tokens = int(sys.argv[4])
llm = Llama(sys.argv[1], n_ctx=tokens + 8, logits_all=True, n_threads=2, verbose=False)
ids = llm.tokenize(text.encode("utf-8"), add_bos=False)[:tokens]
llm.eval(ids)
total = 0.0
for row, target in zip(llm.scores[: len(ids) - 1], ids[1:]):
    row = np.asarray(row, dtype=np.float64)
    row = row - row.max()
    total += math.log(np.exp(row).sum()) - row[target]
print(json.dumps({"tokens": len(ids), "perplexity": math.exp(total / (len(ids) - 1))}))
"""


def write_f32(source: Path, out: Path) -> None:
    """The GGUF ``source`` with every tensor de-quantized to F32 (metadata copied)."""
    import gguf
    from gguf import GGUFReader, GGUFWriter, quants

    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def type_mix(path: Path) -> dict[str, float]:
    """MB of the file's tensors by GGUF type."""
    from gguf import GGUFReader

    sizes: Counter[str] = Counter()
    for tensor in GGUFReader(str(path)).tensors:
        sizes[tensor.tensor_type.name] += int(tensor.n_bytes)
    return {name: round(size / 1e6, 1) for name, size in sizes.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_1")
    parser.add_argument("--quant", default="fit")
    parser.add_argument("--work", default=str(REPO / "data" / "gguf_types"))
    parser.add_argument("--llama-python", default=str(REPO / ".bench" / "bin" / "python"))
    parser.add_argument("--chars", type=int, default=14000)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens scored for perplexity")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gguf_types.json"))
    args = parser.parse_args()
    from kobold_api.engine.prepare import _fetch_default_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    default_gguf = _fetch_default_gguf(REPO / "data" / "models", print)
    f32 = work / "SmolLM2-135M.F32.gguf"
    if not f32.is_file():
        write_f32(default_gguf, f32)
    text_file = REPO.parent / "shared" / "reference" / "chat_and_cards.md"
    text = text_file.read_text(encoding="utf-8")[: args.chars]
    rows = []
    for name in args.types.split(","):
        path = work / f"SmolLM2-135M.{name}.gguf"
        if not path.is_file():
            llama_quantize(args.llama_python, f32, path, name)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"type": name, "quant": args.quant, "gguf_mb": path.stat().st_size / 1e6, "mix_mb": type_mix(path)}
        row.update(timed_prepare(path, cache, args.quant))
        row["ratio"] = row["model_mb"] / row["gguf_mb"]
        ids, logits = score_onnx(Path(row["model_dir"]), text, args.tokens)
        row["perplexity"] = math.exp(mean_nll(logits, ids))
        llama = subprocess.run([args.llama_python, "-c", LLAMA_PERPLEXITY, str(path), str(text_file),
                                str(args.chars), str(args.tokens)], capture_output=True, text=True)
        scored = json.loads(llama.stdout.strip().splitlines()[-1]) if llama.returncode == 0 else {}
        row["llama_cpp_perplexity"] = scored.get("perplexity")
        row["tokens"] = len(ids)
        if args.decode_tokens:
            row["tok_s"] = our_decode(row["model_dir"], args.decode_tokens, args.threads)
            row["llama_cpp_tok_s"] = llama_cpp_decode(args.llama_python, path, args.decode_tokens, args.threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\n{args.tokens} tokens of chat_and_cards.md; decode {args.decode_tokens} greedy tokens, "
          f"{args.threads} threads; --quant {args.quant}")
    print("| GGUF | GGUF MB | prepared MB | ratio | perplexity | llama.cpp | ours / llama.cpp | tok/s | llama.cpp tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        theirs = row.get("llama_cpp_perplexity")
        speed = f"{row['tok_s']:.1f} | {row['llama_cpp_tok_s'] or 0:.1f}" if row.get("tok_s") else "- | -"
        print(f"| {row['type']} | {row['gguf_mb']:.1f} | {row['model_mb']:.1f} | {row['ratio']:.2f}x | "
              f"{row['perplexity']:.2f} | " + (f"{theirs:.2f} | {row['perplexity'] / theirs:.3f}x" if theirs else "- | -")
              + f" | {speed} |")


if __name__ == "__main__":
    main()
