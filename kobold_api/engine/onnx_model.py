"""One ONNX Runtime session for a decoder-only model with a KV cache.

A folder our importer built carries a manifest (``kobold_api_model.json``) that states
the graph's contract: KV-cache layout, EOS/BOS ids, context length. Folders made
elsewhere (the genai builder's fallback, optimum, a user's ONNX folder) are read by
looking at the graph: the builder's layout (input_ids, attention_mask,
past_key_values.*; positions come from the mask) or optimum's (plus position_ids).
The KV cache stays as ``OrtValue`` objects between steps, so on CUDA it never leaves
the device and on the CPU it is never converted to numpy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .layouts import KV_LAYOUTS
from .prepare import read_manifest
from .rotary import RotaryLayout
from .small_graphs import HelperSessions

if TYPE_CHECKING:
    from .kv_slots import KVSlots, StepBuffers

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class ModelInfo:
    """What the loop needs to know about a model, read from its config files."""

    name: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    context_length: int
    vocab_size: int


@dataclass
class KVCache:
    """The past keys/values of one sequence (batch of 1) and the token ids they cover.

    Kept as an object so later work can hold on to it between requests (prefix reuse).
    """

    tensors: list[ort.OrtValue] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    #: When set, the views of slot 0 of ``home`` where this sequence's keys were left parked:
    #: an empty batch on those slots takes them back instead of copying the keys in, and any
    #: other row that needs slot 0 first copies them out into ``tensors``.
    arena: list[np.ndarray] | None = None
    home: KVSlots | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Memory the cache holds: the tensors' whole width, not just the cached positions (a
        concatenated cache may be wider than its sequence); for keys parked in a slot, the
        pages its positions use (the rest of the slot is never touched or was given back)."""
        if self.home is not None:
            return self.home.held_bytes(self.length)
        if not self.tensors:
            return 0
        shape = self.tensors[0].shape()
        itemsize = 2 if "float16" in self.tensors[0].data_type() else 4
        return len(self.tensors) * int(np.prod(shape)) * itemsize


