"""The generation loop on a tiny random model: stopping, truncation, seeds, streaming, cancel."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kobold_api.engine.engine import Engine, QueueFullError
from kobold_api.engine.generation import (
    STOP_ABORT, STOP_EOS, STOP_LENGTH, STOP_STRING, CancelToken, GenerationRequest, TextGenerator,
)
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.prefix_cache import RECOMPUTED_TOKENS, PrefixCache
from kobold_api.engine.sampling import SamplingParams
from kobold_api.engine.tokenizer import IncrementalDecoder, Tokenizer

from model_probe import ModelProbe, submit_together

GREEDY = SamplingParams(temperature=0)
RANDOM = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=1234)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> TextGenerator:
    return TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir))


def request(**kwargs) -> GenerationRequest:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("max_new_tokens", 40)
    kwargs.setdefault("sampling", GREEDY)
    return GenerationRequest(**kwargs)


def ascii_stop_candidate(text: str, length: int = 3) -> tuple[int, str]:
    """A printable-ASCII substring (not at the very start) to use as a stop string."""
    for start in range(1, len(text) - length):
        piece = text[start:start + length]
        if all(32 <= ord(c) < 127 for c in piece) and text.find(piece) == start:
            return start, piece
    pytest.skip(f"greedy output has no {length}-char ASCII run to use as a stop string: {text!r}")


def test_max_length_stops_with_length(generator: TextGenerator) -> None:
    result = generator.generate(request(max_new_tokens=17, ban_eos=True))
    assert result.stop_reason == STOP_LENGTH
    assert result.finish_reason == "length"
    assert result.completion_tokens == 17


def test_eos_stops_generation(generator: TextGenerator) -> None:
    eos = generator.model.info.eos_token_ids[0]
    forced = replace(GREEDY, logit_bias={eos: 100.0})
    result = generator.generate(request(sampling=forced))
    assert result.stop_reason == STOP_EOS
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 0 and result.text == ""


def test_ban_eos_ignores_eos(generator: TextGenerator) -> None:
    eos = generator.model.info.eos_token_ids[0]
    forced = replace(GREEDY, logit_bias={eos: 100.0})
    result = generator.generate(request(sampling=forced, ban_eos=True, max_new_tokens=5))
    assert result.stop_reason == STOP_LENGTH and result.completion_tokens == 5


@pytest.mark.parametrize("trim_stop", [True, False])
def test_stop_string_spanning_three_tokens(generator: TextGenerator, trim_stop: bool) -> None:
    free = generator.generate(request(max_new_tokens=60, ban_eos=True)).text
    start, stop = ascii_stop_candidate(free, 3)  # byte-level tokens: 3 characters = 3 tokens
    result = generator.generate(request(max_new_tokens=60, ban_eos=True, stop_strings=[stop], trim_stop=trim_stop))
    assert result.stop_reason == STOP_STRING
    assert result.finish_reason == "stop"
    assert result.text == (free[:start] if trim_stop else free[:start] + stop)


def test_first_of_several_stop_strings_wins(generator: TextGenerator) -> None:
    free = generator.generate(request(max_new_tokens=60, ban_eos=True)).text
    start, stop = ascii_stop_candidate(free, 2)
    later = free[start + 4:start + 7] if len(free) > start + 7 else "zzzz-not-there"
    result = generator.generate(request(max_new_tokens=60, ban_eos=True, stop_strings=[later, stop]))
    assert result.text == free[:start]


def test_streamed_text_never_includes_stop_string(generator: TextGenerator) -> None:
    free = generator.generate(request(max_new_tokens=60, ban_eos=True)).text
    start, stop = ascii_stop_candidate(free, 4)
    pieces = [c.text for c in generator.stream(request(max_new_tokens=60, ban_eos=True, stop_strings=[stop]))]
    assert "".join(pieces) == free[:start]
    emitted = ""
    for piece in pieces:  # at no point did the client see a prefix of the stop string past the cut
        emitted += piece
        assert len(emitted) <= start


def test_stream_equals_non_stream(generator: TextGenerator) -> None:
    streamed = list(generator.stream(request(sampling=RANDOM, max_new_tokens=30)))
    final = streamed[-1].result
    assert final is not None
    assert "".join(c.text for c in streamed) == final.text
    assert final.text == generator.generate(request(sampling=RANDOM, max_new_tokens=30)).text


def test_seed_reproducibility(generator: TextGenerator) -> None:
    first = generator.generate(request(sampling=RANDOM, max_new_tokens=30, ban_eos=True))
    again = generator.generate(request(sampling=RANDOM, max_new_tokens=30, ban_eos=True))
    other = generator.generate(request(sampling=replace(RANDOM, seed=99), max_new_tokens=30, ban_eos=True))
    assert first.text == again.text
    assert first.text != other.text
    assert first.seed == 1234


def test_random_seed_is_reported_and_replays(generator: TextGenerator) -> None:
    unseeded = replace(RANDOM, seed=None)
    result = generator.generate(request(sampling=unseeded, max_new_tokens=20, ban_eos=True))
    assert result.seed is not None and result.seed >= 0
    replay = generator.generate(request(sampling=replace(RANDOM, seed=result.seed), max_new_tokens=20, ban_eos=True))
    assert replay.text == result.text


def test_prompt_left_truncated_to_fit(generator: TextGenerator) -> None:
    long_prompt = "abcdefghij" * 30  # 300 byte tokens
    result = generator.generate(request(prompt=long_prompt, max_context_length=100, max_new_tokens=20, ban_eos=True))
    assert result.prompt_tokens == 80
    assert result.truncated_tokens == 220
    ids, cut = generator.prompt_ids(request(prompt=long_prompt, max_context_length=100, max_new_tokens=20))
    assert generator.tokenizer.decode(ids) == long_prompt[-80:]  # the end of the prompt is kept
    assert cut == 220


def test_cancel_stops_within_one_step(generator: TextGenerator) -> None:
    cancel = CancelToken()
    produced = 0
    result = None
    for chunk in generator.stream(request(max_new_tokens=200, ban_eos=True), cancel):
        if chunk.result is not None:
            result = chunk.result
        else:
            produced += 1
            if produced == 3:
                cancel.cancel()
    assert result is not None
    assert result.stop_reason == STOP_ABORT
    assert result.completion_tokens <= 4


def test_prefix_cache_gives_identical_output(tiny_model_dir: Path) -> None:
    """Reusing the KV cache of an earlier prompt must not change a single token."""
    model, tokenizer = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir)
    plain = TextGenerator(model, tokenizer)
    cache = PrefixCache(64 * 2**20)
    cached = TextGenerator(model, tokenizer, cache)
    history = "User: hello there, how are you today?\nBot: I am fine, thank you.\n"
    follow_up = history + "User: and what about tomorrow?\nBot:"
    for prompt in (history, follow_up):
        for sampling in (GREEDY, RANDOM):
            expected = plain.generate(request(prompt=prompt, sampling=sampling, max_new_tokens=25, ban_eos=True))
            got = cached.generate(request(prompt=prompt, sampling=sampling, max_new_tokens=25, ban_eos=True))
            assert got.text == expected.text
    assert cache.hits >= 2
    repeat = cached.generate(request(prompt=follow_up, sampling=GREEDY, max_new_tokens=25, ban_eos=True))
    assert repeat.reused_tokens >= len(tokenizer.encode(history)) - 1


def test_resent_prompt_gives_the_same_logprobs_as_a_fresh_one(tiny_model_dir: Path) -> None:
    """A swipe (the same prompt again) is served from the cache and must reproduce the first
    answer's log-probabilities bit for bit, not merely closely."""
    model, tokenizer = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir)
    plain = TextGenerator(model, tokenizer)
    cached = TextGenerator(model, tokenizer, PrefixCache(64 * 2**20))
    for prompt in ["User: hello there, how are you today?\nBot:", "Once upon a time, in a land far away"]:
        req = GenerationRequest(prompt=prompt, max_new_tokens=6, sampling=SamplingParams(temperature=0),
                                ban_eos=True, logprobs=3)
        fresh = plain.generate(req)
        cached.generate(req)
        swiped = cached.generate(req)
        assert swiped.reused_tokens > 0
        assert [(t.token_id, t.logprob) for t in swiped.token_logprobs] == \
            [(t.token_id, t.logprob) for t in fresh.token_logprobs]


