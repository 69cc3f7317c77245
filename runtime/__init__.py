"""Running rewritten graphs: the training loop, ONNX graphs executed by torch, ONNX Runtime sessions."""

from lora_fx.runtime.ort import AdapterInfo, Session  # noqa: E402  (onnxruntime itself loads on first use)

__all__ = ["AdapterInfo", "Session"]
