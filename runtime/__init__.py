"""Running rewritten graphs: the training loop, ONNX graphs executed by torch, ONNX Runtime sessions."""