def test_left_truncation_keeps_a_leading_bos() -> None:
    from kobold_api.engine.generation import keep_tail

    assert keep_tail([1, 5, 6, 7, 8], 3, bos=1) == ([1, 7, 8], 2)  # the BOS stays in front
    assert keep_tail([5, 6, 7, 8], 2, bos=1) == ([7, 8], 2)  # no BOS to keep
    assert keep_tail([1, 5, 6], 1, bos=1) == ([6], 2)  # no room for it
    assert keep_tail([1, 5], 5, bos=1) == ([1, 5], 0)


def test_incremental_decoder_never_splits_utf8(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer(tiny_model_dir)
    text = "héllo wörld → 日本語 🎉 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: multi-byte characters span tokens
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(token) for token in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas  # some tokens completed no character and were held back


def test_cpu_fallback_when_cuda_requested(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kobold_api.engine.onnx_model import cuda_device_available

    if cuda_device_available():
        pytest.skip("this machine has a CUDA GPU, so there is no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="kobold_api.engine.onnx_model"):
        model = OnnxCausalLM(tiny_model_dir, "cuda", cpu_threads=2)
    assert model.provider == "cpu"
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    assert any("CUDA was requested but is not available" in r.getMessage() for r in caplog.records)
    assert TextGenerator(model, Tokenizer(tiny_model_dir)).generate(request(max_new_tokens=3, ban_eos=True)).completion_tokens == 3


def test_engine_queue_runs_jobs_one_at_a_time_and_bounds_the_queue(tiny_model_dir: Path) -> None:
    from conftest import make_engine

    engine: Engine = make_engine(tiny_model_dir, queue_size=1, prefix_cache_mb=0)
    try:
        running = engine.submit(request(max_new_tokens=2000, max_context_length=4000, ban_eos=True))
        for _ in running.chunks():  # wait until it runs, so the queue is empty again
            break
        queued = engine.submit(request(max_new_tokens=5, ban_eos=True))
        with pytest.raises(QueueFullError):
            engine.submit(request(max_new_tokens=5))
        assert engine.abort(running.genkey)
        assert running.wait().stop_reason == STOP_ABORT
        assert queued.wait().completion_tokens == 5
        assert engine.stats.total_generations == 2
    finally:
        engine.shutdown()


def test_aborted_waiting_job_ends_at_once_and_frees_its_place(tiny_model_dir: Path) -> None:
    """A job still waiting for a batch row ends within a step of its abort, frees its queue
    place while the batch stays full, and an abort without genkey reaches the owner's waiting job."""
    from conftest import make_engine

    engine: Engine = make_engine(tiny_model_dir, queue_size=1, prefix_cache_mb=0)  # one row
    try:
        first = engine.submit(request(max_new_tokens=4000, max_context_length=4096, ban_eos=True))
        for _ in first.chunks():  # wait until it runs: the only row is taken
            break
        second = engine.submit(request(max_new_tokens=300, ban_eos=True), owner="client-b")
        with pytest.raises(QueueFullError):
            engine.submit(request(max_new_tokens=3))
        assert not engine.abort(owner="client-c")  # someone else's Stop does not reach it
        assert engine.abort(owner="client-b")  # SillyTavern's Stop: no genkey, its own waiting job
        result = second.wait()
        assert result.stop_reason == STOP_ABORT and result.completion_tokens == 0
        assert not first.finished  # it ended while the only row was still busy
        third = engine.submit(request(max_new_tokens=3))  # the place it held is free again
        first.cancel()
        assert first.wait().stop_reason == STOP_ABORT and third.wait().completion_tokens <= 3
        assert second.wait() is result  # a second reader of a finished job returns too
    finally:
        engine.shutdown()


def test_batched_decoding_matches_single_stream(tiny_model_dir: Path) -> None:
    """Sequences of different lengths decoded together give token-for-token the plain output."""
    from conftest import make_engine

    prompts = ["a", "The quick brown fox jumps", "Hello there, how are you doing today?", "xyz 123"]
    samplings = [GREEDY, RANDOM, replace(RANDOM, seed=7), GREEDY]
    lengths = [30, 12, 25, 40]  # rows finish at different steps, so rows leave mid-batch
    requests = [request(prompt=p, sampling=s, max_new_tokens=n, ban_eos=True)
                for p, s, n in zip(prompts, samplings, lengths)]
    single = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir))
    expected = [single.generate(r).text for r in requests]

    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0)
    try:
        with ModelProbe(engine) as probe:
            jobs: list = []
            # Later jobs join a running batch: the blocker is held in its prefill while they queue.
            submit_together(probe, lambda: jobs.append(engine.submit(request(max_new_tokens=5, ban_eos=True))),
                            [lambda r=r: jobs.append(engine.submit(r)) for r in requests])
            blocker, jobs = jobs[0], jobs[1:]
            blocker.wait()
            assert [job.wait().text for job in jobs] == expected
            assert probe.max_rows == 4  # the blocker and three jobs decoded together; the fourth took its row
    finally:
        engine.shutdown()


