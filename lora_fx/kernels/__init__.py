"""Native CPU kernels, built on first use with the machine's C compiler, each with a torch fallback.

``dequant``: decode quantized weights (nf4, int4 blocks; int8 rows) to float32, the inner loop of
every QLoRA forward and backward. ``tiled_linear``: ``x @ W.T`` and ``grad @ W`` with W dequantized a
tile of rows at a time, so the float tile is still in cache when the matmul reads it.
"""
