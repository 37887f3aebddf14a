"""Names of the engine's batch layouts (a module of its own: the settings read it without
loading ONNX Runtime)."""

#: ``kv_layout`` choices: ``slots`` (fixed key/value slots; in device memory on CUDA), ``concat``
#: (each step's presents become the next pasts), ``auto`` (see ``OnnxCausalLM.decode_layout``).
KV_LAYOUTS = ("auto", "slots", "concat")
