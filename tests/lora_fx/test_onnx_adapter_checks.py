"""What the ONNX adapter paths check before they load or write: a PEFT directory's target_modules against the sites
its tensors are for (as PEFT builds the adapter from them), an adapter's kind (prefix or LoRA) against the model's
slots before the fingerprints, and NaN/inf before a PEFT directory is written. PEFT and ONNX Runtime are the references."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.cli import main
from lora_fx.errors import AdapterError, TargetNotFoundError
from lora_fx.onnx_adapter import OnnxAdapter, Slot, check_fits, current_adapter, stamp_fingerprint, write_onnx_adapter
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from lora_fx.runtime import Session
from tests import models
from tests.exported import eager, exported, feeds, lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def _with_targets(src, dst, target_modules, **fields):
    """A copy of the PEFT directory ``src`` whose adapter_config.json names ``target_modules`` (and ``fields``);
    tensors unchanged."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules, **fields}))
    return dst


@pytest.fixture(scope="module")
def bert_peft(tmp_path_factory):
    """A PEFT adapter on query and value of the tiny BERT (random A and B), saved by PEFT; the served export of that
    BERT (slots on every linear site); feeds."""
    tmp = tmp_path_factory.mktemp("bert-peft")
    torch.manual_seed(3)
    pm = models.peft_wrap(eager("bert"), r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    pm.save_pretrained(str(tmp / "peft"))
    return tmp / "peft", exported("bert", "adapters").model_path, feeds(2, 8, pad=2)


def _peft_output(directory, batch):
    import peft

    pm = peft.PeftModel.from_pretrained(models.build("bert"), str(directory)).eval()
    return models.run(pm, batch).numpy()


def test_a_peft_dir_whose_target_modules_match_nothing_is_refused_by_session_run_and_export(bert_peft, tmp_path):
    """PEFT refuses the directory (it builds the adapter from target_modules first); Session.add_adapter,
    lora-fx run --adapter and lora-fx export --merge --adapter applied its tensors with exit status 0."""
    import peft

    good, served, (batch, np_feeds) = bert_peft
    bad = _with_targets(good, tmp_path / "nomatch", ["nomatch"])
    with pytest.raises(ValueError, match="not found in the base model"):  # the reference
        peft.PeftModel.from_pretrained(models.build("bert"), str(bad))
    sess = Session(served, providers=["CPUExecutionProvider"])
    with pytest.raises(TargetNotFoundError, match=r"target_modules=\['nomatch'\] in .*adapter_config.json matches none "
                                                  r"(.|\n)*module names you can target \(a name, a dotted suffix or a regex\): "
                                                  r"dense, key, query, value"):
        sess.add_adapter("bad", bad)
    assert sess.adapters == []
    np.savez(tmp_path / "feeds.npz", **np_feeds)
    assert main(["run", str(served), "--adapter", str(bad), "--inputs", str(tmp_path / "feeds.npz")]) != 0
    assert main(["export", str(served), "--merge", "--adapter", str(bad), "-o", str(tmp_path / "m.onnx")]) != 0
    assert not (tmp_path / "m.onnx").exists()
    # The directory as PEFT saved it serves PEFT's outputs.
    sess.add_adapter("good", good)
    assert rel(sess.run(np_feeds, adapter="good")[0], _peft_output(good, batch)) <= 1e-4


def test_a_peft_dir_whose_target_modules_leave_out_some_of_its_tensors_is_refused(bert_peft, tmp_path):
    """PEFT builds query alone and leaves the value tensors unloaded without a word: serving them would run another
    adapter than PEFT runs."""
    good, served, (batch, np_feeds) = bert_peft
    partial = _with_targets(good, tmp_path / "query", ["query"])
    sess = Session(served, providers=["CPUExecutionProvider"])
    sess.add_adapter("good", good)
    # The reference: what PEFT runs for it differs from the adapter its tensors hold.
    assert rel(_peft_output(partial, batch), _peft_output(good, batch)) > 1e-3
    with pytest.raises(AdapterError, match=r"target_modules=\['query'\] in .* leaves out sites its tensors are for: "
                                           r"encoder\.layer\.0\.attention\.self\.value"):
        sess.add_adapter("partial", partial)


def test_a_peft_dir_targeting_more_sites_than_its_tensors_serves_what_peft_runs(bert_peft, tmp_path):
    """PEFT gives the targeted sites without tensors their initial B, zero (init_lora_weights=True, as a trained
    adapter's config has it: with False PEFT would run random matrices there); the slots' defaults are zero too."""
    good, served, (batch, np_feeds) = bert_peft
    more = _with_targets(good, tmp_path / "qkv", ["query", "key", "value"], init_lora_weights=True)
    sess = Session(served, providers=["CPUExecutionProvider"])
    sess.add_adapter("more", more)
    assert rel(sess.run(np_feeds, adapter="more")[0], _peft_output(more, batch)) <= 1e-4


def _gemm_peft(tmp_path, target_modules):
    """The PEFT directory of a gemm-mlp LoRA model (fc1, fc2, head), its config naming ``target_modules``."""
    lora_fx.save_adapter(lora_onnx(ENTRY, r=4, alpha=6), tmp_path / "peft")
    return _with_targets(tmp_path / "peft", tmp_path / f"peft-{'-'.join(target_modules)}", target_modules)


def _state(model):
    return ([n.op_type for n in model.graph], sorted(model.graph.initializers), dict(model.metadata_props),
            {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items() if "lora_" in k})


@pytest.mark.parametrize("target_modules, message", [
    (["nomatch"], r"the adapter's config does not fit this model's adapter \(target_modules=\['nomatch'\] matches no "
                  r"linear site(.|\n)*module names you can target"),
    (["fc1", "fc2"], r"does not describe the adapter this model has: it leaves out head"),
])
def test_load_adapter_onto_an_adapted_onnx_model_refuses_a_config_unlike_its_adapter(tmp_path, target_modules, message):
    """The tensors fit the graph's slots, but the config recorded with them must describe them too (as the FX reload
    checks): it was recorded as the model's config, unlike what the graph runs. The model is left as it was."""
    directory = _gemm_peft(tmp_path, target_modules)
    model = lora_onnx(ENTRY, r=4, alpha=6, seed=1)
    before = _state(model)
    with pytest.raises(AdapterError, match=message):
        lora_fx.load_adapter(model, directory)
    after = _state(model)
    assert after[:3] == before[:3] and all(np.array_equal(after[3][k], before[3][k]) for k in before[3])
    # A bare model applies the config first, which refuses the same way the FX path does.
    if target_modules == ["nomatch"]:
        with pytest.raises(TargetNotFoundError, match=r"target_modules=\['nomatch'\] matches no linear site"):
            lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), directory)


