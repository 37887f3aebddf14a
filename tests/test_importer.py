"""The streaming importer: every family and GGUF block layout against transformers, exact
Q4_0/Q8_0 blocks, the manifest the runtime reads, progress, interrupted builds and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kobold_api.engine import importer
from kobold_api.engine.importer import quantize
from kobold_api.engine.importer.sources import GGUFSource
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.prepare import MANIFEST, PrepareError, prepare_model
from kobold_api.engine.tokenizer import Tokenizer

from tiny_gguf import SPM_VOCAB, write_gguf
from tiny_model import FAMILIES, build_tiny_hf_model, reference_logits

PROMPT = list(range(5, 45))
#: Largest logit error allowed, as a fraction of the largest reference logit. fp32 is exact
#: up to float rounding; int8/int4 builds also round activations to 8 bits (accuracy level 4).
TOLERANCE = {"fp32": 1e-5, "int8": 0.03, "int4": 0.12}


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def last_logits(model_dir: Path, stepped: int = 0) -> np.ndarray:
    """Logits after PROMPT, its last ``stepped`` tokens fed one at a time through the cache."""
    model = OnnxCausalLM(model_dir, "cpu", cpu_threads=2)
    cache = model.new_cache()
    logits = model.forward(PROMPT[:len(PROMPT) - stepped], cache)
    for token in PROMPT[len(PROMPT) - stepped:]:
        logits = model.forward([token], cache)
    return logits


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("import-cache")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_folder_of_each_family_matches_transformers(family: str, tied: bool, tmp_path: Path, cache: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / family, family=family, tied=tied)
    reference = reference_logits(hf_dir, PROMPT)
    for quant, tolerance in TOLERANCE.items():
        if family in ("olmo2", "gemma2", "gemma3") and quant != "fp32":
            # Their norms on the layer outputs rescale the quantization noise of a random
            # 64-wide model (Gemma's soft-capping too); fp32 stays exact.
            tolerance = {"int8": 0.05, "int4": 0.3}[quant]
        model_dir = prepare_model(str(hf_dir), "cpu", cache, progress=lambda _: None, quant=quant)
        logits = last_logits(model_dir)
        assert relative_error(logits, reference) < tolerance, quant
        if quant == "fp32":  # decoding through the cache (sliding windows included) agrees too
            assert relative_error(last_logits(model_dir, stepped=12), reference) < tolerance
        # Random weights leave near-ties on top: a quantized build keeps the best token in its top 3.
        top = 1 if quant == "fp32" else 3
        assert int(reference.argmax()) in np.argsort(logits)[-top:], quant
        manifest = json.loads((model_dir / MANIFEST).read_text())
        assert manifest["quant"] == quant
        assert manifest["architecture"] == ("llama" if family == "mistral" else family)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_gguf_block_layouts_match_transformers(family: str, layout: str, tmp_path: Path, cache: Path) -> None:
    """A tiny GGUF per layout (Q4_K as random valid blocks, with Q8_0 around it); the Hugging
    Face folder then holds exactly the file's values, so an fp32 import must match it."""
    k_quant = ("ffn_down", "attn_q") if layout == "Q4_K" else ()
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family=family, merges=4, hidden_size=256 if k_quant else 64)
    gguf_path = write_gguf(hf_dir, tmp_path / f"{family}.gguf", "Q8_0" if k_quant else layout, family, k_quant)
    reference = reference_logits(hf_dir, PROMPT)
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="fp32")
    assert relative_error(last_logits(model_dir), reference) < TOLERANCE["fp32"]
    if layout in ("Q4_0", "Q8_0"):  # copied blocks: only the activations' rounding is left
        quant = "int4" if layout == "Q4_0" else "int8"
        model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant=quant)
        assert relative_error(last_logits(model_dir), reference) < TOLERANCE["int8"]
    # The tokenizer and chat template come from the file's metadata.
    tokenizer = Tokenizer(model_dir)
    text = "the thin hen <|im_end|>"
    assert tokenizer.encode(text) == Tokenizer(hf_dir).encode(text)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