def cuda_device_available() -> bool:
    """Whether a CUDA GPU is really there.

    onnxruntime-gpu lists CUDAExecutionProvider as available even on machines without
    a GPU, so ask the driver: libcuda must load and report at least one device.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


def choose_providers(requested: str) -> list[str]:
    """ORT provider list for ``auto``/``cuda``/``cpu``: CUDA only where ORT offers it and a GPU exists."""
    if requested in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers() \
            and cuda_device_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolved_device(requested: str) -> str:
    """``cuda`` or ``cpu``: what ``requested`` will actually run on here (decides the graph to build)."""
    return "cuda" if choose_providers(requested)[0] == "CUDAExecutionProvider" else "cpu"


class WrongDevice(RuntimeError):
    """The folder holds a graph built for CUDA, and the session could only open on the CPU."""


class OnnxCausalLM:
    """Runs prefill and decode steps; knows nothing about sampling or text."""

    def __init__(self, model_dir: Path, provider: str = "auto", cpu_threads: int = 0,
                 profile_prefix: str = "", kv_layout: str = "auto", cuda_graphs: bool = False) -> None:
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {kv_layout!r}")
        self.kv_layout = kv_layout
        self.model_dir = Path(model_dir)
        providers: list = choose_providers(provider)
        options = _session_options(cpu_threads, profile_prefix, on_cuda=providers[0] == "CUDAExecutionProvider")
        #: Decode steps replay captured CUDA graphs, one per batch-size bucket (device slots only:
        #: a captured graph needs every buffer at a fixed address).
        self.cuda_graphs = cuda_graphs and providers[0] == "CUDAExecutionProvider" and kv_layout == "slots"
        if self.cuda_graphs:
            providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *providers[1:]]
        self._eager = _run_options(-1) if self.cuda_graphs else None
        try:
            self.session = ort.InferenceSession(
                str(self.model_dir / "model.onnx"), sess_options=options, providers=providers
            )
        except Exception as exc:  # a broken CUDA install raises here; the CPU still works
            if providers[0] == "CPUExecutionProvider":
                raise
            log.warning("CUDA session failed (%s); falling back to the CPU provider", exc)
            self.session = ort.InferenceSession(
                str(self.model_dir / "model.onnx"), sess_options=_session_options(cpu_threads, profile_prefix, False),
                providers=["CPUExecutionProvider"]
            )
        self.provider = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            log.warning(
                "CUDA was requested but is not available (providers offered: %s); running on the CPU",
                ", ".join(ort.get_available_providers()),
            )
        log.info("ONNX Runtime session on %s (%s)", self.provider, ", ".join(self.session.get_providers()))
        manifest = read_manifest(self.model_dir)
        if manifest.get("device") == "cuda" and self.provider != "cuda":
            # Our CUDA graphs (fp16 GroupQueryAttention) are refused by the importer for the CPU:
            # running one there would be slow at best. The caller prepares a CPU graph instead.
            raise WrongDevice(f"{self.model_dir.name} was built for CUDA, which is not usable here")
        self.info = _read_model_info(self.model_dir, manifest)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._uses_position_ids = "position_ids" in inputs
        self._past_names = sorted(
            (n for n in inputs if n.startswith("past_key_values.")), key=_layer_sort_key
        )
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        kv = manifest.get("kv_cache")
        if kv:
            self._kv_heads, self._head_dim = int(kv["kv_heads"]), int(kv["head_dim"])
            self._kv_dtype = np.dtype(kv["dtype"]).type
        else:
            first_past = inputs[self._past_names[0]]
            self._kv_heads = int(first_past.shape[1])
            self._head_dim = int(first_past.shape[3])
            self._kv_dtype = _ORT_TO_NUMPY[first_past.type]
        self._output_names = ["logits", *self._present_names]
        #: How the graph rotated its cached keys (our importer's graphs): what context shifting needs.
        self.rotary = RotaryLayout.from_manifest(manifest)
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        self.cuda_graphs = self.cuda_graphs and self.provider == "cuda"
        self._graph_options: dict[int, ort.RunOptions] = {}
        #: Small graphs beside the model (slot copies, top-k), each opened once for all its batches.
        self.helpers = HelperSessions(self.session.get_providers())

    def new_cache(self) -> KVCache:
        empty = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        return KVCache([ort.OrtValue.ortvalue_from_numpy(empty, self.device) for _ in self._past_names])

    @property
    def decode_layout(self) -> str:
        """How batches keep the keys: ``slots`` (host memory, the CPU's), ``device-slots`` (fixed
        slots in device memory) or ``concat`` (presents become the next pasts). On CUDA ``auto``
        stays on ``concat`` until a GPU run has measured the device slots (README, "On a GPU")."""
        if not self.supports_batching or self.kv_layout == "concat":
            return "concat"
        if self.provider == "cpu":
            return "slots"
        return "device-slots" if self.kv_layout == "slots" else "concat"

    @property
    def supports_batching(self) -> bool:
        """Only the builder's GQA graphs compact each row's keys; optimum graphs would leave holes."""
        return not self._uses_position_ids

    @property
    def kv_shape(self) -> tuple[int, int, type]:
        """(kv heads, head dim, numpy dtype) of every past/present tensor."""
        return self._kv_heads, self._head_dim, self._kv_dtype

    @property
    def kv_bytes_per_token(self) -> int:
        """Key/value memory one position takes over all layers."""
        return self.num_kv_tensors * self._kv_heads * self._head_dim * np.dtype(self._kv_dtype).itemsize

    @property
    def num_kv_tensors(self) -> int:
        return len(self._past_names)

    def run_concat(self, input_ids: list[list[int]], attention_mask: np.ndarray, past: list[ort.OrtValue],
                   positions: list[list[int]] | None = None) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """One run in the concatenating layout: returns last-position logits [rows, vocab] and the presents.

        IO binding puts the presents on the session's device (the GPU under CUDA), so the
        cache goes straight back in as the next step's past without visiting the host;
        only the logits are copied out.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", attention_mask)
        if self._uses_position_ids:
            start = np.asarray(positions if positions is not None else [[0]] * len(input_ids), dtype=np.int64)
            binding.bind_cpu_input("position_ids", start + np.arange(len(input_ids[0]), dtype=np.int64)[None, :])
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding, self._eager)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1].astype(np.float32, copy=False), list(outputs[1:])

    def bind_slots(self, slots: KVSlots, first: int, rows: int, buffers: StepBuffers, ids: bool) -> ort.IOBinding:
        """An IO binding of slots [first, first + rows): each layer's past and present bound to the
        same slot memory (GQA writes the new keys in place), and those rows of the mask, the
        logits and (``ids``; else each run binds its own) the token ids. Everything is bound by
        address, so the binding stays valid while these buffers live."""
        binding = self.session.io_binding()
        shape = [rows, *slots.shape[1:]]
        for tensor, (past_name, present_name) in enumerate(zip(self._past_names, self._present_names)):
            address = slots.pointer(tensor, first)
            binding.bind_input(past_name, slots.device, 0, slots.dtype.type, shape, address)
            binding.bind_output(present_name, slots.device, 0, slots.dtype.type, shape, address)
        buffers.bind(binding.bind_input, "attention_mask", first, rows)
        buffers.bind(binding.bind_output, "logits", first, rows)
        if ids:
            buffers.bind(binding.bind_input, "input_ids", first, rows)
        return binding

    def run_shared(self, binding: ort.IOBinding, rows: int, tokens: int, graph: int = -1) -> None:
        """One run on a :meth:`bind_slots` binding of ``rows`` rows of ``tokens`` new tokens each
        (every session run of a slot batch goes through here; tests watch it). With CUDA graphs
        on, ``graph`` (0 and up) is the captured graph this binding replays; -1 runs eagerly."""
        options = self._eager
        if self.cuda_graphs and graph >= 0:
            options = self._graph_options.get(graph)
            if options is None:  # built once per graph, not per step
                options = self._graph_options[graph] = _run_options(graph)
        self.session.run_with_iobinding(binding, options)

    def forward(self, new_token_ids: list[int], cache: KVCache) -> np.ndarray:
        """Feed ``new_token_ids`` after ``cache``; update the cache in place; return last logits [vocab]."""
        total = cache.length + len(new_token_ids)
        logits, cache.tensors = self.run_concat([new_token_ids], np.ones((1, total), dtype=np.int64),
                                                cache.tensors, positions=[[cache.length]])
        cache.token_ids.extend(new_token_ids)
        return logits[0]