def test_load_adapter_onto_an_adapted_onnx_model_with_its_own_config_gives_its_outputs(tmp_path):
    """The check passes the adapter's own directory: the reloaded model computes the saved one's outputs (ORT)."""
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    want = ort_run(save(lora, "oac-saved.onnx"), corpus().get(ENTRY).feeds())
    other = lora_fx.load_adapter(lora_onnx(ENTRY, r=4, alpha=6, seed=1), tmp_path / "peft")
    got = ort_run(save(other, "oac-reloaded.onnx"), corpus().get(ENTRY).feeds())
    assert rel(got, want) <= 1e-6


def _served_gemm(tmp_path):
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    adapter = current_adapter(lora)
    expose_adapters(lora)
    adapter.fingerprint = stamp_fingerprint(lora)
    return save(lora, "oac-served.onnx"), adapter


def test_a_prefix_adapter_on_a_lora_slot_model_is_refused_as_such_not_as_another_base(tmp_path):
    """Exports of one base with prefix slots and with LoRA slots store it differently: their fingerprints differ, and
    the refusal blamed "a different base model", sending the user the wrong way."""
    served, lora_adapter = _served_gemm(tmp_path)
    prefix = OnnxAdapter({f"h.0.attn.prefix_{w}": np.ones((2, 4, 8), np.float32) for w in ("key", "value")},
                         fingerprint="ab" * 32)  # another export's fingerprint
    path = write_onnx_adapter(tmp_path / "prefix.onnx_adapter", prefix)
    sess = Session(served, providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError) as refused:
        sess.add_adapter("p", path)
    message = str(refused.value)
    assert "prefix-tuning adapter (h.0.attn.prefix_key" in message and "has LoRA adapter slots only" in message
    assert "lora-fx export PREFIX_MODEL.onnx --adapters" in message and "different base model" not in message
    assert main(["run", str(served), "--adapter", str(path), "--inputs", str(_feeds_file(tmp_path))]) != 0
    # The other way round: a LoRA adapter on a model with prefix slots only.
    slots = {f"h.0.attn.prefix_{w}": Slot("float32", (2, 4, 8)) for w in ("key", "value")}
    lora_adapter.fingerprint = "cd" * 32
    with pytest.raises(AdapterError, match=r"this is a LoRA adapter \(fc1\.lora_A\.weight, .*has prefix adapter slots "
                                           r"only(.|\n)*--adapters"):
        check_fits(lora_adapter, slots, "ef" * 32, where="p.onnx")


