"""One decode step's matrix products, kernel against kernel: ONNX Runtime's MatMulNBits (our
storage choices) against ggml's mul_mat (llama.cpp's CPU kernels: ``ggml_vec_dot_q4_K_q8_K`` for
Q4_K, ``..._q6_K_q8_K``, ``..._q8_0_q8_0``) at the 3B and 8B shapes, one token, 2 threads.

Each measurement runs one graph of many copies of the same matrix (different memory, each copy
altered a little, enough copies for at least ``--total-mb`` of weights, so the weights stream from
memory as a real model's layers do rather than sitting in the 480 MB L3; byte-identical copies
measured ONNX Runtime at 44-52 GB/s, past what the machine reads) and divides by the copies: the
median microseconds per product over 7 runs and the bytes read per second. ggml's tensors are in
its plain layout: llama.cpp's model loader repacks Q4_K into interleaved rows (its REPACK
feature), which this does not, so ggml's Q4_K here is ``ggml_vec_dot_q4_K_q8_K`` itself. The machine's own read bandwidth (two threads summing
a 2 GB array) is the ceiling both kernels share. This is what the 1.2x decode target of #30 meets:
decode at these sizes reads every weight once per token, so tokens per second = bandwidth /
bytes per token, and the kernel that reads fewer bytes wins unless its arithmetic cannot keep up.

    .venv/bin/python benchmarks/matmul_kernels.py [--llama-python .bench/bin/python]
        [--shapes 3B,8B] [--out benchmarks/results/matmul_kernels.json]

ggml runs in the bench venv (llama-cpp-python's bundled libggml, through ctypes); this file is
also that worker's program (``--worker ggml``).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: (K, N) of the matrices one layer reads at decode (llama.cpp keeps them apart; q and o share a shape).
SHAPES = {
    "3B": {"q/o 3072x3072": (3072, 3072), "gate/up 3072x8192": (3072, 8192), "down 8192x3072": (8192, 3072)},
    "8B": {"q/o 4096x4096": (4096, 4096), "gate/up 4096x14336": (4096, 14336), "down 14336x4096": (14336, 4096)},
}
#: ggml's type numbers (ggml.h) and the llama.cpp formats compared.
GGML_TYPES = {"Q4_K": 12, "Q6_K": 14, "Q8_0": 8}
#: Our storages: (bits, block, zero points) as MatMulNBits reads them.
ORT_STORAGES = {"4-bit/32 zp (fit)": (4, 32, True), "4-bit/32 sym": (4, 32, False),
                "4-bit/64 zp": (4, 64, True), "8-bit/64 sym": (8, 64, False), "8-bit/32 sym": (8, 32, False)}
RUNS = 7


def _copies(nbytes: int, total_mb: float) -> int:
    return max(4, int(np.ceil(total_mb * 1e6 / nbytes)))


def _weights(k: int, n: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((n, k), dtype=np.float32) * 0.02)


# --------------------------------------------------------------------------------- ggml worker

class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml_worker(k: int, n: int, kind: str, threads: int, total_mb: float) -> dict:
    lib_dir = next(Path(p).parent for p in glob.glob(
        str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "llama_cpp" / "lib" / "libggml-cpu.so")))
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    vp = ctypes.c_void_p
    base.ggml_init.restype, base.ggml_init.argtypes = vp, [_InitParams]
    base.ggml_new_tensor_2d.restype = vp
    base.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
    base.ggml_new_graph_custom.restype, base.ggml_new_graph_custom.argtypes = vp, [vp, ctypes.c_size_t, ctypes.c_bool]
    base.ggml_build_forward_expand.argtypes = [vp, vp]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
    base.ggml_row_size.restype, base.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, vp]
    cpu.ggml_graph_compute_with_ctx.restype, cpu.ggml_graph_compute_with_ctx.argtypes = ctypes.c_int, [vp, vp, ctypes.c_int]
    cpu.ggml_cpu_init()

    kind_id = GGML_TYPES[kind]
    matrix_bytes = base.ggml_row_size(kind_id, k) * n
    copies = _copies(matrix_bytes, total_mb)
    ctx = base.ggml_init(_InitParams(matrix_bytes * copies + 64 * n * 4 * copies + (k + 4096) * 4 + (64 << 20), None, False))
    source = np.ascontiguousarray(_weights(k, n))
    packed = np.empty(matrix_bytes, np.uint8)
    written = base.ggml_quantize_chunk(kind_id, source.ctypes.data, packed.ctypes.data, 0, n, k, None)
    assert written == matrix_bytes, (written, matrix_bytes)
    x = base.ggml_new_tensor_2d(ctx, 0, k, 1)
    ctypes.memmove(base.ggml_get_data(x), np.random.default_rng(1).standard_normal(k, dtype=np.float32).ctypes.data, k * 4)
    graph = base.ggml_new_graph_custom(ctx, 4 * copies + 16, False)
    for copy in range(copies):
        w = base.ggml_new_tensor_2d(ctx, kind_id, k, n)
        ctypes.memmove(base.ggml_get_data(w), packed.ctypes.data, matrix_bytes)
        last = np.frombuffer((ctypes.c_uint8 * matrix_bytes).from_address(base.ggml_get_data(w)), np.uint8)
        last[-64:] ^= np.uint8(copy % 255 + 1)  # as ours: no two copies alike
        base.ggml_build_forward_expand(graph, base.ggml_mul_mat(ctx, w, x))
    times = []
    for _ in range(RUNS + 1):
        started = time.perf_counter()
        cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
        times.append(time.perf_counter() - started)
    median = sorted(times[1:])[len(times[1:]) // 2]
    return {"engine": "ggml", "format": kind, "bytes": matrix_bytes, "copies": copies, "us": 1e6 * median / copies}


# ------------------------------------------------------------------------------- ONNX Runtime

def ort_kernel(k: int, n: int, storage: str, threads: int, total_mb: float) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kobold_api.engine.importer import quantize

    bits, block, zero_points = ORT_STORAGES[storage]
    weights = _weights(k, n)
    if bits == 8:
        blocks = quantize.quantize_int8(weights, block)
    elif zero_points:
        blocks = quantize.quantize_int4_zero_point(weights, block)
    else:
        blocks = quantize.quantize_int4(weights, block)
    copies = _copies(blocks.nbytes, total_mb)
    initializers, nodes, outputs = [], [], []
    shared = [numpy_helper.from_array(blocks.codes, "codes"), numpy_helper.from_array(blocks.scales.reshape(-1), "scales")]
    if zero_points:
        shared.append(numpy_helper.from_array(blocks.packed_zero_points().reshape(-1), "zp"))
    for i in range(copies):
        names = []
        for tensor in shared:  # a copy per node, each a little different: every product reads its own memory
            array = numpy_helper.to_array(tensor).copy()
            if tensor.name == "codes":
                array.reshape(-1)[:64] ^= np.uint8(i % 255 + 1)
            initializers.append(numpy_helper.from_array(array, f"{tensor.name}{i}"))
            names.append(f"{tensor.name}{i}")
        nodes.append(helper.make_node("MatMulNBits", ["x", *names], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=block, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "kernels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, graph, initializers
    feed = {"x": np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)}
    times = []
    for _ in range(RUNS + 1):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    median = sorted(times[1:])[len(times[1:]) // 2]
    return {"engine": "onnxruntime", "format": storage, "bytes": blocks.nbytes, "copies": copies,
            "us": 1e6 * median / copies}


def read_bandwidth(threads: int, mb: int = 2048) -> float:
    """GB/s two threads read summing halves of a ``mb`` array (numpy releases the GIL)."""
    data = np.ones(mb * (1 << 20) // 8, np.int64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, data.nbytes / (time.perf_counter() - started) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="3B,8B")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--total-mb", type=float, default=1200, help="weights per measurement (past the L3)")
    parser.add_argument("--llama-python", default=str(REPO / ".bench" / "bin" / "python"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "matmul_kernels.json"))
    parser.add_argument("--worker", choices=["ggml"])
    parser.add_argument("--k", type=int)
    parser.add_argument("--n", type=int)
    parser.add_argument("--format")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(ggml_worker(args.k, args.n, args.format, args.threads, args.total_mb)))
        return
    sys.path.insert(0, str(REPO))
    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth, {args.threads} threads: {bandwidth:.1f} GB/s", flush=True)
    rows = []
    for size in args.shapes.split(","):
        for label, (k, n) in SHAPES[size].items():
            found = []
            for kind in GGML_TYPES:  # interleaved: each engine's formats, shape by shape
                result = subprocess.run([args.llama_python, __file__, "--worker", "ggml", "--k", str(k), "--n", str(n),
                                         "--format", kind, "--threads", str(args.threads),
                                         "--total-mb", str(args.total_mb)], capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(result.stderr[-2000:])
                found.append(json.loads(result.stdout.strip().splitlines()[-1]))
            found += [ort_kernel(k, n, storage, args.threads, args.total_mb) for storage in ORT_STORAGES]
            for row in found:
                row.update(size=size, matrix=label, bits_per_weight=8 * row["bytes"] / (k * n),
                           gb_s=row["bytes"] / row["us"] / 1e3)
                print(json.dumps(row), flush=True)
            rows += found
    Path(args.out).write_text(json.dumps({"read_bandwidth_gb_s": bandwidth, "threads": args.threads,
                                          "onnxruntime": __import__("onnxruntime").__version__, "rows": rows}, indent=1))
    print(f"\nread bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s\n")
    print("| size | matrix | kernel | format | bits/weight | µs per product | GB/s |")
    print("|---|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['size']} | {row['matrix']} | {row['engine']} | {row['format']} | {row['bits_per_weight']:.2f} | "
              f"{row['us']:.0f} | {row['gb_s']:.1f} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
