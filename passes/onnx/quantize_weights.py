"""Store the frozen weights of an ONNX model's linear sites quantized (QLoRA), as ONNX Runtime ops.

Matches the linear sites ``find_sites`` reports that ``QuantConfig.target_modules`` selects when
the site is a ``MatMul`` whose weight is a float initializer, directly or through ``Transpose``, or
a ``Gemm`` with such a weight (either ``transB``; ``alpha`` is folded into W, ``C`` with ``beta = 1``
becomes an ``Add`` after the quantized op, the form a ``MatMul`` site with a bias has):

* nf4 -> ``com.microsoft.MatMulBnb4`` (quant_type 1): W ``[N, K]`` flattened, absmax blocks, the
  same bytes ``lora_fx/kernels/quant_formats`` produces. MatMulBnb4 reads float absmaxes; with
  ``double_quant`` they are stored as int8 plus one factor per ``double_quant_block_size`` blocks and
  decoded by a few constant nodes in front of it (``weight_scale*`` initializers).
* int4 -> ``com.microsoft.MatMulNBits`` (bits 4, blocks along K, each row padded to whole blocks
  unless ``pad=False``, ``accuracy_level=0``), zero point 8 or packed affine zero points.
* int8 -> ``DequantizeLinear`` (int8, one scale per output channel) -> ``Transpose`` -> ``MatMul``
  (training runs this chain as ``lora_fx::linear_int8``: ``runtime/int8_linear``). The per-channel
  ``axis`` needs opset 13: a model importing an older default-domain opset is refused (nf4 and int4 use
  com.microsoft ops, which run at any opset). A float16 or bfloat16 scale needs DequantizeLinear-19: below
  opset 19 such a model's scales are stored float32 and the dequantized W is cast to the model's type
  before the Transpose, by ``CastLike(W, x)`` (opset 15+, the form lora_fx's FX export writes) or ``Cast``.

Why int8 is not ``MatMulNBits(bits=8)``, which ONNX Runtime computes exactly under any session options:
ONNX Runtime 1.31's CPU kernel for it decodes W on every call and runs 2-4x slower than this form (four
384x1536 layers, one thread: 8.05 vs 2.41 ms for 1 row, 19.3 vs 13.5 ms for 128; float W 1.42 / 11.4).
Under default options ONNX Runtime fuses this form into ``MatMulNBits(accuracy_level=4)``, which
quantizes the activations to int8 (~0.4% off); ``lora_fx.runtime.ort.Session`` sets
``session.qdq_matmulnbits_accuracy_level=0`` so it computes in float, as training does, and users of
plain ONNX Runtime set the same option. bits=8 MatMulNBits files other tools write are read everywhere
(``quantized_weight``).

New initializers are named ``<site>.weight_q`` / ``.weight_scale`` / ``.weight_zero`` so the site keeps its
name (find_sites reads it from the ``….weight`` prefix); the new node keeps the old one's name and metadata.
Scales and absmaxes are stored in the model's float type (MatMulBnb4 and MatMulNBits read them in
the type of their input; so does the MatMul after DequantizeLinear), but for int8 below opset 19 (above). The numerics are those of the
FX pass (one implementation). Sites that are already quantized
(MatMulNBits, MatMulBnb4, a weight through DequantizeLinear) are refused before anything changes.

A site inside ``If`` branches (``find_sites``' ``Sites.inside``: Optimum's merged decoders, every branch node of the
site reading one main-graph W) is quantized once: the packed storage goes into the main graph, where W was, and every
branch node of the site (``site_nodes``) becomes the quantized op (int8: the DequantizeLinear chain; nf4 with
``double_quant``: the absmax decode too) in its own branch, reading that storage from the outer scope. W goes once no
node reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lora_fx.config import LoraConfig, QuantConfig, QuantDType
from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.passes.onnx.find_sites import const_tensor, find_sites, linear_parts, site_nodes
from lora_fx.passes.result import PassResult
from lora_fx.targeting import select_targets

MS = "com.microsoft"


def _init(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(list(array.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _absmax_constants(graph: ir.Graph, name: str, storage: dict[str, torch.Tensor], numel: int,
                      cfg: QuantConfig) -> dict[str, ir.Value]:
    """The main-graph constants of a double-quantized absmax decode (``_decode_absmax``), made once per site."""
    n_blocks = -(-numel // cfg.block_size)
    groups = -(-n_blocks // cfg.double_quant_block_size)
    consts = {"factor": _init(graph, f"{name}.weight_scale_factor", storage["qscale_factor"].numpy()),
              "mean": _init(graph, f"{name}.weight_scale_mean", storage["qscale_mean"].numpy())}
    consts.update({key: _init(graph, f"{name}/absmax/{key}_shape", np.array(v, dtype=np.int64))
                   for key, v in (("column", [groups, 1]), ("grid", [groups, cfg.double_quant_block_size]), ("flat", [-1]),
                                  ("start", [0]), ("end", [n_blocks]))})
    return consts


def _decode_absmax(name: str, qscale: ir.Value, consts: dict[str, ir.Value], nodes: list[ir.Node],
                   float_type: ir.DataType) -> ir.Value:
    """Double-quantized absmaxes stay int8 in the file; a small decode before MatMulBnb4 (which reads float
    absmaxes) computes ``qscale / factor + mean`` with one factor per ``double_quant_block_size`` blocks,
    the arithmetic of ``lora_fx/kernels/quant_formats``, cast to the model's float type last. ONNX Runtime
    folds it once, at session start. Each reader of a site inside If branches gets a decode of its own, in its
    own branch, so that the decode feeds one MatMulBnb4 (what ``quantized_weight.DoubleQuant`` rewrites)."""

    def add(op: str, inputs: list[ir.Value], **attrs: Any) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, name=f"{name}/absmax/{len(nodes)}_{op}")
        node.outputs[0].name = f"{name}/absmax/{len(nodes)}_{op.lower()}"
        nodes.append(node)
        return node.outputs[0]

    # Reshape/Expand/Slice rather than Unsqueeze so the decode runs at any opset the model has.
    per_block = add("Slice", [add("Reshape", [add("Expand", [add("Reshape", [consts["factor"], consts["column"]]), consts["grid"]]),
                                               consts["flat"]]), consts["start"], consts["end"]])
    absmax = add("Add", [add("Div", [add("Cast", [qscale], to=int(ir.DataType.FLOAT)), per_block]), consts["mean"]])
    if float_type != ir.DataType.FLOAT:  # MatMulBnb4 reads absmax in the type of its input
        absmax = add("Cast", [absmax], to=int(float_type))
    return absmax


# The default-domain opsets the int8 form needs: DequantizeLinear's ``axis`` (per-channel scales), a float16 or
# bfloat16 scale, and CastLike (which casts W to x's type, what runtime/int8_linear recognises as its op's own cast).
INT8_MIN_OPSET, INT8_NARROW_SCALE_OPSET, CASTLIKE_OPSET = 13, 19, 15


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _int8_scale_type(float_type: ir.DataType, opset: int) -> ir.DataType:
    """The type int8 scales are stored in: the model's float type where DequantizeLinear reads it, else float32."""
    return float_type if float_type == ir.DataType.FLOAT or opset >= INT8_NARROW_SCALE_OPSET else ir.DataType.FLOAT


