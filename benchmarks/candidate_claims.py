"""How often a row's top candidates settle the token, on the default model (host path; the
device path reduces the same candidates on the GPU).

    python benchmarks/candidate_claims.py

For each sampler setting and K (64, 256): of 150 decode steps of a chat reply, how many
TokenSampler.sample_top could serve from the candidates alone (the rest need the whole row).
"""

import numpy as np
from dataclasses import replace
from pathlib import Path
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.decode_batch import SlotBatch
from kobold_api.engine.tokenizer import Tokenizer
from kobold_api.engine.sampling import SamplingParams, TokenSampler
from kobold_api.engine.sampling.candidates import Candidates
from kobold_api.benchmark import SILLYTAVERN_SAMPLERS, CHAT_PROMPT
d = next(p for p in sorted(Path("data/models").glob("SmolLM2-135M-Instruct-*")) if p.is_dir())
m = OnnxCausalLM(d, "cpu", 2); tok = Tokenizer(d)
cases = {"SillyTavern defaults": SILLYTAVERN_SAMPLERS, "Kobold defaults": SamplingParams(seed=1),
         "top_p 0.9": SamplingParams(temperature=1.0, top_p=0.9, seed=1), "min_p 0.05": SamplingParams(temperature=1.0, top_p=1.0, min_p=0.05, seed=1),
         "top_k 40": SamplingParams(temperature=0.7, top_k=40, top_p=1.0, seed=1)}
for K in (64, 256):
    for name, params in cases.items():
        sampler, probe = TokenSampler(params), TokenSampler(params)
        b = SlotBatch(m, 1, 2048); ids = tok.encode(CHAT_PROMPT)
        logits = b.admit(ids, None, 0); ctx = list(ids); served = 0
        for _ in range(150):
            if probe.sample_top(Candidates.of(logits, K), np.asarray(ctx)) is not None: served += 1
            t = sampler(logits, np.asarray(ctx)); ctx.append(t); logits = b.step([t])[0]
        print(K, name, f"{served}/150")
