"""How decode-step attention scales with batch rows and cached positions on this CPU.

Why this exists: the "8 streams >= 2.5x one stream" target is bounded by attention, not by the
scheduler. This script times, in isolation, the attention our graph uses (GroupQueryAttention
with the cache bound as both past and present, as ``engine/decode_batch.py`` does) and, for
comparison, the same attention written with plain ONNX ops (FusedMatMul + Softmax + MatMul), at
the default model's shape (9 query heads, 3 KV heads, head size 64, 30 layers).

    python benchmarks/attention_scaling.py

Prints microseconds per layer for each (rows, cached positions); the step's share is x 30 layers.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD_SIZE, LAYERS = 9, 3, 64, 30
BUFFER = 256  # positions per row in the shared buffer
REPEATS = 30


def _session(nodes: list, inputs: list, outputs: list, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # what the installed runtime reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _tensor(name: str, shape: list[int] | None, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _median_seconds(run) -> float:
    run()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def group_query_attention(rows: int, positions: int, threads: int) -> float:
    """Seconds per layer: one decode token per row, ``positions`` already cached, in place."""
    cache_shape = [rows, KV_HEADS, BUFFER, HEAD_SIZE]
    inputs = [_tensor("qkv", [rows, 1, (HEADS + 2 * KV_HEADS) * HEAD_SIZE]), _tensor("seqlens", [rows], TensorProto.INT32),
              _tensor("total", [], TensorProto.INT32), _tensor("cos", [BUFFER, HEAD_SIZE // 2]),
              _tensor("sin", [BUFFER, HEAD_SIZE // 2])]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        inputs += [_tensor(f"past_k{layer}", cache_shape), _tensor(f"past_v{layer}", cache_shape)]
        outputs += [_tensor(f"out{layer}", None), _tensor(f"k{layer}", cache_shape), _tensor(f"v{layer}", cache_shape)]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k{layer}", f"past_v{layer}", "seqlens", "total", "cos", "sin"],
            [f"out{layer}", f"k{layer}", f"v{layer}"], domain="com.microsoft", num_heads=HEADS,
            kv_num_heads=KV_HEADS, scale=HEAD_SIZE ** -0.5, do_rotary=1))
    session = _session(nodes, inputs, outputs, threads)
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.random((rows, 1, (HEADS + 2 * KV_HEADS) * HEAD_SIZE), dtype=np.float32))
    binding.bind_cpu_input("seqlens", np.full(rows, positions, np.int32))
    binding.bind_cpu_input("total", np.array(positions + 1, np.int32))
    binding.bind_cpu_input("cos", rng.random((BUFFER, HEAD_SIZE // 2), dtype=np.float32))
    binding.bind_cpu_input("sin", rng.random((BUFFER, HEAD_SIZE // 2), dtype=np.float32))
    for layer in range(LAYERS):
        for kind in ("k", "v"):  # one buffer as both past and present: GQA appends in place
            buffer = ort.OrtValue.ortvalue_from_numpy(rng.random(cache_shape, dtype=np.float32))
            binding.bind_ortvalue_input(f"past_{kind}{layer}", buffer)
            binding.bind_ortvalue_output(f"{kind}{layer}", buffer)
        binding.bind_output(f"out{layer}")
    return _median_seconds(lambda: session.run_with_iobinding(binding)) / LAYERS


def plain_op_attention(rows: int, positions: int, threads: int) -> float:
    """Seconds per layer for the attention alone (no rotary, no cache append) in plain ops, the
    query heads of each KV head grouped into one matrix, the buffer masked past ``positions``."""
    group = HEADS // KV_HEADS
    cache_shape = [rows, KV_HEADS, BUFFER, HEAD_SIZE]
    inputs = [_tensor("q", [rows, KV_HEADS, group, HEAD_SIZE]), _tensor("mask", [rows, 1, 1, BUFFER])]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        inputs += [_tensor(f"k{layer}", cache_shape), _tensor(f"v{layer}", cache_shape)]
        outputs.append(_tensor(f"out{layer}", None))
        nodes += [
            helper.make_node("FusedMatMul", ["q", f"k{layer}"], [f"scores{layer}"], domain="com.microsoft",
                             transB=1, alpha=HEAD_SIZE ** -0.5),
            helper.make_node("Add", [f"scores{layer}", "mask"], [f"masked{layer}"]),
            helper.make_node("Softmax", [f"masked{layer}"], [f"probs{layer}"], axis=-1),
            helper.make_node("MatMul", [f"probs{layer}", f"v{layer}"], [f"out{layer}"]),
        ]
    session = _session(nodes, inputs, outputs, threads)
    rng = np.random.default_rng(0)
    mask = np.where(np.arange(BUFFER) <= positions, 0.0, -1e9).astype(np.float32)
    feed = {"q": rng.random((rows, KV_HEADS, group, HEAD_SIZE), dtype=np.float32),
            "mask": np.broadcast_to(mask, (rows, 1, 1, BUFFER)).copy()}
    for layer in range(LAYERS):
        feed[f"k{layer}"] = rng.random(cache_shape, dtype=np.float32)
        feed[f"v{layer}"] = rng.random(cache_shape, dtype=np.float32)
    return _median_seconds(lambda: session.run(None, feed)) / LAYERS


def main() -> None:
    threads = os.cpu_count() or 1
    print(f"attention per layer, {threads} threads, {HEADS}/{KV_HEADS} heads x {HEAD_SIZE}, buffer {BUFFER} positions")
    print(f"{'rows':>4} {'positions':>9} {'GQA in place (us)':>18} {'plain ops (us)':>15}")
    for rows in (1, 8):
        for positions in (30, 100, 200):
            gqa = group_query_attention(rows, positions, threads) * 1e6
            plain = plain_op_attention(rows, positions, threads) * 1e6
            print(f"{rows:>4} {positions:>9} {gqa:>18.1f} {plain:>15.1f}")


if __name__ == "__main__":
    main()
