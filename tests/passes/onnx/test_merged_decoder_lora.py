"""LoRA on a real Optimum-style merged decoder (one ``If`` holding the decoders with and without past), end to end.

The merged file is built from a tiny seeded Llama (``tests/passes/onnx/merged_decoder.py``: two dynamo exports merged
the way Optimum merges them). Every number is compared with PEFT running the same adapter on the same Llama, in both
branches: the rewritten file in ONNX Runtime, the folded (merged) file, the
gradients training through the If computes, and adapters moving between PEFT and the merged file.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.lora_layout import find_branches, read_records
from tests.passes.onnx import merged_decoder as md

pytestmark = pytest.mark.slow  # the two exports take about 20 s on 2 cores, once per process

TARGETS = ["q_proj", "v_proj", "down_proj"]
BRANCHES = [True, False]


@pytest.fixture(scope="module")
def files(merged_decoder_files):
    return merged_decoder_files


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    """PEFT on the same Llama with a non-zero adapter (B random), and its adapter directory."""
    import peft

    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(md.build_llama(), config).eval()
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(path))
    return model, path


def _load(path) -> ir.Model:
    return lora_fx.load(str(path))


def _ort(model: ir.Model, feeds: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.to_proto(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in {**feeds, **(extra or {})}.items() if k in names})


def _close(got: list[np.ndarray], want: list[np.ndarray], atol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol)


def _op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter((g.name, n.domain, n.op_type) for g in [model.graph, *model.graph.subgraphs()] for n in g)


def test_linear_layers_in_the_branches_are_one_site_each_named_as_in_the_unmerged_file(files):
    plain, merged = files
    sites, unmerged = find_sites(_load(merged)), find_sites(_load(plain))
    linear = [s for s in unmerged if s.kind.value == "linear"]
    assert [(s.name, s.in_features, s.out_features, s.is_output_layer) for s in sites] == [
        (s.name, s.in_features, s.out_features, s.is_output_layer) for s in linear]
    assert set(sites.inside.values()) == {"If node 'optimum::if' (else_branch, then_branch)"}  # the If's attribute order
    # Attention inside the If stays out of reach (prefix-tuning), said so.
    assert [s.name for s in sites.unreachable] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.mark.parametrize("use_cache", BRANCHES)
def test_a_peft_adapter_loaded_onto_the_merged_file_matches_peft_in_either_branch(files, peft_model, use_cache):
    model, path = peft_model
    merged = lora_fx.load_adapter(_load(files[1]), path)
    records = read_records(merged)
    assert len(records) == 2 * 3
    for site, rec in records.items():
        # One A and B in the main graph; a branch in each If branch, reading them from the outer scope.
        assert {b.graph.name for b in find_branches(merged.graph, site, rec)} == {"with_past", "no_past"}
    feeds = md.feeds(use_cache)
    base = _ort(_load(files[1]), feeds)
    want = md.eager(model, feeds)
    assert np.abs(want[0] - base[0]).max() > 1e-2  # the adapter matters
    _close(_ort(merged, feeds), want)


def test_an_adapter_saved_from_the_merged_file_loads_into_peft(files, peft_model, tmp_path):
    import peft

    model, path = peft_model
    merged = lora_fx.load_adapter(_load(files[1]), path)
    out = lora_fx.save_adapter(merged, tmp_path / "from_onnx")
    reloaded = peft.PeftModel.from_pretrained(md.build_llama(), str(out)).eval()
    theirs = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert theirs.keys() == ours.keys() and len(ours) == 2 * 6
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_cache", BRANCHES)
def test_folding_writes_the_shared_weights_once_and_leaves_the_base_nodes(files, peft_model, use_cache):
    from lora_fx.passes.onnx.fold_lora import fold_lora

    model, path = peft_model
    merged = lora_fx.load_adapter(_load(files[1]), path)
    fold_lora(merged)
    base = _load(files[1])
    assert _op_counts(merged) == _op_counts(base)
    assert set(merged.graph.initializers) == set(base.graph.initializers)
    feeds = md.feeds(use_cache, seed=1)
    _close(_ort(merged, feeds), md.eager(model, feeds))


def test_served_export_switches_adapters_of_two_ranks_in_both_branches(files, peft_model, tmp_path):
    """``lora-fx export --adapters``: one slot pair per site in the main graph serves both If branches (ONNX Runtime
    resolves a branch's outer-scope read to the fed adapter); runtime.Session switches between the exported adapter
    and a PEFT directory of another rank per call; with no adapter the file is the base; plain ONNX Runtime's
    LoraAdapter gives the same."""
    import onnxruntime as ort
    import peft

    from lora_fx.cli import main
    from lora_fx.runtime.ort import Session

    model, path = peft_model
    trained = tmp_path / "trained.onnx"
    lora_fx.save(lora_fx.load_adapter(_load(files[1]), path), trained)
    served = tmp_path / "served.onnx"
    assert main(["export", str(trained), "-o", str(served), "--adapters", "--name", "a"]) == 0
    adapter = tmp_path / "served.adapters" / "a.onnx_adapter"
    torch.manual_seed(5)  # a second adapter of another rank, from PEFT
    other = peft.get_peft_model(md.build_llama(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS,
                                                                  init_lora_weights=False)).eval()
    other.save_pretrained(str(tmp_path / "other"))
    sess = Session(served)
    sess.add_adapter("a", adapter)
    sess.add_adapter("b", tmp_path / "other")
    plain = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    lora = ort.LoraAdapter()
    lora.Load(str(adapter))
    options.add_active_adapter(lora)
    for use_cache in BRANCHES:
        feeds = md.feeds(use_cache, seed=4)
        with model.disable_adapter():
            base = md.eager(model, feeds)
        for _ in range(2):  # switched every call
            _close(sess.run(feeds, adapter="a"), md.eager(model, feeds))
            _close(sess.run(feeds, adapter="b"), md.eager(other, feeds))
            _close(sess.run(feeds), base)
        _close(plain.run(None, feeds, options), md.eager(model, feeds))


@pytest.mark.parametrize("use_cache", BRANCHES)
def test_gradients_through_the_if_reach_the_shared_adapter_as_in_peft(files, peft_model, use_cache):
    from lora_fx.runtime.onnx_torch import OnnxModule

    model, path = peft_model
    merged = lora_fx.load_adapter(_load(files[1]), path)
    module = OnnxModule(merged)
    feeds = md.feeds(use_cache, seed=4)
    weight = torch.randn(2, 3, md.VOCAB, generator=torch.Generator().manual_seed(5))
    out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    (out["logits"] * weight).sum().backward()

    model.zero_grad()
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    cache = md.cache_of([torch.from_numpy(feeds[n]) for n in md.PAST]) if use_cache else None
    ref = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    (ref.logits * weight).sum().backward()
    params = dict(model.named_parameters())
    scale = 8 / 4
    checked = 0
    for site in read_records(merged):
        prefix = f"base_model.model.{site}"
        a_grad = module.tensor(f"{site}.lora_A.weight").grad  # [in, r]: PEFT's A [r, in] transposed
        b_grad = module.tensor(f"{site}.lora_B.weight").grad  # [r, out]: scale * PEFT's B [out, r], transposed
        assert a_grad is not None and float(a_grad.abs().max()) > 0, site
        torch.testing.assert_close(a_grad, params[f"{prefix}.lora_A.default.weight"].grad.T, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(b_grad * scale, params[f"{prefix}.lora_B.default.weight"].grad.T, rtol=1e-3, atol=1e-5)
        checked += 1
    assert checked == 6


def test_training_through_the_merged_file_moves_the_adapter_and_runs_in_ort(files):
    merged = lora_fx.apply(_load(files[1]), lora_fx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {n: v.const_value.numpy().copy() for n, v in merged.graph.initializers.items() if "lora_B" in n}
    assert len(md.train_briefly(merged).losses) == 4
    after = {n: merged.graph.initializers[n].const_value.numpy() for n in before}
    assert all(np.abs(after[n]).max() > 0 for n in after)  # B moved from zero, trained through both branches
    for use_cache in BRANCHES:
        _ort(merged, md.feeds(use_cache))  # the written-back model still runs


def test_fusing_the_served_branches_keeps_every_branch_node_in_step(files, peft_model):
    from lora_fx.passes.onnx.fold_lora import fold_lora
    from lora_fx.passes.onnx.fuse_lora_add import fuse_lora_add

    model, path = peft_model
    trained = lora_fx.load_adapter(_load(files[1]), path)
    feeds = md.feeds(True, seed=6)
    want = _ort(trained, feeds)
    result = fuse_lora_add(trained)
    assert len(result.changed) == 6
    for site, rec in read_records(trained).items():
        assert {b.form.value for b in find_branches(trained.graph, site, rec)} == {"gemm"}
    _close(_ort(trained, feeds), want, atol=1e-5)
    fold_lora(trained)  # the fused form is read back, and folds to the base's nodes
    assert _op_counts(trained) == _op_counts(_load(files[1]))
    _close(_ort(trained, feeds), want, atol=1e-5)


def test_lora_fx_train_command_takes_use_cache_branch_once_for_every_batch(files, tmp_path, capsys):
    """``use_cache_branch`` is shape [1] whatever the batch: given once in the data, it is fed whole to every batch
    (before, the command took it for one example and demanded --batch-size 1)."""
    from lora_fx.cli import main
    from lora_fx.commands.train import make_batches
    from lora_fx.errors import ConfigError
    from lora_fx.passes.onnx.lora_layout import b_name

    lora = tmp_path / "lora.onnx"
    assert main(["rewrite", str(files[1]), "-o", str(lora), "--target-modules", "q_proj,v_proj", "--r", "2"]) == 0
    rows = [md.feeds(False, seed=s, seq=5) for s in range(3)]
    data = {k: np.concatenate([r[k] for r in rows]) for k in rows[0] if k != "use_cache_branch"}
    data["use_cache_branch"] = np.array([False])
    data["labels"] = np.roll(data["input_ids"], -1, axis=1)
    batches = make_batches(_load(lora), data, "labels", 4)
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    assert all(b["use_cache_branch"].tolist() == [False] for b in batches)
    np.savez(tmp_path / "data.npz", **data)
    capsys.readouterr()
    assert main(["train", str(lora), "--data", str(tmp_path / "data.npz"), "--steps", "2", "--batch-size", "4",
                 "-o", str(tmp_path / "trained.onnx"), "--no-progress"]) == 0
    trained = _load(tmp_path / "trained.onnx")
    site = next(iter(read_records(trained)))
    assert np.abs(trained.graph.initializers[b_name(site)].const_value.numpy()).max() > 0  # B left zero: trained
    # Given per example (one value for each of the 6), it is sliced as before, and its fixed batch of 1 refuses 4.
    data["use_cache_branch"] = np.zeros(6, bool)
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        make_batches(_load(lora), data, "labels", 4)
