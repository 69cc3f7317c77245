"""Move a captured GraphModule to another floating-point dtype or device (``gm.to(torch.bfloat16)``, ``.half()``,
``.float()``, ``gm.to("cuda")``), as ``nn.Module.to`` moves an eager model.

``torch.export`` bakes the dtype and device the model ran in at capture into the graph: every ``x.to(...)`` /
``.float()`` becomes an ``aten.to`` / ``_to_copy`` node with a fixed target dtype and device, export adds an
``aten._assert_tensor_metadata`` check beside it, factory ops (``full``, ``arange``, ``new_ones``, ...) carry a dtype
and device, and mask fills hold ``torch.finfo(dtype).min`` as a number. Casting only the parameters, as
``nn.Module.to`` does, leaves those nodes asserting or converting to the old dtype. ``CastDtype`` rewrites them:

* ``_assert_tensor_metadata``: checks the dtype and device its input now has.
* A conversion or factory node whose dtype is the graph's float dtype ``F`` takes the new one, except where the
  source line that made it names ``F`` itself (``.to(torch.float32)``, ``.float()``): an eager model keeps such
  deliberate upcasts (an RMSNorm's variance, rotary angles) in ``F`` after ``.to(bfloat16)``, and so does the graph.
  A conversion whose source names no dtype at all (``x.to(other.device)``) keeps its input's dtype.
* ``±finfo(F).max`` fills in nodes that now compute in the new dtype become ``±finfo(new).max`` (the float32 value
  overflows to ``-inf`` in bfloat16 and float16, and fully masked rows would turn to NaN).
* Device arguments equal to the old device become the new device.

The rewritten graph is checked by running it on fake tensors in the new dtypes before anything changes; a graph that
would not run (an op with a dtype the pass cannot place) is refused with ``UnsupportedError`` and left as it was.
Packed QLoRA storage (``<site>.qweight`` and its float scales) keeps its dtype, as bitsandbytes keeps its absmax in
float32: only the compute and adapter tensors move.

``castable(gm)`` gives a captured GraphModule this behaviour on its own ``.to()``/``.half()``/``.bfloat16()``/
``.float()``/``.cuda()``/``.cpu()``; ``lora_fx.capture`` and ``lora_fx.apply`` call it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from lora_fx.errors import UnsupportedError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.result import PassResult

aten = torch.ops.aten
Tensor = torch.Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CONVERSIONS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
# Source spellings of each dtype as a literal: a conversion that names its target this way is a deliberate one.
_LITERALS = {
    torch.float32: r"torch\.float32\b|torch\.float\b|\.float\(\)|\"float32\"|'float32'",
    torch.float16: r"torch\.float16\b|torch\.half\b|\.half\(\)",
    torch.bfloat16: r"torch\.bfloat16\b|\.bfloat16\(\)",
    torch.float64: r"torch\.float64\b|torch\.double\b|\.double\(\)",
}
# Ops whose kernels refuse floating inputs of different dtypes while their fake (meta) kernels accept them.
_SAME_DTYPE = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default, aten.linear.default,
               aten.baddbmm.default, aten.scaled_dot_product_attention.default}
_NAMES_A_DTYPE = re.compile(r"dtype|float|half|double|bfloat16|type_as|\.type\(")


def float_dtype(gm: fx.GraphModule) -> torch.dtype:
    """The graph's compute dtype: recorded by the last cast, else the dtype holding most float parameter values."""
    info = meta(gm)
    if info.get("dtype") is not None:
        return getattr(torch, info["dtype"])
    count: dict[torch.dtype, int] = {}
    for _, p in gm.named_parameters():
        if p.dtype in FLOATS:
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else torch.float32


