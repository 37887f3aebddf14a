"""Context shifting: a cached sequence with spans dropped is moved into place instead of prefilled.

Exactness: in a one-layer model a token's key and value depend only on the token and its
position, so after a shift the cache and the next logits must equal a fresh prefill's (this
checks each family's rotary: base, scaling, partial rotary, sliding layers' own base, the GGUF
pair layout). In deeper layers the kept tokens' keys still carry what they saw of the dropped
text (as in llama.cpp's K-shift), so there only layer 0 is exact.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from kobold_api.engine.context_shift import MIN_RUN, ContextShifter, Segment, plan_shift
from kobold_api.engine.decode_batch import ConcatBatch, SlotBatch
from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.prefix_cache import PrefixCache
from kobold_api.engine.prepare import prepare_model
from kobold_api.engine.sampling import SamplingParams

from model_probe import ModelProbe, submit_together
from tiny_gguf import write_gguf
from tiny_model import FAMILIES, build_tiny_hf_model

RNG = np.random.default_rng(7)


def _tokens(count: int, vocab: int = 250) -> list[int]:
    return [int(t) for t in RNG.integers(3, vocab, count)]


CARD, OLD, KEPT, NEW = _tokens(24), _tokens(40), _tokens(60), _tokens(6)


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------
def test_plan_keeps_the_prefix_and_the_run_after_a_dropped_span() -> None:
    cached, prompt = np.array(CARD + OLD + KEPT), np.array(CARD + KEPT + NEW)
    plan = plan_shift(cached, prompt, len(prompt) - 2)
    assert plan.segments == (Segment(0, 0, len(CARD)), Segment(len(CARD) + len(OLD), len(CARD), len(KEPT)))
    assert plan.reused == len(CARD) + len(KEPT) and plan.moves and plan.moved_tokens == len(KEPT)


def test_plan_with_two_dropped_spans_and_none() -> None:
    first, second = KEPT[:30], KEPT[30:]
    cached = np.array(CARD + OLD[:20] + first + OLD[20:] + second)
    prompt = np.array(CARD + first + second + NEW)
    plan = plan_shift(cached, prompt, len(prompt) - 2)
    assert [s.length for s in plan.segments] == [len(CARD), 30, 30]
    assert plan.reused == len(CARD) + len(KEPT)
    # Nothing dropped: the prefix alone, nothing moves.
    same = plan_shift(np.array(CARD + KEPT), np.array(CARD + KEPT + NEW), len(CARD + KEPT + NEW) - 2)
    assert not same.moves and same.reused == len(CARD + KEPT)
    # A run shorter than MIN_RUN is not worth a shift; the limit caps what is reused.
    short = plan_shift(np.array(CARD + OLD + KEPT[:MIN_RUN - 1]), np.array(CARD + KEPT[:MIN_RUN - 1] + NEW), 100)
    assert not short.moves
    # Ten tokens of room after the card: too few for a run, so only the prefix is kept.
    capped = plan_shift(cached, prompt, len(CARD) + 10)
    assert capped.segments == (Segment(0, 0, len(CARD)),) and capped.reused == len(CARD) and not capped.moves
    # Twenty: the run after the first dropped span is kept up to the limit, not to its end.
    capped = plan_shift(cached, prompt, len(CARD) + 20)
    assert capped.segments == (Segment(0, 0, len(CARD)), Segment(len(CARD) + 20, len(CARD), 20))
    assert capped.reused == len(CARD) + 20 and capped.moved_tokens == 20
    # An over-long prompt cut from the start (no shared prefix at all) still finds its run.
    cut = plan_shift(np.array(OLD + KEPT), np.array(KEPT[10:] + NEW), 200)
    assert cut.segments == (Segment(len(OLD) + 10, 0, len(KEPT) - 10),)


# --------------------------------------------------------------------------------------
# Exactness per family
# --------------------------------------------------------------------------------------
def _shift_and_compare(model_dir: Path) -> tuple[float, float, float]:
    """(max relative error of layer-0 keys, of layer-0 values, of the next logits) between a
    shifted cache and a fresh prefill of the same prompt."""
    model = OnnxCausalLM(model_dir, "cpu", cpu_threads=2)
    assert model.rotary is not None
    vocab = model.vocab_size
    card, old, kept, new = ([t % vocab for t in part] for part in (CARD, OLD, KEPT, NEW))
    cache = model.new_cache()
    model.forward(card + old + kept, cache)
    prompt = card + kept + new
    plan = plan_shift(np.array(cache.token_ids), np.array(prompt), len(prompt) - 2)
    assert plan.moves and plan.reused == len(card + kept)
    shifted = ContextShifter(model.rotary, "cpu").shifted_copy(cache, plan, prompt)
    fresh = model.new_cache()
    model.forward(prompt[:plan.reused], fresh)

    def error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    keys = error(shifted.tensors[0].numpy(), fresh.tensors[0].numpy())
    values = error(shifted.tensors[1].numpy(), fresh.tensors[1].numpy())
    after_shift = model.forward(prompt[plan.reused:], shifted)
    reference = model.forward(prompt[plan.reused:], fresh)
    return keys, values, error(after_shift, reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_layer_shift_equals_a_fresh_prefill(family: str, tmp_path: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family=family, layers=1,
                                 **({"layer_types": ["full_attention"]} if family == "gemma3" else {}))
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache", progress=lambda _: None, quant="fp32")
    keys, values, logits = _shift_and_compare(model_dir)
    assert keys < 1e-5 and values < 1e-6 and logits < 1e-5, (keys, values, logits)


def test_sliding_layers_shift_with_their_own_base(tmp_path: Path) -> None:
    # Gemma 3's sliding layers rotate with rope_local_base_freq, unscaled; its global ones use the
    # model's base with linear scaling (the family's test above).
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family="gemma3", layers=1, layer_types=["sliding_attention"])
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache", progress=lambda _: None, quant="fp32")
    assert max(_shift_and_compare(model_dir)) < 1e-5


def test_gguf_pair_layout_shifts_exactly(tmp_path: Path) -> None:
    # llama.cpp's converter makes rotary pairs adjacent (interleaved); the shift follows the manifest.
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family="llama", layers=1, merges=4)
    gguf_path = write_gguf(hf_dir, tmp_path / "llama.gguf", "F32", "llama")
    model_dir = prepare_model(str(gguf_path), "cpu", tmp_path / "cache", progress=lambda _: None, quant="fp32")
    assert OnnxCausalLM(model_dir, "cpu", cpu_threads=2).rotary.interleaved  # type: ignore[union-attr]
    assert max(_shift_and_compare(model_dir)) < 1e-5


def test_quantized_build_shifts_within_the_kernels_tolerance(tmp_path: Path) -> None:
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family="llama", layers=1)
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache", progress=lambda _: None, quant="int4")
    keys, values, logits = _shift_and_compare(model_dir)
    assert keys < 1e-4 and values < 1e-4 and logits < 1e-3, (keys, values, logits)


def test_deeper_layers_keep_a_trace_of_the_dropped_text(tmp_path: Path) -> None:
    """Layer 0 is exact in a two-layer model too; the logits move, but stay close (what the
    README says a shift costs in quality)."""
    hf_dir = build_tiny_hf_model(tmp_path / "hf", family="llama", layers=2)
    model_dir = prepare_model(str(hf_dir), "cpu", tmp_path / "cache", progress=lambda _: None, quant="fp32")
    keys, values, logits = _shift_and_compare(model_dir)
    assert keys < 1e-5 and values < 1e-6
    assert 1e-4 < logits < 0.5, logits


# --------------------------------------------------------------------------------------
# In the engine: both batch layouts, the pool, batching, the fallback
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one-layer")
    hf_dir = build_tiny_hf_model(root / "hf", layers=1)
    return prepare_model(str(hf_dir), "cpu", root / "cache", progress=lambda _: None, quant="fp32")


GREEDY = SamplingParams(temperature=0.0)


def _request(ids: list[int], **kwargs: Any) -> GenerationRequest:
    defaults: dict[str, Any] = dict(prompt_ids=ids, max_new_tokens=6, max_context_length=4096, sampling=GREEDY,
                                    ban_eos=True)
    return GenerationRequest(**{**defaults, **kwargs})


def _engine(model_dir: Path, **kwargs: Any) -> Engine:
    kwargs.setdefault("max_batch_size", 1)
    return Engine.load(str(model_dir), "cpu", model_dir.parent, cpu_threads=2, **kwargs)


def _generate(engine: Engine, ids: list[int], **kwargs: Any) -> Any:
    return engine.submit(_request(ids, **kwargs)).wait()


def test_engine_shifts_a_full_window_chat_and_answers_as_a_fresh_prefill(one_layer_model: Path) -> None:
    shifting, plain = _engine(one_layer_model), _engine(one_layer_model, prefix_cache_mb=0)
    try:
        assert _generate(shifting, CARD + OLD + KEPT).reused_tokens == 0
        follow_up = CARD + OLD[20:] + KEPT + NEW  # the oldest 20 tokens after the card dropped
        shifted = _generate(shifting, follow_up)
        assert shifted.reused_tokens == len(follow_up) - len(NEW), shifted.reused_tokens
        shifter = shifting.generator.prefix_cache.shifter  # type: ignore[union-attr]
        assert shifter is not None and shifter.shifts == 1 and shifter.moved_tokens == len(OLD) - 20 + len(KEPT)
        assert shifted.text == _generate(plain, follow_up).text
        # Dropping more the turn after: shifted again, from the previous turn's cache.
        again = CARD + OLD[35:] + KEPT + NEW + NEW
        result = _generate(shifting, again)
        assert result.reused_tokens == len(again) - len(NEW) and shifter.shifts == 2
        assert result.text == _generate(plain, again).text
    finally:
        shifting.shutdown()
        plain.shutdown()


def test_context_shift_can_be_turned_off(one_layer_model: Path) -> None:
    engine = _engine(one_layer_model, context_shift=False)
    try:
        _generate(engine, CARD + OLD + KEPT)
        assert _generate(engine, CARD + KEPT + NEW).reused_tokens == len(CARD)  # the prefix only
    finally:
        engine.shutdown()


def test_concat_layout_shifts_a_pooled_copy(one_layer_model: Path) -> None:
    """The device layout (ConcatBatch, CUDA's) hands back plain tensors: the pool shifts a copy
    and keeps its entry for other prompts."""
    model = OnnxCausalLM(one_layer_model, "cpu", cpu_threads=2)
    pool = PrefixCache(2**28, shifter=ContextShifter(model.rotary, model.device))  # type: ignore[arg-type]
    batch = ConcatBatch(model)
    batch.admit(CARD + OLD + KEPT, None, 0)
    pool.put(batch.release(0))
    prompt = CARD + KEPT + NEW
    cached, reuse = pool.take(prompt)
    assert cached is not None and reuse == len(CARD + KEPT) and cached.length == reuse and len(pool) == 1
    fresh_batch = ConcatBatch(model)
    shifted_logits = ConcatBatch(model).admit(prompt, cached, reuse)
    fresh_logits = fresh_batch.admit(prompt, None, 0)
    assert np.abs(shifted_logits - fresh_logits).max() / np.abs(fresh_logits).max() < 1e-5
    # The shared-buffer layout adopts a shifted arena in place.
    shared = SlotBatch(model)
    shared.admit(CARD + OLD + KEPT, None, 0)
    pool.clear()
    pool.put(shared.release(0))
    cached, reuse = pool.take(prompt)
    assert cached is not None and cached.arena is not None and len(pool) == 0
    logits = SlotBatch(model).admit(prompt, cached, reuse)
    assert np.abs(logits - fresh_logits).max() / np.abs(fresh_logits).max() < 1e-5


def test_shift_while_other_rows_decode(one_layer_model: Path) -> None:
    """A shifted follow-up admitted into a busy batch answers as it does alone."""
    engine, plain = _engine(one_layer_model, max_batch_size=4), _engine(one_layer_model, prefix_cache_mb=0)
    try:
        _generate(engine, CARD + OLD + KEPT)
        follow_up = CARD + KEPT + NEW
        others = [_tokens(30) for _ in range(3)]
        order = [others[0], follow_up, *others[1:]]  # another row is running when the follow-up comes in
        with ModelProbe(engine) as probe:
            jobs: list[Any] = []
            submit_together(probe, lambda: jobs.append(engine.submit(_request(order[0], max_new_tokens=24))),
                            [lambda ids=ids: jobs.append(engine.submit(_request(ids, max_new_tokens=24)))
                             for ids in order[1:]])
            results = [job.wait() for job in jobs]
            assert probe.max_rows == 4  # all four decoded together
        assert results[1].reused_tokens == len(CARD) + len(KEPT)
        for index, ids in enumerate(order):
            assert results[index].text == _generate(plain, ids, max_new_tokens=24).text, index
    finally:
        engine.shutdown()
        plain.shutdown()


def test_graphs_without_rotary_contract_are_not_shifted(one_layer_model: Path, tmp_path: Path) -> None:
    import json
    import shutil

    copy = tmp_path / "no-rotary"
    shutil.copytree(one_layer_model, copy)
    manifest_path = next(copy.glob("kobold_api_model.json"))
    manifest = json.loads(manifest_path.read_text())
    del manifest["rotary"]
    manifest_path.write_text(json.dumps(manifest))
    model = OnnxCausalLM(copy, "cpu", cpu_threads=2)
    assert model.rotary is None
    engine = _engine(copy)
    try:
        assert engine.generator.prefix_cache is not None and engine.generator.prefix_cache.shifter is None
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# Over HTTP: the server's cut of an over-long prompt
# --------------------------------------------------------------------------------------
def test_server_cut_of_an_over_long_prompt_is_shifted(start_server: Callable[..., Any], one_layer_model: Path,
                                                      test_settings: Any) -> None:
    engine = _engine(one_layer_model)
    server = start_server(engine, replace(test_settings, context_size=4096))
    text = " ".join(f"word{i}" for i in range(400))
    body = {"max_length": 4, "max_context_length": 512, "temperature": 0, "top_k": 0, "ban_eos_token": True}
    first = server.post("/api/v1/generate", json={**body, "prompt": text})
    assert first.status_code == 200
    # The next turn adds text at the end: the cut lands later, so no prefix is shared.
    second = server.post("/api/v1/generate", json={**body, "prompt": text + " and then some more words arrived"})
    assert second.status_code == 200
    perf = server.get("/api/extra/perf").json()
    assert perf["last_reused_count"] > 400, perf
    engine.shutdown()


def test_stored_chat_drops_turns_in_blocks_and_reuses_its_start(start_server: Callable[..., Any],
                                                                one_layer_model: Path, test_settings: Any) -> None:
    engine = _engine(one_layer_model)
    server = start_server(engine, test_settings)
    conversation = server.post("/api/v1/conversations", json={"character": "Assistant"}).json()["result"]["id"]
    dropped, reused = [], []
    for turn in range(24):
        response = server.post("/api/v1/chat", json={
            "conversation_id": conversation, "user_input": f"Turn {turn}: tell me more about the harbour.",
            "max_new_tokens": 12, "max_context_length": 1000, "temperature": 0, "ban_eos_token": True})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        dropped.append(result["dropped_turns"])
        reused.append(server.get("/api/extra/perf").json()["last_reused_count"])
    full = [i for i, d in enumerate(dropped) if d > 0]
    assert len(full) >= 8, dropped  # the window filled
    assert len({dropped[i] for i in full}) <= len(full) // 2, dropped  # blocks, not one turn at a time
    # A turn that keeps the previous start reuses all but the new message.
    kept_start = [i for i in full[1:] if dropped[i] == dropped[i - 1]]
    assert kept_start and all(reused[i] > 500 for i in kept_start), (dropped, reused)
    engine.shutdown()


@pytest.mark.parametrize("interleaved, rotary_dim, dtype", [(False, 64, np.float32), (True, 64, np.float32),
                                                            (False, 32, np.float16), (True, 48, np.float16)])
def test_the_device_shift_is_the_host_shift_bit_for_bit(interleaved: bool, rotary_dim: int, dtype: type) -> None:
    """The gather-and-rotate graphs (device slots' shift, run here on the CPU provider) give the
    host shift's exact keys and values: every rotary layout (halves or interleaved pairs, partial
    rotary), fp32 and fp16 caches, layers with their own frequencies."""
    from kobold_api.engine.onnx_model import KVCache
    from kobold_api.engine.rotary import RotaryLayout
    from kobold_api.engine.shift_graph import ShiftGraphs
    from kobold_api.engine.small_graphs import HelperSessions

    import onnxruntime as ort

    rng = np.random.default_rng(rotary_dim)
    half = rotary_dim // 2
    base = 1.0 / (10000.0 ** (np.arange(half) / half))
    rotary = RotaryLayout(rotary_dim, interleaved, (base, base, base * 0.25))  # the last layer: its own base
    tokens = [int(t) for t in rng.integers(3, 500, 300)]
    cache = KVCache([ort.OrtValue.ortvalue_from_numpy(rng.normal(0, 1, (1, 2, 300, 64)).astype(dtype))
                     for _ in range(6)], tokens)
    prompt = tokens[:40] + tokens[100:220] + tokens[250:290] + [1, 2, 3]
    plan = plan_shift(np.array(tokens), np.array(prompt), len(prompt) - 2)
    assert plan.moves and plan.reused == 200
    host = ContextShifter(rotary, "cpu").shifted_copy(cache, plan, prompt)
    graphs = ShiftGraphs(rotary, 64, np.dtype(dtype), "cpu", HelperSessions(["CPUExecutionProvider"]))
    device = ContextShifter(rotary, "cpu", graphs).shifted_copy(cache, plan, prompt)
    assert device.token_ids == host.token_ids == prompt[:200]
    for got, want in zip(device.tensors, host.tensors):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
