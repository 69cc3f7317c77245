"""The IR-neutral Site model: one adaptable place in a graph, whichever IR the graph is in.

Target selection (``lora_fx.targeting``) sees Sites only, so a ``LoraConfig`` means the same thing
on a torch.export graph and on an ONNX file exported from the same model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class SiteKind(str, enum.Enum):
    LINEAR = "linear"
    ATTENTION = "attention"


class IRKind(str, enum.Enum):
    FX = "fx"
    ONNX = "onnx"


@dataclass
class Site:
    """One linear or attention node of a model graph.

    ``name`` is the source module path (``encoder.layer.0.attention.self.query``). ``handle`` points
    back into the IR (an FX node, an ONNX node) and is never serialized.
    """

    name: str
    kind: SiteKind
    ir: IRKind
    in_features: int | None = None
    out_features: int | None = None
    num_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    dtype: str = "float32"
    has_bias: bool = False
    # The weight is stored [in, out] (GPT-2's Conv1D, ONNX MatMul) rather than torch's [out, in].
    fan_in_fan_out: bool = False
    # The model's output projection (lm_head): "all-linear" leaves it out, as PEFT does.
    is_output_layer: bool = False
    # How the site computes, e.g. "aten.linear", "aten.addmm", "MatMul", "Gemm", "sdpa", "eager".
    op: str = ""
    # The module PEFT adapts this linear together with, as a whole (an nn.MultiheadAttention, for its
    # out_proj): targeting that module selects this site too.
    part_of: str | None = None
    handle: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value, "ir": self.ir.value, "op": self.op, "dtype": self.dtype}
        if self.kind is SiteKind.LINEAR:
            out.update(
                in_features=self.in_features,
                out_features=self.out_features,
                has_bias=self.has_bias,
                fan_in_fan_out=self.fan_in_fan_out,
                is_output_layer=self.is_output_layer,
            )
            if self.part_of is not None:
                out["part_of"] = self.part_of
        else:
            out.update(
                num_heads=self.num_heads,
                kv_heads=self.kv_heads,
                head_dim=self.head_dim,
                in_features=self.in_features,
                out_features=self.out_features,
            )
        return out

    def shape_text(self) -> str:
        if self.kind is SiteKind.LINEAR:
            return f"{self.in_features} -> {self.out_features}"
        parts = [f"heads={self.num_heads}"]
        if self.kv_heads is not None and self.kv_heads != self.num_heads:
            parts.append(f"kv_heads={self.kv_heads}")
        if self.head_dim is not None:
            parts.append(f"head_dim={self.head_dim}")
        return " ".join(parts)


# The class PEFT adapts as a whole (lora.MultiheadAttention: in_proj and out_proj), by its ModuleTree name.
MULTIHEAD_ATTENTION = "torch.nn.modules.activation.MultiheadAttention"

# A model's module tree, as targeting sees it: module path -> qualified names of its class and the classes it
# derives from (``torch.nn.modules.normalization.LayerNorm``, ...). Known where the source model was seen (FX capture)
# and, for the modules whose nodes say enough, in ONNX exports (``passes.onnx.find_sites.module_tree``).
ModuleTree = Mapping[str, Sequence[str]]

# In an ONNX ModuleTree, what stands for a class the file does not record (TorchScript exports name scopes, not
# classes): the ops the module's nodes compute, after this prefix ("onnx ops: Sigmoid, Mul").
ONNX_OPS = "onnx ops: "
# A module whose own nodes look rows up in a constant float matrix: an nn.Embedding (PEFT adapts it, lora_fx does
# not) or a module PEFT refuses; a target matching it is refused either way.
EMBEDDING_LOOKUP = ONNX_OPS + "Gather (an embedding lookup)"


def format_sites(sites: list[Site]) -> str:
    """A plain-text table of sites, for the CLI and for error messages."""
    rows = [(s.name, s.kind.value, s.op, s.shape_text()) for s in sites]
    header = ("name", "kind", "op", "shape")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