def graph_device(gm: fx.GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def quant_storage(gm: fx.GraphModule) -> set[str]:
    """Names of the packed QLoRA tensors (codes, scales, zero points): they keep their dtype across casts."""
    from lora_fx.kernels.quantized_linear import QUANT_OPS, SPECS

    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANT_OPS:
            spec = SPECS[QUANT_OPS[node.target]]
            for arg in node.args[1 : 1 + len(spec.storage)]:
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    names.add(arg.target)
    return names


def _source_line(node: fx.Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    return trace[-1].strip() if trace else ""


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class CastDtype:
    """Retarget the dtype- and device-typed nodes of a captured graph from (``old``, ``old_device``) to (``new``,
    ``new_device``); see the module docstring for the rules. Returns the names of the nodes it changed.

    The parameters themselves are not touched: ``castable``'s ``_apply`` moves them after this pass succeeds.
    """

    def __init__(self, old: torch.dtype, new: torch.dtype, old_device: torch.device, new_device: torch.device,
                 keep: set[str] = frozenset()) -> None:
        self.old, self.new = old, new
        self.old_device, self.new_device = torch.device(old_device), torch.device(new_device)
        self.keep = set(keep)

    # -- the rules -----------------------------------------------------------------------------------------------
    def _dtype(self, dtype: Any) -> Any:
        return self.new if dtype == self.old else dtype

    def _device(self, value: Any) -> Any:
        if isinstance(value, torch.device) and _same_device(value, self.old_device):
            return self.new_device
        return value

    def _target_dtype(self, node: fx.Node, dtype: Any, source: Any) -> Any:
        """The dtype a conversion / factory node with captured target ``dtype`` takes now."""
        if dtype != self.old or self.old == self.new:
            return dtype
        line = _source_line(node)
        if line and re.search(_LITERALS.get(self.old, r"(?!)"), line):
            return dtype  # a deliberate upcast named in the source stays
        if line and source is not None and not _NAMES_A_DTYPE.search(line):
            return source.dtype  # x.to(device): export recorded x's own dtype
        return self.new

    def _retarget(self, node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple, dict]:
        args, kwargs = list(node.args), dict(node.kwargs)
        source = env.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        source = source if isinstance(source, Tensor) else None
        t = node.target
        if t is aten._assert_tensor_metadata.default and source is not None:
            if kwargs.get("dtype") is not None:
                kwargs["dtype"] = source.dtype
            if kwargs.get("device") is not None:
                kwargs["device"] = source.device
            return tuple(args), kwargs
        if t is aten.to.dtype:  # (self, dtype, ...)
            args[1] = self._target_dtype(node, args[1], source)
        elif t is aten.to.device:  # (self, device, dtype, ...)
            args[2] = self._target_dtype(node, args[2], source)
        elif "dtype" in kwargs and kwargs["dtype"] in FLOATS:
            kwargs["dtype"] = self._target_dtype(node, kwargs["dtype"], source if t in _CONVERSIONS else None)
        args = [self._device(a) for a in args]
        kwargs = {k: self._device(v) for k, v in kwargs.items()}
        return tuple(args), kwargs

    def _fills(self, node: fx.Node, args: tuple, kwargs: dict, val: Any) -> tuple[tuple, dict]:
        """``±finfo(old).max`` constants in a node that now computes in ``new``."""
        if not (isinstance(val, Tensor) and val.dtype == self.new and self.new != self.old):
            return args, kwargs
        big, small = torch.finfo(self.old).max, torch.finfo(self.new).max

        def swap(v: Any) -> Any:
            if isinstance(v, float) and not math.isinf(v) and abs(v) == big:
                return math.copysign(small, v)
            return v

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    # -- the pass ------------------------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        from torch._guards import detect_fake_mode

        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
        if mode is None:
            mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        saved = {n: (n.args, n.kwargs, n.meta.get("val")) for n in gm.graph.nodes}
        env: dict[fx.Node, Any] = {}
        changed: list[str] = []
        try:
            for node in gm.graph.nodes:
                env[node] = self._visit(gm, node, env, mode, changed)
        except UnsupportedError:
            self._restore(saved)
            raise
        except Exception as exc:  # an op refused the new dtypes: say which, not torch's trace
            self._restore(saved)
            where = _source_line(node) or node.format_node()
            raise UnsupportedError(
                f"cannot cast this captured graph from {_name(self.old)} to {_name(self.new)}: node {node.name} "
                f"({node.target}) would fail in the new dtype ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"source: {where}. Ways out: capture the model already cast (lora_fx.capture(model.to({_name(self.new, True)}), ...)) "
                "and apply the config to that, or keep the graph in its dtype and train with lora_fx.train(..., bf16=True)"
            ) from None
        return PassResult(gm, bool(changed), changed)

    def _visit(self, gm: fx.GraphModule, node: fx.Node, env: dict, mode: Any, changed: list[str]) -> Any:
        old_val = node.meta.get("val")
        if node.op == "placeholder":
            val = self._fake_like(mode, old_val) if isinstance(old_val, Tensor) else old_val
        elif node.op == "get_attr":
            value = _attr(gm, node.target)
            val = self._fake_like(mode, value, keep=node.target in self.keep) if isinstance(value, Tensor) else old_val
        elif node.op == "call_function":
            args, kwargs = self._retarget(node, env)
            if node.target in _SAME_DTYPE:
                _check_same_dtype(node, args, kwargs, env)
            val = self._run(node.target, args, kwargs, env, mode)
            args, kwargs = self._fills(node, args, kwargs, val)
            if args != tuple(node.args) or kwargs != dict(node.kwargs):
                node.args, node.kwargs = args, kwargs
                changed.append(node.name)
            self._retype_record(node)
        else:  # call_module (export's input guards), output: nothing typed
            return old_val
        if val is not None and "val" in node.meta:
            node.meta["val"] = val
        return val

    def _retype_record(self, node: fx.Node) -> None:
        from lora_fx.passes.fx.find_sites import QUANTIZED

        q = node.meta.get(QUANTIZED)
        if isinstance(q, dict) and q.get("dtype") == _name(self.old):
            node.meta[QUANTIZED] = {**q, "dtype": _name(self.new)}

    def _fake_like(self, mode: Any, t: Tensor, keep: bool = False) -> Tensor:
        dtype = t.dtype if keep else self._dtype(t.dtype)
        device = self._device(t.device)
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device, requires_grad=t.requires_grad)

    @staticmethod
    def _run(target: Callable, args: tuple, kwargs: dict, env: dict, mode: Any) -> Any:
        def value(a: Any) -> Any:
            return env[a] if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(args, value)
        kwargs = fx.node.map_aggregate(kwargs, value)
        with mode:
            return target(*args, **kwargs)

    @staticmethod
    def _restore(saved: dict) -> None:
        for node, (args, kwargs, val) in saved.items():
            node.args, node.kwargs = args, kwargs
            if val is not None:
                node.meta["val"] = val


def _check_same_dtype(node: fx.Node, args: tuple, kwargs: dict, env: dict) -> None:
    dtypes = {env[a].dtype for a in (*args, *kwargs.values())
              if isinstance(a, fx.Node) and isinstance(env.get(a), Tensor) and env[a].is_floating_point()}
    if len(dtypes) > 1:
        raise TypeError(f"{node.target} takes inputs of one dtype, got {', '.join(sorted(map(_name, dtypes)))}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _name(dtype: torch.dtype, qualified: bool = False) -> str:
    name = str(dtype).removeprefix("torch.")
    return f"torch.{name}" if qualified else name


def cast_dtype(gm: fx.GraphModule, new: torch.dtype, new_device: torch.device | str | None = None) -> PassResult:
    """Retarget ``gm``'s graph to ``new`` (and ``new_device``); the parameters are left as they are."""
    device = graph_device(gm)
    return CastDtype(float_dtype(gm), new, device, torch.device(new_device) if new_device else device, quant_storage(gm))(gm)


# ---- nn.Module.to on a captured GraphModule ---------------------------------------------------------------------
class _CastMixin:
    """``_apply`` (behind ``.to``, ``.half``, ``.bfloat16``, ``.float``, ``.cuda``, ``.cpu``) that retargets the
    graph and keeps packed QLoRA storage in its dtype."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        gm: fx.GraphModule = self  # type: ignore[assignment]
        old, device = float_dtype(gm), graph_device(gm)
        probe = fn(torch.empty(0, dtype=old, device=device))
        if not isinstance(probe, Tensor) or (probe.dtype == old and _same_device(probe.device, device)):
            return super()._apply(fn, recurse)  # type: ignore[misc]
        new, new_device = probe.dtype, probe.device
        if new not in FLOATS:
            raise UnsupportedError(
                f"cannot cast a captured graph to {new}: its floating-point tensors can move to float32, float16 or "
                "bfloat16 (gm.to(torch.bfloat16)); integer and complex casts are not supported"
            )
        keep = quant_storage(gm)
        CastDtype(old, new, device, new_device, keep)(gm)
        packed = {name: _attr(gm, name) for name in keep}
        super()._apply(fn, recurse)  # type: ignore[misc]
        for name, t in packed.items():
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            module._buffers[leaf] = t.to(new_device)
        info = meta(gm)
        info["dtype"] = _name(new)
        for record in (info.get("lora_sites") or {}).values():
            if record.get("dtype") == _name(old):
                record["dtype"] = _name(new)
        base = (info.get("modules_to_save") or {}).get("base") or {}
        for name, t in list(base.items()):
            base[name] = t.to(device=new_device, dtype=new if t.dtype == old else t.dtype)
        gm.recompile()
        return gm


_CASTABLE: dict[type, type] = {}


def castable(gm: fx.GraphModule) -> fx.GraphModule:
    """Give ``gm`` (in place) the ``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` / ``.float()`` behaviour above.

    A GraphModule's class is a per-instance subclass of its base; ``gm`` is moved onto one whose base also has
    ``_CastMixin``, so copies (``copy.deepcopy``) keep it.
    """
    if isinstance(gm, _CastMixin):
        return gm
    base = next(c for c in type(gm).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
    cls = _CASTABLE.get(base)
    if cls is None:
        cls = _CASTABLE[base] = type(base.__name__, (_CastMixin, base), {"__module__": base.__module__})
    impl = type("GraphModuleImpl", (cls,), {})
    gm.__class__ = impl
    gm.recompile()
    return gm
