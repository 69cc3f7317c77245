"""Fold LoRA branches into the frozen weights: ``W' = W + A @ B`` in the weight's own layout.

After the pass the model has exactly the base model's nodes and op types; only weight values differ. No LoRA adapter
is claimed any more: the LoRA record, config and base fingerprint go from the model's metadata, and the marker
``insert_lora`` left on each adapted node (``lora_fx.adapted``, which refuses a second adapter there) from its
nodes, so a merged model can be rewritten again like any plain model. The record of modules trained in full
(``modules_to_save``) is the caller's to settle (``lora-fx export --merge`` merges them as trained).
Non-finite results are refused before anything changes (PEFT's ``safe_merge``); prefix adapters
cannot be folded into weights and are refused with the way out (export with adapters instead).

A site whose W is stored quantized (MatMulBnb4 nf4, MatMulNBits int4, DequantizeLinear int8; also
other tools' MatMulNBits bits 8; see ``quantized_weight``) is folded into the dequantized W only when
the caller says what becomes of it (``QuantMerge``): ``FLOAT`` keeps the merged W in float (a plain
MatMul), ``REQUANTIZE`` stores it again in the same format, block size and op (double-quantized nf4
absmaxes stay int8 codes with a factor per ``double_quant_block_size``, decoded by the same nodes), and
reports the error requantization adds (``FoldLora.errors``, and one line per site in
``PassResult.changed``). Without a choice such a site is refused.

A site inside ``If`` branches (one adapter in the main graph, a branch at every node reading the site's outer-scope
weight: Optimum's merged decoders) folds once: ``W'`` is written to the main-graph weight every branch reads, and
every branch is removed from every subgraph. A quantized W (``quantize_weights`` stores it once in the main graph,
every branch node reading it) folds the same way: the requantized storage is written once for all of them, or
(``FLOAT``) one float W replaces it for all. A site whose branch nodes read different storages, or W through a
``Transpose`` that other sites share, is refused before anything changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lora_fx.enums import parse_enum
from lora_fx.errors import AdapterError, ConfigError, UnsupportedError
from lora_fx.passes.onnx.find_sites import INSERTED, const_tensor, subgraph_graphs
from lora_fx.passes.onnx.insert_lora import ADAPTED, SITE
from lora_fx.passes.onnx.lora_layout import (
    CONFIG_KEY, FINGERPRINT_KEY, Branch, find_branches, has_prefix, read_records, remove_branch, replace_value, write_records,
)
from lora_fx.passes.onnx.quantized_weight import QuantizedWeight, quantized_weight, replace_by_float, write_storage
from lora_fx.passes.result import PassResult

# Nodes a LoRA input may pass through on its way from the site's own input (eval-mode dropout).
_PASS_THROUGH = {"Identity", "Dropout"}
# Between a site and its branch of a half-precision model (fp16/bf16 bases train fp32 adapters, as
# PEFT does): x -> Cast(float) -> x @ A @ B, and Cast(y, float) + delta -> Cast back to the model's dtype.
_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_QUANTIZED_OPS = {"MatMulBnb4", "MatMulNBits"}


class QuantMerge(str, enum.Enum):
    """What a merge does with a W stored quantized."""

    FLOAT = "float"  # W + A @ B stays in float: a plain MatMul, no requantization error
    REQUANTIZE = "requantize"  # W + A @ B quantized again (same format, block size, op); its error is reported

    @classmethod
    def parse(cls, value: "QuantMerge | str | None") -> "QuantMerge | None":
        if value is None:
            return None
        return parse_enum(cls, value, f"quant_merge={value!r} is not a choice; use 'float' (keep the merged W in float) or 'requantize'")


@dataclass
class RequantError:
    """The error requantizing a merged W adds: its dequantized value against the float merged W."""

    site: str
    format: str  # e.g. "MatMulNBits int4, block 32"
    max_abs: float
    relative: float  # ||deq(q(W')) - W'|| / ||W'|| (Frobenius)

    def to_dict(self) -> dict:
        return {"site": self.site, "format": self.format, "max_abs_error": self.max_abs, "relative_error": self.relative}


@dataclass
class _Fold:
    branch: Branch
    weight: ir.Value | None  # the initializer holding W (None for a quantized W)
    transposed: bool  # W is stored [out, in] (torch's layout, Gemm transB=1, MatMul over Transpose)
    gemm_alpha: float
    consumer: ir.Node  # the node reading W (MatMul, Transpose or Gemm)
    quant: QuantizedWeight | None = None
    up_cast: ir.Node | None = None  # Cast(y, float) of a half-precision site, undone after the fold
    site_node: ir.Node | None = None  # the MatMul/Gemm of the site (the consumer, unless that is a Transpose)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _source(value: ir.Value) -> ir.Value:
    # A Cast too: the branch of a half-precision site reads x cast to float, the site x itself.
    while value.producer() is not None and value.producer().op_type in _PASS_THROUGH | {"Cast"}:
        value = value.producer().inputs[0]
    return value


def _up_cast(value: ir.Value) -> ir.Node | None:
    """The ``Cast(y, to=float)`` producing ``value`` when y is fp16/bf16, else None."""
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.inputs[0] is None or node.inputs[0].dtype not in _HALF:
        return None
    return node if _attr(node, "to", None) == ir.DataType.FLOAT else None


def _drop_precision_casts(graph: ir.Graph, fold: _Fold) -> None:
    """After a half-precision branch is gone: drop its x Cast, and Cast(Cast(y, float), half) becomes y
    (exact: float holds every fp16/bf16 value), so the folded graph has the base model's nodes."""
    x_cast = fold.branch.x.producer()
    if x_cast is not None and x_cast.op_type == "Cast" and not list(fold.branch.x.uses()) and fold.branch.x not in graph.outputs:
        graph.remove(x_cast, safe=True)
    up = fold.up_cast
    if up is None:
        return
    y, y_float = up.inputs[0], up.outputs[0]
    downs = [use.node for use in y_float.uses()]
    if y_float in graph.outputs or not downs or not all(
            d.op_type == "Cast" and _attr(d, "to", None) == y.dtype for d in downs):
        return
    for down in downs:
        replace_value(graph, down.outputs[0], y)
        graph.remove(down, safe=True)
    graph.remove(up, safe=True)


