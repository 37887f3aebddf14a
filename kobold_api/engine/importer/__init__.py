"""Import a GGUF file or a Hugging Face folder into the engine's ONNX graph, one tensor at a time.

Shape after llama.cpp's ``convert_hf_to_gguf.py`` and onnxruntime-genai's model builder:
a reader per source format (:mod:`.sources`), one importer class per architecture family
registered by name (:mod:`.architectures`), a per-tensor precision decision
(:mod:`.precision`, :mod:`.quantize`) and a graph writer that streams weights to disk
(:mod:`.onnx_writer`). Peak memory is about one tensor (plus the process itself), so a
model of any size is prepared in a few hundred megabytes.

The result's description (:func:`import_model`'s return value) becomes the manifest the
runtime reads: graph inputs, KV-cache layout, importer and version.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from . import gguf_tokenizer
from .architectures import REGISTRY, importer_for
from .onnx_writer import GraphWriter
from .precision import QUANTS, Precision, quantized_file, resolve_quant
from .sources import ModelConfig, SourceError, TensorSource, open_source

__all__ = ["QUANTS", "REGISTRY", "Precision", "SourceError", "copy_tokenizer_files",
           "import_model", "inspect_source", "open_source", "quantized_file", "resolve_quant"]

Say = Callable[[str], None]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def inspect_source(path: Path) -> tuple[TensorSource, type]:
    """Open ``path`` and find its importer: fails fast, before any long work, on a file that
    is not a model or an architecture we cannot build."""
    source = open_source(path)
    return source, importer_for(source.config)


def import_model(path: Path, out_dir: Path, quant: str, device: str, say: Say) -> dict:
    """Write ``model.onnx`` (+ data), the tokenizer files and return the graph contract."""
    source, importer_class = inspect_source(path)
    precision = Precision(quant, device, source)
    config = source.config
    say(f"Importing {Path(path).name}: {config.architecture}, {config.num_layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size} -> {precision.quant} for {device}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_tokenizer(source, out_dir)  # first: a tokenizer we cannot read fails before the long part
        writer = GraphWriter(out_dir, precision.float_type)
        bar = ProgressBar(say)
        try:
            importer = importer_class(source, precision, writer, bar.update)
            precision.plan(importer.matrix_groups(), reserve=importer.table_bytes())
            if precision.quant == "fit":
                say(f"fit: {precision.planned_bytes / 1e6:.0f} MB of matrices for the file's "
                    f"{precision.file_bytes / 1e6:.0f} MB ({precision.planned_bytes / precision.file_bytes:.2f}x)")
            importer.build()
            writer.save()
        except BaseException:
            writer.abort()
            raise
    finally:
        precision.close()
    bar.finish()
    return {**contract(config, importer_class, precision, device), "rotary": importer.rotary_contract()}


def contract(config: ModelConfig, importer_class: type, precision: Precision, device: str) -> dict:
    """What the runtime may rely on without looking inside the graph (``rotary``, added by
    :func:`import_model`, says how cached keys were rotated)."""
    return {
        "importer": importer_class.__name__, "importer_version": importer_class.version,
        "architecture": config.architecture, "quant": precision.quant, "device": device,
        "graph": {
            "inputs": ["input_ids", "attention_mask"], "position_ids": False, "logits": "last_position",
            "past": "past_key_values.{layer}.{key|value}", "present": "present.{layer}.{key|value}",
        },
        "kv_cache": {"layers": config.num_layers, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                     "dtype": str(precision.float_type), "layout": "batch, kv_heads, positions, head_dim"},
        "vocab_size": config.vocab_size, "context_length": config.context_length,
        "bos_token_id": config.bos_token_id, "eos_token_ids": config.eos_token_ids,
    }


class ProgressBar:
    """Tensors done, MB written and time left: redrawn in place on a terminal, and a log
    line every tenth of the way (so a log file or a server start shows progress too)."""

    def __init__(self, say: Say) -> None:
        self.say = say
        self.started = time.monotonic()
        self._last_tenth = -1
        self._tty = sys.stderr.isatty()

    def update(self, done: int, total: int, written: int) -> None:
        fraction = min(1.0, done / max(total, 1))
        elapsed = time.monotonic() - self.started
        left = elapsed / fraction - elapsed if fraction > 0 else 0.0
        text = (f"{done}/{total} tensors, {written / 1e6:,.0f} MB written, "
                f"{elapsed:.0f} s elapsed, ~{left:.0f} s left")
        if self._tty:
            filled = int(fraction * 30)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}   ")
            sys.stderr.flush()
        tenth = int(fraction * 10)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            if not self._tty or tenth == 10:
                self.say(f"  {fraction * 100:3.0f}%  {text}")

    def finish(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


def write_tokenizer(source: TensorSource, out_dir: Path) -> None:
    """tokenizer.json and friends: copied from a folder, or made from a GGUF's metadata."""
    if source.kind != "gguf":
        copy_tokenizer_files(source.path, out_dir)
        if not (out_dir / "tokenizer.json").is_file():
            raise SourceError(f"{source.path} has no tokenizer.json (a fast tokenizer is needed)")
        return
    gguf_tokenizer.convert(source.path, out_dir)


def copy_tokenizer_files(hf_dir: Path, out_dir: Path, *extra: str) -> None:
    for name in TOKENIZER_FILES + extra:
        if (hf_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