def test_batching_with_prefix_cache_matches_plain_path(tiny_model_dir: Path) -> None:
    from conftest import make_engine

    history = "User: tell me about the sea.\nBot: The sea is wide and deep.\n"
    requests = [request(prompt=history + f"User: question {i}?\nBot:", sampling=replace(RANDOM, seed=i),
                        max_new_tokens=20, ban_eos=True) for i in range(3)]
    single = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir))
    expected = [single.generate(r).text for r in requests]
    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=64)
    try:
        first = [engine.submit(r) for r in requests]
        assert [job.wait().text for job in first] == expected
        again = [engine.submit(r) for r in requests]  # now served from cached prefixes
        results = [job.wait() for job in again]
        assert [r.text for r in results] == expected
        assert all(r.reused_tokens > 0 for r in results)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", ["SlotBatch", "ConcatBatch"])
def test_decode_batch_layouts_match_single_sequence(tiny_model_dir: Path, layout: str) -> None:
    """Both KV layouts (in-place shared buffers on CPU; concatenation, the CUDA path) give the
    same logits as running each sequence alone, as rows join, grow and leave."""
    import numpy as np

    from kobold_api.engine import decode_batch

    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    batch = decode_batch.SlotBatch(model, 4) if layout == "SlotBatch" else decode_batch.ConcatBatch(model)
    prompts = [list(range(40, 75)), list(range(80, 90)), list(range(100, 160))]
    references = []
    for prompt in prompts:
        cache = model.new_cache()
        references.append((cache, model.forward(prompt, cache)))
        logits = batch.admit(prompt, None, 0)
        np.testing.assert_allclose(logits, references[-1][1], atol=1e-4)
    alive = [0, 1, 2]
    for step in range(300):
        tokens = [int(np.argmax(references[i][1])) for i in alive]
        logits = batch.step(tokens)
        for row, index in enumerate(alive):
            cache, _ = references[index]
            expected = model.forward([tokens[row]], cache)
            references[index] = (cache, expected)
            np.testing.assert_allclose(logits[row], expected, atol=1e-3)
        if step == 5:  # the middle row leaves; the last row takes its place
            released = batch.release(1)
            assert released.token_ids == references[1][0].token_ids
            alive = [0, 2]
    released = batch.release(0)
    assert released.token_ids == references[0][0].token_ids and batch.size == 1
    # A released cache continues where it left off when admitted again as a cached prefix.
    continued = batch.admit(released.token_ids + [7], released, len(released.token_ids))
    np.testing.assert_allclose(continued, model.forward([7], references[0][0]), atol=1e-3)


