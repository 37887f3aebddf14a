"""Context shifting on the device: the kept runs gathered into place and their keys rotated
back, as two small graphs run where the cache lives, so a device cache never visits host memory.

The rotation is written as a per-position linear map over the head dimension, which covers
every rotary layout the manifest describes: ``out = x * C + x[perm] * S``. For the pair
``(i, j)`` rotated by angle ``a``: ``out_i = x_i cos a - x_j sin a`` and ``out_j = x_j cos a +
x_i sin a``; dimensions past the rotary part keep ``C = 1, S = 0``. The tables and pairs come
from :class:`RotaryLayout` (``tables``, ``partners``), which the host shift
(:meth:`RotaryLayout.rotate`) uses too, and the products are the same float32 operations, so the
result is bit for bit the host shift's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .rotary import RotaryLayout
from .small_graphs import HelperSessions


class ShiftGraphs:
    """Gather (values) and gather-and-rotate (keys) sessions for one cache dtype on one device."""

    def __init__(self, rotary: RotaryLayout, head_dim: int, dtype: np.dtype, device: str,
                 helpers: HelperSessions) -> None:
        from onnx import TensorProto, helper
        from onnx.helper import np_dtype_to_tensor_dtype

        self.rotary, self.head_dim, self.device = rotary, head_dim, device
        element = np_dtype_to_tensor_dtype(np.dtype(dtype))
        cast = element != TensorProto.FLOAT
        source = helper.make_tensor_value_info("source", element, [1, None, None, head_dim])
        index = helper.make_tensor_value_info("index", TensorProto.INT64, [None])
        out = helper.make_tensor_value_info("out", element, [1, None, None, head_dim])

        def session(nodes: list, inputs: list) -> ort.InferenceSession:
            return helpers.session("shift", nodes, inputs, [out])

        self._values = session([helper.make_node("Gather", ["source", "index"], ["out"], axis=2)], [source, index])
        nodes = [helper.make_node("Gather", ["source", "index"], ["moved"], axis=2)]
        if cast:
            nodes.append(helper.make_node("Cast", ["moved"], ["wide"], to=TensorProto.FLOAT))
        wide = "wide" if cast else "moved"
        nodes += [helper.make_node("Gather", [wide, "perm"], ["partner"], axis=3),
                  helper.make_node("Mul", [wide, "cos"], ["straight"]),
                  helper.make_node("Mul", ["partner", "sin"], ["across"]),
                  helper.make_node("Add", ["straight", "across"], ["rotated" if cast else "out"])]
        if cast:
            nodes.append(helper.make_node("Cast", ["rotated"], ["out"], to=element))
        tables = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, head_dim]) for name in ("cos", "sin")]
        self._keys = session(nodes, [source, index, helper.make_tensor_value_info("perm", TensorProto.INT64,
                                                                                   [head_dim]), *tables])
        self._perm = self.rotary.partners(head_dim)

    def tables(self, layer: int, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``C`` and ``S`` [positions, head_dim] for keys moved ``distances`` towards the start."""
        return self.rotary.tables(layer, distances, self.head_dim)

    def gather(self, value: ort.OrtValue, index: np.ndarray) -> ort.OrtValue:
        binding = self._values.io_binding()
        binding.bind_ortvalue_input("source", value)
        binding.bind_cpu_input("index", index)
        binding.bind_output("out", self.device)
        self._values.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def rotate(self, value: ort.OrtValue, index: np.ndarray, tables: tuple[np.ndarray, np.ndarray]) -> ort.OrtValue:
        binding = self._keys.io_binding()
        binding.bind_ortvalue_input("source", value)
        binding.bind_cpu_input("index", index)
        binding.bind_cpu_input("perm", self._perm)
        binding.bind_cpu_input("cos", tables[0])
        binding.bind_cpu_input("sin", tables[1])
        binding.bind_output("out", self.device)
        self._keys.run_with_iobinding(binding)
        return binding.get_outputs()[0]