def _int8_reader(q: ir.Value, scale: ir.Value, x: ir.Value, float_type: ir.DataType, opset: int,
                 names: tuple[str, str, str] | None = None) -> tuple[list[ir.Node], ir.Node]:
    """``MatMul(x, Transpose(DequantizeLinear(q, scale, axis=0)))``, with W cast to ``float_type`` when the scale is
    stored in another type; ``names``: the values' names (dequantized, cast, transposed) where they must be unique."""
    dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 0})
    nodes, w = [dq], dq.outputs[0]
    if scale.dtype != float_type:
        cast = (ir.node("CastLike", [w, x]) if opset >= CASTLIKE_OPSET
                else ir.node("Cast", [w], attributes={"to": int(float_type)}))
        nodes.append(cast)
        w = cast.outputs[0]
    tr = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
    nodes.append(tr)
    if names is not None:
        dq.outputs[0].name, tr.outputs[0].name = names[0], names[2]
        if len(nodes) == 3:
            nodes[1].outputs[0].name = names[1]
    new = ir.node("MatMul", [x, tr.outputs[0]])
    return [*nodes, new], new


def _onnx_type(dtype: ir.DataType) -> str:
    import onnx

    return f"tensor({onnx.TensorProto.DataType.Name(int(dtype)).lower()})"


