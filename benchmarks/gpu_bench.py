"""Engine benchmark on a GPU: each precision built for CUDA, then `kobold-api bench`'s
measurements (decode, prefill, follow-up, raw batched steps, concurrent requests).

Models: the default model (SmolLM2-135M) when its GGUF is given (`--gguf`), else random
weights in its exact shape (speed does not depend on the values; a GPU machine may have
no network to fetch the default), and a ~1B model of engine_notes §6's shape.

    python benchmarks/gpu_bench.py [--device cuda] [--gguf FILE] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from kobold_api.benchmark import run_benchmark  # noqa: E402
from kobold_api.engine.prepare import prepare_model  # noqa: E402
from kobold_api.engine.profile import profile_steps  # noqa: E402

SHAPES = {
    # name: hidden, layers, heads, kv heads, ffn, vocab, tied
    "SmolLM2-135M shape": (576, 30, 9, 3, 1536, 49152, True),
    "1.07B (engine_notes §6)": (2048, 16, 32, 8, 8192, 49152, True),
}


def random_hf_model(out_dir: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                    vocab: int, tied: bool) -> Path:
    """A Llama folder with random fp16 weights written straight to safetensors (no torch init)."""
    from safetensors.numpy import save_file
    from tiny_model import build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "intermediate_size": ffn, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    (out_dir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
            p + "self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": matrix(ffn, hidden),
            p + "mlp.up_proj.weight": matrix(ffn, hidden),
            p + "mlp.down_proj.weight": matrix(hidden, ffn),
        })
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gguf", help="the default model's GGUF, if at hand")
    parser.add_argument("--work", default="/tmp/gpu_bench")
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--quants", default="fp16")
    parser.add_argument("--big-quants", default="int4,fp16", help="precisions for the 1B model")
    parser.add_argument("--layouts", default="concat,slots,graphs",
                        help="kv_layout values to compare (engine/onnx_model.py); graphs: slots with cuda_graphs")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="ONNX Runtime's per-node profile of raw steps")
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for shape, dims in SHAPES.items():
        big = dims[0] > 1000
        quants = [q for q in (args.big_quants if big else args.quants).split(",") if q]
        if not quants:
            continue
        if args.gguf and not big:
            source, shape = args.gguf, "SmolLM2-135M-Instruct (GGUF)"
        else:
            started = time.perf_counter()
            source = str(random_hf_model(work / shape.split()[0], *dims))
            print(f"{shape}: random weights written in {time.perf_counter() - started:.1f} s", flush=True)
        for quant, layout in ((quant, layout) for quant in quants for layout in args.layouts.split(",")):
            row = {"model": shape, "quant": quant, "layout": layout}
            try:
                started = time.perf_counter()
                model_dir = prepare_model(source, args.device, work / "cache", progress=lambda m: None, quant=quant)
                row["prepare_s"] = round(time.perf_counter() - started, 1)
                row["size_mb"] = round(sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6)
                kv_layout, graphs = ("slots", True) if layout == "graphs" else (layout, False)
                row.update(run_benchmark(str(model_dir), args.device, work / "cache", args.tokens, args.repeats,
                                         kv_layout=kv_layout, cuda_graphs=graphs))
                if args.profile and not graphs:  # where a step's time goes, at 1 and 8 rows (engine/profile.py)
                    for rows in (1, 8):
                        row[f"profile_{rows}_rows"] = profile_steps(model_dir, args.device, rows, kv_layout=kv_layout)
            except Exception as exc:  # report and go on: one broken precision must not hide the rest
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not (args.gguf and not big):
            peer = transformers_peer(Path(source), args.tokens)
            if peer is not None:
                rows.append({"model": shape, "quant": "fp16", "layout": "transformers", **peer})
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def transformers_peer(hf_dir: Path, tokens: int) -> dict | None:
    """The same weights in fp16 through transformers on the GPU, greedy decode tok/s (the peer the
    GPU issue asks for); None where PyTorch with CUDA is not installed (a GPU machine without
    network cannot carry it)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers peer: PyTorch or transformers not installed here", flush=True)
        return None
    if not torch.cuda.is_available():
        print("transformers peer: PyTorch sees no CUDA device", flush=True)
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float16).to("cuda").eval()
        prompt = torch.arange(5, 105, device="cuda")[None, :]
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            torch.cuda.synchronize()
        new = int(out.shape[1] - prompt.shape[1])
        return {"decode_tok_s_greedy": round(new / (time.perf_counter() - started), 1)}
    except Exception as exc:  # report, never hide the rows above
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def print_table(rows: list[dict]) -> None:
    columns = [("decode_tok_s_greedy", "decode greedy tok/s"), ("decode_tok_s_sillytavern", "decode ST tok/s"),
               ("prefill_1024_s", "prefill 1,024 s"), ("follow_up_prefill_s", "follow-up s"),
               ("raw_step_1_tok_s", "raw 1 row tok/s"), ("raw_step_8_tok_s", "raw 8 rows tok/s"),
               ("batch_1_tok_s", "1 request tok/s"), ("batch_8_tok_s", "8 requests tok/s"),
               ("prepare_s", "prepare s"), ("size_mb", "size MB")]
    print("\n| model | quant | layout | " + " | ".join(title for _, title in columns) + " |")
    print("|---|---|---|" + "---:|" * len(columns))
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['quant']} | {row.get('layout', '')} | failed: {row['error']} |")
            continue
        cells = ["" if key not in row else f"{row[key]:.3f}" if key.endswith("_s") and row[key] < 10
                 else f"{row[key]:.0f}" for key, _ in columns]
        print(f"| {row['model']} | {row['quant']} | {row.get('layout', '')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
