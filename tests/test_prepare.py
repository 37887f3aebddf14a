"""Model preparation: source detection, caching, graph rewrite and clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from kobold_api.engine import prepare
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.prepare import MANIFEST, PrepareError, prepare_model, resolve_source


def test_resolve_source_kinds(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert resolve_source("default").kind == "default"
    assert resolve_source(str(tiny_model_dir)).kind == "onnx_dir"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_source(str(hf)).kind == "hf_dir"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


@pytest.mark.parametrize("spec, message", [
    ("./does/not/exist", "is not a .gguf file or a model folder"),
    ("not a model", "cannot understand model"),
])
def test_resolve_source_errors_say_what_to_do(spec: str, message: str) -> None:
    with pytest.raises(PrepareError, match=message):
        resolve_source(spec)


def test_folder_without_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="neither model.onnx nor"):
        resolve_source(str(tmp_path))


def test_built_model_is_cached_and_not_rebuilt(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    assert manifest["target"] == "mixed-cpu"  # auto, for a model this small
    hf_dir = Path(manifest["source"]["location"])

    def must_not_build(*args, **kwargs):
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr(prepare, "build_onnx", must_not_build)
    assert prepare_model(str(hf_dir), "cpu", tiny_model_dir.parent) == tiny_model_dir


def test_auto_precision_follows_device_and_model_size() -> None:
    from kobold_api.engine.importer.precision import resolve_quant
    from kobold_api.engine.importer.sources import ModelConfig

    smollm2 = ModelConfig("llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                          intermediate_size=1536, vocab_size=49152, rms_eps=1e-5, rope_theta=1e5,
                          context_length=8192, tied_embeddings=True)
    assert 134_000_000 < smollm2.parameters < 135_000_000
    assert resolve_quant("auto", "cpu", smollm2.parameters) == "mixed"
    assert resolve_quant("auto", "cpu", smollm2.parameters, quantized_file=True) == "mixed"
    assert resolve_quant("auto", "cpu", 1_070_000_000) == "int4"
    # A quantized GGUF of 0.5B or more reads no more bytes than its file.
    assert resolve_quant("auto", "cpu", 1_070_000_000, quantized_file=True) == "fit"
    assert resolve_quant("auto", "cpu", None) == "int4"  # unknown size: the builder's choice
    assert resolve_quant("auto", "cuda", smollm2.parameters) == "fp16"
    assert resolve_quant("auto", "cuda", 1_070_000_000, quantized_file=True) == "fp16"
    assert resolve_quant("fit", "cpu", smollm2.parameters) == "fit"
    assert resolve_quant("INT4", "cuda") == "int4"


def test_cache_key_depends_on_target() -> None:
    source = resolve_source("default")
    assert source.cache_key("int4-cpu") != source.cache_key("fp16-cuda")


def test_graph_returns_only_last_position_logits(tiny_model_dir: Path) -> None:
    graph = onnx.load(str(tiny_model_dir / "model.onnx"), load_external_data=False).graph
    assert any(node.name == "last_position_slice" for node in graph.node)
    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    cache = model.new_cache()
    logits = model.forward(list(range(10, 30)), cache)
    assert logits.shape == (model.info.vocab_size,)
    assert cache.length == 20
    # Same logits as feeding the tokens one by one: the KV cache carries the context.
    step_cache = model.new_cache()
    for token in range(10, 30):
        step_logits = model.forward([token], step_cache)
    np.testing.assert_allclose(step_logits, logits, rtol=1e-3, atol=1e-3)


def test_int4_graph_keeps_the_output_matrix_in_8_bits(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The GGUF layout: the output matrix (Q8_0 in the default GGUF) 8-bit, the rest int4 in
    blocks of 32; all-int4 cost the default model 25.2 against 22.5 perplexity."""
    hf_dir = Path(json.loads((tiny_model_dir / MANIFEST).read_text())["source"]["location"])
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache", quant="int4")
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    bits = {node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in graph.node if node.op_type == "MatMulNBits"}
    lm_head = [name for name in bits if "lm_head" in name]
    assert len(lm_head) == 1 and bits[lm_head[0]]["bits"] == 8
    others = [attrs for name, attrs in bits.items() if name not in lm_head]
    assert others and all(attrs["bits"] == 4 and attrs["block_size"] == 32 for attrs in others)


def test_failed_build_says_what_to_do(tmp_path: Path) -> None:
    hf = tmp_path / "broken"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "not-a-real-architecture"}))
    with pytest.raises(PrepareError) as error:
        prepare_model(str(hf), "cpu", tmp_path / "cache")
    assert "could export" in str(error.value) or "failed" in str(error.value)
    assert not any((tmp_path / "cache").glob(f"*/{MANIFEST}"))  # nothing half-built is left as usable
