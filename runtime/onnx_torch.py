"""Run an onnx_ir graph as a ``torch.nn.Module``, so ONNX models train with torch autograd.

Frozen initializers become buffers, adapter initializers (see ``trainable_initializers``) become
``nn.Parameter``s, and every node is executed by one torch function that follows the ONNX
semantics of its op (broadcasting, integer division, negative Gather indices, attribute defaults
per opset, ...). Inputs are passed by graph input name; outputs come back as a dict keyed by graph
output name. Batch and sequence sizes may differ between calls.

Each op's torch function lives in ``lora_fx.runtime.onnx_ops`` (one module per op family); this
module walks the graph and calls them.

Shape arithmetic (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape``) depends only on the input
shapes, so it is evaluated once per input-shape signature and kept as Python constants
(``Const``): later calls, and ``torch.compile`` traces, see plain ints there instead of
data-dependent tensors.

Values are tensors, ``Const``s, or sequences (Python lists of tensors, made by the sequence ops).
Control flow (``If``, ``Loop``) runs its subgraphs with the same executor, inside the current run:
a subgraph reads outer-scope values by name, so gradients reach the weights a branch uses. Subgraph
values are computed afresh each run (shape arithmetic in them still comes out as ``Const``); an ``If``
whose condition and outer reads are all shape arithmetic is cached like any other.

Training mode: graphs exported in eval mode contain no dropout, so ``set_training_mode`` only
affects ``Dropout`` nodes that are actually present in the graph (they drop with their ratio when
training, and are the identity otherwise).
"""

from __future__ import annotations

import json
import re
from collections import ChainMap
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch._compile

from lora_fx.errors import ConfigError, UnsupportedError
from lora_fx.runtime.int8_linear import Int8Linear, find_int8_linears, run_int8_linear
from lora_fx.runtime.int8_linear import storage as int8_storage
from lora_fx.runtime.onnx_ops import OPS, Const, Ctx, torch_dtype

__all__ = ["OnnxModule", "check_supported", "torch_dtype", "trainable_initializers", "trainable_module"]

LORA_METADATA_KEY = "lora_fx.lora"
PREFIX_METADATA_KEY = "lora_fx.prefix"
SAVED_METADATA_KEY = "lora_fx.modules_to_save"  # {parameter: module} trained in full
_ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Constants (shape arithmetic) larger than this stay tensors: they are data, not shapes.
_CONST_LIMIT = 1024
_SHAPE_CACHE_SIZE = 64


# ---- which initializers train ------------------------------------------------------------------


def _metadata_json(model: Any, key: str) -> dict:
    raw = model.metadata_props.get(key)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"model metadata {key!r} is not valid JSON; re-apply the adapter with lora_fx.apply") from None
    return data if isinstance(data, dict) else {}


def trainable_initializers(model: Any) -> list[str]:
    """Names of the initializers that train: the adapters, everything else stays frozen.

    An initializer is an adapter if the model's ``lora_fx.lora`` metadata names it (``"a"``/``"b"``
    of a site), if its name ends in ``.lora_A.weight`` / ``.lora_B.weight`` (the public naming), or
    if the ``lora_fx.prefix`` metadata names it (any string value of a site entry). The parameters of
    modules trained in full (``modules_to_save``: the SEQ_CLS head), which the ``lora_fx.modules_to_save``
    metadata lists, train too.
    """
    inits = model.graph.initializers
    names: list[str] = []
    for site in _metadata_json(model, LORA_METADATA_KEY).values():
        if isinstance(site, dict):
            names += [site[k] for k in ("a", "b") if isinstance(site.get(k), str)]
    prefix = _metadata_json(model, PREFIX_METADATA_KEY)
    # The record lists its sites under "sites" (beside num_virtual_tokens): read at the top level, no prefix trained.
    for site in (prefix["sites"] if isinstance(prefix.get("sites"), dict) else prefix).values():
        if isinstance(site, dict):
            names += [v for v in site.values() if isinstance(v, str) and v in inits]
    names += [n for n in inits if n.endswith(_ADAPTER_SUFFIXES)]
    names += list(_metadata_json(model, SAVED_METADATA_KEY))
    seen: dict[str, None] = {}
    for n in names:
        if n in inits:
            seen.setdefault(n, None)
    return list(seen)