def _schema_problem(nodes: list[ir.Node], opset: int) -> str | None:
    """Why ``nodes`` (default domain) would not be valid ONNX at ``opset``: an op without a schema there, an attribute
    it lacks, an input of a type it does not take; else None. A guard on the forms above, as onnx.checker would judge
    them, before the graph changes."""
    import onnx

    for node in nodes:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            return f"{node.op_type} has no schema at opset {opset}"
        extra = sorted(set(node.attributes) - set(schema.attributes))
        if extra:
            return f"{node.op_type}-{schema.since_version} has no attribute {', '.join(extra)}"
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype is None or not schema.inputs:
                continue
            formal = schema.inputs[min(i, len(schema.inputs) - 1)]
            if _onnx_type(value.dtype) not in allowed.get(formal.type_str, {formal.type_str}):
                return f"{node.op_type}-{schema.since_version} does not take {_onnx_type(value.dtype)} as {formal.name}"
    return None


def _check_int8_form(model: ir.Model, float_types: set[ir.DataType]) -> int:
    """The model's default-domain opset, once the int8 form is known to be valid ONNX there (else the refusal)."""
    opset = default_opset(model)
    if opset < INT8_MIN_OPSET:
        raise UnsupportedError(
            f"int8 quantization stores each weight behind DequantizeLinear with one scale per output channel (its axis "
            f"attribute), which ONNX has from opset {INT8_MIN_OPSET}; this model imports opset {opset} of the default "
            f"domain. Quantize it with nf4 or int4 (com.microsoft ops, any opset), or export it again at opset "
            f"{INT8_MIN_OPSET} or later")
    for float_type in sorted(float_types, key=int):
        probe = ir.Value(name="x", type=ir.TensorType(float_type))
        q = ir.Value(name="q", type=ir.TensorType(ir.DataType.INT8))
        scale = ir.Value(name="scale", type=ir.TensorType(_int8_scale_type(float_type, opset)))
        nodes, _ = _int8_reader(q, scale, probe, float_type, opset)
        why = _schema_problem(nodes, opset)
        if why is not None:  # a lora_fx bug, were it to happen: said before anything changes
            raise UnsupportedError(f"int8 quantization of {float_type.name} weights at opset {opset} would write invalid "
                                   f"ONNX ({why}); quantize with nf4 or int4 instead")
    return opset


def _refusal(node: ir.Node, parts: Any) -> str | None:
    """Why the site's float matmul cannot become a quantized one, or None."""
    if node.op_type not in ("MatMul", "Gemm") or any(n.op_type != "Transpose" for n in parts.chain):
        return f"handles MatMul and Gemm with an initializer weight, not {node.op_type}"
    if node.op_type == "Gemm" and parts.bias is not None and node.attributes.get_float("beta", 1.0) != 1.0:
        return "handles Gemm with beta = 1 only"
    return None


