"""Fixed key/value slots (the batch layout the GPU needs, checked here on the CPU provider).

Logits must be bit-identical to the concatenating layout (the CUDA path today) through joins,
leaves, cuts and context shifts; a step after warm-up must create no IO binding and no OrtValue;
padding a step up to a bucket must leave the live rows' logits unchanged; a row is refused
before it writes past its slot; and a slot never holds a live row and a pooled cache at once.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
import pytest

from kobold_api.engine.context_shift import ContextShifter
from kobold_api.engine.decode_batch import ConcatBatch, SlotBatch
from kobold_api.engine.kv_slots import _PAGE, MIN_SLOT_TOKENS, HostSlots, KVSlots, SlotOverflow, plan_slots
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.prefix_cache import PrefixCache
from kobold_api.engine.sampling.candidates import Candidates, RowLogits

pytestmark = pytest.mark.fast


@pytest.fixture(params=["host", "device"])
def memory(request: pytest.FixtureRequest) -> str:
    """Both kinds of slot memory: host (mmap) and device (ORT-allocated, copies as graphs; the
    CUDA layout, run here on the CPU provider)."""
    return request.param


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> OnnxCausalLM:
    return OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(length)]


def test_slots_match_the_concatenating_layout_bit_for_bit(model: OnnxCausalLM, memory: str) -> None:
    """Random joins (fresh and from a released row's cache), leaves, cuts (a phrase ban's
    rewind) and steps, on both layouts side by side: every logit is the same float."""
    rng = random.Random(29)
    slots, concat = SlotBatch(model, 4, memory=memory), ConcatBatch(model)
    released = []
    for _ in range(3):
        prompt = _prompt(rng, rng.randrange(2, 90))
        np.testing.assert_array_equal(slots.admit(prompt, None, 0), concat.admit(prompt, None, 0))
    joins = leaves = cuts = 0
    for step in range(120):
        action = rng.random()
        if action < 0.08 and slots.size < 4:
            if released and rng.random() < 0.5:  # a follow-up that continues a cache that left
                one, other = released.pop()
                prompt = one.token_ids + _prompt(rng, rng.randrange(1, 6))
                got, want = slots.admit(prompt, one, one.length), concat.admit(prompt, other, other.length)
            else:
                prompt = _prompt(rng, rng.randrange(2, 70))
                got, want = slots.admit(prompt, None, 0), concat.admit(prompt, None, 0)
            np.testing.assert_array_equal(got, want)
            joins += 1
        elif action < 0.14 and slots.size > 1:
            row = rng.randrange(slots.size)
            one, other = slots.release(row), concat.release(row)
            assert one.token_ids == other.token_ids
            np.testing.assert_array_equal(one.tensors[0].numpy()[:, :, :one.length],
                                          other.tensors[0].numpy())
            released.append((one, other))
            leaves += 1
        elif action < 0.2:
            row = rng.randrange(slots.size)
            keep = max(1, len(slots.token_ids[row]) - rng.randrange(1, 4))
            slots.truncate(row, keep)
            concat.truncate(row, keep)
            cuts += 1
        tokens = [rng.randrange(3, 250) for _ in range(slots.size)]
        np.testing.assert_array_equal(slots.step(tokens), concat.step(tokens))
        assert slots.token_ids == concat.token_ids
    assert joins and leaves and cuts


def test_a_shifted_follow_up_matches_the_concatenating_layout(model: OnnxCausalLM, memory: str) -> None:
    """Context shift: host slots shift the parked slot in place, device slots a device copy
    (the gather-and-rotate graphs), the concatenating layout a pooled copy on the host; the
    follow-up's logits are the same floats every way."""
    from kobold_api.engine.shift_graph import ShiftGraphs

    rng = random.Random(5)
    card, old, kept, new = (_prompt(rng, n) for n in (40, 60, 80, 12))
    logits = []
    assert model.rotary is not None
    heads, dim, dtype = model.kv_shape
    graphs = ShiftGraphs(model.rotary, dim, np.dtype(dtype), model.device, model.helpers)
    for batch in (SlotBatch(model, 2, memory=memory), ConcatBatch(model)):
        on_device = isinstance(batch, SlotBatch) and memory == "device"
        pool = PrefixCache(2**28, shifter=ContextShifter(model.rotary, model.device, graphs if on_device else None))
        batch.admit(card + old + kept, None, 0)
        pool.put(batch.release(0))
        cached, reuse = pool.take(card + kept + new)
        assert cached is not None and reuse == len(card + kept)
        logits.append(batch.admit(card + kept + new, cached, reuse))
        logits.append(batch.step([7])[0].copy())
    np.testing.assert_array_equal(logits[0], logits[2])
    np.testing.assert_array_equal(logits[1], logits[3])


