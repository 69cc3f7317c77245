""".onnx_adapter files and the ONNX side of save_adapter/load_adapter, checked through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import lora_fx
from lora_fx.errors import AdapterError
from lora_fx.onnx_adapter import (
    current_adapter, onnx_adapter_to_peft_dir, peft_dir_to_onnx_adapter, read_onnx_adapter, sidecar_path,
    short_fingerprint, stamp_fingerprint, write_onnx_adapter,
)
from lora_fx.passes.onnx.expose_adapters import expose_adapters
from tests.exported import lora_onnx, ort_run, rel, save
from tests.onnx_corpus import corpus

ENTRY = "gemm-mlp"


def test_save_adapter_then_load_adapter_on_a_fresh_onnx_base(tmp_path):
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    feeds = corpus().get(ENTRY).feeds()
    want = ort_run(save(lora, "oa-lora.onnx"), feeds)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    fresh = lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "peft")
    assert rel(ort_run(save(fresh, "oa-fresh.onnx"), feeds), want) <= 1e-6


def test_a_refused_adapter_leaves_a_bare_onnx_model_unchanged(tmp_path):
    """load_adapter applies the adapter's config to a bare model only once every tensor fits."""
    import json

    from safetensors.numpy import load_file, save_file

    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("fc1.lora_A.weight"))
    tensors[key] = np.zeros((4, tensors[key].shape[1] + 1), tensors[key].dtype)  # one input feature too many
    save_file(tensors, str(weights))
    bare = lora_fx.load(corpus().get(ENTRY).path)
    before = ([n.op_type for n in bare.graph], sorted(bare.graph.initializers), dict(bare.metadata_props))
    with pytest.raises(AdapterError, match=r"expects \(4, \d+\)"):
        lora_fx.load_adapter(bare, tmp_path / "peft")
    assert ([n.op_type for n in bare.graph], sorted(bare.graph.initializers), dict(bare.metadata_props)) == before
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def _served_model():
    """A served (adapter-slot) model, its current adapter in memory, feeds, and the outputs of the
    unexposed LoRA model (what the adapter must reproduce)."""
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    feeds = corpus().get(ENTRY).feeds()
    want = ort_run(save(lora, "oa-lora3.onnx"), feeds)
    adapter = current_adapter(lora)
    expose_adapters(lora)
    adapter.fingerprint = stamp_fingerprint(lora)
    return save(lora, "oa-served3.onnx"), adapter, feeds, want


def _served_adapter(tmp_path):
    """As ``_served_model``, the adapter written to tmp_path/a.onnx_adapter."""
    served, adapter, feeds, want = _served_model()
    return served, write_onnx_adapter(tmp_path / "a.onnx_adapter", adapter), feeds, want


def test_file_round_trips_with_and_without_its_sidecar(tmp_path):
    served, adapter, feeds, want = _served_model()
    path = write_onnx_adapter(tmp_path / "a.onnx_adapter", adapter)
    back = read_onnx_adapter(path)
    assert back.fingerprint == adapter.fingerprint and back.short_fingerprint == short_fingerprint(adapter.fingerprint)
    assert back.sites["fc1"]["scale"] == pytest.approx(1.5)
    for k, v in adapter.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)
    # .onnx_adapter -> PEFT dir -> .onnx_adapter gives the same outputs, with or without the sidecar.
    for keep_sidecar in (True, False):
        if not keep_sidecar:
            sidecar_path(path).unlink()
        peft_dir = onnx_adapter_to_peft_dir(path, tmp_path / f"peft-{keep_sidecar}")
        again = peft_dir_to_onnx_adapter(peft_dir, served, tmp_path / f"again-{keep_sidecar}.onnx_adapter")
        assert rel(ort_run(served, feeds, adapter=again), want) <= 1e-5
    assert read_onnx_adapter(path).fingerprint is None  # only the 31 bits in the file remain


def test_a_sidecar_from_another_file_is_refused(tmp_path):
    lora = lora_onnx(ENTRY)
    a = current_adapter(lora)
    a.fingerprint = "a" * 64
    b = current_adapter(lora)
    b.fingerprint = "b" * 64
    pa = write_onnx_adapter(tmp_path / "a.onnx_adapter", a)
    pb = write_onnx_adapter(tmp_path / "b.onnx_adapter", b)
    sidecar_path(pa).write_text(sidecar_path(pb).read_text())
    with pytest.raises(AdapterError, match="disagree"):
        read_onnx_adapter(pa)