#: Settings under which a tiny Hugging Face model means what its GGUF says: GGUF files
#: keep no query scale for Gemma (llama.cpp: 1/sqrt(head_dim) below 27B) and llama.cpp
#: fixes Gemma 3's local rotary base and its five-sliding-to-one-global pattern.
GGUF_AS_LLAMA_CPP_READS_IT = {
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {"query_pre_attn_scalar": 16, "rope_local_base_freq": 10000.0,
               "layer_types": ["sliding_attention", "sliding_attention"]},
}


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2"])
def test_gguf_of_each_further_family_matches_transformers(family: str, tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Family layouts and metadata (Gemma's 1 + w norms, Phi-3's fused matrices and LongRoPE
    factors, Granite's multipliers, OLMo 2's output norms) and their tokenizers: Gemma and
    Phi-3 files carry SentencePiece vocabularies, Granite and OLMo 2 byte-level BPE."""
    config_name, model_name, extra = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (config_name, model_name,
                                           {**extra, **GGUF_AS_LLAMA_CPP_READS_IT.get(family, {})}))
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family=family, merges=4)
    gguf_path = write_gguf(hf_dir, tmp_path / f"{family}.gguf", "Q8_0", family)
    reference = reference_logits(hf_dir, PROMPT)
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="fp32")
    assert relative_error(last_logits(model_dir), reference) < TOLERANCE["fp32"]
    assert relative_error(last_logits(model_dir, stepped=12), reference) < TOLERANCE["fp32"]
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="int8")
    assert relative_error(last_logits(model_dir), reference) < TOLERANCE["int8"]
    tokenizer = Tokenizer(model_dir)
    ids = tokenizer.encode("the thin hen")
    assert tokenizer.decode(ids) == "the thin hen"
    assert max(ids) < len(reference) and len(ids) > 3
    # The SentencePiece files ask for a BOS (id 2); the byte-level ones do not.
    assert (ids[0] == 2) == (family in SPM_VOCAB)


def test_multimodal_gemma3_checkpoint_reads_its_text_model(tmp_path: Path, cache: Path) -> None:
    """Gemma 3 4B+ checkpoints nest the text model's settings (defaults left out) and weights
    under prefixes; the importer finds both."""
    from safetensors.numpy import load_file, save_file

    hf_dir = build_tiny_hf_model(tmp_path / "text", family="gemma3", tied=True)
    reference = reference_logits(hf_dir, PROMPT)
    text_config = json.loads((hf_dir / "config.json").read_text())
    text_config.pop("architectures")
    text_config.pop("max_position_embeddings")  # left to the default (131,072), as saved diffs do
    (hf_dir / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text_config, "vision_config": {"model_type": "siglip_vision_model"}}))
    weights = load_file(str(hf_dir / "model.safetensors"))
    save_file({name.replace("model.", "model.language_model.", 1): value for name, value in weights.items()},
              str(hf_dir / "model.safetensors"))
    model_dir = prepare_model(str(hf_dir), "cpu", cache, progress=lambda _: None, quant="fp32")
    assert relative_error(last_logits(model_dir), reference) < TOLERANCE["fp32"]
    assert json.loads((model_dir / MANIFEST).read_text())["context_length"] == 131072


def _graph_matrix(model_dir: Path, node_name: str) -> np.ndarray:
    """A MatMulNBits node's weight, de-quantized from the graph's own initializers."""
    model = onnx.load(str(model_dir / "model.onnx"))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    codes = weights[node.input[1]]
    blocks = codes.shape[1]
    if len(node.input) < 4 or not node.input[3]:  # symmetric: the operator's default zero point
        zero_points = np.full((codes.shape[0], blocks), 1 << (attrs["bits"] - 1), np.uint8)
    elif attrs["bits"] == 8:
        zero_points = weights[node.input[3]].reshape(codes.shape[0], -1)
    else:
        zero_points = weights[node.input[3]].reshape(codes.shape[0], -1)
        unpacked = np.empty((codes.shape[0], zero_points.shape[1] * 2), np.uint8)
        unpacked[:, 0::2], unpacked[:, 1::2] = zero_points & 0x0F, zero_points >> 4
        zero_points = unpacked[:, :blocks]
    matrix = quantize.Blocks(attrs["bits"], codes, weights[node.input[2]].reshape(codes.shape[0], -1), zero_points)
    return matrix.dequantize()


@pytest.mark.parametrize("layout, bits", [("Q4_0", 4), ("Q8_0", 8)])
def test_q4_0_and_q8_0_blocks_are_copied_exactly(layout: str, bits: int, tmp_path: Path, cache: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf", merges=4)
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf", layout)
    quant = "int4" if bits == 4 else "int8"
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant=quant)
    source = GGUFSource(gguf_path)
    qkv = np.concatenate([source.require(f"layers.1.{p}").float_rows(0, source.require(f"layers.1.{p}").shape[0])
                          for p in ("q", "k", "v")])
    np.testing.assert_array_equal(_graph_matrix(model_dir, "layers.1/qkv"), qkv)
    down = source.require("layers.0.down")
    np.testing.assert_array_equal(_graph_matrix(model_dir, "layers.0/down"), down.float_rows(0, down.shape[0]))
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    layer_bits = {onnx.helper.get_attribute_value(a) for n in graph.node if n.name.startswith("layers.")
                  for a in n.attribute if a.name == "bits"}
    assert layer_bits == {bits}


def _stored_matrices(model_dir: Path) -> tuple[dict[str, tuple[int, int, bool]], int]:
    """Each MatMulNBits node's (bits, block size, zero points given), and the bytes of every
    quantized matrix's initializers (codes, scales, zero points; the tied embedding once)."""
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    lengths = {init.name: next((int(e.value) for e in init.external_data if e.key == "length"), len(init.raw_data))
               for init in graph.initializer}
    storage, names = {}, set()
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            names.update(n for i, n in enumerate(node.input) if n and (i in (1, 2, 3) if node.op_type == "MatMulNBits"
                                                                       else i in (2, 3)))
            if node.op_type == "MatMulNBits":
                storage[node.name] = (attrs["bits"], attrs["block_size"], len(node.input) > 3 and bool(node.input[3]))
    names |= {"embed.codes"} & set(lengths)
    return storage, sum(lengths[n] for n in names)


def test_fit_stays_within_the_files_bytes_and_moves_attention_to_8_bits_first(tmp_path: Path, cache: Path) -> None:
    """``fit`` on a Q5_0 file: 4-bit blocks with zero points everywhere, 8 bits where 1.10x the
    file's matrix bytes allow, the fused query/key/value projections first; its logits are
    nearer the file's than ``int4``'s (0.20 against 0.34 of the largest logit, six layers)."""
    hf_dir = build_tiny_hf_model(tmp_path / "hf", layers=6, merges=4, max_position_embeddings=128)
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf", "Q5_0")
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="fit")
    assert json.loads((model_dir / MANIFEST).read_text())["quant"] == "fit"
    storage, stored = _stored_matrices(model_dir)
    source = GGUFSource(gguf_path)
    matrices = [source.require(f"layers.{i}.{p}") for i in range(6) for p in ("q", "k", "v", "o", "gate", "up", "down")]
    file_bytes = sum(t.nbytes for t in matrices + [source.require("embed"), source.require("lm_head")])
    assert stored <= 1.10 * file_bytes
    layers = {name: kind for name, kind in storage.items() if name != "lm_head"}
    eight = {name for name, (bits, _, _) in layers.items() if bits == 8}
    four = {name: kind for name, kind in layers.items() if kind[0] == 4}
    assert eight and four, storage
    assert all(kind == (4, 32, True) for kind in four.values())
    qkv = {f"layers.{i}/qkv" for i in range(6)}
    assert qkv <= eight or not eight - qkv  # no other matrix before every qkv
    assert all(storage[name][1] == 64 and not storage[name][2] for name in eight)  # K = 64: one scale per row
    reference = reference_logits(hf_dir, PROMPT)
    int4_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="int4")
    assert relative_error(last_logits(model_dir), reference) < 0.75 * relative_error(last_logits(int4_dir), reference)


