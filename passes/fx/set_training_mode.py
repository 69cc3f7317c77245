"""Switch dropout on or off in an exported graph.

``torch.export`` bakes train/eval into the graph and ``gm.train()`` raises on exported modules, so
the mode is switched by rewriting the ``train`` argument of every ``aten.dropout`` node.
Attention-probability dropout inside ``scaled_dot_product_attention`` stays as captured (off,
since capture runs in eval mode): export records ``dropout_p=0`` and the model's rate is not in
the graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lora_fx.passes.fx.capture import meta
from lora_fx.passes.result import PassResult

aten = torch.ops.aten


class SetTrainingMode:
    def __init__(self, training: bool) -> None:
        self.training = bool(training)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        changed = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is aten.dropout.default:
                args = list(node.args)
                while len(args) < 3:
                    args.append(node.kwargs.get("train", False))
                if bool(args[2]) != self.training:
                    args[2] = self.training
                    node.args = tuple(args)
                    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "train"}
                    changed.append(node.name)
        meta(gm)["training"] = self.training
        if changed:
            gm.recompile()
        return PassResult(gm, bool(changed), changed)


def set_training_mode(gm: fx.GraphModule, training: bool) -> PassResult:
    return SetTrainingMode(training)(gm)