# ---- the module ------------------------------------------------------------------------------------


_DATA_SHAPED_OPS = {"NonZero", "Unique", "Compress", "TopK", "NonMaxSuppression"}
# inputs read as Python ints: when such an input is not a shape constant, the output shape depends on data
# (If's condition and Loop's trip count and condition choose what runs, so they count too)
_SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Split": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Trilu": (1,), "CumSum": (1,),
    "SplitToSequence": (1,), "SequenceAt": (1,), "SequenceInsert": (2,), "SequenceErase": (1,),
    "If": (0,), "Loop": (0, 1),
}
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Dropout", "Multinomial", "Bernoulli"}


def _attr_value(attr: Any) -> Any:
    import onnx_ir as ir

    t = attr.type
    if t == ir.AttributeType.TENSOR:
        return _to_torch(attr.value)
    if t in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return attr.value
    if t == ir.AttributeType.INTS or t == ir.AttributeType.FLOATS or t == ir.AttributeType.STRINGS:
        return list(attr.value)
    return attr.value


def _to_torch(tensor: Any, share: bool = False) -> torch.Tensor:
    """An onnx_ir tensor as a torch tensor (4-bit types unpacked to one int8/uint8 per value).

    ``share``: use the tensor's own memory where it is a writable numpy array (what ``lora_fx.load``
    gives), so a frozen weight is held once, not once by the model and once by torch. Read-only
    memory (a view into a parsed protobuf) is copied: torch cannot share it.
    """
    import onnx_ir as ir

    dtype = tensor.dtype
    if dtype == ir.DataType.STRING:
        raise UnsupportedError(f"string tensor {tensor.name!r} cannot run in torch")
    arr = tensor.numpy()
    share = share and arr.flags.writeable and arr.flags.c_contiguous
    if dtype == ir.DataType.BFLOAT16:
        bits = arr.view(np.uint16) if share else np.ascontiguousarray(arr).view(np.uint16).copy()
        return torch.from_numpy(bits).view(torch.bfloat16)
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return torch.from_numpy(arr.astype(np.int8 if dtype == ir.DataType.INT4 else np.uint8))
    return torch.from_numpy(arr if share else np.array(arr, copy=True))


def _from_torch(t: torch.Tensor, dtype: Any, name: str) -> Any:
    import onnx_ir as ir

    t = t.detach().cpu().contiguous()
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        # A trainable's float32 master is rounded as the graph rounds it in forward; viewing its bits as
        # uint16 unrounded would split each float32 into two bfloat16s (twice the columns, garbage values).
        bits = t.to(torch.bfloat16, copy=True).view(torch.uint16)
        return ir.Tensor(bits.numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy().astype(dtype.numpy(), copy=True), name=name)


def _subgraphs(node: Any) -> list[Any]:
    """The graphs ``node`` holds in its attributes (If's branches, Loop's body, ...)."""
    import onnx_ir as ir

    out = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.value)
    return out


def _all_nodes(graph: Any) -> Iterable[Any]:
    """Every node of ``graph`` and of the subgraphs nested in it."""
    import onnx_ir as ir

    return ir.traversal.RecursiveGraphIterator(graph)


def _outer_reads(graph: Any) -> list[str]:
    """Names a subgraph reads from enclosing scopes (its own nested subgraphs included), in first-read order."""
    local = {v.name for v in graph.inputs} | set(graph.initializers)
    reads: dict[str, None] = {}
    for node in graph:
        names = [v.name for v in node.inputs if v is not None]
        for sub in _subgraphs(node):
            names += _outer_reads(sub)
        for name in names:
            if name and name not in local:
                reads.setdefault(name, None)
        local.update(v.name for v in node.outputs if v is not None)
    return list(reads)


def check_supported(model: Any) -> None:
    """Raise ``UnsupportedError`` naming every op that cannot run, before anything runs (subgraphs included)."""
    missing: dict[tuple[str, str], str] = {}
    for node in _all_nodes(model.graph):
        key = (node.domain or "", node.op_type)
        if key[0] == "ai.onnx":
            key = ("", key[1])
        if key not in OPS:
            missing.setdefault(key, node.name or "<unnamed>")
    if missing:
        listed = ", ".join(f"{op_type} (domain {dom or 'ai.onnx'}, node {name!r})" for (dom, op_type), name in missing.items())
        raise UnsupportedError(
            f"the ONNX graph uses ops lora_fx cannot execute in torch: {listed}. "
            "Ways out: re-export the model without these ops, or file an issue naming the op"
        )