class _Counts:
    """Counts every OrtValue and IO binding made, and everything bound, through ORT's Python API."""

    NAMES = {
        ort.OrtValue: ("ortvalue_from_numpy", "ortvalue_from_shape_and_type"),
        ort.InferenceSession: ("io_binding",),
        ort.IOBinding: ("bind_cpu_input", "bind_input", "bind_output", "bind_ortvalue_input",
                        "bind_ortvalue_output"),
    }

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for owner, names in self.NAMES.items():
            for name in names:
                original = getattr(owner, name)
                static = isinstance(owner.__dict__.get(name), staticmethod)
                monkeypatch.setattr(owner, name, self._wrap(name, original, static))

    def _wrap(self, name: str, original: Any, static: bool) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(*args, **kwargs)

        return staticmethod(counted) if static else counted


def test_steps_after_warm_up_create_no_binding_and_no_ortvalue(model: OnnxCausalLM, memory: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    batch = SlotBatch(model, 4, memory=memory)
    for length in (30, 5, 61):
        batch.admit(_prompt(rng, length), None, 0)
    batch.step([9, 9, 9])  # warm-up: the three-row bucket is bound
    batch.step_rows([9, 9, 9])  # and, on the device, its top-candidate reduction
    counts = _Counts(monkeypatch)
    seen = []
    for index in range(40):
        tokens = [rng.randrange(3, 250) for _ in range(3)]
        if memory == "device" and index % 2:  # the engine's steps: top candidates, whole rows on demand
            rows = batch.step_rows(tokens)
            assert all(isinstance(row, RowLogits) for row in rows)
            for row in rows:
                want = Candidates.of(row.full(), row.candidates.ids.size)
                np.testing.assert_array_equal(row.candidates.values, want.values)
                assert row.candidates.lse == pytest.approx(want.lse, rel=1e-6)
            seen.append(np.stack([row.full() for row in rows]))
        else:
            seen.append(batch.step(tokens).copy())
    assert not counts.calls, counts.calls
    assert len({row.tobytes() for step in seen for row in step}) == 120  # the steps really ran
    # The counter sees what the concatenating layout does per step (it would catch a regression).
    concat = ConcatBatch(model)
    concat.admit(_prompt(rng, 10), None, 0)
    concat.step([5])
    assert counts.calls["io_binding"] == 2 and counts.calls["bind_output"] >= 2  # its prefill and step


def test_rows_padded_up_to_a_bucket_leave_live_rows_unchanged(model: OnnxCausalLM, memory: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 3 and 5 rows run as buckets of 4 and 8 (free slots fed a dummy token): the live
    rows' logits are those of unpadded steps, bit for bit."""
    rng = random.Random(11)
    padded, exact = SlotBatch(model, 8, buckets=[1, 2, 4, 8], memory=memory), SlotBatch(model, 8, memory=memory)
    assert padded.buckets == [1, 2, 4, 8] and exact.buckets == list(range(1, 9))
    rows_run: list[int] = []
    original = model.run_shared
    monkeypatch.setattr(model, "run_shared",
                        lambda binding, rows, tokens, **options: (rows_run.append(rows),
                                                                  original(binding, rows, tokens, **options)))
    for joined in (3, 2):
        for _ in range(joined):
            prompt = _prompt(rng, rng.randrange(2, 50))
            np.testing.assert_array_equal(padded.admit(prompt, None, 0), exact.admit(prompt, None, 0))
        for _ in range(6):
            tokens = [rng.randrange(3, 250) for _ in range(padded.size)]
            np.testing.assert_array_equal(padded.step(tokens), exact.step(tokens))
    assert 4 in rows_run and 8 in rows_run  # the padded batch really ran 4- and 8-row buckets
    assert 3 in rows_run and 5 in rows_run


def test_a_row_is_refused_before_it_writes_past_its_slot(model: OnnxCausalLM, memory: str) -> None:
    rng = random.Random(2)
    batch = SlotBatch(model, 2, capacity=64, memory=memory)
    with pytest.raises(SlotOverflow):
        batch.admit(_prompt(rng, 65), None, 0)
    batch.admit(_prompt(rng, 62), None, 0)
    batch.admit(_prompt(rng, 10), None, 0)
    batch.step([5, 6])
    batch.step([5, 6])  # row 0 now holds 64 positions: its slot is full
    def contents() -> list[np.ndarray]:
        return [value.numpy().copy() for slot, length in ((0, 64), (1, 13)) for value in batch.slots.read(slot, length)]

    before = contents()
    ids_before = [list(ids) for ids in batch.token_ids]
    with pytest.raises(SlotOverflow):
        batch.step([7, 8])
    assert batch.token_ids == ids_before
    assert all(np.array_equal(old, new) for old, new in zip(before, contents()))


def test_another_chat_leaves_parked_host_slots_alone_and_the_next_turn_takes_them_back(model: OnnxCausalLM) -> None:
    """The last row's keys stay parked in their slot for the pool, and the batch goes on in
    fresh slots: a different prompt in between copies nothing out, and the chat's next turn
    takes the parked slots back (no copy either), with a fresh prefill's logits."""
    rng = random.Random(8)
    pool = PrefixCache(2**28)
    batch = SlotBatch(model, 2)
    first = _prompt(rng, 70)
    batch.admit(first, None, 0)
    parked = batch.release(0)
    pool.put(parked)
    home = parked.home
    assert home is not None and home is not batch.slots and home.is_parked(parked)
    assert np.shares_memory(parked.arena[0], home.buffers[0])
    batch.admit(_prompt(rng, 40), None, 0)  # another chat: in the batch's fresh slots
    batch.step([4])
    assert parked.home is home and home.is_parked(parked)  # nothing copied out
    other = batch.release(0)
    pool.put(other)
    cached, reuse = pool.take(first + [5, 6])
    assert cached is parked and reuse == len(first)
    continued = batch.admit(first + [5, 6], cached, reuse)
    assert batch.slots is home and not home.is_parked(parked)  # taken back whole
    np.testing.assert_array_equal(continued, SlotBatch(model).admit(first + [5, 6], None, 0))
    assert other.home is not None and other.home.is_parked(other)  # the other chat's keys stay parked


def _live_or_pooled(batches: list[SlotBatch], pool: PrefixCache) -> Iterator[tuple[KVSlots, int]]:
    for batch in batches:
        for slot in range(batch.size):
            yield batch.slots, slot
    for entry in pool._entries.values():
        if entry.cache.home is not None:
            yield entry.cache.home, 0


def test_no_slot_is_both_live_and_pooled_while_an_engine_serves(model: OnnxCausalLM, memory: str) -> None:
    """Random admissions (reusing pooled prefixes when they match) and releases on two batches
    sharing one pool: after every operation each slot is held by one owner at most."""
    rng = random.Random(13)
    pool = PrefixCache(2**28)
    batches = [SlotBatch(model, 3, memory=memory), SlotBatch(model, 3, memory=memory)]
    histories = [_prompt(rng, 40) for _ in range(3)]
    for _ in range(80):
        batch = rng.choice(batches)
        if batch.size and (batch.size == 3 or rng.random() < 0.45):
            pool.put(batch.release(rng.randrange(batch.size)))
        else:
            prompt = rng.choice(histories) + _prompt(rng, rng.randrange(3, 12))
            cached, reuse = pool.take(prompt)
            batch.admit(prompt, cached, reuse)
        owners = list(_live_or_pooled(batches, pool))
        assert len(owners) == len({(id(slots), slot) for slots, slot in owners})


def test_forgotten_pages_are_zero_and_the_kept_positions_stay() -> None:
    slots = HostSlots(tensors=2, slots=2, heads=2, capacity=4096, dim=16, dtype=np.float32)
    for buffer in slots.buffers:
        buffer[:] = 1.0
    slots.forget(1, keep=100)
    for buffer in slots.buffers:
        assert (buffer[0] == 1).all() and (buffer[1, :, :100] == 1).all()
        first_free_page = -(-100 * 16 * 4 // _PAGE) * _PAGE // (16 * 4)
        assert (buffer[1, :, first_free_page:] == 0).all()
    assert slots.held_bytes(100) == 2 * 2 * -(-100 * 16 * 4 // _PAGE) * _PAGE


def test_slot_plan_fits_the_budget() -> None:
    per_token = 1000
    assert plan_slots(per_token, 8, 2048, 0 + 8 * 2048 * per_token) == (8, 2048)
    assert plan_slots(per_token, 8, 2048, 3 * 2048 * per_token + 5) == (3, 2048)  # fewer rows first
    assert plan_slots(per_token, 8, 2048, 1024 * per_token) == (1, 1024)  # then a shorter context
    assert plan_slots(per_token, 8, 2048, 10 * per_token) == (1, MIN_SLOT_TOKENS)


def test_the_kv_budget_sets_the_engine_rows_and_context(tiny_model_dir: Path) -> None:
    from conftest import make_engine

    probe = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    slot = probe.kv_bytes_per_token * 512
    engine = make_engine(tiny_model_dir, max_batch_size=8, context_size=512,
                         kv_cache_mb=-(-3 * slot // 2**20))
    try:
        rows = min(8, (-(-3 * slot // 2**20) * 2**20) // slot)
        assert engine.context_length == 512 and engine.max_batch_size == rows < 8
    finally:
        engine.shutdown()


def test_a_cuda_graph_is_never_run_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA is listed but unusable (a broken install): the graph built for CUDA is refused on the
    CPU provider, and the engine prepares and opens a CPU graph instead."""
    from tiny_model import build_tiny_hf_model

    from kobold_api.engine import engine as engine_module
    from kobold_api.engine.onnx_model import WrongDevice
    from kobold_api.engine.prepare import prepare_model, read_manifest

    hf_dir = build_tiny_hf_model(tmp_path / "hf", layers=1)
    cuda_dir = prepare_model(str(hf_dir), "cuda", tmp_path / "cache", progress=lambda _: None, quant="fp16")
    assert read_manifest(cuda_dir)["device"] == "cuda"
    with pytest.raises(WrongDevice):
        OnnxCausalLM(cuda_dir, "cpu", cpu_threads=2)
    monkeypatch.setattr(engine_module, "resolved_device", lambda requested: "cuda")
    engine = engine_module.Engine.load(str(hf_dir), "cuda", tmp_path / "cache", cpu_threads=2, quant="fp16",
                                       max_batch_size=1)
    try:
        model = engine.generator.model
        assert model.provider == "cpu" and read_manifest(model.model_dir)["device"] == "cpu"
        assert model.model_dir != cuda_dir
    finally:
        engine.shutdown()


def test_a_batch_never_takes_over_the_slots_of_a_batch_still_in_use(model: OnnxCausalLM, memory: str) -> None:
    """Batch A parks a row; batch B (same shape, A still alive) continues that cache: B copies
    the keys instead of taking A's slots over, so A's next row cannot overwrite B's."""
    rng = random.Random(21)
    pool = PrefixCache(2**28)
    first, second = SlotBatch(model, 2, memory=memory), SlotBatch(model, 2, memory=memory)
    history = _prompt(rng, 50)
    first.admit(history, None, 0)
    first_slots = first.slots
    pool.put(first.release(0))
    cached, reuse = pool.take(history + [6, 7])
    assert cached is not None and cached.home is first_slots
    got = second.admit(history + [6, 7], cached, reuse)
    assert second.slots is not first_slots
    first._adopt(first_slots)  # A's slots with the parked row again (as its next turn would take them)
    first.admit(_prompt(rng, 60), None, 0)  # another prompt writes their slot 0
    reference = SlotBatch(model, memory=memory)
    np.testing.assert_array_equal(got, reference.admit(history + [6, 7], None, 0))
    np.testing.assert_array_equal(second.step([9])[0], reference.step([9])[0])
    # Once A is gone, a batch of its shape may take its parked slots over (a one-off batch per
    # request: TextGenerator.stream).
    parked = first.release(0)
    slots = parked.home
    del first
    third = SlotBatch(model, 2, memory=memory)
    third.admit(parked.token_ids + [3, 4], parked, parked.length)
    assert third.slots is slots


def _fill(batch: SlotBatch, prompt: list[int], chunk: int, cached: Any = None, reuse: int = 0) -> tuple[np.ndarray, int]:
    batch.begin(prompt, cached, reuse)
    runs = 1
    while (logits := batch.fill(chunk)) is None:
        runs += 1
    return logits, runs


def test_a_prompt_filled_in_parts_between_padded_steps_matches_a_whole_prefill(model: OnnxCausalLM, memory: str) -> None:
    """A prompt run part by part (from a reused prefix too), with padded decode steps of the other
    rows between the parts and a row leaving meanwhile: the same logits as a whole prefill, and
    the other rows' logits are those of steps without it."""
    rng = random.Random(17)
    prompt = _prompt(rng, 230)
    whole = SlotBatch(model, 4, memory=memory).admit(prompt, None, 0)
    logits, runs = _fill(SlotBatch(model, 4, memory=memory), prompt, 50)
    assert runs == 5
    np.testing.assert_array_equal(logits, whole)
    donor = SlotBatch(model, 2, memory=memory)
    donor.admit(prompt[:90], None, 0)
    cached = donor.release(0)
    donor.admit(_prompt(rng, 10), None, 0)  # copies the parked keys out: a plain cache
    np.testing.assert_array_equal(_fill(SlotBatch(model, 4, memory=memory), prompt, 64, cached, 90)[0], whole)

    padded, plain = SlotBatch(model, 4, buckets=[1, 2, 4], memory=memory), SlotBatch(model, 4, memory=memory)
    others = [_prompt(rng, n) for n in (20, 33)]
    for other in others:
        padded.admit(other, None, 0)
        plain.admit(other, None, 0)
    padded.begin(prompt, None, 0)
    parts = 0
    while (logits := padded.fill(40)) is None:
        parts += 1
        tokens = [rng.randrange(3, 250) for _ in range(padded.size)]
        np.testing.assert_array_equal(padded.step(tokens), plain.step(tokens))  # a 4-row bucket: slots 2, 3 padded
        if parts == 2:  # a row leaves: the filling row moves down a slot
            padded.release(0)
            plain.release(0)
    np.testing.assert_array_equal(logits, whole)
    assert padded.size == 2 and padded.token_ids[-1] == prompt
    reference = SlotBatch(model, memory=memory)
    reference.admit(prompt, None, 0)
    np.testing.assert_array_equal(padded.step([5, 6])[1], reference.step([6])[0])


def test_an_abandoned_prompt_frees_its_slot(model: OnnxCausalLM, memory: str) -> None:
    rng = random.Random(4)
    batch = SlotBatch(model, 2, memory=memory)
    batch.begin(_prompt(rng, 100), None, 0)
    assert batch.fill(30) is None
    batch.abandon()
    assert batch.size == 0
    prompt = _prompt(rng, 40)
    np.testing.assert_array_equal(batch.admit(prompt, None, 0), SlotBatch(model, memory=memory).admit(prompt, None, 0))


def test_device_slots_park_a_copy_and_the_next_turn_takes_the_slot_back(model: OnnxCausalLM,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Device memory has no host views: a parked row leaves a device copy of its positions in
    its cache (what other batches and the pool read), and the chat's next turn takes the slot
    itself back without copying anything in."""
    from kobold_api.engine.kv_slots import DeviceSlots, _SlotCopies

    rng = random.Random(31)
    batch = SlotBatch(model, 2, memory="device")
    assert isinstance(batch.slots, DeviceSlots)
    first = _prompt(rng, 70)
    batch.admit(first, None, 0)
    parked = batch.release(0)
    heads, dim, _ = model.kv_shape
    assert parked.home is batch.slots and parked.arena is None and batch.slots.is_parked(parked)
    assert parked.tensors[0].shape() == [1, heads, 70, dim]
    assert parked.nbytes == model.num_kv_tensors * heads * 70 * dim * 4
    copies: list[str] = []
    for name in ("place", "place_from", "take"):
        original = getattr(_SlotCopies, name)
        monkeypatch.setattr(_SlotCopies, name, lambda self, *a, _o=original, _n=name: (copies.append(_n), _o(self, *a))[1])
    follow_up = first + [5, 6]
    logits = batch.admit(follow_up, parked, len(first))
    assert copies == [] and not batch.slots.is_parked(parked)
    np.testing.assert_array_equal(logits, SlotBatch(model).admit(follow_up, None, 0))
    # Another prompt in slot 0 detaches a parked cache; its copy still continues its own sequence.
    again = batch.release(0)
    batch.admit(_prompt(rng, 30), None, 0)
    assert again.home is None
    continued = SlotBatch(model, memory="device").admit(follow_up + [8, 9], again, len(follow_up))
    np.testing.assert_array_equal(continued, SlotBatch(model).admit(follow_up + [8, 9], None, 0))


def test_device_batches_open_their_helper_graphs_once_per_model(model: OnnxCausalLM) -> None:
    """Every batch on device slots needs the same slot-copy and top-k graphs: the model opens
    each once, and a second batch (a guided or streamed request's own) opens none."""
    rng = random.Random(5)
    first = SlotBatch(model, 2, memory="device")
    opened = len(model.helpers)
    assert opened >= 3  # take, place, top-k
    second = SlotBatch(model, 2, memory="device")
    assert len(model.helpers) == opened
    prompt = _prompt(rng, 40)
    expected = SlotBatch(model).admit(prompt, None, 0)
    np.testing.assert_array_equal(first.admit(prompt, None, 0), expected)
    np.testing.assert_array_equal(second.admit(prompt, None, 0), expected)
    assert len(model.helpers) == opened


def test_an_engine_on_device_slots_answers_as_on_host_slots(tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole engine (batching, a part-by-part prompt, the prefix pool, follow-ups) on the
    device layout, run on the CPU provider: the same texts as the host layout."""
    from conftest import make_engine

    from kobold_api.engine.generation import GenerationRequest
    from kobold_api.engine.sampling import SamplingParams

    history = [(5 * i) % 200 + 3 for i in range(120)]
    samplings = [SamplingParams(temperature=0.8, seed=1),  # top-p: the whole row
                 SamplingParams(temperature=0.8, top_k=40, rep_pen=1.1, seed=2),  # from the candidates
                 SamplingParams(temperature=0),  # greedy: from the candidates
                 SamplingParams(temperature=1.2, min_p=0.1, top_p=1.0, seed=4)]  # min-p: from the candidates
    requests = [GenerationRequest(prompt_ids=history + [7, i + 3], max_new_tokens=12, ban_eos=True,
                                  sampling=sampling) for i, sampling in enumerate(samplings)]
    requests.append(GenerationRequest(prompt_ids=history + [8], max_new_tokens=6, ban_eos=True, logprobs=2,
                                      sampling=SamplingParams(temperature=0)))  # logprobs: the whole row
    follow_up = GenerationRequest(prompt_ids=history + [7, 3, 9, 9], max_new_tokens=6, ban_eos=True,
                                  sampling=SamplingParams(temperature=0))

    def serve() -> tuple[list[str], int]:
        engine = make_engine(tiny_model_dir, max_batch_size=3, prefix_cache_mb=64, prefill_chunk=32)
        try:
            texts = [job.wait().text for job in [engine.submit(r) for r in requests]]
            result = engine.submit(follow_up).wait()
            return texts + [result.text], result.reused_tokens
        finally:
            engine.shutdown()

    from kobold_api.engine.kv_slots import DeviceSlots
    from kobold_api.engine.sampling import TokenSampler

    made: list[DeviceSlots] = []
    original = DeviceSlots.__init__
    monkeypatch.setattr(DeviceSlots, "__init__", lambda self, *args: (made.append(self), original(self, *args))[1])
    from_candidates: list[int] = []
    sample_top = TokenSampler.sample_top
    monkeypatch.setattr(TokenSampler, "sample_top", lambda self, *args: (
        lambda token: (from_candidates.append(token) if token is not None else None, token)[1])(sample_top(self, *args)))
    host = serve()
    assert not made and not from_candidates
    monkeypatch.setattr(OnnxCausalLM, "decode_layout", property(lambda self: "device-slots"))
    device = serve()
    assert device == host and host[1] > 0 and made  # the device layout really served
    # Three of the five requests sampled their steps from the top candidates (their first token
    # comes from the prompt's full row): most of their 36 decode steps.
    assert len(from_candidates) >= 24


def test_captured_graphs_get_one_id_per_bucket_and_prompts_run_eagerly(tiny_model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA graph plumbing, run on the CPU provider (which ignores the run option): with
    graphs on, batches pad to power-of-two buckets, each bucket's steps replay one graph id, and
    prompt runs never capture (-1)."""
    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    model.cuda_graphs = True  # as a CUDA session with enable_cuda_graph would have it
    runs: list[tuple[int, int, int]] = []
    original = model.run_shared
    monkeypatch.setattr(model, "run_shared", lambda binding, rows, tokens, graph=-1: (
        runs.append((rows, tokens, graph)), original(binding, rows, tokens, graph=graph))[1])
    from kobold_api.engine.decode_batch import new_decode_batch

    batch = new_decode_batch(model, 8, 256)
    assert isinstance(batch, SlotBatch) and batch.buckets == [1, 2, 4, 8]
    rng = random.Random(1)
    for joined in range(5):
        batch.admit(_prompt(rng, 6 + joined), None, 0)
        batch.step([rng.randrange(3, 250) for _ in range(batch.size)])
    prompts = [graph for rows, tokens, graph in runs if tokens > 1]
    steps = {(rows, graph) for rows, tokens, graph in runs if tokens == 1}
    assert prompts == [-1] * 5
    assert steps == {(1, 0), (2, 1), (4, 2), (8, 3)}  # 3 rows ran as 4, 5 as 8


def test_device_slots_start_cleared() -> None:
    """A fresh device allocation holds whatever bytes were there (NaNs too): the slots are
    cleared once, so nothing past a row's keys can poison a kernel that reads a whole slot."""
    from kobold_api.engine.kv_slots import DeviceSlots
    from kobold_api.engine.small_graphs import HelperSessions

    slots = DeviceSlots(2, 3, 2, 128, 16, np.float32, "cpu", HelperSessions(["CPUExecutionProvider"]))
    for slot in range(3):
        assert all(not value.numpy().any() for value in slots.read(slot, 128))


def test_a_process_on_device_slots_exits_cleanly_after_shutdown(tiny_model_dir: Path) -> None:
    """Shutdown waits for the worker, so the device buffers and helper sessions it holds are
    released before the interpreter exits (it aborted before: "terminate called without an
    active exception")."""
    import subprocess
    import sys

    script = f"""
from pathlib import Path
from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.sampling import SamplingParams
OnnxCausalLM.decode_layout = property(lambda self: "device-slots")
engine = Engine.load({str(tiny_model_dir)!r}, "cpu", Path({str(tiny_model_dir.parent)!r}), cpu_threads=2,
                     max_batch_size=2, prefix_cache_mb=16)
print(engine.submit(GenerationRequest(prompt="hi", max_new_tokens=3, sampling=SamplingParams(temperature=0))).wait().completion_tokens)
engine.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]
    assert "terminate called" not in done.stderr