def test_fit_copies_a_q8_0_file_whole(tmp_path: Path, cache: Path) -> None:
    """A Q8_0 file fits at 9 bits for its 8.5: every matrix 8-bit, bit for bit, without zero
    points (a short context: the rotary tables count against the budget)."""
    hf_dir = build_tiny_hf_model(tmp_path / "hf", merges=4, max_position_embeddings=32)
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf", "Q8_0")
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="fit")
    storage, _ = _stored_matrices(model_dir)
    assert set(storage.values()) == {(8, 32, False)}
    source = GGUFSource(gguf_path)
    down = source.require("layers.1.down")
    np.testing.assert_array_equal(_graph_matrix(model_dir, "layers.1/down"), down.float_rows(0, down.shape[0]))


def test_int4_keeps_the_files_8_bit_tensors_and_the_output_matrix(tmp_path: Path, cache: Path) -> None:
    """Under int4, a tensor the file stores with many more bits than the rest stays 8-bit."""
    hf_dir = build_tiny_hf_model(tmp_path / "hf", merges=4)
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf", "Q4_1")
    model_dir = prepare_model(str(gguf_path), "cpu", cache, progress=lambda _: None, quant="int4")
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    bits = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("lm_head") == 8
    assert set(bits.values()) == {4}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_mixed_keeps_8_bits_except_inner_ffn_gate_and_up(family: str, tmp_path: Path, cache: Path) -> None:
    """``mixed``: 4-bit ffn gate/up (Phi-3's fused gate_up too) in all but the first and last two
    layers, 8 bits everywhere else; its logits sit between int8's and int4's."""
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family=family, layers=6)
    model_dir = prepare_model(str(hf_dir), "cpu", cache, progress=lambda _: None, quant="mixed")
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    bits = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.node if n.op_type == "MatMulNBits"}
    four = {name for name, b in bits.items() if b == 4}
    parts = ("gate_up",) if family == "phi3" else ("gate", "up")
    assert four == {f"layers.{i}/{part}" for i in (2, 3) for part in parts}
    assert set(bits.values()) == {4, 8} and bits["lm_head"] == 8
    error = relative_error(last_logits(model_dir), reference_logits(hf_dir, PROMPT))
    assert error < TOLERANCE["int4"]
    assert json.loads((model_dir / MANIFEST).read_text())["quant"] == "mixed"