def test_prefix_pool_keeps_branch_points_and_hands_over_continuations(tiny_model_dir: Path) -> None:
    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    pool = PrefixCache(64 * 2**20)
    history = list(range(50, 150))
    cache = model.new_cache()
    model.forward(history, cache)
    pool.put(cache)
    branch, reuse = pool.take(history[:60] + [7, 8, 9])  # shares 60 tokens, then differs
    assert reuse == 60 and branch is not cache and len(pool) == 1  # the entry stays for others
    again, reuse = pool.take(history[:40] + [1, 2])
    assert reuse == 40 and len(pool) == 1
    continued, reuse = pool.take(history + [5])  # continues the whole sequence: taken over
    assert continued is cache and reuse == 100 - (RECOMPUTED_TOKENS - 1) and len(pool) == 0
    assert pool.take(history + [5]) == (None, 0)
    assert pool.take([999] + history)[1] == 0  # no common start


def test_a_chat_branch_takes_a_whole_buffer_over_and_matches_a_fresh_prefill(tiny_model_dir: Path) -> None:
    """A follow-up whose history matches but whose last reply differs (regenerated, trimmed)
    takes the pooled buffer over instead of copying its prefix; the stale tail of the old
    branch is overwritten or never read: prefill and decode give a fresh prefill's logits."""
    import numpy as np

    from kobold_api.engine.decode_batch import SlotBatch

    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    pool = PrefixCache(256 * 2**20)
    batch = SlotBatch(model, max_rows=4)
    history = [(7 * i) % 200 + 3 for i in range(150)]
    first = history + [(5 * i) % 90 + 3 for i in range(40)]
    batch.admit(first, None, 0)
    released = batch.release(0)
    buffers = released.arena
    assert buffers is not None
    pool.put(released)
    branch = history + [(3 * i) % 70 + 9 for i in range(25)]  # shorter than the old branch
    cached, reuse = pool.take(branch)
    assert reuse == 150 and cached.arena is buffers and len(pool) == 0  # taken over, not copied
    logits = batch.admit(branch, cached, reuse)
    fresh_cache = model.new_cache()
    np.testing.assert_allclose(logits, model.forward(branch, fresh_cache), atol=1e-3)
    for token in (11, 12, 13):
        np.testing.assert_allclose(batch.step([token])[0], model.forward([token], fresh_cache), atol=1e-3)


