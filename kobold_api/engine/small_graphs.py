"""Sessions for the engine's small helper graphs (slot copies, the top-k reduction, context
shifts), run on the model's own device beside its session."""

from __future__ import annotations

import onnxruntime as ort


def small_session(name: str, nodes: list, inputs: list, outputs: list, providers: list[str] | None,
                  initializers: list | None = None, opset: int = 17) -> ort.InferenceSession:
    """An ONNX Runtime session for a graph of ``nodes`` (onnx.helper objects), quiet in the log."""
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One thread, no pool: these graphs are tiny, and a pool's threads still running when the
    # interpreter exits abort it ("terminate called without an active exception").
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers or None)
