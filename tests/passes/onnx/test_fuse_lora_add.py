"""fuse_lora_add: each branch's B MatMul + Add becomes one Gemm; outputs unchanged, fold/expose read the fused form."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import lora_fx
from lora_fx.onnx_adapter import current_adapter, write_onnx_adapter
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from lora_fx.passes.onnx.fold_lora import fold_lora
from lora_fx.passes.onnx.fuse_lora_add import FuseLoraAdd, fuse_lora_add
from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add
from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY, BranchForm, find_branch, read_records
from tests.exported import TMP, lora_onnx, ort_run, rel
from tests.onnx_corpus import corpus

# Small hand-built graphs (2-D and 3-D inputs, fp16, Gemm sites) and exported transformers.
ENTRIES = ["gemm-mlp", "forms", "fp16-mlp", "bert-dynamo18", "gpt2-dynamo18", "llama-torchscript"]


def _lora(entry: str, seed: int = 0) -> ir.Model:
    if entry in ("gemm-mlp", "forms", "fp16-mlp"):
        return lora_onnx(entry, seed=seed)
    import torch

    torch.manual_seed(seed)
    model = lora_fx.load(corpus().get(entry).path)
    return lora_fx.apply(model, lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def save(model: ir.Model, name: str):
    return lora_fx.save(model, TMP / name)  # the model itself: a proto copy loses its external data's folder


def _tol(entry: str) -> float:
    return 2e-3 if entry.startswith("fp16") else 1e-5


@pytest.mark.parametrize("entry", ENTRIES)
def test_fusing_keeps_outputs_and_every_branch_becomes_one_gemm(entry):
    feeds = corpus().get(entry).feeds()
    lora = _lora(entry)
    want = ort_run(save(lora, f"fuse-{entry}-lora.onnx"), feeds)
    records = read_records(lora)
    matmuls = sum(n.op_type == "MatMul" for n in lora.graph)
    fuser = FuseLoraAdd()
    result = fuser(lora)
    assert sorted(result.changed) == sorted(records) and not fuser.refused
    for site, rec in records.items():
        branch = find_branch(lora.graph, site, rec)
        assert branch.form is BranchForm.GEMM and branch.matmul_b.op_type == "Gemm"
        assert branch.matmul_b.inputs[1] is branch.b and branch.matmul_a.inputs[1] is branch.a
    # One B MatMul per site is gone and no Add is left between a branch and its site output.
    assert sum(n.op_type == "MatMul" for n in lora.graph) == matmuls - len(records)
    assert rel(ort_run(save(lora, f"fuse-{entry}-fused.onnx"), feeds), want) <= _tol(entry)
    assert not fuse_lora_add(lora).modified  # a fused branch is left alone
    # fold_lora reads the fused form: the folded model has the base model's op types and its outputs.
    folded = fold_lora(lora).model
    base = lora_fx.load(corpus().get(entry).path)
    assert sorted(n.op_type for n in folded.graph) == sorted(n.op_type for n in base.graph)
    assert rel(ort_run(save(folded, f"fuse-{entry}-folded.onnx"), feeds), want) <= 5 * _tol(entry)


@pytest.mark.parametrize("entry", ["forms", "bert-dynamo18"])
def test_the_served_deployment_fused_is_the_base_without_an_adapter_and_the_lora_model_with_it(entry):
    feeds = corpus().get(entry).feeds()
    lora = _lora(entry, seed=1)
    want = ort_run(save(lora, f"fuse-serve-{entry}-lora.onnx"), feeds)
    adapter = current_adapter(lora)
    expose_adapters(lora)
    hoist_lora_add(lora)
    assert fuse_lora_add(lora).changed
    adapter.fingerprint = lora.metadata_props[FINGERPRINT_KEY]
    path = save(lora, f"fuse-serve-{entry}.onnx")
    adapter_path = write_onnx_adapter(TMP / f"fuse-serve-{entry}.onnx_adapter", adapter)
    base = ort_run(corpus().get(entry).path, feeds)
    assert rel(ort_run(path, feeds), base) <= 1e-6
    assert rel(ort_run(path, feeds, adapter=adapter_path), want) <= 1e-5 and rel(want, base) > 1e-3
    # expose_adapters is idempotent on the fused form, and a fused served model still folds.
    assert not expose_adapters(lora).modified
    for key, arr in adapter.tensors.items():
        lora.graph.initializers[key].const_value = ir.tensor(arr, name=key)
    folded = fold_lora(lora).model
    assert rel(ort_run(save(folded, f"fuse-serve-{entry}-folded.onnx"), feeds), want) <= 5e-5


def test_a_branch_whose_output_is_broadcast_is_left_alone_with_the_reason():
    lora = lora_onnx("forms")
    site = sorted(read_records(lora))[0]
    branch = find_branch(lora.graph, site, read_records(lora)[site])
    branch.x.shape = ir.Shape(["batch", 8, 16])
    branch.y.shape = ir.Shape([16])
    fuser = FuseLoraAdd()
    result = fuser(lora)
    assert site not in result.changed and "broadcast" in fuser.refused[site]
    assert find_branch(lora.graph, site, read_records(lora)[site]).form is BranchForm.MATMUL_ADD


def test_an_input_of_unknown_rank_below_opset_11_is_left_alone_with_the_reason():
    lora = lora_onnx("forms")
    site = sorted(read_records(lora))[0]
    find_branch(lora.graph, site, read_records(lora)[site]).x.shape = None
    lora.opset_imports[""] = 10  # Flatten(axis=-1) needs opset 11
    fuser = FuseLoraAdd()
    assert site not in fuser(lora).changed and "opset is below 11" in fuser.refused[site]
