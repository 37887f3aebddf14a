"""Names and defaults of the engine's batch layouts (a module of its own: the settings read it
without loading ONNX Runtime)."""

#: ``kv_layout`` choices: ``slots`` (fixed key/value slots; in device memory on CUDA), ``concat``
#: (each step's presents become the next pasts), ``auto`` (see ``OnnxCausalLM.decode_layout``).
KV_LAYOUTS = ("auto", "slots", "concat")
#: Prompt tokens per session run (``prefill_chunk_tokens``, see Engine._start): a long prompt runs
#: in parts of this many, between the running streams' steps when there are any. On the 2-core CPU
#: a running stream then waits at most 1.2 s while a 4,096-token prompt joins (9.5 s at once), and
#: the prompt itself is done sooner (7.9 vs 9.0 s): benchmarks/prefill_stall.py. Alone too: ONNX
#: Runtime's CPU attention keeps a float32 score buffer of [heads, new tokens, slot] per run, so a
#: whole 4,096-token prompt in a slot of 8,192 added 336-354 MB to the default model's process (3.2
#: GB of scores at 3B), parts of 256 add 168 MB (94 MB of it the keys), and the prompt ran in
#: 7.4-7.7 s instead of 8.7 (128: 8.0 s; 512: 7.6-7.9 s; 1,024: 8.7 s). The parts' logits are
#: bit-identical to a whole prefill's.
DEFAULT_PREFILL_CHUNK = 256
