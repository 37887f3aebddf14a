"""Classifier-free guidance (``guidance_scale`` / ``negative_prompt``): the mix, the negative
context's bookkeeping, generation against a step-by-step reference, and the routes."""

from __future__ import annotations

import numpy as np
import pytest

from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import CancelToken, GenerationRequest, Sequence
from kobold_api.engine.guidance import Guidance, guided_logits
from kobold_api.engine.sampling import SamplingParams

from conftest import LiveServer
from model_probe import ModelProbe, submit_together

PROMPT = "The old lighthouse keeper looked at the sea and said"
NEGATIVE = "A cheerful list of numbers:"


def log_softmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


def fresh_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """The model's next-token logits after ``ids``, from an empty cache (no reuse of anything)."""
    model = engine.generator.model
    return model.forward(list(ids), model.new_cache())


def greedy(scale: float, negative: str, max_new: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, max_new_tokens=max_new, logprobs=0,
                             sampling=SamplingParams(temperature=0.0, rep_pen=1.0, guidance_scale=scale,
                                                     negative_prompt=negative))


def reference(engine: Engine, scale: float, negative_ids: list[int], max_new: int) -> list[int]:
    """Guided greedy decoding recomputed from scratch at every step."""
    prompt_ids = engine.generator.prompt_ids(GenerationRequest(prompt=PROMPT, max_new_tokens=max_new))[0]
    eos = set(engine.generator.model.info.eos_token_ids)
    out: list[int] = []
    for _ in range(max_new):
        mixed = guided_logits(fresh_logits(engine, prompt_ids + out), fresh_logits(engine, negative_ids + out), scale)
        token = int(np.argmax(mixed))
        if token in eos:
            break
        out.append(token)
    return out


def test_the_mix_is_negative_plus_scale_times_the_difference() -> None:
    rng = np.random.default_rng(7)
    positive, negative = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    mixed = guided_logits(positive, negative, 1.5)
    expected = log_softmax(negative) + 1.5 * (log_softmax(positive) - log_softmax(negative))
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-5)
    # scale 1 is the real context alone; scale 0 the negative alone
    np.testing.assert_allclose(guided_logits(positive, negative, 1.0), log_softmax(positive), atol=1e-5)
    np.testing.assert_allclose(guided_logits(positive, negative, 0.0), log_softmax(negative), atol=1e-5)


def test_the_negative_context_follows_generated_tokens_and_takes_them_back(tiny_engine: Engine) -> None:
    model = tiny_engine.generator.model
    negative = tiny_engine.tokenizer.encode(NEGATIVE)
    guidance = Guidance(model, negative, 2.0)
    positive = np.zeros(model.vocab_size, dtype=np.float32)
    a, b, c, d = 11, 12, 13, 14
    guidance.apply(positive, np.array([a, b, c]))
    assert guidance.length == len(negative) + 3
    # A phrase ban took ``c`` back and ``d`` was chosen instead: the negative context drops ``c``.
    after_rewind = guidance.apply(positive, np.array([a, b, d]))
    assert guidance.length == len(negative) + 3
    expected = guided_logits(positive, fresh_logits(tiny_engine, negative + [a, b, d]), 2.0)
    np.testing.assert_allclose(after_rewind, expected, rtol=1e-3, atol=1e-3)
    # Taken back without a replacement: the logits after [a] come from feeding ``a`` again.
    shorter = guidance.apply(positive, np.array([a]))
    np.testing.assert_allclose(shorter, guided_logits(positive, fresh_logits(tiny_engine, negative + [a]), 2.0),
                               rtol=1e-3, atol=1e-3)
    guidance.close()
    assert guidance.length == 0


