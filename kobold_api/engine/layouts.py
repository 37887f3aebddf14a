"""Names and defaults of the engine's batch layouts (a module of its own: the settings read it
without loading ONNX Runtime)."""

#: ``kv_layout`` choices: ``slots`` (fixed key/value slots; in device memory on CUDA), ``concat``
#: (each step's presents become the next pasts), ``auto`` (see ``OnnxCausalLM.decode_layout``).
KV_LAYOUTS = ("auto", "slots", "concat")
#: Prompt tokens per part when a long prompt joins running streams (``prefill_chunk_tokens``, see
#: Engine._start): on the 2-core CPU a running stream then waits at most 1.2 s while a 4,096-token
#: prompt joins (9.5 s at once), and the prompt itself is done sooner (7.9 vs 9.0 s):
#: benchmarks/prefill_stall.py.
DEFAULT_PREFILL_CHUNK = 256
