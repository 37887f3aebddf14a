"""Token samplers with KoboldAI semantics, in numpy.

The generation loop calls a :class:`TokenSampler` once per generated token.
Each sampler is a small class that validates its settings once, in
``__init__``, and then transforms a 1-D float32 logits vector on every call
(masking means setting an entry to ``-inf``). The chain is ordered by the
KoboldAI wire field ``sampler_order``, whose ids are listed in
:class:`SamplerId`.

Performance notes: a call must cost well under a millisecond for a
49,152-entry vocabulary, so the samplers avoid full-vocabulary sorts whenever
the answer provably does not depend on the tail (see :class:`TopPSampler` and
:class:`TypicalSampler`), and only look at the entries that are still
unmasked once an earlier sampler has truncated the distribution.

Ties: every truncating sampler cuts by *value*, so tokens whose score equals
the score at the cut are all kept. This makes the result independent of how a
sort orders equal entries (the reference implementations cut by position,
which is arbitrary among ties).

The chain, as :func:`build_processors` composes it (KoboldCpp's order):

1. ``logit_bias``, then the token bans, then top-n-sigma (``nsigma``);
2. with ``mirostat`` off, the ``sampler_order`` ids in turn, where id 5 is
   the temperature step (dynamic temperature when ``dynatemp_range > 0``,
   else plain temperature; then quadratic smoothing) and id 6 the penalty
   step (DRY, ``rep_pen``, presence/frequency); then XTC, then Adaptive-P
   (``adaptive_target`` >= 0), which reshapes what is left around its target;
3. with ``mirostat`` 1 or 2 instead: the penalty step, plain temperature,
   smoothing, then Mirostat (top-k/top-a/top-p/min-p/tfs/typical, dynamic
   temperature and XTC are skipped, as in KoboldCpp);
4. the draw (:class:`TokenSampler`), after which Mirostat updates its state.

Greedy decoding (temperature 0) only applies the steps that can change the
argmax: bias, bans and the penalty step (DRY included). XTC, Mirostat,
dynamic temperature and smoothing do not apply then.
"""

from .base import (
    DEFAULT_DRY_SEQUENCE_BREAKERS, DEFAULT_SAMPLER_ORDER, MAX_LOGIT_BIAS, NEG_INF, LogitsProcessor, SamplerId,
    SamplingParams, SettingError,
)
from .chain import TokenSampler, build_processors, normalize_sampler_order
from .penalties import (
    DryPenaltySampler, LogitBiasSampler, PresenceFrequencyPenaltySampler, RepetitionPenaltySampler, TokenBanSampler,
)
from .temperature import DynamicTemperatureSampler, MirostatSampler, SmoothingSampler, TemperatureSampler
from .truncation import (
    AdaptivePSampler, MinPSampler, TailFreeSampler, TopASampler, TopKSampler, TopNSigmaSampler, TopPSampler,
    TypicalSampler, XTCSampler,
)

__all__ = [
    "AdaptivePSampler",
    "TopNSigmaSampler",
    "MAX_LOGIT_BIAS",
    "NEG_INF",
    "SettingError",
    "DEFAULT_DRY_SEQUENCE_BREAKERS",
    "DEFAULT_SAMPLER_ORDER",
    "DryPenaltySampler",
    "DynamicTemperatureSampler",
    "LogitBiasSampler",
    "LogitsProcessor",
    "MinPSampler",
    "MirostatSampler",
    "PresenceFrequencyPenaltySampler",
    "RepetitionPenaltySampler",
    "SamplerId",
    "SamplingParams",
    "SmoothingSampler",
    "TailFreeSampler",
    "TemperatureSampler",
    "TokenBanSampler",
    "TokenSampler",
    "TopASampler",
    "TopKSampler",
    "TopPSampler",
    "TypicalSampler",
    "XTCSampler",
    "build_processors",
    "normalize_sampler_order",
]