def test_follow_up_longer_than_the_adopted_buffer_keeps_its_history(tiny_model_dir: Path) -> None:
    """A chat follow-up much longer than the previous turn takes its parked slot back (the
    pages past the old turn were given back) and gives the same logits as a fresh prefill."""
    import numpy as np

    from kobold_api.engine.decode_batch import SlotBatch

    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    history = [(7 * i) % 200 + 3 for i in range(200)]
    batch = SlotBatch(model, max_rows=4)
    batch.admit(history, None, 0)
    released = batch.release(0)
    assert released.arena is not None  # the slot itself is handed over
    follow_up = history + [(11 * i) % 200 + 3 for i in range(110)]
    logits = batch.admit(follow_up, released, len(history))
    fresh = model.forward(follow_up, model.new_cache())
    np.testing.assert_allclose(logits, fresh, atol=1e-3)


def test_rows_leaving_are_copied_out_and_the_last_stays_parked_in_its_slot(tiny_model_dir: Path) -> None:
    """Rows that leave are copied out at their exact size; the last one to leave stays parked in
    slot 0 (the copy-free path for a chat's next turn), which the follow-up takes back."""
    import numpy as np

    from kobold_api.engine.decode_batch import SlotBatch

    model = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2)
    batch = SlotBatch(model, max_rows=4)
    prompts = [list(range(10 + offset, 60 + offset)) for offset in range(3)]
    for prompt in prompts:
        batch.admit(prompt, None, 0)
    caches = [batch.release(row) for row in (2, 1)]
    assert all(cache.arena is None and cache.tensors[0].shape()[2] == cache.length for cache in caches)
    last = batch.release(0)
    home = last.home
    assert home is not None and last.arena is not None and last.token_ids == prompts[0]
    assert home.is_parked(last) and batch.size == 0 and batch.slots is not home  # the batch goes on in fresh slots
    follow_up = prompts[0] + [5, 6, 7]
    logits = batch.admit(follow_up, last, len(prompts[0]))
    assert batch.slots is home and not home.is_parked(last) and last.arena is not None  # taken back, not copied
    np.testing.assert_array_equal(logits, model.forward(follow_up, model.new_cache()))
    for cache, prompt in zip(caches, (prompts[2], prompts[1])):  # the copies hold the right keys
        continued = SlotBatch(model).admit(prompt + [9, 9], cache, len(prompt))
        np.testing.assert_array_equal(continued, model.forward(prompt + [9, 9], model.new_cache()))