def test_a_damaged_file_is_refused_in_plain_words(tmp_path):
    served, path, feeds, want = _served_adapter(tmp_path)
    assert rel(ort_run(served, feeds, adapter=path), want) <= 1e-6
    data = path.read_bytes()
    # A flipped byte inside a tensor still parses (ORT runs it, off by a little): the sidecar's digest catches it.
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert 0 < rel(ort_run(served, feeds, adapter=path), want)
    with pytest.raises(AdapterError, match="does not hold the tensors its sidecar .* describes"):
        read_onnx_adapter(path)
    for cut, message in ((0, "is empty"), (100, r"not a readable .onnx_adapter file \(truncated or corrupt\?; ONNX Runtime: The buffer")):
        path.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match=message) as info:
            read_onnx_adapter(path)
        assert "onnxruntime_src" not in str(info.value) and "::" not in str(info.value)
    with pytest.raises(AdapterError, match=r"an ONNX model, not an adapter"):
        read_onnx_adapter(served)


@pytest.mark.parametrize("sidecar, message", [
    ("[1, 2]", "not a lora_fx adapter sidecar"),
    ('{"format": "lora_fx.onnx_adapter/1", "base_fingerprint": 5}', "base_fingerprint is a int"),
    ('{"format": "lora_fx.onnx_adapter/1", "sites": ["fc1"]}', "sites is a list"),
    ('{"format": "lora_fx.onnx_adapter/1", "sites": {"fc1": 2}}', "sites must map each site to a record"),
])
def test_a_malformed_sidecar_is_refused_with_the_way_out(tmp_path, sidecar, message):
    _, path, _, _ = _served_adapter(tmp_path)
    sidecar_path(path).write_text(sidecar)
    with pytest.raises(AdapterError, match=f"{message}.*delete it"):
        read_onnx_adapter(path)


def test_only_marked_model_versions_are_read_as_fingerprints(tmp_path):
    """Olive and ORT's examples write model_version=1; ours carry bit 30, so the two never mix up."""
    import onnxruntime as ort

    from lora_fx.onnx_adapter import check_fits, model_slots

    served, path, feeds, want = _served_adapter(tmp_path)
    fp = read_onnx_adapter(path).fingerprint
    assert short_fingerprint(fp) >> 30 == 1 and short_fingerprint(fp) < 2**31
    sidecar_path(path).unlink()
    assert read_onnx_adapter(path).short_fingerprint == short_fingerprint(fp)
    tensors = {k: np.ascontiguousarray(v) for k, v in read_onnx_adapter(path).tensors.items()}
    for version in (1, 2**31 - 1 - 2**30):  # small, and all bits but the mark
        fmt = ort.AdapterFormat()
        fmt.set_model_version(version)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
        fmt.export_adapter(str(tmp_path / "plain.onnx_adapter"))
        plain = read_onnx_adapter(tmp_path / "plain.onnx_adapter")
        assert plain.short_fingerprint is None
        check_fits(plain, model_slots(lora_fx.load(served)), fp)
    assert rel(ort_run(served, feeds, adapter=tmp_path / "plain.onnx_adapter"), want) <= 1e-6


