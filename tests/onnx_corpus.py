"""A corpus of ONNX models for tests: tiny transformers exported every way users export them, plus
hand-built graphs for the forms exporters do not write (Gemm MLP, fp16, quantized weights, tied
weights, contrib attention ops).

Each ``Entry`` carries the file, the source torch model and example inputs (when there is one), the
exact number of linear and attention sites ``find_sites`` must report, and the prefix an exporter's
wrapper adds to module names. Entries are built lazily, once per process, into one temporary folder:

    from tests.onnx_corpus import corpus
    entry = corpus().get("bert-dynamo18")      # or the session fixture ``onnx_corpus`` in conftest
    model = lora_fx.load(entry.path)

Nothing downloads: the transformers models come from ``tests.models`` (random, seeded).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tests import models


@dataclass
class Entry:
    name: str
    path: Path
    n_linear: int
    n_attention: int
    # The eager torch model the file was exported from and its example inputs (None for hand-built graphs).
    model: torch.nn.Module | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    # What an exporter's wrapper put in front of the torch module paths (TorchScript: "model.").
    prefix: str = ""
    # False where the exported file itself does not run in ONNX Runtime (an exporter or ORT limitation).
    runs_in_ort: bool = True
    # False where a fusion merged source linear layers (packed QKV), so FX and ONNX sites differ by design.
    same_sites_as_fx: bool = True
    # Passes onnx.checker (ORT-only fused ops in the default domain do not).
    checker: bool = True
    # Attention sites' (num_heads, kv_heads, head_dim) where the model has attention.
    heads: tuple[int, int, int] | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in self.inputs.items()}


def _export(name: str, path: Path, *, opset: int, dynamo: bool, optimize: bool = True) -> tuple[torch.nn.Module, dict]:
    from tests.runtime.onnx_models import export

    model = models.build(name)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    if optimize:
        export(name, path, opset=opset, dynamo=dynamo)
    else:
        # What lora_fx's own FX export path writes: no optimizer, so every parameter keeps its name and
        # weights reach MatMul through Transpose nodes.
        kwargs = models.inputs(2, 8)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=True, optimize=False, opset_version=opset,
                              input_names=list(kwargs), dynamic_shapes={k: {0: batch, 1: seq} for k in kwargs}, verbose=False)
    return model, models.inputs(2, 8, pad=2)


# Sites of the tiny zoo models (2 layers): BERT 6 linear a layer + pooler; GPT-2 4 + lm_head; Llama 7 + lm_head.
_COUNTS = {"bert": (13, 2), "gpt2": (9, 2), "llama": (15, 2), "minilm": (37, 6)}
_HEADS = {"bert": (4, 4, 8), "gpt2": (4, 4, 8), "llama": (4, 2, 8), "minilm": (12, 12, 32)}


class Corpus:
    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="lora_fx_onnx_corpus_"))
        self._entries: dict[str, Entry] = {}
        self._builders: dict[str, Callable[[], Entry]] = {}
        for arch in ("bert", "gpt2", "llama"):
            self._builders[f"{arch}-dynamo18"] = lambda a=arch: self._zoo(a, 18, True)
            self._builders[f"{arch}-torchscript"] = lambda a=arch: self._zoo(a, 17, False)
        # Llama at opset 23 keeps GQA in the Attention op; its RotaryEmbedding export does not run in ORT 1.31.
        self._builders["bert-dynamo23"] = lambda: self._zoo("bert", 23, True)
        self._builders["llama-dynamo23"] = lambda: self._zoo("llama", 23, True, runs_in_ort=False)
        # Opset 12, below Shape(start, end), CastLike and Unsqueeze's axes input; eager attention (no SDPA before 14).
        self._builders["llama-torchscript12"] = lambda: self._zoo("llama", 12, False)
        # The real pretrained all-MiniLM-L6-v2 (bundled), as the TorchScript exporter writes it.
        self._builders["minilm-torchscript"] = lambda: self._zoo("minilm", 17, False)
        self._builders["llama-dynamo18-noopt"] = lambda: self._zoo("llama", 18, True, optimize=False)
        self._builders["bert-ortfused"] = lambda: self._fused("bert")
        self._builders["llama-ortfused"] = lambda: self._fused("llama")
        self._builders["gemm-mlp"] = self._gemm_mlp
        self._builders["fp16-mlp"] = self._fp16
        self._builders["forms"] = self._forms

    @property
    def names(self) -> list[str]:
        return list(self._builders)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            self._entries[name] = self._builders[name]()
        return self._entries[name]

    # ---- transformers exports -------------------------------------------------------------------
    def _zoo(self, arch: str, opset: int, dynamo: bool, runs_in_ort: bool = True, optimize: bool = True) -> Entry:
        tag = (f"dynamo{opset}" if dynamo else "torchscript" + ("" if opset == 17 else str(opset))) + ("" if optimize else "-noopt")
        path = self.dir / f"{arch}-{tag}.onnx"
        model, inputs = _export(arch, path, opset=opset, dynamo=dynamo, optimize=optimize)
        n_lin, n_att = _COUNTS[arch]
        return Entry(
            f"{arch}-{tag}", path, n_lin, n_att, model, inputs, prefix="" if dynamo else "model.",
            runs_in_ort=runs_in_ort, heads=_HEADS[arch],
        )

    def _fused(self, arch: str) -> Entry:
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        src = self.get(f"{arch}-dynamo18")
        model = ir.load(str(src.path))
        optimize_for_ort(model)
        path = self.dir / f"{arch}-ortfused.onnx"
        ir.save(model, str(path))
        n_lin, n_att = _COUNTS[arch]
        if arch == "bert":
            # q, k, v of each layer fuse into com.microsoft.Attention's packed QKV weight: one (unadaptable) site.
            n_lin -= 2 * 2
        return Entry(
            f"{arch}-ortfused", path, n_lin, n_att, src.model, src.inputs, same_sites_as_fx=(arch != "bert"),
            checker=False, heads=_HEADS[arch],
        )

    # ---- hand-built graphs ----------------------------------------------------------------------
    def _gemm_mlp(self) -> Entry:
        """fc1: Gemm transB=1 with C; fc2: Gemm transB=0 without C; head: Gemm transB=1 with C (output)."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(1)
        w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
        inits = [
            numpy_helper.from_array(w(32, 16), "fc1.weight"), numpy_helper.from_array(w(32), "fc1.bias"),
            numpy_helper.from_array(w(32, 24), "fc2.weight"),
            numpy_helper.from_array(w(5, 24), "head.weight"), numpy_helper.from_array(w(5), "head.bias"),
        ]
        nodes = [
            helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
            helper.make_node("Relu", ["h1"], ["a1"]),
            helper.make_node("Gemm", ["a1", "fc2.weight"], ["h2"], name="fc2", transB=0, alpha=0.5),
            helper.make_node("Relu", ["h2"], ["a2"]),
            helper.make_node("Gemm", ["a2", "head.weight", "head.bias"], ["y"], name="head", transB=1),
        ]
        graph = helper.make_graph(
            nodes, "gemm_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits,
        )
        path = self._write(graph, "gemm-mlp.onnx", opset=17)
        return Entry("gemm-mlp", path, 3, 0, inputs={"x": rng.standard_normal((4, 16)).astype(np.float32)}, same_sites_as_fx=False)

    def _fp16(self) -> Entry:
        """An fp16 block: MatMul + bias Add, Gemm transB=1, MatMul into the output."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(2)
        w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float16)  # noqa: E731
        inits = [
            numpy_helper.from_array(w(16, 32), "up.weight"), numpy_helper.from_array(w(32), "up.bias"),
            numpy_helper.from_array(w(32, 32), "mid.weight"), numpy_helper.from_array(w(32), "mid.bias"),
            numpy_helper.from_array(w(32, 8), "out.weight"),
        ]
        nodes = [
            helper.make_node("MatMul", ["x", "up.weight"], ["u"], name="up/MatMul"),
            helper.make_node("Add", ["u", "up.bias"], ["ub"], name="up/Add"),
            helper.make_node("Tanh", ["ub"], ["t"]),
            helper.make_node("Gemm", ["t", "mid.weight", "mid.bias"], ["m"], name="mid", transB=1),
            helper.make_node("Tanh", ["m"], ["t2"]),
            helper.make_node("MatMul", ["t2", "out.weight"], ["y"], name="out/MatMul"),
        ]
        graph = helper.make_graph(
            nodes, "fp16_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])], inits,
        )
        path = self._write(graph, "fp16-mlp.onnx", opset=17)
        return Entry("fp16-mlp", path, 3, 0, inputs={"x": rng.standard_normal((4, 16)).astype(np.float16)}, same_sites_as_fx=False)

    def _forms(self) -> Entry:
        """Weights through Transpose / Cast / DequantizeLinear, MatMulNBits, and one weight tied to two MatMuls."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(3)
        w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
        n = 32
        q = rng.integers(-8, 8, size=(n, n)).astype(np.int8)
        packed, scales = pack_nbits(w(n, n), block=16)  # [N, K] weight, quantized 4-bit
        inits = [
            numpy_helper.from_array(w(n, 16), "enc.proj.weight"), numpy_helper.from_array(w(n), "enc.proj.bias"),
            numpy_helper.from_array(w(n, n).astype(np.float16), "enc.half.weight"),
            numpy_helper.from_array(q, "enc.q8.weight"), numpy_helper.from_array(np.array(0.02, np.float32), "enc.q8.scale"),
            numpy_helper.from_array(packed, "enc.q4.weight"), numpy_helper.from_array(scales, "enc.q4.scales"),
            numpy_helper.from_array(w(n, n), "tied.weight"),
        ]
        nodes = [
            # nn.Linear stored [out, in], transposed in the graph (TorchScript / unoptimized dynamo style).
            helper.make_node("Transpose", ["enc.proj.weight"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["h0"], name="proj_matmul"),
            helper.make_node("Add", ["h0", "enc.proj.bias"], ["h1"]),
            helper.make_node("Cast", ["enc.half.weight"], ["wh"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["h1", "wh"], ["h2"], name="half_matmul"),
            helper.make_node("DequantizeLinear", ["enc.q8.weight", "enc.q8.scale"], ["wq"]),
            helper.make_node("MatMul", ["h2", "wq"], ["h3"], name="q8_matmul"),
            helper.make_node("MatMulNBits", ["h3", "enc.q4.weight", "enc.q4.scales"], ["h4"], name="q4_matmul",
                             domain="com.microsoft", K=n, N=n, bits=4, block_size=16),
            helper.make_node("MatMul", ["h4", "tied.weight"], ["h5"], name="tied_first"),
            helper.make_node("Tanh", ["h5"], ["h6"]),
            helper.make_node("MatMul", ["h6", "tied.weight"], ["y"], name="tied_second"),
        ]
        graph = helper.make_graph(
            nodes, "forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits,
        )
        path = self._write(graph, "forms.onnx", opset=21, ms=True)
        return Entry("forms", path, 6, 0, inputs={"x": rng.standard_normal((3, 16)).astype(np.float32)}, same_sites_as_fx=False)

    def _write(self, graph: Any, filename: str, *, opset: int, ms: bool = False) -> Path:
        import onnx
        from onnx import helper

        opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        if not ms:
            onnx.checker.check_model(model)
        path = self.dir / filename
        onnx.save(model, str(path))
        return path


def pack_nbits(weight: np.ndarray, block: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``weight`` ``[N, K]`` to MatMulNBits' 4-bit layout (zero point 8, low nibble first)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // block, block)
    scales = np.abs(blocks).max(axis=-1) / 7.0
    scales[scales == 0] = 1.0
    q = np.clip(np.round(blocks / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, scales.reshape(-1).astype(np.float32)


_CORPUS: Corpus | None = None


def corpus() -> Corpus:
    """The process-wide corpus (entries built on first use into one temporary folder)."""
    global _CORPUS
    if _CORPUS is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CORPUS = Corpus()
    return _CORPUS
