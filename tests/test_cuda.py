"""The CUDA path: graphs built for the GPU (fp16, int8, int4) against transformers, and the
KV-on-device decode batch. Skipped without an NVIDIA GPU; `benchmarks/gpu_check.sh` runs
this file on a GPU machine. It needs no conftest (the GPU machine has no web packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kobold_api.engine.decode_batch import ConcatBatch, new_decode_batch
from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest, TextGenerator
from kobold_api.engine.onnx_model import OnnxCausalLM, resolved_device
from kobold_api.engine.prepare import prepare_model
from kobold_api.engine.sampling import SamplingParams
from kobold_api.engine.tokenizer import Tokenizer

from tiny_model import build_tiny_hf_model, reference_logits

pytestmark = pytest.mark.skipif(
    resolved_device("cuda") != "cuda",
    reason="needs an NVIDIA GPU and onnxruntime-gpu's CUDA provider (benchmarks/gpu_check.sh runs it there)",
)

#: Largest logit error allowed, as a fraction of the largest reference logit.
TOLERANCE = {"fp16": 0.02, "int8": 0.04, "int4": 0.15}
PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf_model(tmp_path_factory.mktemp("cuda") / "hf", family="qwen2")


@pytest.mark.parametrize("quant", ["fp16", "int8", "int4"])
def test_cuda_build_matches_transformers(hf_dir: Path, tmp_path: Path, quant: str) -> None:
    model_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant=quant)
    model = OnnxCausalLM(model_dir, "cuda")
    assert model.provider == "cuda"
    reference = reference_logits(hf_dir, PROMPT)
    cache = model.new_cache()
    logits = model.forward(PROMPT, cache)
    error = float(np.abs(logits - reference).max()) / float(np.abs(reference).max())
    assert error < TOLERANCE[quant], f"{quant}: relative logit error {error:.4f}"
    assert int(logits.argmax()) == int(reference.argmax())
    # Token by token through the device-resident cache gives the same last logits.
    step_cache = model.new_cache()
    for token in PROMPT:
        step_logits = model.forward([token], step_cache)
    assert float(np.abs(step_logits - logits).max()) / float(np.abs(logits).max()) < TOLERANCE["fp16"]


def test_cuda_decode_batch_rows_match_single_sequences(hf_dir: Path, tmp_path: Path) -> None:
    model = OnnxCausalLM(prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant="fp16"), "cuda")
    batch = new_decode_batch(model, 4)
    assert isinstance(batch, ConcatBatch)
    prompts = [PROMPT[:12], PROMPT[:30], PROMPT[5:9]]  # rows of different lengths
    for prompt in prompts:
        batch.admit(prompt, None, 0)
    next_tokens = [7, 8, 9]
    batched = batch.step(next_tokens)
    batch.release(1)  # the last row moves into the freed slot; the rest keep decoding
    after_release = batch.step([10, 11])
    for row, (prompt, token) in enumerate(zip(prompts, next_tokens)):
        alone = model.forward(prompt + [token], model.new_cache())
        assert np.abs(batched[row] - alone).max() / np.abs(alone).max() < TOLERANCE["fp16"]
    for row, prompt, tokens in ((0, prompts[0], [7, 10]), (1, prompts[2], [9, 11])):
        alone = model.forward(prompt + tokens, model.new_cache())
        assert np.abs(after_release[row] - alone).max() / np.abs(alone).max() < TOLERANCE["fp16"]


def test_cuda_engine_serves_concurrent_requests(hf_dir: Path, tmp_path: Path) -> None:
    model_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant="int4")
    model = OnnxCausalLM(model_dir, "cuda")
    engine = Engine(TextGenerator(model, Tokenizer(model_dir)), "cuda-test", queue_size=8, max_batch_size=4)
    try:
        jobs = [engine.submit(GenerationRequest(prompt=f"Story {i}:", max_new_tokens=24, ban_eos=True,
                                                sampling=SamplingParams(temperature=0)))
                for i in range(4)]
        results = [job.wait() for job in jobs]
    finally:
        engine.shutdown()
    assert [r.completion_tokens for r in results] == [24] * 4
    alone = TextGenerator(model, Tokenizer(model_dir)).generate(
        GenerationRequest(prompt="Story 0:", max_new_tokens=24, ban_eos=True, sampling=SamplingParams(temperature=0)))
    assert results[0].text[:8] == alone.text[:8]


def test_cuda_context_shift_matches_a_fresh_prefill(tmp_path: Path) -> None:
    """The device cache shifted (through host memory, fp16 keys rotated in fp32): a one-layer
    model answers as a fresh prefill of the shortened prompt does."""
    from kobold_api.engine.context_shift import ContextShifter
    from kobold_api.engine.prefix_cache import PrefixCache

    one_layer = build_tiny_hf_model(tmp_path / "hf", family="qwen2", layers=1)
    model = OnnxCausalLM(prepare_model(str(one_layer), "cuda", tmp_path / "cache", quant="fp16"), "cuda")
    assert model.rotary is not None
    pool = PrefixCache(2**28, shifter=ContextShifter(model.rotary, model.device))
    card, old, kept, new = PROMPT[:10], list(range(60, 90)), list(range(100, 140)), [7, 8, 9]
    batch = ConcatBatch(model)
    batch.admit(card + old + kept, None, 0)
    pool.put(batch.release(0))
    prompt = card + kept + new
    cached, reuse = pool.take(prompt)
    assert cached is not None and reuse == len(card + kept)
    shifted = ConcatBatch(model).admit(prompt, cached, reuse)
    fresh = ConcatBatch(model).admit(prompt, None, 0)
    assert np.abs(shifted - fresh).max() / np.abs(fresh).max() < TOLERANCE["fp16"]


def test_cuda_constrained_batch_and_scored_prompt(hf_dir: Path, tmp_path: Path) -> None:
    """Grammars hold per row of a CUDA batch, and a scored prompt (one step per token through
    the device cache) agrees with the logprob a generation reports for the same token."""
    import re

    from kobold_api.engine.constraints import Constraint

    model_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant="int4")
    model = OnnxCausalLM(model_dir, "cuda")
    engine = Engine(TextGenerator(model, Tokenizer(model_dir)), "cuda-test", queue_size=8, max_batch_size=4)
    try:
        grammar = Constraint.from_grammar('root ::= [a-f]+ "."')
        jobs = [engine.submit(GenerationRequest(prompt=f"Story {i}:", max_new_tokens=16, constraint=grammar,
                                                sampling=SamplingParams(temperature=1.0, seed=i)))
                for i in range(4)]
        texts = [job.wait().text for job in jobs]
        first = engine.submit(GenerationRequest(prompt="Story", max_new_tokens=1, logprobs=1,
                                                sampling=SamplingParams(temperature=0))).wait()
        token = first.token_logprobs[0].token_id
        ids = Tokenizer(model_dir).encode("Story")
        scored = engine.submit(GenerationRequest(prompt_ids=ids + [token], max_new_tokens=1, logprobs=1,
                                                 prompt_logprobs=True,
                                                 sampling=SamplingParams(temperature=0))).wait()
    finally:
        engine.shutdown()
    assert all(re.fullmatch(r"[a-f]*\.?", text) for text in texts), texts
    assert abs(scored.prompt_logprobs[-1].logprob - first.token_logprobs[0].logprob) < 0.05


def test_cuda_device_slots_match_the_concatenating_layout(hf_dir: Path, tmp_path: Path) -> None:
    """Fixed slots in device memory (kv_layout "slots"): joins, a leave, a part-by-part prompt
    and padded buckets give the concatenating layout's logits (same kernels: within fp16
    rounding), and a parked row comes back for the next turn."""
    from kobold_api.engine.decode_batch import SlotBatch
    from kobold_api.engine.kv_slots import DeviceSlots

    model_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant="fp16")
    model = OnnxCausalLM(model_dir, "cuda", kv_layout="slots")
    assert model.decode_layout == "device-slots"
    slots = new_decode_batch(model, 4, 512)
    assert isinstance(slots, SlotBatch) and isinstance(slots.slots, DeviceSlots)
    padded = SlotBatch(model, 4, 512, buckets=[1, 2, 4], memory="device")
    concat = ConcatBatch(model)
    prompts = [PROMPT[:12], PROMPT[:30], PROMPT[5:9]]

    def close(got: np.ndarray, want: np.ndarray) -> bool:
        return float(np.abs(got - want).max()) / float(np.abs(want).max()) < TOLERANCE["fp16"]

    for prompt in prompts:
        want = concat.admit(prompt, None, 0)
        assert close(slots.admit(prompt, None, 0), want) and close(padded.admit(prompt, None, 0), want)
    for step in range(4):
        tokens = [7 + step, 8, 9][: concat.size]
        want = concat.step(tokens)
        assert close(slots.step(tokens), want) and close(padded.step(tokens), want)  # 3 rows: a 4-row bucket
        if step == 1:
            for batch in (slots, padded, concat):
                batch.release(1)
    long_prompt = list(range(3, 300))
    padded.begin(long_prompt, None, 0)
    while (part := padded.fill(64)) is None:
        padded.step([5, 6])
    assert close(part, ConcatBatch(model).admit(long_prompt, None, 0))
    lone = SlotBatch(model, 2, 512, memory="device")
    lone.admit(PROMPT, None, 0)
    parked = lone.release(0)
    assert parked.home is lone.slots
    again = lone.admit(PROMPT + [4, 5], parked, len(PROMPT))
    assert close(again, ConcatBatch(model).admit(PROMPT + [4, 5], None, 0))


def test_cuda_engine_on_device_slots_answers_as_the_concatenating_layout(hf_dir: Path, tmp_path: Path) -> None:
    model_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", quant="fp16")
    texts = {}
    for layout in ("concat", "slots", "graphs"):  # graphs: slots with captured CUDA graphs
        model = OnnxCausalLM(model_dir, "cuda", kv_layout="slots" if layout == "graphs" else layout,
                             cuda_graphs=layout == "graphs")
        assert model.cuda_graphs == (layout == "graphs")
        engine = Engine(TextGenerator(model, Tokenizer(model_dir)), "cuda-test", queue_size=8, max_batch_size=4)
        try:
            jobs = [engine.submit(GenerationRequest(prompt=f"Story {i}:", max_new_tokens=24, ban_eos=True,
                                                    sampling=SamplingParams(temperature=0)))
                    for i in range(4)]
            texts[layout] = [job.wait().text for job in jobs]
        finally:
            engine.shutdown()
    # fp16 kernels may round a near-tie differently: the first tokens agree.
    for layout in ("slots", "graphs"):
        assert [text[:8] for text in texts[layout]] == [text[:8] for text in texts["concat"]], layout


def test_cuda_device_shift_matches_the_host_shift(tmp_path: Path) -> None:
    """Context shift of a device cache on the device (gather-and-rotate graphs): the keys and
    values the host shift computes, without the round trip through host memory."""
    from kobold_api.engine.context_shift import ContextShifter, plan_shift
    from kobold_api.engine.shift_graph import ShiftGraphs

    one_layer = build_tiny_hf_model(tmp_path / "hf", family="qwen2", layers=1)
    model = OnnxCausalLM(prepare_model(str(one_layer), "cuda", tmp_path / "cache", quant="fp16"), "cuda")
    assert model.rotary is not None
    cache = model.new_cache()
    tokens = list(range(3, 203))
    model.forward(tokens, cache)
    prompt = tokens[:20] + tokens[80:180] + [5, 6, 7]
    plan = plan_shift(np.array(tokens), np.array(prompt), len(prompt) - 2)
    host = ContextShifter(model.rotary, "cuda").shifted_copy(cache, plan, prompt)
    graphs = ShiftGraphs(model.rotary, model.kv_shape[1], np.dtype(model.kv_shape[2]), "cuda", model.helpers)
    device = ContextShifter(model.rotary, "cuda", graphs).shifted_copy(cache, plan, prompt)
    for got, want in zip(device.tensors, host.tensors):
        assert got.device_name().lower() == "cuda"
        np.testing.assert_allclose(got.numpy().astype(np.float32), want.numpy().astype(np.float32), atol=2e-3)
