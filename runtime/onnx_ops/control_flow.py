"""Control flow: If (one branch runs) and Loop (the body runs while its condition holds).

A subgraph attribute reaches these functions compiled by the executor; ``ctx.run_graph(body, inputs)``
runs it inside the current run, so its nodes read outer-scope values (weights, activations) by name and
autograd follows them through the branch that ran. The condition and trip count are read as Python
values: a condition is boolean, so it never carries a gradient, and reading it costs one device sync
unless it came from shape arithmetic (a ``Const``).

Scan is not here: ``check_supported`` refuses it by name.
"""

from __future__ import annotations

import torch

from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_ops.registry import Const, op, scalar


@op("If")
def _if(ctx, x, a):
    then_branch, else_branch = a["then_branch"], a["else_branch"]
    return tuple(ctx.run_graph(then_branch if bool(scalar(x[0])) else else_branch, []))


@op("Loop")
def _loop(ctx, x, a):
    body = a["body"]
    trip = int(scalar(x[0])) if x and x[0] is not None else None
    has_cond = len(x) > 1 and x[1] is not None
    if trip is None and not has_cond:
        raise UnsupportedError("Loop with neither a trip count nor a condition never ends; the graph is malformed")
    go = bool(scalar(x[1])) if has_cond else True
    carried = list(x[2:])
    n_scan = len(body.output_names) - 1 - len(carried)
    scans: list[list[torch.Tensor]] = [[] for _ in range(n_scan)]
    i = 0
    while go and (trip is None or i < trip):
        outs = ctx.run_graph(body, [Const(i, torch.int64, ()), Const(go, torch.bool, ())] + carried)
        go = bool(scalar(outs[0])) if has_cond else True  # without a condition input the body's is ignored
        carried = outs[1 : 1 + len(carried)]
        for k, v in enumerate(outs[1 + len(carried) :]):
            scans[k].append(ctx.t(v))
        i += 1
    if n_scan and i == 0:
        raise UnsupportedError("Loop ran no iteration, so its scan outputs have no element to take a shape from; "
                               "lora_fx cannot build them. Feed inputs that run the loop at least once")
    return tuple(carried) + tuple(torch.stack(s) for s in scans)
