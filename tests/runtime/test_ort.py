"""runtime.Session: providers said, adapters registered once and switched per call, threads, refusals.

Only the CPU path runs here (no GPU on the test machines); the CUDA/IOBinding path is exercised by
``benchmarks/ort_inference.py`` where a CUDA GPU is present.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.errors import AdapterError, ConfigError, ModelLoadError
from lora_fx.onnx_adapter import OnnxAdapter, current_adapter, peft_dir_to_onnx_adapter, stamp_fingerprint, write_onnx_adapter
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from lora_fx.runtime import Session
from tests import models
from tests.exported import TMP, eager, exported, feeds, lora_onnx, ort_run, rel, save, trained_gm
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def _served_with_two_adapters():
    """A gemm-mlp model with slots, two adapters (ranks 4 and 2) and each one's own reference output."""
    feeds_ = corpus().get(ENTRY).feeds()
    paths, wants = {}, {}
    served = None
    for name, r, seed in (("legal", 4, 0), ("medical", 2, 5)):
        lora = lora_onnx(ENTRY, r=r, seed=seed)
        wants[name] = ort_run(save(lora, f"ort-{name}.onnx"), feeds_)
        adapter = current_adapter(lora)
        expose_adapters(lora)
        adapter.fingerprint = stamp_fingerprint(lora)
        paths[name] = write_onnx_adapter(TMP / f"ort-{name}.onnx_adapter", adapter)
        served = served or save(lora, "ort-served.onnx")
    return served, paths, wants, feeds_




@pytest.fixture(scope="module")
def served():
    return _served_with_two_adapters()


def test_providers_are_chosen_and_reported(served, caplog):
    path = served[0]
    with caplog.at_level(logging.INFO, logger="lora_fx.runtime"):
        sess = Session(path)
    assert sess.providers[-1] == "CPUExecutionProvider"
    # No GPU here: CUDA is only chosen when it really loads, otherwise CPU alone.
    assert sess.providers[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert "providers" in caplog.text and sess.providers[0] in caplog.text
    assert Session(path, providers=["CPUExecutionProvider"]).providers == ["CPUExecutionProvider"]


def test_switching_adapters_call_after_call(served):
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    for name, p in paths.items():
        sess.add_adapter(name, p)
    assert sess.adapters == ["legal", "medical"]
    base = ort_run(corpus().get(ENTRY).path, feeds_)
    assert rel(wants["legal"], wants["medical"]) > 1e-2
    for name in ["legal", "medical", "medical", None, "legal", "medical", None, "legal"]:
        got = sess.run(feeds_, adapter=name)[0]
        assert rel(got, wants[name] if name else base) <= 1e-5, name


def test_two_threads_with_different_adapters_on_one_session(served):
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    for name, p in paths.items():
        sess.add_adapter(name, p)

    def work(name):
        return [rel(sess.run(feeds_, adapter=name)[0], wants[name]) for _ in range(60)]

    with ThreadPoolExecutor(2) as pool:
        errors = list(pool.map(work, ["legal", "medical"]))
    assert max(max(e) for e in errors) <= 1e-5


def test_bad_adapters_and_names_are_refused(served, tmp_path):
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("legal", paths["legal"])
    with pytest.raises(AdapterError, match="'legal' is already registered"):
        sess.add_adapter("legal", paths["medical"])
    with pytest.raises(AdapterError, match="no adapter named 'nope'.*legal"):
        sess.run(feeds_, adapter="nope")
    good = lora_fx.onnx_adapter.read_onnx_adapter(paths["legal"])

    def variant(tag, **change):
        tensors = dict(good.tensors)
        tensors.update(change.pop("tensors", {}))
        adapter = OnnxAdapter(tensors, fingerprint=change.pop("fingerprint", good.fingerprint), sites=good.sites)
        return write_onnx_adapter(tmp_path / f"{tag}.onnx_adapter", adapter)

    a = good.tensors["fc1.lora_A.weight"]
    cases = {
        "another base": (variant("base", fingerprint="0" * 64), "different base model"),
        "wrong shape": (variant("shape", tensors={"fc1.lora_A.weight": np.zeros((17, 4), np.float32)}), r"shape \(17, 4\).*expects \(16, 'r'\)"),
        "wrong rank": (variant("rank", tensors={"fc1.lora_A.weight": np.zeros((16, 3), np.float32)}), "lora_A has rank 3 but lora_B has rank 4"),
        "wrong dtype": (variant("dtype", tensors={"fc1.lora_A.weight": a.astype(np.float64)}), "float64 but .* expects float32"),
        "unknown name": (variant("name", tensors={"fc9.lora_A.weight": a}), "fc9.lora_A.weight have no adapter slot"),
    }
    for case, (p, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            sess.add_adapter(case, p)
        assert case not in sess.adapters
    with pytest.raises(AdapterError, match="not a readable .onnx_adapter"):
        bad = tmp_path / "junk.onnx_adapter"
        bad.write_bytes(b"not an adapter")
        sess.add_adapter("junk", bad)
    with pytest.raises(ConfigError, match="missing inputs"):
        sess.run({}, adapter="legal")
    with pytest.raises(ConfigError, match="adapter slot"):
        sess.run({**feeds_, "fc1.lora_A.weight": a}, adapter=None)
    with pytest.raises(ModelLoadError):
        Session(tmp_path / "missing.onnx")


def test_a_model_without_slots_takes_no_adapter(served):
    sess = Session(corpus().get(ENTRY).path)
    with pytest.raises(AdapterError, match="no adapter slots.*mode='adapters'"):
        sess.add_adapter("legal", served[1]["legal"])


@pytest.mark.slow
def test_exported_gpt2_switches_between_our_adapter_and_a_peft_adapter_in_two_threads():
    """Two real adapters on one session of an exported model: ours (vs the GraphModule) and PEFT's (vs PeftModel)."""
    served = exported("gpt2", "adapters")
    torch.manual_seed(11)
    pm = models.peft_wrap(eager("gpt2"), r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    pm.save_pretrained(str(TMP / "ort-gpt2-peft"))
    peft_adapter = peft_dir_to_onnx_adapter(TMP / "ort-gpt2-peft", served.model_path, TMP / "ort-gpt2-peft.onnx_adapter")
    tb, nb = feeds(3, 9, pad=2)
    wants = {"ours": models.run(trained_gm("gpt2"), tb).numpy(), "peft": models.run(pm, tb).numpy()}
    sess = Session(served.model_path)
    sess.add_adapter("ours", served.adapter_paths[0])
    sess.add_adapter("peft", peft_adapter)

    def work(order):
        return max(rel(sess.run(nb, adapter=n)[0], wants[n]) for n in order * 10)

    with ThreadPoolExecutor(2) as pool:
        assert max(pool.map(work, [["ours", "peft"], ["peft", "ours"]])) <= 1e-4

    # The same adapter refused on a base with other weights (a re-trained or different base).
    other = ir.load(str(served.model_path))
    w = other.graph.initializers["transformer.h.0.ln_1.weight"]
    w.const_value = ir.tensor(w.const_value.numpy() + 0.5, name=w.name)
    stamp_fingerprint(other)
    other_path = save(other, "ort-gpt2-other-base.onnx")
    with pytest.raises(AdapterError, match="different base model"):
        Session(other_path).add_adapter("ours", served.adapter_paths[0])