def test_prefix_pool_counts_the_pages_a_parked_slot_holds(tiny_model_dir: Path) -> None:
    """A lone request's keys stay parked in its slot, which spans the whole context: the pool
    counts the pages its positions use (the rest of the slot is never touched, or was given
    back), so the byte limit bounds what the pool really holds."""
    from kobold_api.engine.kv_slots import _PAGE

    model, tokenizer = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir)
    pool = PrefixCache(64 * 2**20)
    generator = TextGenerator(model, tokenizer, pool)
    generator.generate(request(prompt="short", max_new_tokens=3))
    (entry,) = pool._entries.values()
    cache = entry.cache
    assert cache.home is not None and cache.arena is not None
    heads, dim = cache.home.shape[1], cache.home.shape[3]
    pages = -(-cache.length * dim * cache.home.dtype.itemsize // _PAGE)
    assert pool.total_bytes == cache.home.held_bytes(cache.length) == model.num_kv_tensors * heads * pages * _PAGE
    assert pool.total_bytes < model.num_kv_tensors * cache.home.slot_bytes  # not the whole slot
    small = PrefixCache(pool.total_bytes * 3 + 1)  # room for three such caches
    generator = TextGenerator(model, tokenizer, small)
    for index in range(6):
        generator.generate(request(prompt=f"{index} different", max_new_tokens=3))
    assert len(small) == 3 and small.total_bytes <= small.max_bytes


def test_the_newest_sequence_stays_pooled_when_it_is_larger_than_the_pool(tiny_model_dir: Path) -> None:
    """A chat's keys can outgrow ``prefix_cache_mb`` (1,400 tokens are 320 MB at 3B): the pool
    still keeps the newest sequence, alone, so the next turn continues it instead of running
    the whole history again; an older entry goes."""
    model, tokenizer = OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir)
    pool = PrefixCache(1)  # smaller than any cache
    generator = TextGenerator(model, tokenizer, pool)
    history = [(5 * i) % 200 + 3 for i in range(120)]
    generator.generate(request(prompt_ids=history, max_new_tokens=3))
    assert len(pool) == 1 and pool.total_bytes > pool.max_bytes
    follow_up = history + [7, 8, 9]  # the reply swapped for other text: a branch inside the cached keys
    again = generator.generate(request(prompt_ids=follow_up, max_new_tokens=8))
    assert again.reused_tokens == len(history)
    assert again.text == TextGenerator(model, tokenizer).generate(request(prompt_ids=follow_up, max_new_tokens=8)).text
    generator.generate(request(prompt_ids=[11, 12, 13, 14, 15, 16, 17, 18, 19, 20], max_new_tokens=3))
    assert len(pool) == 1 and generator.generate(request(prompt_ids=follow_up, max_new_tokens=1)).reused_tokens == 0


def test_the_engine_pool_holds_at_least_one_whole_context(tiny_model_dir: Path) -> None:
    """``prefix_cache_mb`` below one context's keys (a 3B chat's 1,400 tokens are 320 MB) still
    pools a whole context, so a chat's history survives a request in between; a larger setting
    stands, and 0 keeps nothing."""
    from conftest import make_engine

    for mb, expected in ((1, None), (4096, 4096 * 2**20), (0, 0)):
        engine: Engine = make_engine(tiny_model_dir, prefix_cache_mb=mb)
        try:
            model, pool = engine.generator.model, engine.generator.prefix_cache
            whole = engine.generator.context_length * model.kv_bytes_per_token
            if expected == 0:
                assert pool is None
            else:
                assert whole > 2**20 and pool.max_bytes == (expected or whole)
        finally:
            engine.shutdown()


def test_worker_survives_a_failed_step_and_keeps_serving(tiny_model_dir: Path) -> None:
    from conftest import make_engine
    from kobold_api.engine.engine import GenerationFailed

    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0)
    model = engine.generator.model
    original = model.run_shared
    calls = {"n": 0}

    def fail_on_the_third_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected session failure")
        return original(*args, **kwargs)

    model.run_shared = fail_on_the_third_run  # type: ignore[method-assign]
    try:
        doomed = engine.submit(request(max_new_tokens=50, ban_eos=True))
        with pytest.raises(GenerationFailed, match="injected session failure"):
            doomed.wait()
        assert engine.submit(request(max_new_tokens=5, ban_eos=True)).wait().completion_tokens == 5
        assert not engine.busy
    finally:
        model.run_shared = original  # type: ignore[method-assign]
        engine.shutdown()


def test_shutdown_ends_queued_jobs_instead_of_leaving_them_waiting(tiny_model_dir: Path) -> None:
    from conftest import make_engine
    from kobold_api.engine.engine import GenerationFailed

    engine: Engine = make_engine(tiny_model_dir, max_batch_size=1, queue_size=8, prefix_cache_mb=0)
    running = engine.submit(request(max_new_tokens=3000, max_context_length=4000, ban_eos=True))
    queued = [engine.submit(request(max_new_tokens=5)) for _ in range(3)]
    engine.shutdown()
    outcomes = []
    for job in [running, *queued]:
        try:
            outcomes.append(job.wait().stop_reason)
        except GenerationFailed as exc:
            outcomes.append(str(exc))
    assert all(o in (STOP_ABORT, "server is shutting down") for o in outcomes), outcomes
    with pytest.raises(QueueFullError):
        engine.submit(request(max_new_tokens=5))


# --- phrase bans ------------------------------------------------------------------------


def _greedy_text(generator: TextGenerator, prompt: str, **kwargs) -> str:
    return generator.generate(request(prompt=prompt, max_new_tokens=60, ban_eos=True, **kwargs)).text


