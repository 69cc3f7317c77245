"""What every op function shares: ``OPS`` (``(domain, op_type) -> fn``, filled by ``@op``), the call
context ``Ctx``, shape constants ``Const`` and the ONNX-to-torch dtype table.

An op function is ``fn(ctx, inputs, attrs)``: ``inputs`` are tensors, ``Const``s, sequences (Python lists
of tensors) or None (an omitted optional input), ``attrs`` the node's attributes by name (a subgraph
attribute arrives compiled, to be run with ``ctx.run_graph``); it returns a value or a tuple of them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lora_fx.errors import UnsupportedError


_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16, 21: torch.uint8, 22: torch.int8,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _DTYPES[int(onnx_type)]
    except KeyError:
        raise UnsupportedError(f"ONNX data type {onnx_type} has no torch equivalent here") from None


class Const:
    """A small value known from the input shapes alone, held as Python numbers."""

    __slots__ = ("value", "dtype", "shape", "_tensor")

    def __init__(self, value: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.value = value
        self.dtype = dtype
        self.shape = shape
        self._tensor: torch.Tensor | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> "Const":
        t = t.detach()
        return cls(t.cpu().tolist(), t.dtype, tuple(t.shape))

    def tensor(self, device: torch.device) -> torch.Tensor:
        t = self._tensor
        if t is None or t.device != device:
            t = torch.tensor(self.value, dtype=self.dtype, device=device)
            self._tensor = t
        return t

    def ints(self) -> list[int]:
        """The values flattened, as ints."""
        out: list[int] = []
        stack = [self.value]
        while stack:
            v = stack.pop()
            if isinstance(v, list):
                stack.extend(reversed(v))
            else:
                out.append(int(v))
        return out


class Ctx:
    """What an op needs besides its inputs: the opset of its domain, the device, training mode, and (for
    If and Loop) ``run_graph(body, inputs) -> outputs``, which the executor sets to run a compiled
    subgraph inside the current run."""

    def __init__(self, opset: int, device: torch.device, training: bool) -> None:
        self.opset = opset
        self.device = device
        self.training = training
        self.n_outputs = 1
        self.run_graph: Callable[[Any, list], list] = _no_subgraphs

    def t(self, v: Any) -> torch.Tensor | None:
        if v is None or isinstance(v, torch.Tensor):
            return v
        return v.tensor(self.device)


def _no_subgraphs(body: Any, inputs: list) -> list:
    raise UnsupportedError("this op runs a subgraph, and only lora_fx's graph executor (OnnxModule) can run one")


def ints(v: Any) -> list[int]:
    """A shape-like input as Python ints (free for constants; a device sync for tensors)."""
    if isinstance(v, Const):
        return v.ints()
    return [int(x) for x in v.reshape(-1).tolist()]


def scalar(v: Any) -> Any:
    if isinstance(v, Const):
        return v.value[0] if isinstance(v.value, list) else v.value
    return v.reshape(-1)[0].item()


OpFn = Callable[[Ctx, list, dict], Any]
OPS: dict[tuple[str, str], OpFn] = {}


def op(*names: str, domain: str = "") -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[(domain, name)] = fn
        return fn

    return register


def norm_axis(a: int, rank: int) -> int:
    """A possibly negative axis as its index in a tensor of ``rank`` dims."""
    return a + rank if a < 0 else a