def _safe_attr_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit():
        base = "t_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _lazy_compiler_disable(fn: Callable) -> Callable:
    """``torch.compiler.disable`` without importing torch._dynamo (seconds) when this module loads.

    torch's own lazy variant imports dynamo on the first call, and dynamo runs it eagerly (a graph
    break) when tracing; the pinned torch has it. Without it, the plain decorator is used.
    """
    lazy = getattr(torch._compile, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


class _Node:
    __slots__ = ("fn", "inputs", "outputs", "attrs", "opset", "label", "const_ok", "n_outputs", "op", "domain",
                 "attrs_checked", "free", "captures", "is_shape")


class _Body:
    """A compiled subgraph (a branch of If, the body of Loop). Its nodes run inside the enclosing run and read
    outer-scope values by name; ``inputs`` are bound per call, ``outputs`` come back as a list."""

    __slots__ = ("nodes", "input_names", "output_names", "name")

    def __init__(self, nodes: list[_Node], input_names: list[str], output_names: list[str], name: str) -> None:
        self.nodes, self.input_names, self.output_names, self.name = nodes, input_names, output_names, name


class _ReadAttrs(dict):
    """A node's attributes that remember which ones the op function looked at (its first call only)."""

    def __init__(self, attrs: dict) -> None:
        super().__init__(attrs)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)


def _schema_default(n: "_Node", name: str) -> Any:
    """The schema's default for attribute ``name`` of ``n``'s op (ONNX's, or ONNX Runtime's for its contrib
    ops), or a sentinel when it has none."""
    import onnx

    if n.domain == "com.microsoft":
        return _contrib_defaults().get((n.op, name), _NO_DEFAULT)
    try:
        attr = onnx.defs.get_schema(n.op, n.opset, n.domain).attributes.get(name)
    except onnx.defs.SchemaError:
        return _NO_DEFAULT
    if attr is None or not attr.default_value.name:
        return _NO_DEFAULT
    return _attr_value_proto(attr.default_value)


_NO_DEFAULT = object()
# Attributes that choose how ONNX Runtime computes, not what: a float computation may leave them unread.
# A seed fixes which elements drop, not how dropout computes; torch draws from its own generator.
_HINTS = {("com.microsoft", "MatMulNBits", "accuracy_level"), ("com.microsoft", "MatMulBnb4", "training_mode"),
          ("", "Dropout", "seed")}


def _contrib_defaults() -> dict[tuple[str, str], Any]:
    global _CONTRIB_DEFAULTS
    if _CONTRIB_DEFAULTS is None:
        import onnx
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        _CONTRIB_DEFAULTS = {}
        for schema in ort_c.get_all_operator_schema():
            if schema.domain != "com.microsoft":
                continue
            for name, attr in schema.attributes.items():
                proto = onnx.AttributeProto()
                proto.ParseFromString(attr._default_value)
                if proto.name:
                    _CONTRIB_DEFAULTS[(schema.name, name)] = _attr_value_proto(proto)
    return _CONTRIB_DEFAULTS


_CONTRIB_DEFAULTS: dict[tuple[str, str], Any] | None = None


def _attr_value_proto(proto: Any) -> Any:
    import onnx

    value = onnx.helper.get_attribute_value(proto)
    if isinstance(value, bytes):
        return value.decode()
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_ignored_attrs(n: "_Node", attrs: _ReadAttrs) -> None:
    """Refuse an attribute the op's torch function never read unless it holds the schema's default: the
    function would otherwise compute the op without it, silently."""
    for name in set(attrs) - attrs.read:
        if (n.domain, n.op, name) in _HINTS:
            continue
        value, default = dict.__getitem__(attrs, name), _schema_default(n, name)
        if default is _NO_DEFAULT or value != default:
            raise UnsupportedError(
                f"{n.label}: lora_fx's torch execution of {n.op} does not implement its attribute {name}={value!r}, "
                "so it would compute the op without it. Re-export without it, or file an issue naming the op and attribute"
            )


