"""How long a running stream stalls while a long prompt joins it, with and without chunked prefill.

    python benchmarks/prefill_stall.py [--prompt 4096] [--chunks 0,256,512,1024]

One stream decodes 200 tokens of the default model; once it is under way, a request with a
``--prompt``-token prompt joins. For each ``prefill_chunk`` (0: the whole prompt at once) it
prints the stream's longest gap between two tokens, its tok/s over its whole run, and the
joining request's time to first token. Numbers go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from kobold_api.engine.engine import Engine
from kobold_api.engine.generation import GenerationRequest, TextGenerator
from kobold_api.engine.onnx_model import OnnxCausalLM
from kobold_api.engine.sampling import SamplingParams
from kobold_api.engine.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--chunks", default="0,256,512,1024")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    model_dir = next(path for path in sorted(Path("data/models").glob("SmolLM2-135M-Instruct-*")) if path.is_dir())
    model, tokenizer = OnnxCausalLM(model_dir, "cpu", args.threads), Tokenizer(model_dir)
    long_ids = [(7 * i) % 40000 + 100 for i in range(args.prompt)]
    for chunk in (int(value) for value in args.chunks.split(",")):
        engine = Engine(TextGenerator(model, tokenizer, None, 8192), "bench", max_batch_size=4, prefill_chunk=chunk)
        try:
            stream = engine.submit(GenerationRequest(prompt="Once upon a time", max_new_tokens=200, ban_eos=True,
                                                     sampling=GREEDY, max_context_length=8192))
            arrivals: list[float] = []
            reader = threading.Thread(target=lambda: [arrivals.append(time.perf_counter()) for _ in stream.chunks()])
            reader.start()
            while len(arrivals) < 20:
                time.sleep(0.001)
            joined_at = time.perf_counter()
            joining = engine.submit(GenerationRequest(prompt_ids=long_ids, max_new_tokens=1, ban_eos=True,
                                                      sampling=GREEDY, max_context_length=8192))
            first = joining.wait()
            ttft = time.perf_counter() - joined_at
            reader.join()
            result = stream.wait()
            gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
            print(json.dumps({"prefill_chunk": chunk, "prompt_tokens": args.prompt,
                              "stream_max_gap_s": round(max(gaps), 3),
                              "stream_tok_s": round(result.completion_tokens / (arrivals[-1] - arrivals[0]), 1),
                              "joining_ttft_s": round(ttft, 3), "joining_prefill_s": round(first.prefill_seconds, 3)}))
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