def test_ort_messages_lose_source_locations_and_signatures():
    import lora_fx.onnx_adapter
    import lora_fx.runtime.ort
    from lora_fx.errors import ort_message

    # Lives in errors.py (runtime/ort.py uses it too); the old import keeps working.
    assert lora_fx.onnx_adapter.ort_message is ort_message and lora_fx.runtime.ort.ort_message is ort_message

    raw = ("/onnxruntime_src/onnxruntime/lora/adapter_format_utils.cc:93 const onnxruntime::adapters::Adapter* "
           "onnxruntime::adapters::utils::ValidateAndGetAdapterFromBytes(gsl::span<const unsigned char>) The buffer does not appear")
    assert ort_message(RuntimeError(raw)) == "The buffer does not appear"
    multi = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x\n index: 1 Got: 5 Expected: 16\n"
    assert ort_message(RuntimeError(multi)) == "Got invalid dimensions for input: x index: 1 Got: 5 Expected: 16"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_peft_adapter_is_written_in_the_models_dtype(tmp_path, dtype):
    """PEFT adapters saved in fp16/bf16 for a float32 model: converted as loading into torch would (cast),
    not refused and not a torch TypeError (bfloat16 has no numpy dtype)."""
    import torch
    from safetensors.torch import load_file, save_file

    served, _, feeds, want = _served_adapter(tmp_path)
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "half")
    lora_fx.save_adapter(lora, tmp_path / "rounded")
    weights = load_file(str(tmp_path / "half" / "adapter_model.safetensors"))
    save_file({k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, str(tmp_path / "half" / "adapter_model.safetensors"))
    # The reference: the same rounded weights, stored as float32.
    save_file({k: v.to(getattr(torch, dtype)).float() for k, v in weights.items()}, str(tmp_path / "rounded" / "adapter_model.safetensors"))
    half = peft_dir_to_onnx_adapter(tmp_path / "half", served, tmp_path / "half.onnx_adapter")
    rounded = peft_dir_to_onnx_adapter(tmp_path / "rounded", served, tmp_path / "rounded.onnx_adapter")
    assert {v.dtype for v in read_onnx_adapter(half).tensors.values()} == {np.dtype(np.float32)}
    got = ort_run(served, feeds, adapter=half)
    assert rel(got, ort_run(served, feeds, adapter=rounded)) <= 1e-6
    assert 0 < rel(got, want) <= 2e-2  # only the rounding of the stored weights differs
    onto_base = lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "half")
    assert rel(ort_run(save(onto_base, f"oa-half-{dtype}.onnx"), feeds), got) <= 1e-6


def test_a_prefix_of_another_length_is_refused_naming_the_prefix_layout():
    from lora_fx.onnx_adapter import OnnxAdapter, Slot, check_fits

    slots = {"h.0.attn.prefix_key": Slot("float32", (4, 4, 8))}
    with pytest.raises(AdapterError, match=r"shape \(4, 6, 8\) .* expects \(4, 4, 8\) \(prefixes are \[kv_heads, virtual tokens, head_dim\]\)"):
        check_fits(OnnxAdapter({"h.0.attn.prefix_key": np.zeros((4, 6, 8), np.float32)}), slots, None)


def test_peft_dirs_that_cannot_mean_what_they_say_are_refused(tmp_path):
    """A rank unlike the config's would get a wrong scale (PEFT refuses to load such a directory);
    a 1-D weight and a model without slots get a message, not an IndexError or "its slots are ."."""
    import json

    from safetensors.torch import load_file, save_file

    served, _, feeds, want = _served_adapter(tmp_path)
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    good = peft_dir_to_onnx_adapter(tmp_path / "peft", served, tmp_path / "good.onnx_adapter")
    assert rel(ort_run(served, feeds, adapter=good), want) <= 1e-6
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterError, match=r"site fc1: the tensors have rank 4 but adapter_config.json gives it r=8"):
        peft_dir_to_onnx_adapter(tmp_path / "peft", served, tmp_path / "bad.onnx_adapter")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("fc1.lora_B.weight"))
    save_file({**tensors, key: tensors[key][:, 0].contiguous()}, str(weights))
    with pytest.raises(AdapterError, match=r"site fc1: .* LoRA weights are 2-D"):
        peft_dir_to_onnx_adapter(tmp_path / "peft", served, tmp_path / "bad.onnx_adapter")
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=r"gemm-mlp.onnx has no adapter slots; export it with mode='adapters'"):
        peft_dir_to_onnx_adapter(tmp_path / "peft", corpus().get(ENTRY).path, tmp_path / "bad.onnx_adapter")
    assert not (tmp_path / "bad.onnx_adapter").exists()


def _rank0(tensors):
    """The same sites with rank 0: lora_A [in, 0], lora_B [0, out]."""
    return {k: np.zeros((v.shape[0], 0) if ".lora_A" in k else (0, v.shape[1]), v.dtype) for k, v in tensors.items()}


