"""Classifier-free guidance: KoboldCpp's and text-generation-webui's ``guidance_scale`` / ``negative_prompt``.

A second context holds the negative prompt in place of the real one, followed by the tokens the
request has generated so far. Before each token is sampled, both contexts' next-token
log-probabilities are mixed (llama.cpp's and transformers' formula)::

    guided = negative + scale * (positive - negative)

so a ``scale`` above 1 pushes the reply away from what the negative prompt makes likely and
towards what the real prompt adds; ``scale`` 1 is plain sampling and builds no second context.
An empty negative prompt leaves the last prompt token alone as the "unconditional" context, as
transformers does.

The negative context runs in a one-row decode batch of its own beside the main batch: one more
forward pass per generated token for the requests that ask for guidance, as KoboldCpp's guidance
context costs. Its keys are private (negative prompts are short; nothing is shared with the
prefix pool).
"""

from __future__ import annotations

import math

import numpy as np

from .decode_batch import new_decode_batch
from .onnx_model import OnnxCausalLM
from .sampling import SettingError

__all__ = ["Guidance", "MAX_GUIDANCE_SCALE", "check_guidance_scale", "guided_logits"]

#: Far above any useful setting (text-generation-webui's slider stops at 2.5): keeps the maths finite.
MAX_GUIDANCE_SCALE = 100.0


def check_guidance_scale(scale: float) -> float:
    """The scale as a float; a :class:`SettingError` under ``guidance_scale`` when it is out of range."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 0.0 <= scale <= MAX_GUIDANCE_SCALE:
        raise SettingError("guidance_scale", f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE:g} "
                                             f"(got {scale!r})")
    return float(scale)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float32, copy=False) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def guided_logits(positive: np.ndarray, negative: np.ndarray, scale: float) -> np.ndarray:
    """Mix the two contexts' next-token scores: ``negative + scale * (positive - negative)`` on
    log-probabilities (float32, the shape of ``positive``)."""
    base, unconditional = _log_softmax(positive), _log_softmax(negative)
    return unconditional + np.float32(scale) * (base - unconditional)


class Guidance:
    """The negative context of one request: its ids, its own one-row decode batch, and the logits
    after them."""

    def __init__(self, model: OnnxCausalLM, negative_ids: list[int], scale: float, capacity: int = 0) -> None:
        if not negative_ids:
            raise ValueError("the negative context needs at least one token")
        self.negative_ids = list(negative_ids)
        self.scale = check_guidance_scale(scale)
        self._batch = new_decode_batch(model, 1, capacity or None)
        self._logits: np.ndarray | None = None

    def apply(self, logits: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """``logits`` (the real context's, after ``generated``) guided by the negative context after
        the same generated tokens. Tokens taken back since the last call (a phrase ban) are cut from
        the negative context too."""
        return guided_logits(logits, self._negative_logits([int(token) for token in generated]), self.scale)

    def close(self) -> None:
        """Free the negative context's keys (the request ended)."""
        if self._batch.size:
            self._batch.release(0)
        self._logits = None

    @property
    def length(self) -> int:
        """Positions the negative context's cache holds."""
        return len(self._batch.token_ids[0]) if self._batch.size else 0

    def _negative_logits(self, generated: list[int]) -> np.ndarray:
        wanted = self.negative_ids + generated
        if not self._batch.size:
            self._logits = self._batch.admit(wanted, None, 0)
            return self._logits
        held = self._batch.token_ids[0]
        if self._logits is not None and held == wanted:
            return self._logits
        shared = 0
        for mine, theirs in zip(held, wanted):
            if mine != theirs:
                break
            shared += 1
        # The logits after ``wanted`` come from feeding at least its last token.
        keep = min(shared, len(wanted) - 1)
        self._batch.truncate(0, keep)
        for token in wanted[keep:]:
            self._logits = self._batch.step([token])[0]
        assert self._logits is not None
        return self._logits
