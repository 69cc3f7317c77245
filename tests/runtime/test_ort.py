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


def test_four_threads_switching_every_call_match_single_threaded_runs(served):
    """Adapters of ranks 4 and 2 and the base, switched on every call from four threads, batch sizes varying."""
    path, paths, _, _ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    for name, p in paths.items():
        sess.add_adapter(name, p)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(12)]
    names = [None, "legal", "medical"]
    wants = {(i, n): sess.run({"x": x}, adapter=n)[0] for i, x in enumerate(xs) for n in names}

    def work(t):
        calls = [(k % len(xs), names[(k + t) % 3]) for k in range(90)]
        return max(rel(sess.run({"x": xs[i]}, adapter=n)[0], wants[(i, n)]) for i, n in calls)

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(work, range(4))) <= 1e-6


def test_replace_swaps_an_adapter_while_other_threads_run_it(served, tmp_path):
    """No call between the swaps finds the name missing or gets a mix: each gets one adapter's output."""
    import threading

    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("live", paths["legal"])
    stop, results, errors = threading.Event(), [], []

    def runner():
        while not stop.is_set():
            try:
                got = sess.run(feeds_, adapter="live")[0]
                results.append(min(rel(got, wants["legal"]), rel(got, wants["medical"])))
            except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                errors.append(exc)

    threads = [threading.Thread(target=runner) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            sess.add_adapter("live", paths["medical" if i % 2 == 0 else "legal"], replace=True)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and results and max(results) <= 1e-5
    assert rel(sess.run(feeds_, adapter="live")[0], wants["legal"]) <= 1e-5  # the last swap put legal in
    bad = tmp_path / "bad.onnx_adapter"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(AdapterError, match="not a readable"):
        sess.add_adapter("live", bad, replace=True)
    assert rel(sess.run(feeds_, adapter="live")[0], wants["legal"]) <= 1e-5  # a refused file keeps the old one
    with pytest.raises(AdapterError, match="adapter names are non-empty strings"):
        sess.add_adapter(None, paths["legal"])
    assert sess.adapters == ["live"]


def test_feeds_are_checked_by_input_and_cast_only_without_loss(served):
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("legal", paths["legal"])
    x = feeds_["x"]
    # A list takes the input's dtype; float16 widens to float32 without loss; a torch tensor works too.
    for same in (x.tolist(), torch.from_numpy(x)):
        assert rel(sess.run({"x": same}, adapter="legal")[0], wants["legal"]) <= 1e-6
    half = x.astype(np.float16)
    assert rel(sess.run({"x": half}, adapter="legal")[0], sess.run({"x": half.astype(np.float32)}, adapter="legal")[0]) == 0
    with pytest.raises(ConfigError, match=r"input 'x' is float64 but .* takes float32; pass x.astype\(np.float32\)"):
        sess.run({"x": x.astype(np.float64)})
    with pytest.raises(ConfigError, match=r"input 'x' is int32"):
        sess.run({"x": x.astype(np.int32)})
    with pytest.raises(ConfigError, match=r"input 'x' has shape \(4, 5\) but .* takes \('batch', 16\)"):
        sess.run({"x": x[:, :5]})
    # Output names: one name is a name (not its letters); unknown ones are listed against the real ones.
    name = sess.outputs[0]
    assert rel(sess.run(feeds_, adapter="legal", output_names=name)[0], wants["legal"]) == 0
    with pytest.raises(ConfigError, match=rf"unknown output names \['logits'\]; .* has outputs \['{name}'\]"):
        sess.run(feeds_, output_names="logits")


def test_a_plain_onnxruntime_adapter_file_with_its_own_model_version_loads(served, tmp_path):
    """Olive and ORT's examples write model_version=1: not a fingerprint, so not "another base"."""
    import onnxruntime as ort

    path, paths, wants, feeds_ = served
    tensors = {k: np.ascontiguousarray(v) for k, v in lora_fx.onnx_adapter.read_onnx_adapter(paths["legal"]).tensors.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(tmp_path / "olive.onnx_adapter"))
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("olive", tmp_path / "olive.onnx_adapter")
    assert rel(sess.run(feeds_, adapter="olive")[0], wants["legal"]) <= 1e-6


def test_callers_session_options_keep_float_activations_in_int4_matmuls(tmp_path, caplog):
    """ORT fuses an int4 DequantizeLinear + MatMul into MatMulNBits, whose default accuracy level
    quantizes the activations to int8 (~4e-3 off here): options the caller passes get level 0 too."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, block = 64, 32, 32
    wq = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scale = (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["W", "S"], ["Wf"], axis=0, block_size=block), helper.make_node("MatMul", ["x", "Wf"], ["y"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        initializer=[helper.make_tensor("W", TensorProto.INT4, [k, n], wq.flatten().tolist()), numpy_helper.from_array(scale, "S")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / "dq.onnx")
    x = (rng.standard_normal((8, k)) * 3).astype(np.float32)
    want = x.astype(np.float64) @ (np.repeat(scale, block, axis=0) * wq)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    assert rel(Session(tmp_path / "dq.onnx", session_options=options).run({"x": x})[0], want) <= 1e-5
    assert rel(Session(tmp_path / "dq.onnx").run({"x": x})[0], want) <= 1e-5
    # A provider asked for by name that ORT cannot load here is said, not silently dropped.
    with caplog.at_level(logging.WARNING, logger="lora_fx.runtime"):
        sess = Session(tmp_path / "dq.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in sess.providers:
        assert "could not load CUDAExecutionProvider" in caplog.text


@pytest.mark.slow
def test_int_ids_and_a_bool_mask_run_and_inputs_of_two_batches_are_refused():
    served = exported("gpt2", "adapters")
    tb, nb = feeds(3, 9, pad=2)
    sess = Session(served.model_path)
    sess.add_adapter("ours", served.adapter_paths[0])
    want = models.run(trained_gm("gpt2"), tb).numpy()
    small = {"input_ids": nb["input_ids"].astype(np.int32), "attention_mask": nb["attention_mask"].astype(bool)}
    assert rel(sess.run(small, adapter="ours")[0], want) <= 1e-4
    with pytest.raises(ConfigError, match=r"input 'attention_mask' is \(3, 5\) and 'input_ids' is \(3, 9\).*equal along dim"):
        sess.run({**nb, "attention_mask": nb["attention_mask"][:, :5]}, adapter="ours")
    with pytest.raises(ConfigError, match=r"input 'input_ids' is float32 but .* takes int64"):
        sess.run({**nb, "input_ids": nb["input_ids"].astype(np.float32)})


def test_rewriting_a_registered_file_in_place_changes_nothing(served, tmp_path):
    """ORT memory-maps an adapter file: the session must hold its own copy of what add_adapter checked,
    or `cp other.onnx_adapter live.onnx_adapter` swaps in an unchecked adapter (here for another base)."""
    import shutil

    path, paths, wants, feeds_ = served
    live = tmp_path / "live.onnx_adapter"
    shutil.copy(paths["legal"], live)
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("live", live)
    good = lora_fx.onnx_adapter.read_onnx_adapter(paths["legal"])
    other = write_onnx_adapter(tmp_path / "other.onnx_adapter", OnnxAdapter({k: v * 3 for k, v in good.tensors.items()}, fingerprint="f" * 64))
    with open(live, "r+b") as f:  # in place, as cp does: same inode, new bytes
        f.write(other.read_bytes())
    assert rel(sess.run(feeds_, adapter="live")[0], wants["legal"]) <= 1e-6


def _rank0(tensors):
    return {k: np.zeros((v.shape[0], 0) if ".lora_A" in k else (0, v.shape[1]), v.dtype) for k, v in tensors.items()}


def test_a_rank0_adapter_is_refused_by_add_adapter(served, tmp_path):
    """Zero-size adapter tensors are what ONNX Runtime's CUDA provider fails on (onnxruntime#21483), and a
    rank-0 adapter is the base model: written by any tool, it is refused when registered."""
    import onnxruntime as ort

    path, paths, wants, feeds_ = served
    good = lora_fx.onnx_adapter.read_onnx_adapter(paths["legal"])
    arrays = {k: np.ascontiguousarray(v) for k, v in _rank0(good.tensors).items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(tmp_path / "zero.onnx_adapter"))
    sess = Session(path, providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError, match=r"zero-size \(rank 0\).*base model.*CUDA"):
        sess.add_adapter("zero", tmp_path / "zero.onnx_adapter")
    assert sess.adapters == []


def test_a_partial_adapter_reports_the_sites_left_at_the_default(served, tmp_path):
    """ONNX Runtime runs the slots an adapter does not name with the model's initializers (zeros here: the base
    model at those sites). add_adapter accepts such an adapter, as ORT does, and says which sites those are."""
    path, paths, wants, feeds_ = served
    good = lora_fx.onnx_adapter.read_onnx_adapter(paths["legal"])
    only_fc1 = write_onnx_adapter(tmp_path / "fc1.onnx_adapter", OnnxAdapter(
        {k: v for k, v in good.tensors.items() if k.startswith("fc1.")}, fingerprint=good.fingerprint))
    sess = Session(path, providers=["CPUExecutionProvider"])
    assert sess.slot_sites == ["fc1", "fc2", "head"]
    full = sess.add_adapter("legal", paths["legal"])
    assert (full.sites, full.default_sites) == (["fc1", "fc2", "head"], [])
    info = sess.add_adapter("fc1", only_fc1)
    assert (info.name, info.sites, info.default_sites) == ("fc1", ["fc1"], ["fc2", "head"])
    assert sess.adapter_info("fc1") == info
    # The reference: the LoRA model with fc2's and head's B at zero, in plain ONNX Runtime.
    lora = lora_onnx(ENTRY, r=4, seed=0)
    for site in ("fc2", "head"):
        b = lora.graph.initializers[f"{site}.lora_B.weight"]
        b.const_value = ir.tensor(np.zeros_like(b.const_value.numpy()), name=b.name)
    want = ort_run(save(lora, "ort-fc1-only.onnx"), feeds_)
    assert rel(sess.run(feeds_, adapter="fc1")[0], want) <= 1e-5
    assert rel(want, wants["legal"]) > 1e-3  # the other sites' adapters matter
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        sess.adapter_info("nope")
    # remove_adapter of an unknown name lists the registered ones (under the lock that `adapters` takes too).
    with pytest.raises(AdapterError, match="no adapter named 'nope'; registered: fc1, legal"):
        sess.remove_adapter("nope")


def test_big_endian_feeds_run_as_their_values(served):
    """ONNX Runtime reads a feed's bytes in native order: a '>f4' array (an .npz written on a big-endian
    machine) used to run as garbage (outputs off by 1e37) without a word."""
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    sess.add_adapter("legal", paths["legal"])
    swapped = feeds_["x"].astype(">f4")
    assert not swapped.dtype.isnative
    assert rel(sess.run({"x": swapped}, adapter="legal")[0], wants["legal"]) <= 1e-5


def test_a_non_finite_adapter_is_refused_by_add_adapter_and_keeps_the_old_one(served, tmp_path):
    """Registered, a NaN adapter made every output of its sites NaN; refused, ``replace=True`` keeps the old one."""
    from lora_fx.onnx_adapter import export_tensors, read_onnx_adapter

    path, paths, wants, feeds_ = served
    good = read_onnx_adapter(paths["legal"])
    tensors = {k: np.array(v) for k, v in good.tensors.items()}
    tensors["fc1.lora_A.weight"][1, 0] = -np.inf
    export_tensors(tmp_path / "inf.onnx_adapter", tensors, good.short_fingerprint)
    assert not np.isfinite(ort_run(path, feeds_, adapter=tmp_path / "inf.onnx_adapter")).all()  # ORT serves it
    sess = Session(path, providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError, match=r"inf.onnx_adapter: adapter tensor fc1.lora_A.weight holds 1 NaN or inf values"):
        sess.add_adapter("inf", tmp_path / "inf.onnx_adapter")
    assert sess.adapters == []
    sess.add_adapter("legal", paths["legal"])
    with pytest.raises(AdapterError, match="NaN or inf"):
        sess.add_adapter("legal", tmp_path / "inf.onnx_adapter", replace=True)
    assert rel(sess.run(feeds_, adapter="legal")[0], wants["legal"]) <= 1e-5


def test_a_mixed_adapter_batch_gives_each_row_its_own_adapters_output(served):
    """``run(adapter=[...])``, one entry per row (PEFT's ``adapter_names``): every row equals the row of a whole-batch
    run with that row's adapter (or the base), in the rows' order; bad lists are refused before anything runs."""
    path, paths, wants, feeds_ = served
    sess = Session(path, providers=["CPUExecutionProvider"])
    for name, p in paths.items():
        sess.add_adapter(name, p)
    base = ort_run(corpus().get(ENTRY).path, feeds_)
    rows = feeds_["x"].shape[0]
    for adapters in (["medical", None, "legal", "medical"][:rows], ["legal"] * rows, [None] * rows):
        (got,) = sess.run(feeds_, adapter=adapters)
        assert got.shape == wants["legal"].shape
        for i, name in enumerate(adapters):
            want = wants[name][i] if name else base[i]
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=rf"adapter list has {rows - 1} entries but the batch has {rows} rows \(x, axis 0\)"):
        sess.run(feeds_, adapter=["legal"] * (rows - 1))
    with pytest.raises(AdapterError, match="no adapter named 'tax'.*registered: legal, medical"):
        sess.run(feeds_, adapter=["legal"] * (rows - 1) + ["tax"])
    with pytest.raises(ConfigError, match="names or None, not int"):
        sess.run(feeds_, adapter=[0] * rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_mixed_adapter_batch_of_an_exported_model_matches_peft_adapter_names(name):
    """The reference is PEFT's own mixed batch: a PeftModel holding our adapter (from the export's PEFT dir) and a
    PEFT-trained one, called with ``adapter_names`` per row, left padding included. The exported Llama names the
    batch of ``input_ids`` and ``attention_mask`` apart (s72, s43): the rows are found by size."""
    import peft

    served = exported(name, "adapters")
    torch.manual_seed(12)
    pm = models.peft_wrap(eager(name), r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    pm.save_pretrained(str(TMP / f"ort-mixed-peft-{name}"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager(name)), str(TMP / f"ort-mixed-peft-{name}"), adapter_name="peft").eval()
    pm.load_adapter(str(served.peft_dirs[0]), adapter_name="ours")
    sess = Session(served.model_path)
    sess.add_adapter("ours", served.adapter_paths[0])
    sess.add_adapter("peft", peft_dir_to_onnx_adapter(TMP / f"ort-mixed-peft-{name}", served.model_path,
                                                      TMP / f"ort-mixed-peft-{name}.onnx_adapter"))
    tb, nb = feeds(4, 9, pad=2)
    names = ["peft", None, "ours", "peft"]
    with torch.no_grad():
        want = models.main_output(pm(**tb, adapter_names=[n or "__base__" for n in names])).numpy()
    (got,) = sess.run(nb, adapter=names)
    assert rel(want, models.run(pm.get_base_model(), tb).numpy()) > 1e-2  # the adapters do change the rows
    assert rel(got, want) <= 1e-4


def test_a_directory_is_refused_as_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory; Session takes the .onnx model file"):
        Session(tmp_path)
    with pytest.raises(ModelLoadError, match="no such ONNX model file"):
        Session(tmp_path / "missing.onnx")


def _gather_model(tmp_path) -> str:
    """A Gather over a 4-row table: an index out of range passes Session's checks and fails in ORT's kernel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "gather",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], initializer=[table])
    path = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


