"""hoist_lora_add: the LoRA Add moves in front of the bias Add; outputs unchanged, fold/expose still work."""

from __future__ import annotations

import onnx_ir as ir

import pytest

import lora_fx
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from lora_fx.passes.onnx.fold_lora import fold_lora
from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add
from lora_fx.passes.onnx.lora_layout import find_branch, read_records
from tests.exported import lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus


@pytest.mark.parametrize("entry", ["forms", "fp16-mlp"])
def test_hoisting_keeps_outputs_and_the_branch_stays_recognisable(entry):
    feeds = corpus().get(entry).feeds()
    lora = lora_onnx(entry)
    want = ort_run(save(lora, f"hoist-{entry}-lora.onnx"), feeds)
    result = hoist_lora_add(lora)
    biased = {"forms": ["enc.proj"], "fp16-mlp": ["up"]}[entry]
    assert result.changed == biased  # only sites with a bias Add move
    for site in biased:
        branch = find_branch(lora.graph, site, read_records(lora)[site])
        assert branch.y.producer().op_type == "MatMul"
        (use,) = list(branch.add.outputs[0].uses())
        assert use.node.op_type == "Add" and use.node.inputs[1].name.endswith(".bias")
    tol = 1e-6 if entry == "forms" else 2e-3
    assert rel(ort_run(save(lora, f"hoist-{entry}-hoisted.onnx"), feeds), want) <= tol
    assert not hoist_lora_add(lora).modified  # a hoisted branch is left alone
    folded = fold_lora(ir.from_proto(ir.to_proto(lora))).model  # (deepcopy breaks onnx_ir node removal)
    assert rel(ort_run(save(folded, f"hoist-{entry}-folded.onnx"), feeds), want) <= 5 * tol
    expose_adapters(lora)
    assert rel(ort_run(save(lora, f"hoist-{entry}-served.onnx"), feeds), ort_run(corpus().get(entry).path, feeds)) <= tol
