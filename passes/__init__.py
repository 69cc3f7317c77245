"""Graph rewrites, one pass per file, with the same file names under ``fx/`` and ``onnx/``."""

from lora_fx.passes.result import PassResult

__all__ = ["PassResult"]