class QuantizeWeights:
    """Replace float MatMul weights of selected linear sites by packed storage and a quantized matmul op."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def __call__(self, model: ir.Model) -> PassResult:
        from lora_fx.kernels import quant_formats as formats

        cfg = self.config
        sites = find_sites(model)
        selector = LoraConfig(r=1, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules)
        targets = select_targets(sites, selector)
        graph = model.graph
        # Every site is checked and quantized before the graph changes: a refusal leaves the model as it was.
        plans = [self._plan(model, target) for target in targets]
        opset = _check_int8_form(model, {p[3].dtype for p in plans}) if cfg.dtype is QuantDType.INT8 and plans else 0
        changed: list[str] = []
        for target, nodes_of_site, weight, weight_tensor, w, s in plans:
            dtype = weight_tensor.dtype
            np_type = dtype.numpy()

            def as_stored(t: torch.Tensor) -> np.ndarray:
                return t.float().numpy().astype(np_type)

            def as_read(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())

            n, k = w.shape
            name = target.site.name
            # The storage, once per site in the main graph (where W was); ``build`` makes one reader of it in the
            # graph holding a node of the site, returning its nodes and the one computing x @ W.
            if cfg.dtype is QuantDType.NF4:
                packed = s["qweight"][: (n * k + 1) // 2]
                q = _init(graph, f"{name}.weight_q", packed.numpy())
                if cfg.double_quant:
                    scale = _init(graph, f"{name}.weight_scale", s["qscale"].numpy())
                    consts = _absmax_constants(graph, name, s, n * k, cfg)
                    read = formats.nf4_decoder(s["qweight"], s["qscale"], s["qscale_factor"], s["qscale_mean"], n, k,
                                               cfg.block_size, cfg.double_quant_block_size).scale
                else:
                    scale = _init(graph, f"{name}.weight_scale", as_stored(s["qscale"]))
                    consts, read = None, s["qscale"]

                def build(x: ir.Value, tag: str) -> tuple[list[ir.Node], ir.Node]:
                    nodes: list[ir.Node] = []
                    absmax = _decode_absmax(f"{name}{tag}", scale, consts, nodes, dtype) if consts is not None else scale
                    new = ir.node("MatMulBnb4", [x, q, absmax], domain=MS,
                                  attributes={"K": k, "N": n, "block_size": cfg.block_size, "quant_type": 1})
                    return [*nodes, new], new

                deq = formats.dequantize_nf4(s["qweight"], as_read(as_stored(read)), None, None, n, k, cfg.block_size,
                                             cfg.double_quant_block_size)
                stored_bytes = packed.numel() + sum(v.const_value.nbytes for key, v in graph.initializers.items()
                                                    if key.startswith(f"{name}.weight_scale"))
            elif cfg.dtype is QuantDType.INT4:
                b = s["qweight"].reshape(n, -(-k // cfg.block_size), cfg.block_size // 2).numpy()
                scale = as_stored(s["qscale"])
                stored = [_init(graph, f"{name}.weight_q", b), _init(graph, f"{name}.weight_scale", scale)]
                if "qzero" in s:
                    stored.append(_init(graph, f"{name}.weight_zero", s["qzero"].numpy()))

                def build(x: ir.Value, tag: str) -> tuple[list[ir.Node], ir.Node]:
                    # accuracy_level 0: ONNX Runtime computes in float, as training does (4 quantizes x to int8).
                    new = ir.node("MatMulNBits", [x, *stored], domain=MS, attributes={
                        "K": k, "N": n, "bits": 4, "block_size": cfg.block_size, "accuracy_level": 0})
                    return [new], new

                deq = formats.dequantize_int4(s["qweight"], as_read(scale), s.get("qzero"), n, k, cfg.block_size)
                stored_bytes = sum(v.const_value.nbytes for v in stored)
            else:
                # float32 where DequantizeLinear reads no float16/bfloat16 scale (below opset 19): W is cast after it.
                scale = s["qscale"].float().numpy().astype(_int8_scale_type(dtype, opset).numpy())
                q = _init(graph, f"{name}.weight_q", s["qweight"].numpy())
                sc = _init(graph, f"{name}.weight_scale", scale)

                def build(x: ir.Value, tag: str) -> tuple[list[ir.Node], ir.Node]:
                    # In a branch: a name the branch would pick may be taken in another of the model's graphs.
                    names = (f"{name}.weight_dq{tag}", f"{name}.weight_dq_cast{tag}", f"{name}.weight_dq_t{tag}") if tag else None
                    return _int8_reader(q, sc, x, dtype, opset, names)

                deq = formats.dequantize_int8(s["qweight"], as_read(scale))
                stored_bytes = q.const_value.nbytes + sc.const_value.nbytes
            for i, node in enumerate(nodes_of_site):
                # Values in several branches get names of their own (ONNX names are unique across the graphs).
                _replace(node, build, dtype, "" if node.graph is graph else f"__{i}")
            if cfg.dtype is not QuantDType.INT8:
                # Serializing adds the domains of main-graph nodes only; a branch's contrib op needs it said.
                model.opset_imports.setdefault(MS, 1)
            if not any(True for _ in weight.uses()) and graph.initializers.get(weight.name) is weight:
                del graph.initializers[weight.name]
            max_err, rel = formats.quantization_error(w, deq)
            where = f", in {len(nodes_of_site)} If-branch nodes" if name in sites.inside else ""
            changed.append(f"{name}: {cfg.dtype.value} {n}x{k}, {weight_tensor.nbytes} -> {stored_bytes} bytes, "
                           f"max abs error {max_err:.3g}, relative rms error {rel:.3g}{where}")
        return PassResult(model, bool(changed), changed)

    def _plan(self, model: ir.Model, target: Any) -> tuple:
        """(target, the site's nodes, W's initializer, its tensor, W [out, in] float32, quantized storage) of one site, or the
        refusal. A site inside If branches has a node in each branch reading its W; all must read it alike."""
        from lora_fx.kernels import quant_formats as formats

        cfg = self.config
        node = target.site.handle
        name = target.site.name
        nodes = site_nodes(model, node)
        parts = linear_parts(node)
        for each in nodes:
            each_parts = linear_parts(each)
            if each.domain == MS or any(n.op_type == "DequantizeLinear" for n in each_parts.chain):
                raise ConfigError(f"site {name} is already quantized ({each.op_type}); a weight is quantized once")
            why = _refusal(each, each_parts)
            if why is not None:
                raise UnsupportedError(f"site {name}: quantize_weights {why}; exclude it with QuantConfig(exclude_modules=[...])")
            if (each_parts.weight, each_parts.stored_out_in, each_parts.alpha) != (parts.weight, parts.stored_out_in, parts.alpha):
                raise UnsupportedError(
                    f"site {name}: its If-branch nodes ({each.name!r}, {node.name!r}) read its weight in different layouts, "
                    "so no one quantized W serves them all; exclude it with QuantConfig(exclude_modules=[...])")
        weight_tensor = const_tensor(parts.weight)
        # Scales and absmaxes are read in the type of the op's input (ORT binds them to one type T1): a
        # float16 model stores them float16, and the reported error uses the values as stored.
        if not weight_tensor.dtype.is_floating_point():
            raise UnsupportedError(f"site {name}: its weight is {weight_tensor.dtype.name}, not a float tensor; "
                                   "exclude it with QuantConfig(exclude_modules=[...])")
        stored = torch.from_numpy(np.array(weight_tensor.numpy(), dtype=np.float32))
        w = stored if parts.stored_out_in else stored.t()  # [out, in]
        w = (w * parts.alpha if parts.alpha != 1.0 else w).contiguous()  # Gemm's alpha goes into W
        what = f"site {name}"
        if cfg.dtype is QuantDType.NF4:
            s = formats.quantize_nf4(w, cfg.block_size, cfg.double_quant, cfg.double_quant_block_size, pad=cfg.pad, what=what)
        elif cfg.dtype is QuantDType.INT4:
            s = formats.quantize_int4(w, cfg.block_size, cfg.symmetric, pad=cfg.pad, what=what)
        else:
            s = formats.quantize_int8(w, what=what)
        return target, nodes, parts.weight, weight_tensor, w, s


def _replace(node: ir.Node, build: Any, dtype: ir.DataType, tag: str) -> None:
    """Put the quantized reader ``build`` makes in place of ``node``, in the graph holding it (the main graph, or an
    If branch reading the storage from the outer scope)."""
    home = node.graph
    # Read again: rewriting an earlier site replaced the value this one may read as x.
    parts = linear_parts(node)
    nodes, new = build(parts.x, tag)
    # find_sites names a site from its node's name or name-scope metadata: the new node keeps both.
    new.name = node.name
    new.metadata_props.update(node.metadata_props)
    old_name = node.outputs[0].name
    node.outputs[0].name = f"{old_name}_float"
    out = new
    if node.op_type == "Gemm" and parts.bias is not None:
        # Gemm's C becomes the bias Add that follows a MatMul site (find_sites reads it as the site's bias).
        new.outputs[0].name = f"{old_name}_matmul"
        new.outputs[0].dtype = node.outputs[0].dtype or dtype
        out = ir.node("Add", [new.outputs[0], parts.bias], name=f"{node.name}/bias_add" if node.name else None)
        nodes.append(out)
    out.outputs[0].name = old_name  # a graph output keeps its name
    out.outputs[0].dtype = node.outputs[0].dtype or dtype
    out.outputs[0].shape = node.outputs[0].shape
    home.insert_before(node, nodes)
    ir.convenience.replace_all_uses_with(node.outputs[0], out.outputs[0], replace_graph_outputs=True)
    home.remove(node, safe=True)
    for chain_node in parts.chain:
        if chain_node.graph is not None and not any(True for _ in chain_node.outputs[0].uses()):
            chain_node.graph.remove(chain_node, safe=True)


def quantize_weights(model: ir.Model, config: QuantConfig) -> PassResult:
    return QuantizeWeights(config)(model)


def apply_quant(model: ir.Model, quant: QuantConfig | dict, lora_config: Any = None) -> PassResult:
    """The ``lora_fx.apply(..., quant=...)`` hook for ONNX models."""
    if isinstance(quant, dict):
        quant = QuantConfig.from_dict(quant)
    if not isinstance(quant, QuantConfig):
        raise ConfigError(f"quant must be a lora_fx.QuantConfig, got {type(quant).__name__}")
    return quantize_weights(model, quant)