def _feeds_file(tmp_path):
    np.savez(tmp_path / "feeds.npz", **corpus().get(ENTRY).feeds())
    return tmp_path / "feeds.npz"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_peft_dir_refuses_nan_and_inf_naming_the_tensor(tmp_path, dtype):
    """A PEFT directory with NaN/inf was written (exit status 0) and every output of its sites was NaN once loaded;
    write_onnx_adapter refused the same tensors. An existing folder keeps its files."""
    from lora_fx.adapters import read_peft_dir, write_peft_dir

    lora_fx.save_adapter(lora_onnx(ENTRY, r=4, alpha=6), tmp_path / "peft")
    config, tensors = read_peft_dir(tmp_path / "peft")
    key = next(k for k in sorted(tensors) if k.endswith("fc2.lora_B.weight"))
    bad = {k: v.to(dtype) for k, v in tensors.items()}
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(AdapterError, match=rf"adapter tensor {key.replace('.', '[.]')} holds NaN or inf .*nothing was written"):
        write_peft_dir(tmp_path / "out", config, bad)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["peft"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()}
    bad[key][0, 0] = float("inf")
    with pytest.raises(AdapterError, match="holds NaN or inf"):
        write_peft_dir(tmp_path / "peft", config, bad)
    assert {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()} == before
    # save_adapter of a model whose adapter diverged goes through the same check.
    model = lora_onnx(ENTRY, r=4, alpha=6)
    b = model.graph.initializers["fc1.lora_B.weight"]
    arr = b.const_value.numpy().copy()
    arr[0, 0] = np.inf
    b.const_value = ir.tensor(arr, name=b.name)
    with pytest.raises(AdapterError, match=r"adapter tensor base_model\.model\.fc1\.lora_B\.weight holds NaN or inf"):
        lora_fx.save_adapter(model, tmp_path / "diverged")
    assert not (tmp_path / "diverged").exists()


def test_a_tensor_of_no_module_on_an_onnx_model_is_refused_with_its_whole_key_quoted(tmp_path):
    """check_saved_tensors quoted the name alone: base_model.model.'nowhere.weight'."""
    from safetensors.torch import load_file, save_file

    lora_fx.save_adapter(lora_onnx(ENTRY, r=4, alpha=6), tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({**load_file(str(weights)), "base_model.model.nowhere.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(AdapterError, match=r"adapter tensor 'base_model\.model\.nowhere\.weight' is neither a LoRA matrix"):
        lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "peft")