class OnnxModule(torch.nn.Module):
    """An onnx_ir Model executed by torch. Call with graph inputs by name; returns ``{output name: tensor}``
    (a sequence output: a list of tensors).

    Keyword arguments that name no graph input are ignored, so a training batch holding labels
    can be passed as it is.
    """

    def __init__(self, model: Any, trainable: Iterable[str] | None = None) -> None:
        import onnx_ir as ir

        super().__init__()
        check_supported(model)
        graph = model.graph
        self._model = model
        self._opsets = {("" if k == "ai.onnx" else k): v for k, v in model.opset_imports.items()}
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self.trainable_names = list(trainable_initializers(model) if trainable is None else trainable)
        taken: set[str] = set(dir(self))
        self._attr_of: dict[str, str] = {}
        # Half-precision trainables train as float32 masters, cast to the graph's type where the graph reads them (as
        # PEFT's autocast_adapter_dtype keeps adapters float32): AdamW's eps=1e-8 is 0 in float16, and a zero
        # gradient (every lora_A at step 1, B starting at zero) then divides by zero.
        self._compute_dtype: dict[str, torch.dtype] = {}
        init_consts: dict[str, Const] = {}
        # Subgraphs may hold initializers of their own: frozen, and (ONNX names being unique) kept beside the main ones.
        sub_inits = [(name, value) for node in _all_nodes(graph) for sub in _subgraphs(node)
                     for name, value in sub.initializers.items()]
        for name, value in [*graph.initializers.items(), *sub_inits]:
            if value.const_value is None:
                raise UnsupportedError(f"initializer {name!r} has no value; the model needs its data (the .onnx.data file) beside it")
            t = _to_torch(value.const_value, share=name not in self.trainable_names)  # adapters: copies, trained in place
            if isinstance(value.const_value, ir.ExternalTensor):
                # A read-only mapping of the data file, so t is a copy; unmapping the file's pages keeps them out
                # of the process's memory (the tensor maps the file again if it is read later).
                try:
                    value.const_value.release()
                except BufferError:  # another view of the mapping is alive: the pages stay
                    pass
            attr = _safe_attr_name(name, taken)
            self._attr_of[name] = attr
            if name in self.trainable_names:
                if t.dtype in (torch.float16, torch.bfloat16):
                    self._compute_dtype[name] = t.dtype
                    t = t.float()
                self.register_parameter(attr, torch.nn.Parameter(t))
            else:
                # frozen weights are not part of state_dict(): checkpoints hold only what trains
                self.register_buffer(attr, t, persistent=False)
                if not t.dtype.is_floating_point and t.numel() <= _CONST_LIMIT:
                    init_consts[name] = Const.of(t)
        missing = [n for n in self.trainable_names if n not in graph.initializers]
        if missing:
            raise ConfigError(f"trainable initializers not in the graph: {missing}")
        self._init_consts = init_consts
        self.int8_linears = find_int8_linears(graph)
        if self.int8_linears.refused:
            import warnings

            (first, why), more = next(iter(self.int8_linears.refused.items())), len(self.int8_linears.refused) - 1
            warnings.warn(
                f"{len(self.int8_linears.refused)} int8 weight(s) of this graph are dequantized whole, so "
                f"training keeps a float copy of each for backward (lora_fx's int8 op takes 2-D int8 weights with one "
                f"scale per output channel and zero point 0, 128 in MatMulNBits): {first!r}: {why}"
                + (f" (and {more} more)" if more else ""),
                stacklevel=2,
            )
        fused = {}
        for hit in self.int8_linears.matched:
            # The op's own storage: q itself for the DequantizeLinear [N, K] layout, else one int8 copy
            # (transposed, or MatMulNBits' codes - 128 without the row padding).
            names = []
            in_body = hit.consumer.graph is not graph
            for part in ("qweight", "qscale"):
                # The If branches of a merged decoder read one storage: one copy serves every branch node.
                names.append(f"{hit.qweight}|{hit.scale}|{hit.block_size}::int8_{part}" if in_body
                             else f"{hit.consumer.name or hit.consumer.outputs[0].name}::int8_{part}")
            if names[0] not in self._attr_of:
                for name, t in zip(names, int8_storage(hit, self.tensor)):
                    self._attr_of[name] = _safe_attr_name(name, taken)
                    self.register_buffer(self._attr_of[name], t, persistent=False)
            fused[id(hit.consumer)] = (hit, names)
        for hit in self.int8_linears.matched:
            # Initializers only the fused call's absorbed nodes read (MatMulNBits' B): the int8 copy replaces them.
            # (Not for a subgraph's node: its If or Loop lists what the subgraph reads from outside, B among them.)
            for name in hit.released if hit.consumer.graph is graph else ():
                if name in self._attr_of and name not in self.trainable_names:
                    delattr(self, self._attr_of.pop(name))
                    self._init_consts.pop(name, None)
        self._nodes = self._compile(graph, set(init_consts), fused)
        self._shape_cache: dict[tuple, dict[str, Const]] = {}
        self._training_mode = False

    def _compile(self, graph: Any, const_inits: set[str], fused: dict[int, tuple[Int8Linear, list[str]]]) -> list[_Node]:
        absorbed = {id(s) for hit, _ in fused.values() for s in hit.skipped}
        self._fused, self._absorbed = fused, absorbed  # int8 weights inside subgraphs too (``_compile_body``)
        return self._compile_nodes(graph, set(const_inits), set(), fused, absorbed, set(self.output_names), body=False)

    def _compile_body(self, graph: Any, data_shaped: set[str]) -> _Body:
        """A subgraph's nodes. None of them is cached as shape arithmetic: a body runs only when its If or Loop
        chooses to, so its values are computed each run (those made from constants still come out as ``Const``)."""
        inputs = [v.name for v in graph.inputs]
        outputs = [v.name for v in graph.outputs]
        nodes = self._compile_nodes(graph, set(), set(data_shaped), self._fused, self._absorbed, set(outputs), body=True)
        return _Body(nodes, inputs, outputs, graph.name or "<subgraph>")

    def _compile_nodes(self, graph: Any, candidates: set[str], data_shaped: set[str],
                       fused: dict[int, tuple[Int8Linear, list[str]]], absorbed: set[int], keep: set[str],
                       body: bool) -> list[_Node]:
        """``candidates``: values computable from input shapes alone; ``data_shaped``: values whose shape
        depends on input data. Both grow as the nodes are compiled."""
        nodes = []
        for node in graph:
            if id(node) in absorbed:
                continue
            n = _Node()
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            n.fn = OPS[(domain, node.op_type)]
            n.inputs = [v.name if v is not None else None for v in node.inputs]
            if id(node) in fused:
                hit, storage = fused[id(node)]
                n.fn = run_int8_linear
                n.inputs = [hit.x.name, *storage] + ([hit.bias.name] if hit.bias is not None else [])
            while n.inputs and n.inputs[-1] is None:
                n.inputs.pop()
            n.outputs = [v.name if v is not None else "" for v in node.outputs]
            n.n_outputs = len(n.outputs)
            n.attrs = {k: _attr_value(v) for k, v in node.attributes.items()}
            if id(node) in fused:
                hit = fused[id(node)][0]
                n.attrs = {"N": hit.out_features, "K": hit.in_features}
            subs = _subgraphs(node)
            # Values a subgraph reads from this scope are inputs of the node that holds it: for the shape
            # cache, for data-dependent shapes, and so that they stay alive until the node has run.
            n.captures = [c for sub in subs for c in _outer_reads(sub)]
            n.captures = list(dict.fromkeys(c for c in n.captures if c not in n.inputs))
            n.opset = self._opsets.get(domain, 1)
            n.label = f"{node.op_type} node {node.name!r}"
            n.op, n.domain, n.attrs_checked = node.op_type, domain, False
            n.is_shape = node.op_type in ("Shape", "Size") and domain == ""
            real = [i for i in n.inputs if i] + n.captures
            if body:
                ok = False
            elif n.is_shape:
                ok = bool(real) and real[0] not in data_shaped
            elif node.op_type in _RANDOM_OPS or any(m.op_type in _RANDOM_OPS for sub in subs for m in _all_nodes(sub)):
                ok = False
            else:
                ok = all(i in candidates for i in real)
            n.const_ok = ok
            if ok:
                candidates.update(o for o in n.outputs if o)
            shape_ins = _SHAPE_INPUTS.get(node.op_type, ())
            if (node.op_type in _DATA_SHAPED_OPS or any(i in data_shaped for i in real)
                    or any(j < len(n.inputs) and n.inputs[j] and n.inputs[j] not in candidates for j in shape_ins)):
                data_shaped.update(o for o in n.outputs if o)
            for k, v in node.attributes.items():
                if v.type.name == "GRAPH":
                    n.attrs[k] = self._compile_body(v.value, data_shaped)
                elif v.type.name == "GRAPHS":
                    n.attrs[k] = [self._compile_body(g, data_shaped) for g in v.value]
            nodes.append(n)
        # Each value leaves the run's environment after its last reader (or, never read, right after it is made),
        # as the code torch.fx generates deletes dead values: a forward would otherwise hold every intermediate
        # tensor of the graph until it returns, not only those autograd saves. A body frees only its own values.
        last: dict[str, int] = {}
        for k, n in enumerate(nodes):
            for name in n.outputs:
                if name:
                    last.setdefault(name, k)
            for name in n.inputs + n.captures:
                if name:
                    last[name] = k
        for n in nodes:
            n.free = []
        own = {o for n in nodes for o in n.outputs if o} | ({v.name for v in graph.inputs} if body else set(last))
        for name, k in last.items():
            if name not in keep and name in own:
                nodes[k].free.append(name)
        return nodes

    # ---- modes and write-back --------------------------------------------------------------
    def set_training_mode(self, training: bool) -> None:
        """Dropout nodes present in the graph drop when training; exported eval graphs have none."""
        self._training_mode = bool(training)
        self.train(training)

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer holding initializer ``name`` (a half-precision trainable: its float32 master)."""
        return getattr(self, self._attr_of[name])

    def named_adapters(self) -> dict[str, torch.nn.Parameter]:
        return {n: getattr(self, self._attr_of[n]) for n in self.trainable_names}

    def write_back(self) -> list[str]:
        """Copy the trained parameters into the onnx_ir Model's initializers; returns their names."""
        inits = self._model.graph.initializers
        for name, param in self.named_adapters().items():
            value = inits[name]
            value.const_value = _from_torch(param, value.const_value.dtype, name)
        return list(self.trainable_names)

    # ---- execution -------------------------------------------------------------------------
    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        feeds = self._feeds(inputs)
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if torch.compiler.is_compiling():
            consts = self._consts_for(key, feeds)
            return self._run(feeds, consts, None)
        consts = self._shape_cache.get(key)
        if consts is None:
            record: dict[str, Const] = {}
            out = self._run(feeds, None, record)
            self._remember(key, record)
            return out
        return self._run(feeds, consts, None)

    def _remember(self, key: tuple, consts: dict[str, Const]) -> None:
        if len(self._shape_cache) >= _SHAPE_CACHE_SIZE:  # unpadded data: many shapes; keep the newest
            self._shape_cache.pop(next(iter(self._shape_cache)))
        self._shape_cache[key] = consts

    @_lazy_compiler_disable
    def _consts_for(self, key: tuple, feeds: dict[str, torch.Tensor]) -> dict[str, Const]:
        consts = self._shape_cache.get(key)
        if consts is None:
            consts = {}
            with torch.no_grad():
                self._run(feeds, None, consts)
            self._remember(key, consts)
        return consts

    def _feeds(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(f"missing graph inputs {missing}; the graph takes {self.input_names}")
        out = {}
        for n in self.input_names:
            v = inputs[n]
            if isinstance(v, torch.Tensor):
                out[n] = v
            elif np.asarray(v).dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.as_tensor refuses: its bits
                out[n] = torch.from_numpy(np.ascontiguousarray(v).view(np.uint16).copy()).view(torch.bfloat16)
            else:
                out[n] = torch.as_tensor(np.asarray(v))
        return out

    def _run(self, feeds: dict[str, torch.Tensor], consts: dict[str, Const] | None,
             record: dict[str, Const] | None) -> dict[str, Any]:
        env: dict[str, Any] = {n: getattr(self, a) for n, a in self._attr_of.items()}
        for n, dtype in self._compute_dtype.items():
            env[n] = env[n].to(dtype)
        env.update(self._init_consts)
        env.update(feeds)
        if consts:
            env.update(consts)
        device = next(iter(feeds.values())).device if feeds else torch.device("cpu")
        ctx = Ctx(0, device, self._training_mode)
        scopes = [env]  # the environment a subgraph reads its outer-scope values from: the innermost running one

        def run_graph(body: _Body, inputs: list) -> list:
            local: ChainMap = ChainMap(dict(zip(body.input_names, inputs)), scopes[-1])
            scopes.append(local)
            try:
                self._exec(body.nodes, local, ctx, None, None, fold=True)
            finally:
                scopes.pop()
            return [local[name] for name in body.output_names]

        ctx.run_graph = run_graph
        self._exec(self._nodes, env, ctx, consts, record, fold=False)
        return {n: _as_output(ctx, env[n]) for n in self.output_names}

    def _exec(self, nodes: list[_Node], env: Any, ctx: Ctx, consts: dict[str, Const] | None,
              record: dict[str, Const] | None, fold: bool) -> None:
        """Run ``nodes`` in ``env``. ``consts``: cached shape arithmetic to skip; ``record``: where to cache it.
        ``fold`` (subgraphs, never cached): shape arithmetic still comes out as ``Const``, computed afresh."""
        for n in nodes:
            if consts is not None and n.const_ok and all((not o) or o in consts for o in n.outputs):
                continue
            args = [env[i] if i else None for i in n.inputs]
            ctx.opset = n.opset
            ctx.n_outputs = n.n_outputs
            if (record is not None and n.const_ok and (n.is_shape or not any(_is_data(v) for v in args)
                                                       and not any(_is_data(env[c]) for c in n.captures))
                    or fold and (n.is_shape or not n.captures and not any(_is_data(v) for v in args))):
                with torch.no_grad():
                    outs = self._call(n, ctx, args)
                for name, t in zip(n.outputs, outs):
                    if name and (isinstance(t, Const) or isinstance(t, torch.Tensor) and t.numel() <= _CONST_LIMIT):
                        c = t if isinstance(t, Const) else Const.of(t)  # a subgraph's output may be a Const already
                        if record is not None:
                            record[name] = c
                        env[name] = c
                    elif name:
                        env[name] = t
                for name in n.free:
                    env.pop(name, None)
                continue
            outs = self._call(n, ctx, args)
            del args
            for name, t in zip(n.outputs, outs):
                if name:
                    env[name] = t
            for name in n.free:
                env.pop(name, None)

    @staticmethod
    def _call(n: _Node, ctx: Ctx, args: list) -> Sequence[Any]:
        try:
            if n.attrs_checked:
                out = n.fn(ctx, args, n.attrs)
            else:  # first call: which attributes does the op function read?
                attrs = _ReadAttrs(n.attrs)
                out = n.fn(ctx, args, attrs)
                _check_ignored_attrs(n, attrs)
                n.attrs_checked = True
        except (ConfigError, UnsupportedError) as exc:
            # Op functions are not handed their node: the refusal names it here, where the node is known.
            if n.label in str(exc):
                raise
            raise type(exc)(f"{n.label}: {exc}") from None
        return out if isinstance(out, tuple) else (out,)  # a list is one value: a sequence


def _is_data(v: Any) -> bool:
    """A tensor, or a sequence (list) of them: values that are not shape arithmetic."""
    return isinstance(v, (torch.Tensor, list))


def _as_output(ctx: Ctx, v: Any) -> Any:
    return [ctx.t(t) for t in v] if isinstance(v, list) else ctx.t(v)


def trainable_module(model: Any) -> OnnxModule:
    """The torch module that trains ``model``'s adapters; ``write_back()`` stores them in ``model``."""
    module = OnnxModule(model)
    if not module.trainable_names:
        raise ConfigError(
            "the ONNX model has no adapter initializers to train; apply one first: "
            "lora_fx.apply(model, lora_fx.LoraConfig(...))"
        )
    return module


__all__ = ["Const", "OnnxModule", "OPS", "check_supported", "trainable_initializers", "trainable_module"]
