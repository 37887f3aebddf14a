"""kobold_api: a KoboldAI-compatible LLM server on ONNX Runtime."""

__version__ = "0.1.0"