def test_rank0_onnx_adapters_are_refused_where_they_enter(tmp_path):
    """A rank-0 adapter is the base model, and ONNX Runtime's CUDA provider fails on zero-size adapter
    tensors (onnxruntime#21483); such files used to be written, read and run (as the base model) silently."""
    import onnxruntime as ort

    from lora_fx.onnx_adapter import OnnxAdapter, check_fits, model_slots

    served, adapter, feeds, _ = _served_model()
    zero = _rank0(adapter.tensors)
    with pytest.raises(AdapterError, match=r"refusing to write the adapter: adapter tensor \S+ has shape \(\d+, 0\), zero-size \(rank 0\)"):
        write_onnx_adapter(tmp_path / "zero.onnx_adapter", OnnxAdapter(zero, fingerprint=adapter.fingerprint))
    assert not (tmp_path / "zero.onnx_adapter").exists()
    # Written by plain ONNX Runtime, as another tool would: ORT itself loads and runs it.
    arrays = {k: np.ascontiguousarray(v) for k, v in zero.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(tmp_path / "zero.onnx_adapter"))
    np.testing.assert_array_equal(ort_run(served, feeds, adapter=tmp_path / "zero.onnx_adapter"), ort_run(served, feeds))
    with pytest.raises(AdapterError, match=r"zero.onnx_adapter: adapter tensor .* zero-size \(rank 0\).*CUDA.*r >= 1"):
        read_onnx_adapter(tmp_path / "zero.onnx_adapter")
    # An adapter built in memory (a PEFT conversion) is checked against the model too; one site at rank 0 is enough.
    one = dict(adapter.tensors)
    one.update({k: v for k, v in zero.items() if k.startswith("fc2.")})
    with pytest.raises(AdapterError, match=r"adapter tensor fc2.lora_A.weight has shape \(\d+, 0\), zero-size"):
        check_fits(OnnxAdapter(one), model_slots(lora_fx.load(served)), adapter.fingerprint)


def test_prefix_adapters_of_zero_tokens_or_half_a_pair_are_refused():
    from lora_fx.onnx_adapter import OnnxAdapter, Slot, check_fits

    slots = {f"h.0.attn.prefix_{kv}": Slot("float32", (4, 4, 8)) for kv in ("key", "value")}
    pair = {name: np.ones((4, 4, 8), np.float32) for name in slots}
    check_fits(OnnxAdapter(pair), slots, None)
    with pytest.raises(AdapterError, match=r"prefix_key has shape \(4, 0, 8\), zero-size \(0 virtual tokens\)"):
        check_fits(OnnxAdapter({**pair, "h.0.attn.prefix_key": np.zeros((4, 0, 8), np.float32)}), slots, None)
    # The value prefix would stay the model's own: keys of one prefix attending to values of another.
    with pytest.raises(AdapterError, match="site h.0.attn: the adapter holds only one of prefix_key / prefix_value"):
        check_fits(OnnxAdapter({"h.0.attn.prefix_key": pair["h.0.attn.prefix_key"]}), slots, None)