@pytest.mark.parametrize("prompt", ["abc abc abc abc abc", "The quick brown fox"])
def test_banned_phrase_is_never_written_and_the_text_before_it_stays(generator: TextGenerator, prompt: str) -> None:
    plain = _greedy_text(generator, prompt)
    phrase = plain[10:14]  # something the model writes (and, looping, writes again)
    assert phrase.strip() and phrase in plain
    banned = generator.generate(request(prompt=prompt, max_new_tokens=60, ban_eos=True, logprobs=1,
                                        banned_phrases=[phrase.upper() if phrase.upper() != phrase else phrase]))
    assert phrase.lower() not in banned.text.lower()
    first = plain.lower().find(phrase.lower())
    assert banned.text[:first] == plain[:first]  # only the tokens from the phrase on were redrawn
    assert len(banned.token_logprobs) == banned.completion_tokens == 60


def test_phrase_ban_at_the_first_token_and_streaming_never_shows_it(generator: TextGenerator) -> None:
    plain = _greedy_text(generator, PROMPT)
    phrase = plain[:3]
    chunks = list(generator.stream(request(prompt=PROMPT, max_new_tokens=60, ban_eos=True,
                                           banned_phrases=[phrase])))
    streamed = "".join(chunk.text for chunk in chunks)
    assert chunks[-1].result is not None and streamed == chunks[-1].result.text
    assert phrase not in streamed and streamed != plain


def test_phrase_bans_in_a_batch_match_the_single_stream(tiny_model_dir: Path) -> None:
    """Rewinds cut a row's cache inside a running batch; the other rows must not notice."""
    from conftest import make_engine

    single = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir))
    prompts = ["abc abc abc abc abc", "The quick brown fox", "Hello there, how are you doing today?"]
    requests = []
    for index, prompt in enumerate(prompts):
        plain = _greedy_text(single, prompt)
        bans = [plain[8:11], plain[25:28]] if index != 1 else []
        requests.append(request(prompt=prompt, max_new_tokens=60, ban_eos=True, banned_phrases=bans))
    expected = [single.generate(r).text for r in requests]
    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0)
    try:
        with ModelProbe(engine) as probe:
            jobs: list = []
            submit_together(probe, lambda: jobs.append(engine.submit(requests[0])),
                            [lambda r=r: jobs.append(engine.submit(r)) for r in requests[1:]])
            assert [job.wait().text for job in jobs] == expected
            assert probe.max_rows == 3  # the rewinds happened with all three rows in the batch
    finally:
        engine.shutdown()
    for r, text in zip(requests, expected):
        assert not any(phrase.lower() in text.lower() for phrase in r.banned_phrases)


def test_stop_string_inside_withheld_text_ends_like_without_bans(generator: TextGenerator) -> None:
    """A stop string that completes while a possible banned phrase holds the text back: the same
    text and token count as without the ban (tokens after the stop are neither sent nor counted)."""
    plain = _greedy_text(generator, PROMPT)
    at = next(i for i in range(5, len(plain) - 2) if plain[i:i + 2].isascii() and plain[i:i + 2].strip()
              and plain.find(plain[i:i + 2]) == i)
    stop = plain[at:at + 2]
    common = {"prompt": PROMPT, "max_new_tokens": 60, "ban_eos": True, "stop_strings": [stop]}
    without = generator.generate(request(**common))
    held = generator.generate(request(**common, banned_phrases=[stop[0] + "\u2603never"]))
    assert without.stop_reason == held.stop_reason == STOP_STRING
    assert held.text == without.text == plain[:at]
    assert held.completion_tokens == without.completion_tokens