def test_scale_one_builds_no_negative_context(tiny_engine: Engine) -> None:
    sequence = Sequence(tiny_engine.generator, greedy(1.0, NEGATIVE), CancelToken())
    assert sequence.guidance is None
    plain = tiny_engine.generator.generate(greedy(1.0, ""))
    assert tiny_engine.generator.generate(greedy(1.0, NEGATIVE)).text == plain.text


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_guided_generation_matches_a_step_by_step_reference(tiny_engine: Engine, negative: str) -> None:
    generator = tiny_engine.generator
    request = greedy(3.0, negative)
    sequence = Sequence(generator, request, CancelToken())
    assert sequence.guidance is not None
    if negative:  # tokenized as the prompt is (the tokenizer's BOS included)
        assert sequence.guidance.negative_ids == generator.tokenizer.encode(negative)
    else:  # transformers' unconditional context: the prompt's last token alone
        assert sequence.guidance.negative_ids == sequence.prompt_ids[-1:]
    expected = reference(tiny_engine, 3.0, sequence.guidance.negative_ids, request.max_new_tokens)

    result = generator.generate(request)
    assert [entry.token_id for entry in result.token_logprobs] == expected
    assert result.text == generator.tokenizer.decode(expected)
    # The reported log-probabilities are the guided ones.
    first = guided_logits(fresh_logits(tiny_engine, sequence.prompt_ids),
                          fresh_logits(tiny_engine, sequence.guidance.negative_ids), 3.0)
    assert result.token_logprobs[0].logprob == pytest.approx(float(log_softmax(first)[expected[0]]), abs=1e-3)
    # ... and guidance changed what greedy decoding picks.
    assert generator.generate(greedy(1.0, negative)).text != result.text


def test_guided_rows_in_a_busy_batch_match_running_alone(tiny_model_dir) -> None:
    from conftest import make_engine

    engine = make_engine(tiny_model_dir, max_batch_size=4, prefix_cache_mb=0)
    try:
        alone = [engine.generator.generate(greedy(scale, NEGATIVE)).text for scale in (1.0, 2.0, 0.5)]
        with ModelProbe(engine) as probe:
            jobs: list = []
            submit_together(probe, lambda: jobs.append(engine.submit(greedy(1.0, NEGATIVE))),
                            [lambda s=scale: jobs.append(engine.submit(greedy(s, NEGATIVE))) for scale in (2.0, 0.5)])
            assert [job.wait().text for job in jobs] == alone
            assert probe.max_rows == 3  # the three rows decoded in one batch (negatives run in their own)
    finally:
        engine.shutdown()


def test_kobold_and_openai_routes_guide_generation(server: LiveServer, tiny_engine: Engine) -> None:
    body = {"prompt": PROMPT, "max_length": 12, "temperature": 0, "rep_pen": 1, "guidance_scale": 3,
            "negative_prompt": NEGATIVE}
    expected = tiny_engine.generator.generate(greedy(3.0, NEGATIVE)).text
    plain = tiny_engine.generator.generate(greedy(1.0, NEGATIVE)).text
    assert expected != plain

    kobold = server.post("/api/v1/generate", json=body)
    assert kobold.status_code == 200, kobold.text
    assert kobold.json()["results"][0]["text"] == expected
    openai = server.post("/v1/completions", json={**body, "max_tokens": 12})
    assert openai.status_code == 200, openai.text
    assert openai.json()["choices"][0]["text"] == expected
    unguided = server.post("/api/v1/generate", json={**body, "guidance_scale": 1})
    assert unguided.json()["results"][0]["text"] == plain

    version = server.get("/api/extra/version").json()
    assert version["guidance"] is True


@pytest.mark.parametrize("scale", [-0.5, 101, "strong"])
def test_a_bad_scale_is_refused_in_each_family_shape(server: LiveServer, scale: object) -> None:
    kobold = server.post("/api/v1/generate", json={"prompt": "Hi", "guidance_scale": scale})
    assert kobold.status_code == 422
    assert "guidance_scale" in kobold.json()["detail"]
    openai = server.post("/v1/completions", json={"prompt": "Hi", "guidance_scale": scale})
    assert openai.status_code == 400
    assert "guidance_scale" in openai.text
    negative = server.post("/api/v1/generate", json={"prompt": "Hi", "guidance_scale": 2, "negative_prompt": 5})
    assert negative.status_code == 422 and "negative_prompt" in negative.json()["detail"]


def test_server_side_chat_is_guided(server: LiveServer) -> None:
    body = {"user_input": "Tell me about the sea.", "max_new_tokens": 12, "temperature": 0, "rep_pen": 1,
            "negative_prompt": NEGATIVE}
    texts = {}
    for scale in (1, 3, 3):
        answer = server.post("/api/v1/chat", json={**body, "guidance_scale": scale})
        assert answer.status_code == 200, answer.text
        texts.setdefault(scale, set()).add(answer.json()["results"][0]["text"])
    assert len(texts[3]) == 1 and texts[1] != texts[3]  # deterministic, and guidance changed the reply
    refused = server.post("/api/v1/chat", json={**body, "guidance_scale": -1})
    assert refused.status_code == 422 and "guidance_scale" in refused.json()["detail"]
