"""QLoRA on an Optimum merged decoder (``decoder_model_merged.onnx``: every layer in the branches of one ``If``, both
reading the main graph's weights), checked against the same tiny Llama's unmerged files quantized by the same pass:
the packed storage goes once into the main graph and every branch node reads it, so each branch computes what its
own file does. Training runs through the If, folding writes the storage once, and the served export feeds both
branches from one slot pair.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.lora_layout import read_records
from tests.passes.onnx import merged_decoder as md

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj", "down_proj"]
BRANCHES = [True, False]
QUANTS = {
    "nf4": dict(dtype="nf4", block_size=32, double_quant=True, double_quant_block_size=4),
    "int4": dict(dtype="int4", block_size=16, symmetric=False),
    "int8": dict(dtype="int8"),
}


@pytest.fixture(scope="module")
def files(merged_decoder_files):
    no_past, merged = merged_decoder_files
    # The unmerged file of each branch: the reference for that branch.
    return merged, {True: no_past.parent / "decoder_with_past_model.onnx", False: no_past}


def _ort(model: ir.Model, feeds: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in {**feeds, **(extra or {})}.items() if k in names})


def _load(path) -> ir.Model:
    """The file with its weights in memory (the unmerged exports keep theirs in a .data file beside them)."""
    return ir.external_data.load_to_model(lora_fx.load(str(path)))


def _qlora(path, quant: str, seed: int = 7) -> ir.Model:
    """``lora_fx.apply`` with quant, then A and B set to the same values on every file (B non-zero: the adapter counts)."""
    model = lora_fx.apply(_load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                          quant=lora_fx.QuantConfig(target_modules="all-linear", **QUANTS[quant]))
    g = torch.Generator().manual_seed(seed)
    for name in sorted(model.graph.initializers):
        if ".lora_" in name:
            value = model.graph.initializers[name]
            b = torch.randn(tuple(value.const_value.shape), generator=g).numpy() * 0.2
            value.const_value = ir.tensor(b.astype(np.float32), name=name)
    return model


def _storage(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if ".weight_" in n}


def _op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter((n.domain, n.op_type) for g in model.graph.subgraphs() for n in g)


def _close(got: list[np.ndarray], want: list[np.ndarray], atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_both_branches_compute_what_their_own_quantized_files_do(files, quant):
    merged_path, own = files
    merged = _qlora(merged_path, quant)
    sites = find_sites(merged)
    # all-linear, as PEFT means it: every linear site inside the branches but the output layer.
    linear = [s.name for s in sites if s.kind.value == "linear" and s.name in sites.inside and s.name != "lm_head"]
    assert len(linear) == 7 * md.LAYERS
    assert not [s for s in linear if f"{s}.weight" in merged.graph.initializers]  # no float W left behind
    # Each quantized op in both branches, the storage once in the main graph.
    op = {"nf4": "MatMulBnb4", "int4": "MatMulNBits", "int8": "DequantizeLinear"}[quant]
    quantized = [n for n in merged.graph.initializers if n.endswith(".weight_q")]
    assert len(quantized) == len(linear)
    branches = list(merged.graph.subgraphs())
    assert len(branches) == 2 and all(sum(n.op_type == op for n in g) == len(quantized) for g in branches)
    for use_cache in BRANCHES:
        reference = _qlora(own[use_cache], quant)
        want = _storage(reference)
        got = _storage(merged)
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        feeds = md.feeds(use_cache, seed=3)
        base = _ort(_load(own[use_cache]), feeds)
        result = _ort(merged, feeds)
        _close(result, _ort(reference, feeds))
        assert np.abs(result[0] - base[0]).max() > 1e-3  # quantization and the adapter both count


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gradients_through_the_if_match_the_quantized_unmerged_file(files, quant):
    from lora_fx.runtime.onnx_torch import OnnxModule

    merged_path, own = files
    merged_model = _qlora(merged_path, quant)
    merged = OnnxModule(merged_model)
    if quant == "int8":  # every branch node runs lora_fx's int8 op (no float W kept for backward)
        quantized = [n for n in merged_model.graph.initializers if n.endswith(".weight_q")]
        assert len(quantized) == 7 * md.LAYERS
        assert len(merged.int8_linears.matched) == 2 * len(quantized) and not merged.int8_linears.refused
    target = torch.randn(2, 3, md.VOCAB, generator=torch.Generator().manual_seed(5))
    for use_cache in BRANCHES:
        reference = OnnxModule(_qlora(own[use_cache], quant))
        feeds = {k: torch.from_numpy(v) for k, v in md.feeds(use_cache, seed=4).items()}
        merged.zero_grad()
        names = set(reference.input_names)
        (merged(**feeds)["logits"] * target).sum().backward()
        (reference(**{k: v for k, v in feeds.items() if k in names})["logits"] * target).sum().backward()
        checked = 0
        for name in reference.trainable_names:
            got, want = merged.tensor(name).grad, reference.tensor(name).grad
            assert want is not None and float(want.abs().max()) > 0, name
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            checked += 1
        assert checked == 2 * len(TARGETS) * md.LAYERS


def test_training_the_quantized_merged_file_moves_the_adapter_and_runs_in_ort(files):
    merged = _qlora(files[0], "nf4")
    storage = _storage(merged)
    before = {n: v.const_value.numpy().copy() for n, v in merged.graph.initializers.items() if ".lora_" in n}
    assert len(md.train_briefly(merged).losses) == 4
    after = {n: merged.graph.initializers[n].const_value.numpy() for n in before}
    assert all(np.abs(after[n] - before[n]).max() > 0 for n in after)  # every A and B moved, through both branches
    for name, value in _storage(merged).items():  # the frozen storage did not
        np.testing.assert_array_equal(value, storage[name])
    for use_cache in BRANCHES:
        assert np.isfinite(_ort(merged, md.feeds(use_cache))[0]).all()


@pytest.mark.parametrize("quant_merge", ["requantize", "float"])
@pytest.mark.parametrize("quant", ["nf4", "int4", "int8"])
def test_folding_a_quantized_branch_site_matches_folding_the_unmerged_file(files, quant, quant_merge):
    from lora_fx.passes.onnx.fold_lora import fold_lora

    merged_path, own = files
    merged = _qlora(merged_path, quant)
    adapted = {use_cache: _ort(merged, md.feeds(use_cache, seed=2)) for use_cache in BRANCHES}
    nodes = _op_counts(merged)
    fold_lora(merged, quant_merge)
    assert not read_records(merged) and not [n for n in merged.graph.initializers if ".lora_" in n]
    if quant_merge == "requantize":  # the base file's quantized nodes, nothing more
        lora = {k: v for k, v in _op_counts(merged).items()}
        assert all(lora.get(k, 0) <= v for k, v in nodes.items()) and sum(nodes.values()) > sum(lora.values())
    for use_cache in BRANCHES:
        reference = _qlora(own[use_cache], quant)
        fold_lora(reference, quant_merge)
        feeds = md.feeds(use_cache, seed=2)
        got = _ort(merged, feeds)
        _close(got, _ort(reference, feeds))
        if quant_merge == "float":  # no requantization: the adapted model, folded
            _close(got, adapted[use_cache], atol=1e-4)
    if quant_merge == "requantize":
        want = _storage(reference)
        for name, value in _storage(merged).items():
            np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_served_export_of_a_quantized_merged_file_feeds_both_branches_from_one_slot_pair(files, tmp_path):
    from lora_fx.cli import main
    from lora_fx.runtime.ort import Session

    trained_model = _qlora(files[0], "nf4")  # double-quantized: its int8 absmaxes stay so
    trained = tmp_path / "trained.onnx"
    lora_fx.save(trained_model, trained)
    served = tmp_path / "served.onnx"
    assert main(["export", str(trained), "-o", str(served), "--adapters", "--name", "a"]) == 0
    sess = Session(served)
    sess.add_adapter("a", tmp_path / "served.adapters" / "a.onnx_adapter")
    exposed = lora_fx.load(str(served))
    # One slot pair per site, in the main graph, defaulting to zeros; the quantized storage served as trained.
    slots = [v for v in exposed.graph.inputs if ".lora_" in (v.name or "")]
    assert len(slots) == 2 * len(TARGETS) * md.LAYERS and all(not v.const_value.numpy().any() for v in slots)
    assert _storage(exposed).keys() == _storage(trained_model).keys()
    base = _qlora(files[0], "nf4")
    for name, value in base.graph.initializers.items():
        if ".lora_B." in name:
            value.const_value = ir.tensor(np.zeros(value.const_value.shape, np.float32), name=name)
    for use_cache in BRANCHES:
        feeds = md.feeds(use_cache, seed=6)
        _close(sess.run(feeds, adapter="a"), _ort(trained_model, feeds))
        _close(sess.run(feeds), _ort(base, feeds))