@contextlib.contextmanager
def held_in_first_part(engine: Engine, part: int) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Stops the engine's worker inside the first prompt part of ``part`` tokens: ``started`` is
    set once it is there, and it goes on when the test sets ``go``."""
    model = engine.generator.model
    started, go = threading.Event(), threading.Event()
    original = model.run_shared

    def gate(binding, rows, tokens, **options):
        if tokens == part and not started.is_set():
            started.set()
            go.wait(60)
        return original(binding, rows, tokens, **options)

    model.run_shared = gate  # type: ignore[method-assign]
    try:
        yield started, go
    finally:
        go.set()
        del model.run_shared


def test_a_long_prompt_joins_running_streams_part_by_part(tiny_model_dir: Path) -> None:
    """While a stream decodes, a long prompt that joins runs 32 tokens at a time between its
    steps instead of holding it up for the whole prefill; both answer as they do alone. A
    request cancelled part-way through its prompt ends without a row, and the stream goes on."""
    from conftest import make_engine
    from kobold_api.engine.generation import STOP_ABORT

    stream = request(prompt="Once upon a time", max_new_tokens=60, ban_eos=True)
    joining = request(prompt_ids=[(7 * i) % 200 + 3 for i in range(300)], max_new_tokens=8, ban_eos=True)
    single = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2), Tokenizer(tiny_model_dir))
    expected = [single.generate(stream).text, single.generate(joining).text]

    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0, prefill_chunk=32)
    try:
        with ModelProbe(engine) as probe:
            jobs: list = []
            submit_together(probe, lambda: jobs.append(engine.submit(stream)), [lambda: jobs.append(engine.submit(joining))])
            assert [job.wait().text for job in jobs] == expected
            runs = list(probe.runs)
        parts = [index for index, (rows, tokens) in enumerate(runs) if tokens > 1 and index > 0]
        assert len(parts) == 10  # 300 tokens: nine parts of 32 and the last 12
        between = [runs[index] for index in range(parts[0] + 1, parts[-1]) if index not in parts]
        assert len(between) >= 9 and all(shape == (1, 1) for shape in between)  # the stream's steps

        with held_in_first_part(engine, 32) as (started, go), ModelProbe(engine) as probe:
            jobs = []
            submit_together(probe, lambda: jobs.append(engine.submit(stream)),
                            [lambda: jobs.append(engine.submit(joining))])
            assert started.wait(60)
            jobs[1].cancel()
            go.set()
            assert jobs[1].wait().stop_reason == STOP_ABORT
            assert jobs[0].wait().text == expected[0]
            assert sum(tokens > 1 for _, tokens in probe.runs[1:]) == 1  # no part ran after the cancel
        assert not engine.busy
    finally:
        engine.shutdown()


def test_a_lone_long_prompt_runs_in_parts(tiny_model_dir: Path) -> None:
    """With no stream running, a long prompt still runs ``prefill_chunk`` tokens per session run
    (its attention scratch is bounded by the part, not the prompt) and answers as a whole
    prefill does; ``prefill_chunk=0`` runs it whole."""
    from conftest import make_engine

    prompt = request(prompt_ids=[(7 * i) % 200 + 3 for i in range(300)], max_new_tokens=8, ban_eos=True)
    expected = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2),
                             Tokenizer(tiny_model_dir)).generate(prompt).text
    for chunk, parts in ((64, [64, 64, 64, 64, 44]), (0, [300])):
        engine: Engine = make_engine(tiny_model_dir, prefix_cache_mb=0, prefill_chunk=chunk)
        try:
            with ModelProbe(engine) as probe:
                assert engine.submit(prompt).wait().text == expected
                runs = list(probe.runs)
        finally:
            engine.shutdown()
        assert [tokens for rows, tokens in runs if tokens > 1] == parts
        assert all(rows == 1 for rows, _ in runs)


def test_a_failing_cancelled_job_leaves_the_filling_prompt_alone(tiny_model_dir: Path) -> None:
    """While a long prompt fills part by part, a queued job that was cancelled ends at once; if
    its request is broken too (its sampler refuses a setting), its failure must not drop the
    filling row, which belongs to another request."""
    from conftest import make_engine

    stream = request(prompt="Once upon a time", max_new_tokens=40, ban_eos=True)
    joining = request(prompt_ids=[(7 * i) % 200 + 3 for i in range(200)], max_new_tokens=5, ban_eos=True)
    broken = request(prompt="x", max_new_tokens=5, sampling=SamplingParams(top_k=-3))
    expected = TextGenerator(OnnxCausalLM(tiny_model_dir, "cpu", cpu_threads=2),
                             Tokenizer(tiny_model_dir)).generate(joining).text
    engine: Engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0, prefill_chunk=32)
    try:
        with held_in_first_part(engine, 32) as (started, go), ModelProbe(engine) as probe:
            jobs: list = []
            submit_together(probe, lambda: jobs.append(engine.submit(stream)),
                            [lambda: jobs.append(engine.submit(joining))])
            assert started.wait(60)
            doomed = engine.submit(broken)
            doomed.cancel()
            go.set()
            with pytest.raises(Exception):
                doomed.wait()
            assert jobs[1].wait().text == expected
            jobs[0].wait()
    finally:
        engine.shutdown()