def test_quantizers_round_trip() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 96)).astype(np.float32)
    int8 = quantize.quantize_int8(weights).dequantize()
    int4 = quantize.quantize_int4(weights).dequantize()
    assert np.abs(int8 - weights).max() < np.abs(weights).max() / 127
    assert np.abs(int4 - weights).max() < np.abs(weights).max() / 7
    # The scale search never does worse than plain round-to-nearest (-8 on the largest magnitude).
    blocks = weights.reshape(64, 3, 32)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    scale = signed_max / -8
    plain = (np.clip(np.rint(blocks / scale), -8, 7) * scale).reshape(64, 96)
    assert np.square(int4 - weights).sum() <= np.square(plain - weights).sum()
    # A 4-bit matrix turned 8-bit keeps its values.
    four = quantize.quantize_int4(weights)
    np.testing.assert_array_equal(quantize.to_8bit(four).dequantize(), four.dequantize())


def test_zero_point_quantizer_and_block_sizes() -> None:
    """4-bit codes with zero points fit values off centre better than symmetric codes; the
    bytes a plan counts are the bytes written; block sizes follow the width."""
    rng = np.random.default_rng(1)
    weights = (rng.standard_normal((48, 256)) * 0.02 + rng.uniform(-0.03, 0.03, (48, 1))).astype(np.float32)
    weights[3] = 0.0  # an all-zero row stays zero
    for block in (32, 64):
        shifted = quantize.quantize_int4_zero_point(weights, block)
        symmetric = quantize.quantize_int4(weights, block)
        assert shifted.block_size == block and shifted.zero_points.max() <= 15
        assert not shifted.symmetric
        np.testing.assert_array_equal(shifted.dequantize()[3], 0.0)
        assert np.square(shifted.dequantize() - weights).sum() < 0.8 * np.square(symmetric.dequantize() - weights).sum()
        storage = importer.precision.Storage(4, block, zero_points=True)
        assert storage.nbytes(*weights.shape) == shifted.nbytes
    eight = quantize.quantize_int8(weights, 64)
    assert importer.precision.Storage(8, 64).nbytes(*weights.shape) == eight.nbytes
    assert np.abs(eight.dequantize() - weights).max() <= np.abs(weights).max() / 127
    assert [quantize.block_for(n) for n in (576, 1536, 3072, 96, 100)] == [64, 64, 64, 32, 32]
    with pytest.raises(ValueError, match="block sizes"):
        quantize.concat([eight, quantize.quantize_int8(weights, 32)])


