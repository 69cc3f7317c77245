"""Passes on onnx_ir Models: the same jobs as ``passes/fx/``, with the same file names."""