def test_rank0_peft_directories_are_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    served, _, feeds, _ = _served_model()
    lora = lora_onnx(ENTRY, r=4, alpha=6)
    lora_fx.save_adapter(lora, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    # r = 0 in the config (PEFT's own LoraConfig refuses it; a hand-edited file need not).
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(lora_fx.ConfigError, match="r must be a positive integer, got 0"):
        peft_dir_to_onnx_adapter(tmp_path / "peft", served, tmp_path / "bad.onnx_adapter")
    with pytest.raises(lora_fx.ConfigError, match="r must be a positive integer, got 0"):
        lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "peft")
    # Zero-size tensors under a valid config: named as rank 0, not as a rank mismatch.
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v[:0] if ".lora_A" in k else v[:, :0] for k, v in tensors.items()}, str(weights))
    for load in (lambda: peft_dir_to_onnx_adapter(tmp_path / "peft", served, tmp_path / "bad.onnx_adapter"),
                 lambda: lora_fx.load_adapter(lora_fx.load(corpus().get(ENTRY).path), tmp_path / "peft")):
        with pytest.raises(AdapterError, match=r"adapter_model.safetensors: adapter tensor \S+ has shape \((0, \d+|\d+, 0)\), zero-size \(rank 0\)"):
            load()
    assert not (tmp_path / "bad.onnx_adapter").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_adapter_file_is_refused_where_it_is_read(tmp_path, bad):
    """check_writable refuses NaN/inf on write; a file written by another tool (plain AdapterFormat) was read and
    served, every output of its sites NaN, with exit status 0."""
    from lora_fx.onnx_adapter import export_tensors

    served, adapter, feeds, want = _served_model()
    tensors = {k: np.array(v) for k, v in adapter.tensors.items()}
    tensors["fc2.lora_B.weight"][0, :3] = bad
    export_tensors(tmp_path / "bad.onnx_adapter", tensors, short_fingerprint(adapter.fingerprint))
    # What refusing spares: plain ONNX Runtime runs it, and the outputs are not numbers.
    assert not np.isfinite(ort_run(served, feeds, adapter=tmp_path / "bad.onnx_adapter")).all()
    with pytest.raises(AdapterError, match=r"bad.onnx_adapter: adapter tensor fc2.lora_B.weight holds 3 NaN or inf "
                                           r"values of \d+; .*diverged.*train again \(lower the learning rate\)"):
        read_onnx_adapter(tmp_path / "bad.onnx_adapter")
    with pytest.raises(AdapterError, match="holds 3 NaN or inf values"):  # nor converted to a PEFT directory
        onnx_adapter_to_peft_dir(tmp_path / "bad.onnx_adapter", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    # The same tensors, finite, read and run as written.
    tensors["fc2.lora_B.weight"] = np.array(adapter.tensors["fc2.lora_B.weight"])
    export_tensors(tmp_path / "good.onnx_adapter", tensors, short_fingerprint(adapter.fingerprint))
    for k, v in read_onnx_adapter(tmp_path / "good.onnx_adapter").tensors.items():
        np.testing.assert_array_equal(v, adapter.tensors[k])
    assert rel(ort_run(served, feeds, adapter=tmp_path / "good.onnx_adapter"), want) <= 1e-6


def test_a_file_that_is_no_adapter_is_named_by_its_content_not_its_name(tmp_path):
    """The hint came from the extension alone: a text file named .onnx was called an ONNX model."""
    served, path, _, _ = _served_adapter(tmp_path)
    data = path.read_bytes()
    files = {
        "notes.onnx": ("a text file, not an adapter", b"input_ids: 1 2 3\nlabels: 0\n"),
        "notes.onnx_adapter": ("a text file, not an adapter", "poids de l'adaptateur — voir README\n".encode()),
        "model.onnx_adapter": ("an ONNX model, not an adapter", served.read_bytes()),
        "cut.onnx": (r"truncated or corrupt\?", data[:100]),  # an adapter still, whatever its name
        "tiny.onnx": (r"truncated or corrupt\?", data[:5]),
        "weights.onnx_adapter": ("not in ONNX Runtime's adapter format", b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(64)),
    }
    for name, (hint, content) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AdapterError, match=rf"{name} is not a readable .onnx_adapter file \({hint}; ONNX Runtime: ") as info:
            read_onnx_adapter(tmp_path / name)
        assert "ONNX model" not in str(info.value) or name == "model.onnx_adapter", (name, info.value)


def _another_export(served, path):
    """``served`` as another exporter writes the same checkpoint: one base initializer held by a Constant node
    (TorchScript keeps biases and norm weights so, where dynamo stores initializers), fingerprint stamped anew."""
    import onnx_ir as ir

    model = lora_fx.load(served)
    graph = model.graph
    name = next(n for n, v in graph.initializers.items() if v.const_value is not None and "lora" not in n)
    value = graph.initializers.pop(name)
    graph.insert_before(next(iter(graph)), ir.node("Constant", [], {"value": value.const_value}, outputs=[value]))
    stamp_fingerprint(model)
    ir.save(model, str(path))
    return path


def test_an_adapter_from_another_export_of_its_checkpoint_is_refused_naming_its_peft_directory(tmp_path):
    """The fingerprint hashes initializers as stored, so two exports of one checkpoint differ: the refusal says so
    and names the adapter's PEFT directory, which does load onto the other export and reproduces the adapter."""
    from lora_fx.runtime.ort import Session

    served, path, feeds, want = _served_adapter(tmp_path)
    other = _another_export(served, tmp_path / "other.onnx")
    np.testing.assert_allclose(ort_run(other, feeds), ort_run(served, feeds), rtol=0, atol=0)  # the same base
    session = Session(other, providers=["CPUExecutionProvider"])
    with pytest.raises(AdapterError) as refused:
        session.add_adapter("a", path)
    message = str(refused.value)
    assert "different base model than" in message and "another export of the same checkpoint" in message
    assert "PEFT directory" in message and "lora-fx export --adapters" in message and "lora_fx.save_adapter" in message
    assert "Session.add_adapter(name, peft_dir)" in message and "lora-fx run --adapter DIR" in message
    # The way out it names works: the adapter's PEFT directory on the other export gives the adapter's outputs.
    session.add_adapter("a", onnx_adapter_to_peft_dir(path, tmp_path / "peft"))
    assert rel(session.run(feeds, adapter="a")[0], want) <= 1e-5