def _drop_lora_markers(model: ir.Model) -> None:
    """Drop the per-node LoRA markers from every graph: the fold removed every branch of every recorded site, so no
    node is adapted any more. Left behind, ``lora_fx.adapted`` made ``insert_lora`` refuse the merged model's sites
    ("already has a LoRA adapter"). The branch nodes' own ``lora_fx.inserted``/``lora_fx.site`` went with them; a
    surviving one is dropped too. Prefix markers cannot occur: prefix models are refused before the fold."""
    for graph in subgraph_graphs(model):
        for node in graph:
            props = node.metadata_props
            props.pop(ADAPTED, None)
            props.pop(SITE, None)
            if props.get(INSERTED) == "lora":
                props.pop(INSERTED)


def _weight_origin(graph: ir.Graph, value: ir.Value | None) -> str:
    """Where a weight that is no initializer comes from, in the words of the refusal."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Transpose" and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer() or node
    if node is not None and node.op_type == "Constant":
        return f"is the value of Constant node {node.name!r} (lift it to an initializer, e.g. with onnx_ir's LiftConstantsToInitializersPass, to fold)"
    if value is not None and value in graph.inputs:
        return f"is graph input {value.name!r}"
    return f"is computed by {node.op_type} node {node.name!r}" if node is not None else "is not stored in the graph"


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.Value | None:
    if value is not None and value.name in graph.initializers and graph.initializers[value.name] is value:
        return value
    return None


def _constant_bias(graph: ir.Graph, value: ir.Value | None) -> bool:
    """An initializer or Constant, possibly behind ``Identity`` nodes: the TorchScript exporter stores tensors of
    equal value once and reads the others through ``Identity`` (Qwen2's zero-initialized k and v biases)."""
    while value is not None and value.producer() is not None and value.producer().op_type == "Identity":
        value = value.producer().inputs[0]
    return _initializer(graph, value) is not None or const_tensor(value) is not None


class FoldLora:
    """Fold each LoRA branch recorded in ``lora_fx.lora`` into its site's weight.

    Matches a branch ``Add(y, MatMul(MatMul(x, A), B))`` where ``y`` is computed from ``x`` by
    ``MatMul(x, W)`` (``W [in, out]``, Conv1D-style and ONNX-native), ``MatMul(x, Transpose(W))``
    (``W [out, in]``, torch's layout), or ``Gemm(x, W[, C], transB=0|1, alpha)``, optionally followed
    by ``Add(·, bias)``. A weight shared with other nodes (tied embeddings) gets its own merged copy.
    Quantized weights (MatMulBnb4, MatMulNBits, MatMul over DequantizeLinear) fold as ``quant_merge`` says.
    """

    def __init__(self, quant_merge: QuantMerge | None = None) -> None:
        self.quant_merge = QuantMerge.parse(quant_merge)
        self.errors: list[RequantError] = []
        self.quantized_sites: list[str] = []  # the folded sites whose W was stored quantized

    def __call__(self, model: ir.Model) -> PassResult:
        if has_prefix(model):
            raise UnsupportedError(
                "this model holds prefix-tuning adapters, which cannot be folded into weights "
                "(they are extra key/value tokens, not a weight delta); export with adapter slots instead: "
                "lora-fx export ... --adapters, or export_onnx(..., mode='adapters')"
            )
        graph = model.graph
        records = read_records(model)
        plans = [self._plan_site(graph, site, rec) for site, rec in records.items()]
        merged = {}
        self.errors = []
        self.quantized_sites = [folds[0].branch.site for folds in plans if folds[0].quant is not None]
        # Compute and check every new weight before touching the model: a refusal leaves it as it was.
        for folds in plans:
            fold = folds[0]
            merged[fold.branch.site] = self._merged_quantized(fold) if fold.quant is not None else self._merged_weight(fold)
        for folds in plans:
            fold = folds[0]
            if fold.quant is not None:
                self._apply_quantized(graph, folds, merged[fold.branch.site])
            elif len(folds) == 1:
                self._apply(graph, fold, merged[fold.branch.site])
            else:
                self._apply_branches(graph, folds, merged[fold.branch.site])
            for each in folds:
                _drop_precision_casts(each.branch.graph, each)
        from lora_fx.onnx_adapter import HEADS_AS_BASE_KEY

        write_records(model, {})
        if plans:
            _drop_lora_markers(model)
        # HEADS_AS_BASE_KEY only qualifies the fingerprint (onnx_adapter.model_fingerprints), which goes.
        for key in (CONFIG_KEY, FINGERPRINT_KEY, HEADS_AS_BASE_KEY):
            model.metadata_props.pop(key, None)
        changed = [folds[0].branch.site for folds in plans]
        changed += [f"{e.site}: requantized ({e.format}), max abs error {e.max_abs:.3g}, relative error {e.relative:.3g}"
                    for e in self.errors]
        return PassResult(model, bool(plans), changed)

    def _plan_site(self, graph: ir.Graph, site: str, rec: dict) -> list[_Fold]:
        """One ``_Fold`` per branch of the site (several for a site inside If branches), all onto one weight."""
        folds = [self._plan(graph, branch) for branch in find_branches(graph, site, rec)]
        if len(folds) == 1:
            return folds
        first = folds[0]
        if first.quant is not None or any(f.quant is not None for f in folds):
            self._check_shared_storage(site, folds)
            return folds
        if any((f.weight, f.transposed, f.gemm_alpha) != (first.weight, first.transposed, first.gemm_alpha) for f in folds):
            raise UnsupportedError(f"site {site}: its If-branch nodes read different weights or layouts, so no one W + A @ B "
                                   "serves them all; export with adapter slots instead")
        if any(f.consumer is not f.site_node and len(list(f.consumer.outputs[0].uses())) > 1 for f in folds):
            raise UnsupportedError(f"site {site}: a branch reads its weight through a Transpose other sites share, which "
                                   "lora_fx does not split inside If branches; export with adapter slots instead")
        return folds

    @staticmethod
    def _check_shared_storage(site: str, folds: list[_Fold]) -> None:
        """The If-branch nodes of a quantized site must read one storage (``quantize_weights`` makes it so) for one
        merged W to serve them all."""
        first = folds[0].quant

        def inputs(q: QuantizedWeight) -> list:
            # x is each node's own; so is a double-quantized absmax, decoded in each branch from shared constants.
            own = [v for i, v in enumerate(q.node.inputs)
                   if (i != 0 or q.node is not q.matmul) and not (i == 2 and q.double_quant is not None)]
            return own + ([q.double_quant.values[k] for k in sorted(q.double_quant.values)] if q.double_quant else [])

        same = all(f.quant is not None and f.quant.describe() == first.describe() and f.quant.stored_out_in == first.stored_out_in
                   and (f.quant.out_features, f.quant.in_features) == (first.out_features, first.in_features)
                   and len(inputs(f.quant)) == len(inputs(first))
                   and all(a is b for a, b in zip(inputs(f.quant), inputs(first))) for f in folds)
        if not same:
            raise UnsupportedError(f"site {site}: its If-branch nodes read different quantized weights or formats, so no "
                                   "one W + A @ B serves them all; export with adapter slots instead")

    def _plan(self, graph: ir.Graph, branch: Branch) -> _Fold:
        """``graph`` is the main graph (the weights' home); the branch may lie in one of its If branches."""
        site = branch.site
        up_cast = _up_cast(branch.y)
        node = up_cast.inputs[0].producer() if up_cast is not None else branch.y.producer()
        if node is not None and node.op_type == "Add":
            # y = x @ W + bias: the weight is behind the bias Add.
            for i, other in ((0, 1), (1, 0)):
                producer = node.inputs[i].producer() if node.inputs[i] is not None else None
                if producer is not None and (producer.op_type in ("MatMul", "Gemm") or producer.op_type in _QUANTIZED_OPS) \
                        and _constant_bias(graph, node.inputs[other]):
                    node = producer
                    break
        quant = quantized_weight(site, node) if node is not None else None
        if quant is not None:
            if self.quant_merge is None:
                raise UnsupportedError(
                    f"site {site}: its weight is stored quantized ({quant.describe()}); say what the merge makes of it: "
                    "keep the merged W in float (CLI --float, Python quant_merge=QuantMerge.FLOAT) or quantize it again "
                    "(--requantize, QuantMerge.REQUANTIZE; the error it adds is reported), or export with adapter slots instead"
                )
            if _source(node.inputs[0]) is not _source(branch.x):
                raise UnsupportedError(f"site {site}: the LoRA branch reads a different input than the site's weight; cannot fold")
            return _Fold(branch, None, True, 1.0, quant.matmul, quant, up_cast)
        if node is None or node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            found = "a graph input" if node is None else node.op_type
            raise UnsupportedError(
                f"site {site}: its output comes from {found}, not a MatMul/Gemm over a stored weight, so the "
                "adapter cannot be folded (a quantized weight cannot absorb a float delta); export with adapter slots instead"
            )
        w_in = node.inputs[1]
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                raise UnsupportedError(f"site {site}: Gemm with transA=1 is not a linear site layout lora_fx folds")
            weight = _initializer(graph, w_in)
            transposed, alpha, consumer = bool(_attr(node, "transB", 0)), float(_attr(node, "alpha", 1.0)), node
        else:
            weight, transposed, alpha, consumer = _initializer(graph, w_in), False, 1.0, node
            producer = w_in.producer()
            if weight is None and producer is not None and producer.op_type == "Transpose" and tuple(_attr(producer, "perm", (1, 0))) == (1, 0):
                weight, transposed, consumer = _initializer(graph, producer.inputs[0]), True, producer
        if weight is None or weight.const_value is None:
            raise UnsupportedError(f"site {site}: its weight {_weight_origin(graph, w_in)}, not an initializer, so the fold "
                                   "has nowhere to write W + A @ B; export with adapter slots instead")
        if _source(node.inputs[0]) is not _source(branch.x):
            raise UnsupportedError(f"site {site}: the LoRA branch reads a different input than the site's weight; cannot fold")
        return _Fold(branch, weight, transposed, alpha, consumer, None, up_cast, node)

    @staticmethod
    def _merged_weight(fold: _Fold) -> np.ndarray:
        site = fold.branch.site
        w = fold.weight.const_value.numpy()
        a = fold.branch.a.const_value.numpy().astype(np.float64)
        b = fold.branch.b.const_value.numpy().astype(np.float64)
        delta = (a @ b) / fold.gemm_alpha
        if fold.transposed:
            delta = delta.T
        if delta.shape != w.shape:
            raise AdapterError(f"site {site}: A @ B has shape {delta.shape} but the weight {fold.weight.name} is {w.shape}")
        with np.errstate(all="ignore"):
            out = (w.astype(np.float64) + delta).astype(w.dtype)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise AdapterError(
                f"site {site}: merging the adapter gives {bad} non-finite weight values (NaN/inf in the adapter "
                "or an overflow in the weight's dtype); nothing was merged. Check the adapter (training diverged?)"
            )
        return out

    def _merged_quantized(self, fold: _Fold) -> np.ndarray | dict:
        """Float merged W ``[out, in]`` (FLOAT) or the new storage (REQUANTIZE), checked finite."""
        site, quant = fold.branch.site, fold.quant
        w = quant.dequantize().astype(np.float64)
        a = fold.branch.a.const_value.numpy().astype(np.float64)
        b = fold.branch.b.const_value.numpy().astype(np.float64)
        delta = (a @ b).T
        if delta.shape != w.shape:
            raise AdapterError(f"site {site}: A @ B has shape {delta.shape[::-1]} but the quantized weight is [in, out] {w.shape[::-1]}")
        with np.errstate(all="ignore"):
            merged = (w + delta).astype(quant.float_dtype)
        if not np.isfinite(merged).all():
            bad = int((~np.isfinite(merged)).sum())
            raise AdapterError(
                f"site {site}: merging the adapter gives {bad} non-finite weight values (NaN/inf in the adapter "
                "or an overflow in the weight's dtype); nothing was merged. Check the adapter (training diverged?)"
            )
        if self.quant_merge is QuantMerge.FLOAT:
            return merged
        target = merged.astype(np.float32)
        with np.errstate(all="ignore"):
            storage = quant.quantize(target)
            deq = quant.dequantize(storage).astype(np.float64)
        if not np.isfinite(deq).all():
            raise AdapterError(
                f"site {site}: requantizing the merged weight gives non-finite values (its scales overflow "
                f"{quant.describe()}); nothing was merged. Merge with --float (QuantMerge.FLOAT) instead"
            )
        diff = deq - target.astype(np.float64)
        norm = float(np.sqrt((target.astype(np.float64) ** 2).sum()))
        self.errors.append(RequantError(site, quant.describe(), float(np.abs(diff).max()),
                                        float(np.sqrt((diff ** 2).sum())) / max(norm, 1e-30)))
        return storage

    def _apply_quantized(self, graph: ir.Graph, folds: list[_Fold], merged: np.ndarray | dict) -> None:
        """Every branch of the site goes; its node (every If-branch node of a site inside them) reads the requantized
        storage, written once in the main graph, or one float merged W."""
        site = folds[0].branch.site
        for fold in folds:
            remove_branch(graph, fold.branch)
        if isinstance(merged, dict):
            write_storage(graph, site, folds[0].quant, merged, tuple(f.quant for f in folds[1:]))
        else:
            weight = None
            for fold in folds:
                weight = replace_by_float(graph, site, fold.quant, merged, weight)

    @staticmethod
    def _apply_branches(graph: ir.Graph, folds: list[_Fold], merged: np.ndarray) -> None:
        """A site inside If branches: every branch goes, and the one weight they all read becomes W + A @ B (a copy
        of its own where other nodes read W too, a tied embedding)."""
        weight = folds[0].weight
        consumers = {id(f.consumer) for f in folds}
        for fold in folds:
            remove_branch(graph, fold.branch)
        if weight in graph.inputs or any(id(use.node) not in consumers for use in weight.uses()):
            new = _merged_initializer(graph, folds[0].branch.site, merged, weight.type)
            for use in list(weight.uses()):
                if id(use.node) in consumers:
                    use.node.replace_input_with(use.idx, new)
        else:
            weight.const_value = ir.tensor(merged, name=weight.name)

    @staticmethod
    def _apply(graph: ir.Graph, fold: _Fold, merged: np.ndarray) -> None:
        weight = fold.weight
        remove_branch(graph, fold.branch)
        consumer = fold.consumer
        if consumer is not fold.site_node and len(list(consumer.outputs[0].uses())) > 1:
            # One Transpose(W) read by several sites (a layer called twice, exporters' common-subexpression
            # elimination): this site alone reads its merged W, stored [in, out] so no node is added.
            new = _merged_initializer(graph, fold.branch.site, np.ascontiguousarray(merged.T), weight.type)
            for use in list(consumer.outputs[0].uses()):
                if use.node is fold.site_node:
                    fold.site_node.replace_input_with(use.idx, new)
        elif len(list(weight.uses())) > 1 or weight in graph.inputs:
            # A tied weight (lm_head = embeddings) keeps its value for its other users.
            new = _merged_initializer(graph, fold.branch.site, merged, weight.type)
            for use in list(weight.uses()):
                if use.node is fold.consumer:
                    fold.consumer.replace_input_with(use.idx, new)
        else:
            weight.const_value = ir.tensor(merged, name=weight.name)


def _merged_initializer(graph: ir.Graph, site: str, merged: np.ndarray, type_: ir.TypeProtocol | None) -> ir.Value:
    """A new initializer ``<site>.weight`` holding ``merged``, for the site alone where others still read the base W."""
    name = f"{site}.weight"
    while name in graph.initializers:
        name += ".merged"
    new = ir.Value(name=name, shape=ir.Shape(list(merged.shape)), type=type_, const_value=ir.tensor(merged, name=name))
    graph.register_initializer(new)
    return new


def fold_lora(model: ir.Model, quant_merge: QuantMerge | str | None = None) -> PassResult:
    return FoldLora(quant_merge)(model)
