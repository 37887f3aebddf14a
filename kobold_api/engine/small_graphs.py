"""Sessions for the engine's small helper graphs (slot copies, the top-k reduction, context
shifts), run on the model's own device beside its session."""

from __future__ import annotations

import onnxruntime as ort


class HelperSessions:
    """A model's helper sessions (quiet in the log), each graph opened once on the model's
    providers: every batch on device slots needs the same slot-copy and top-k graphs, and
    opening them again for each new batch (each guided or streamed request's own) cost a few
    session starts per request."""

    def __init__(self, providers: list[str] | None) -> None:
        self.providers = providers
        self._sessions: dict[bytes, ort.InferenceSession] = {}

    def session(self, name: str, nodes: list, inputs: list, outputs: list, initializers: list | None = None,
                opset: int = 17) -> ort.InferenceSession:
        key = _serialized(name, nodes, inputs, outputs, initializers, opset)
        if key not in self._sessions:
            self._sessions[key] = _open(key, self.providers)
        return self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)


def _serialized(name: str, nodes: list, inputs: list, outputs: list, initializers: list | None, opset: int) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _open(model: bytes, providers: list[str] | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # One thread, no pool: these graphs are tiny, and a pool's threads still running when the
    # interpreter exits abort it ("terminate called without an active exception").
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=providers or None)