@pytest.mark.parametrize("caller_level", [None, -1, 3])
def test_a_failed_run_is_said_once_by_the_exception_not_also_by_onnxruntimes_log(tmp_path, capfd, caller_level):
    """ORT logged "[E:onnxruntime:, sequential_executor.cc ... ExecuteKernel] ..." on the C-level stderr before
    Session raised the same message as a ConfigError (lora-fx run printed it twice, in red first)."""
    import onnxruntime as ort

    options = None
    if caller_level is not None:
        options = ort.SessionOptions()
        options.log_severity_level = caller_level
    sess = Session(_gather_model(tmp_path), providers=["CPUExecutionProvider"], session_options=options)
    np.testing.assert_array_equal(sess.run({"ids": np.array([3, 0])})[0], [[6, 7], [0, 1]])
    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"ONNX Runtime refused the run .*Gather.*idx=9"):
        sess.run({"ids": np.array([9])})
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "ExecuteKernel" not in err, err


def test_a_callers_verbose_log_level_is_kept_for_runs(tmp_path, capfd):
    """Options asking for warnings or more (debugging) keep ORT's run log, the failed kernel's line included."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2
    sess = Session(_gather_model(tmp_path), providers=["CPUExecutionProvider"], session_options=options)
    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"idx=9"):
        sess.run({"ids": np.array([9])})
    assert "ExecuteKernel" in capfd.readouterr().err


def test_the_bound_run_logs_no_onnxruntime_error_either(tmp_path, capfd):
    """The IOBinding path (CUDA's) takes the same RunOptions; run on the CPU here, as test_bf16_onnx does."""
    sess = Session(_gather_model(tmp_path), providers=["CPUExecutionProvider"])
    sess.on_cuda, sess._device = True, "cpu"
    np.testing.assert_array_equal(sess.run({"ids": np.array([1])})[0], [[2, 3]])
    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"idx=9"):
        sess.run({"ids": np.array([9])})
    assert "ExecuteKernel" not in capfd.readouterr().err


def test_the_provider_fallback_warning_is_still_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_fx.runtime"):
        sess = Session(_gather_model(tmp_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in sess.providers:
        pytest.skip("CUDA loads here: nothing falls back")
    assert "could not load CUDAExecutionProvider here; running on CPUExecutionProvider" in caplog.text