def _session_options(cpu_threads: int, profile_prefix: str, on_cuda: bool) -> ort.SessionOptions:
    """All optimizations; on the CPU every core (or ``cpu_threads``) spinning between the steps'
    operators; under CUDA one thread that sleeps (the CPU runs only shape operators there, and
    spinning threads would take the cores the HTTP threads and the sampler need)."""
    options = ort.SessionOptions()
    if profile_prefix:  # ONNX Runtime's per-node trace (engine/profile.py)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cpu_threads or (1 if on_cuda else os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if on_cuda else "1")
    return options


def _run_options(graph: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph))
    return options


def owned_ortvalue(array: np.ndarray, device: str) -> ort.OrtValue:
    """An OrtValue over a private copy of ``array``.

    ``OrtValue.numpy()`` may return a view of memory the session owns; wrapping such a
    view directly would leave the new OrtValue pointing at freed memory once the old
    one is released (seen as garbage keys after a batch row left).
    """
    return ort.OrtValue.ortvalue_from_numpy(np.array(array, copy=True, order="C"), device)


def _layer_sort_key(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[1]), 0 if parts[2] == "key" else 1


def _read_model_info(model_dir: Path, manifest: dict) -> ModelInfo:
    """EOS ids and context length from the manifest, else genai_config.json, config.json
    and generation_config.json."""
    if "eos_token_ids" in manifest:
        return ModelInfo(model_dir.name, list(manifest["eos_token_ids"]), manifest.get("bos_token_id"),
                         int(manifest["context_length"]), int(manifest["vocab_size"]))
    eos: list[int] = []
    bos: int | None = None
    context_length = 2048
    vocab_size = 0

    def add_eos(value: object) -> None:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in eos:
                eos.append(item)

    genai_path = model_dir / "genai_config.json"
    if genai_path.is_file():
        model = json.loads(genai_path.read_text())["model"]
        add_eos(model.get("eos_token_id"))
        bos = model.get("bos_token_id")
        context_length = int(model.get("context_length", context_length))
        vocab_size = int(model.get("vocab_size", 0))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            config = json.loads(path.read_text())
            add_eos(config.get("eos_token_id"))
            bos = bos if bos is not None else config.get("bos_token_id")
            context_length = int(config.get("max_position_embeddings", context_length))
            vocab_size = vocab_size or int(config.get("vocab_size", 0))
    return ModelInfo(model_dir.name, eos, bos, context_length, vocab_size)