def test_progress_is_reported_to_the_end(tmp_path: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf")
    lines: list[str] = []
    prepare_model(str(hf_dir), "cpu", tmp_path / "cache", progress=lines.append)
    percents = [line for line in lines if "tensors" in line and "%" in line]
    assert percents and "100%" in percents[-1] and "MB written" in percents[-1]
    assert any(line.startswith("Model ready") for line in lines)


def test_interrupted_build_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf")
    calls = {"n": 0}
    original = importer.Precision.blocks

    def interrupted(self, tensors, is_output=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the layers
        return original(self, tensors, is_output)

    monkeypatch.setattr(importer.Precision, "blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(str(hf_dir), "cpu", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(f"*/{MANIFEST}"))
    assert not list((tmp_path / "cache").glob("*/model.onnx"))
    monkeypatch.setattr(importer.Precision, "blocks", original)
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache")  # the next start builds it whole
    assert (model_dir / MANIFEST).is_file()


def test_manifest_is_the_contract_the_runtime_reads(tiny_model_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    assert manifest["importer"] == "LlamaImporter" and manifest["importer_version"] >= 1
    assert manifest["kv_cache"] == {"layers": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float32",
                                    "layout": "batch, kv_heads, positions, head_dim"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_model_dir.iterdir():
        (copy / item.name).symlink_to(item)
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).write_text(json.dumps({**manifest, "eos_token_ids": [2, 7], "context_length": 1234}))
    info = OnnxCausalLM(copy, "cpu", cpu_threads=1).info
    assert info.eos_token_ids == [2, 7] and info.context_length == 1234


@pytest.mark.parametrize("quant, device, message", [
    ("fp16", "cpu", "fp16 runs only on CUDA"),
    ("fp32", "cuda", "fp32 is not built for CUDA"),
    ("int3", "cpu", "unknown quant 'int3'"),
])
def test_impossible_precisions_are_refused_before_work(quant: str, device: str, message: str,
                                                       tmp_path: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf")
    with pytest.raises(PrepareError, match=message):
        prepare_model(str(hf_dir), device, tmp_path / "cache", quant=quant)
    assert not (tmp_path / "cache").exists()


def test_rotary_scalings_we_cannot_build_go_to_the_fallback_before_any_work() -> None:
    from kobold_api.engine.importer.architectures import importer_for
    from kobold_api.engine.importer.sources import ModelConfig, UnsupportedArchitecture

    config = ModelConfig("llama", 64, 2, 4, 2, 16, 128, 259, 1e-5, 1e4, 4096,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedArchitecture, match="rope scaling 'yarn'"):
        importer_for(config)
    config.rope_scaling = {"rope_type": "llama3", "factor": 8.0}
    assert importer_for(config).__name__ == "LlamaImporter"


def test_gguf_of_an_unknown_architecture_names_it(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(importer.SourceError, match="'mamba'"):
        importer.inspect_source(path)


def test_damaged_gguf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(PrepareError, match="not a readable GGUF"):
        prepare_model(str(path), "cpu", tmp_path / "cache")
