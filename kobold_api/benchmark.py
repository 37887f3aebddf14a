"""``kobold-api bench``: decode speed and prefill time of the engine on a model.

A benchmark, not a test: it prints numbers for a human to compare (ratios taken in one
run on one machine mean more than absolute figures on a shared machine).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .engine.engine import Engine
from .engine.generation import GenerationRequest, TextGenerator
from .engine.onnx_model import OnnxCausalLM, resolved_device
from .engine.prefix_cache import PrefixCache
from .engine.prepare import prepare_model
from .engine.profile import raw_steps
from .engine.sampling import DEFAULT_SAMPLER_ORDER, SamplingParams
from .engine.tokenizer import Tokenizer

#: SillyTavern's default Kobold sampler settings (see the wire reference).
SILLYTAVERN_SAMPLERS = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, rep_pen=1.1,
                                      rep_pen_range=1024, rep_pen_slope=0.9, sampler_order=list(DEFAULT_SAMPLER_ORDER),
                                      seed=1234)
CHAT_PROMPT = "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def run_benchmark(model: str, provider: str, cache_dir: Path, new_tokens: int = 200, repeats: int = 3,
                  cpu_threads: int = 0, quant: str = "auto", kv_layout: str = "auto",
                  cuda_graphs: bool = False) -> dict[str, float]:
    model_dir = prepare_model(model, resolved_device(provider), cache_dir, progress=print, quant=quant)
    onnx_model = OnnxCausalLM(model_dir, provider, cpu_threads, kv_layout=kv_layout, cuda_graphs=cuda_graphs)
    generator = TextGenerator(onnx_model, Tokenizer(model_dir))
    results: dict[str, float] = {}

    for label, sampling in (("greedy", SamplingParams(temperature=0)), ("sillytavern", SILLYTAVERN_SAMPLERS)):
        rates = []
        for _ in range(repeats):
            result = generator.generate(GenerationRequest(prompt=CHAT_PROMPT, max_new_tokens=new_tokens,
                                                          max_context_length=4096, sampling=sampling, ban_eos=True))
            rates.append(result.completion_tokens / result.decode_seconds)
        results[f"decode_tok_s_{label}"] = statistics.median(rates)

    prompt_ids = (generator.tokenizer.encode("The history of the lighthouse begins in the old harbour. ") * 200)[:1024]
    times = []
    for _ in range(repeats):
        cache = onnx_model.new_cache()
        started = time.perf_counter()
        onnx_model.forward(prompt_ids, cache)
        times.append(time.perf_counter() - started)
    results["prefill_1024_s"] = statistics.median(times)

    # A chat follow-up: the same long history plus one new message, with the prefix cache.
    cached = TextGenerator(onnx_model, generator.tokenizer, PrefixCache(512 * 2**20))
    history = prompt_ids[:1000]
    cached.generate(GenerationRequest(prompt_ids=history, max_new_tokens=1, sampling=SamplingParams(temperature=0)))
    follow_up = cached.generate(GenerationRequest(prompt_ids=history + prompt_ids[:24], max_new_tokens=1,
                                                  sampling=SamplingParams(temperature=0)))
    results["follow_up_prefill_s"] = follow_up.prefill_seconds
    results["follow_up_reused_tokens"] = follow_up.reused_tokens

    # The kernels' own batching gain: decode steps alone (no prefill, sampling or scheduling),
    # the ceiling for what the scheduler below can reach.
    prompt_tokens = len(generator.tokenizer.encode(CHAT_PROMPT))
    for rows in (1, 8):
        seconds = raw_steps(onnx_model, rows, new_tokens // 2, prompt_tokens)
        results[f"raw_step_{rows}_tok_s"] = rows * (new_tokens // 2) / seconds

    # Continuous batching without HTTP: aggregate tok/s of 1, 4 and 8 requests submitted together.
    engine = Engine(TextGenerator(onnx_model, generator.tokenizer), "bench", queue_size=16, max_batch_size=8)
    try:
        for streams in (1, 4, 8):
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                jobs = [engine.submit(GenerationRequest(prompt=f"Story {i}: {CHAT_PROMPT}", max_new_tokens=100,
                                                        sampling=SamplingParams(temperature=0), ban_eos=True))
                        for i in range(streams)]
                tokens = sum(job.wait().completion_tokens for job in jobs)
                rates.append(tokens / (time.perf_counter() - started))
            results[f"batch_{streams}_tok_s"] = statistics.median(rates)
    finally:
        engine.shutdown()
    results["provider_cuda"] = 1.0 if onnx_model.provider == "cuda" else 0.0
    return results


def main(model: str, provider: str, cache_dir: Path, new_tokens: int, repeats: int, cpu_threads: int,
         quant: str = "auto") -> None:
    results = run_benchmark(model, provider, cache_dir, new_tokens, repeats, cpu_threads, quant)
    device = "CUDA" if results.pop("provider_cuda") else "CPU"
    print(f"\nkobold_api engine benchmark ({device}, median of {repeats})")
    print(f"  decode, greedy:                {results['decode_tok_s_greedy']:8.1f} tok/s ({new_tokens} new tokens)")
    print(f"  decode, SillyTavern samplers:  {results['decode_tok_s_sillytavern']:8.1f} tok/s")
    print(f"  prefill, 1,024-token prompt:   {results['prefill_1024_s']:8.3f} s")
    print(f"  follow-up (1,000 cached + 24): {results['follow_up_prefill_s']:8.3f} s "
          f"({int(results['follow_up_reused_tokens'])} tokens reused)")
    raw_one, raw_eight = results["raw_step_1_tok_s"], results["raw_step_8_tok_s"]
    print(f"  decode steps alone, 1 / 8 rows: {raw_one:7.1f} / {raw_eight:.1f} tok/s ({raw_eight / raw_one:.2f}x: "
          "the ceiling for the line below)")
    single = results["batch_1_tok_s"]
    for streams in (1, 4, 8):
        rate = results[f"batch_{streams}_tok_s"]
        print(f"  {streams} concurrent requests:         {rate:8.1f} tok/s aggregate ({rate / single:.2f}x one)")
