"""Store the frozen weights of linear sites quantized (QLoRA) in a captured GraphModule.

Matches the linear sites ``find_sites`` reports that ``QuantConfig.target_modules`` selects:

* ``aten.linear(x, W, b)`` with W a ``[out, in]`` parameter,
* ``aten.addmm(b, x, W)``, ``aten.mm(x, W)``, ``aten.matmul(x, W)`` with W an ``[in, out]``
  parameter (GPT-2's Conv1D); W is stored transposed, as ``[out, in]``.

Each becomes one node ``lora_fx::linear_<format>(x, <packed storage>, b, ...)``: a torch custom op
that dequantizes W right before the matmul. The packed storage is uint8/int8 buffers registered
next to where W was (``<site>.qweight``, ``qscale``, ...); the float parameter W is deleted, so no
float copy of W stays alive. The op's backward dequantizes W again instead of saving it (as
bitsandbytes' ``MatMul4Bit``), and both directions decode W a tile of rows at a time into one
per-thread buffer right before the matmul that reads it (``lora_fx.kernels.tiled_linear``; 4-bit
codes and int8 through ``lora_fx.kernels.dequant``, native kernels where the machine can build them), so a
training step never holds more than a tile of float W.
Gradients reach the input (and so the LoRA branches), never the packed storage.

The formats and their numerics: ``lora_fx.kernels.quant_formats``; the ops: ``lora_fx.kernels.quantized_linear``;
their ONNX export: ``lora_fx.quant_export``.

A site that is already quantized is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lora_fx.config import LoraConfig, QuantConfig, QuantDType
from lora_fx.errors import ConfigError
from lora_fx.kernels.quant_formats import quantization_error, quantize_int4, quantize_int8, quantize_nf4
from lora_fx.kernels.quantized_linear import QUANT_OPS, SPECS, OpSpec
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.find_sites import QUANTIZED, find_sites, transposed_weight
from lora_fx.passes.result import PassResult
from lora_fx.targeting import select_targets

aten = torch.ops.aten
Tensor = torch.Tensor


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Tensor, bool, Any, Any]:
    """(weight get_attr node, W parameter, stored [in, out]?, x, bias) of a linear site node."""
    if node.target is aten.linear.default:
        w_node, x, bias = node.args[1], node.args[0], node.args[2] if len(node.args) > 2 else None
        return w_node, gm.get_parameter(w_node.target), False, x, bias
    if node.target is aten.addmm.default:
        w_node, x, bias = node.args[2], node.args[1], node.args[0]
    else:
        w_node, x, bias = node.args[1], node.args[0], None
    under = transposed_weight(w_node)  # x @ W.T: W is stored [out, in] already
    if under is not None:
        return under, gm.get_parameter(under.target), False, x, bias
    return w_node, gm.get_parameter(w_node.target), True, x, bias


def _shared(gm: fx.GraphModule, target: str, param: Tensor) -> list[str]:
    names = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is param and n != target]
    users = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    uses = sum(len(u.users) for u in users)
    return names + (["another node"] if uses > 1 else [])


class QuantizeWeights:
    """Replace the weights of selected linear sites by packed 4/8-bit storage and a dequantizing linear op.

    Matches ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` linear sites with a parameter weight
    (see the module docstring). Returns the quantized sites in ``changed`` with their sizes and the
    dequantize(quantize(W)) error; the same numbers are kept in ``meta(gm)["quant"]``.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        sites = find_sites(gm)
        selector = LoraConfig(r=1, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules)
        targets = select_targets(sites, selector, model_type=meta(gm).get("model_type"))
        already = [t.site.name for t in targets if t.site.handle.meta.get(QUANTIZED)]
        if already:
            raise ConfigError(
                f"sites already quantized: {', '.join(already)}; a weight is quantized once. To change the format, "
                f"capture the float model again, or exclude these sites with QuantConfig(exclude_modules=...)"
            )
        report = meta(gm).setdefault("quant", {})
        # Every weight is quantized before the graph changes: a refused weight (NaN, a scale out of range)
        # leaves the model as it was.
        storages = [self._storage(gm, target.site) for target in targets]
        changed: list[str] = []
        for target, storage in zip(targets, storages):
            line = storage if isinstance(storage, str) else self._quantize_site(gm, target.site, report, storage)
            changed.append(line)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, any(not c.endswith("(left in float)") for c in changed), changed)

    def _storage(self, gm: fx.GraphModule, site: Any) -> dict[str, Tensor] | str:
        """The site's packed storage, or the line saying why its weight stays in float."""
        cfg = self.config
        w_node, param, transposed, _, _ = _weight_of(gm, site.handle)
        shared = _shared(gm, w_node.target, param)
        if shared:
            # Tied weights (an embedding shared with a head) are read elsewhere in float: leave them.
            return f"{site.name}: weight shared with {', '.join(shared)} (left in float)"
        w = param.detach().t() if transposed else param.detach()
        what = f"site {site.name}"
        if cfg.dtype is QuantDType.NF4:
            return quantize_nf4(w, cfg.block_size, cfg.double_quant, cfg.double_quant_block_size, cfg.pad, what)
        if cfg.dtype is QuantDType.INT4:
            return quantize_int4(w, cfg.block_size, cfg.symmetric, cfg.pad, what)
        return quantize_int8(w, what)

    def _quantize_site(self, gm: fx.GraphModule, site: Any, report: dict, storage: dict[str, Tensor]) -> str:
        cfg = self.config
        node: fx.Node = site.handle
        w_node, param, transposed, x, bias = _weight_of(gm, node)
        target = w_node.target
        w = param.detach().t() if transposed else param.detach()
        out_f, in_f = w.shape
        if cfg.dtype is QuantDType.NF4:
            extra = (out_f, in_f, cfg.block_size, cfg.double_quant_block_size)
        elif cfg.dtype is QuantDType.INT4:
            extra = (out_f, in_f, cfg.block_size)
        else:
            extra = (out_f, in_f)
        spec = SPECS[cfg.dtype]
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        # An nn.Linear's storage is <site>.qweight, ...; a module holding several weights (w1, w2, or
        # nn.MultiheadAttention's in_proj_weight) needs one set per weight, or the last overwrites the others.
        prefix = (f"{owner_path}." if owner_path else "") + ("" if leaf == "weight" else f"{leaf}_")
        device = param.device
        graph = gm.graph
        with graph.inserting_before(node):
            args: list[Any] = [x]
            for name in spec.storage:
                if name in storage:
                    full = prefix + name
                    owner.register_buffer(full.rpartition(".")[2], storage[name].to(device))
                    args.append(graph.get_attr(full))
                else:
                    args.append(None)
            args.append(bias)
            args.extend(extra)
            new = graph.call_function(spec.op._opoverload, tuple(args))
        new.meta.update({k: v for k, v in node.meta.items()})
        new.meta[QUANTIZED] = {"name": site.name, "format": cfg.dtype.value, "in_features": in_f, "out_features": out_f, "dtype": site.dtype,
                              "has_bias": bias is not None}
        node.replace_all_uses_with(new)
        w_arg = node.args[1] if node.target is not aten.addmm.default else node.args[2]
        graph.erase_node(node)
        if w_arg is not w_node and not w_arg.users:  # the W.T the matmul read
            graph.erase_node(w_arg)
        if not w_node.users:
            graph.erase_node(w_node)
        deq = spec.dequantize(self._args_for_check(args, storage, spec, w.dtype))
        max_err, rel_rms = quantization_error(w, deq)
        before = param.numel() * param.element_size()
        after = sum(t.numel() * t.element_size() for t in storage.values())
        # The float W goes: no copy of it stays reachable from the module.
        delattr(owner, leaf)
        del param, w
        report[site.name] = {
            "format": cfg.dtype.value, "block_size": cfg.block_size if cfg.dtype is not QuantDType.INT8 else None,
            "double_quant": cfg.double_quant, "symmetric": cfg.symmetric if cfg.dtype is QuantDType.INT4 else None,
            "shape": [out_f, in_f], "bytes_before": before, "bytes_after": after,
            "max_abs_error": max_err, "rel_rms_error": rel_rms,
        }
        return (f"{site.name}: {cfg.dtype.value} {out_f}x{in_f}, {before} -> {after} bytes, "
                f"max abs error {max_err:.3g}, relative rms error {rel_rms:.3g}")

    @staticmethod
    def _args_for_check(args: list[Any], storage: dict[str, Tensor], spec: OpSpec, dtype: torch.dtype) -> tuple:
        vals = [torch.empty(0, dtype=dtype)]
        vals += [storage.get(name) for name in spec.storage]
        vals += [None] + list(args[len(spec.storage) + 2 :])
        return tuple(vals)


def quantize_weights(gm: fx.GraphModule, config: QuantConfig) -> PassResult:
    return QuantizeWeights(config)(gm)


def apply_quant(model: fx.GraphModule, quant: QuantConfig | dict, lora_config: Any = None) -> PassResult:
    """The ``lora_fx.apply(..., quant=...)`` hook: quantize, then freeze everything quantized."""
    if isinstance(quant, dict):
        quant = QuantConfig.from_dict(quant)
    if not isinstance(quant, QuantConfig):
        raise ConfigError(f"quant must be a lora_fx.QuantConfig, got {type(quant).__name__}")
    return quantize_weights(model, quant)


# ---- reading a quantized graph back ------------------------------------------------------------
def quantized_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Site name -> the ``lora_fx::linear_<format>`` node, for every quantized site of ``gm``."""
    from lora_fx.passes.fx.find_sites import linear_site_name

    return {linear_site_name(n): n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANT_OPS}


def _value(gm: fx.GraphModule, arg: Any) -> Any:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return arg
    try:
        return gm.get_buffer(arg.target)
    except AttributeError:  # the bias stays a (frozen) parameter
        return gm.get_parameter(arg.target)


def dequantized_weight(gm: fx.GraphModule, site: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float ``[out, in]`` weight a quantized site computes with."""
    nodes = quantized_nodes(gm)
    if site not in nodes:
        raise ConfigError(f"site {site!r} is not quantized; quantized sites: {', '.join(sorted(nodes)) or 'none'}")
    node = nodes[site]
    spec = SPECS[QUANT_OPS[node.target]]
    args = tuple(_value(gm, a) for a in node.args)
    return spec.dequantize((torch.empty(0, dtype=dtype), *args[1:]))


def linear_weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the frozen linear-site weights: float parameters plus quantized storage."""
    from lora_fx.passes.fx.find_sites import weight_node

    total = 0
    seen: set[int] = set()
    for site in find_sites(gm):
        if site.kind.value != "linear":
            continue
        node = site.handle
        if node.meta.get(QUANTIZED):
            spec = SPECS[QUANT_OPS[node.target]]
            tensors = [_value(gm, a) for a in node.args[1 : 1 + len(spec.storage)]]
        else:
            tensors = [gm.get_parameter(weight_node(node).target)]
        for t in tensors:
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
