"""lora_fx.load / lora_fx.save: external data both ways, clear errors on bad files, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.errors import ModelLoadError
from lora_fx.onnx_model import load, save


def _model_proto() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "fc.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])], [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model_proto(), str(path))
    return path


def test_exported_as_lora_fx_load_and_save():
    assert lora_fx.load is load and lora_fx.save is save


def test_round_trip_inline(model_file, tmp_path):
    model = load(model_file)
    assert isinstance(model, ir.Model)
    out = save(model, tmp_path / "sub" / "copy.onnx")
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(model_file, x))
    assert not (tmp_path / "sub" / "copy.onnx.data").exists()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["copy.onnx"], "no temporary files are left behind"


def test_external_data_load_and_save_elsewhere(model_file, tmp_path):
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(_model_proto(), str(ext_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = load(ext_dir / "m.onnx")
    assert isinstance(model.graph.initializers["fc.weight"].const_value, ir.ExternalTensor)
    # Saved to another folder, the weights must travel (not stay a reference to ext/m.onnx.data).
    out = save(model, tmp_path / "other" / "copy.onnx")
    assert (tmp_path / "other" / "copy.onnx.data").is_file()
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(model_file, x))
    inline = save(load(ext_dir / "m.onnx"), tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_array_equal(_run(inline, x), _run(model_file, x))


def test_forced_external_data(model_file, tmp_path):
    out = save(load(model_file), tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size == 64 * 32 * 4
    assert isinstance(load(out).graph.initializers["fc.weight"].const_value, ir.ExternalTensor)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not an ONNX model"),
        (b"this is a text file, not a model\n" * 4, "could not be read|not an ONNX model"),
        (None, "truncated|could not be read"),
    ],
)
def test_bad_files_raise_model_load_error_naming_the_file(model_file, tmp_path, content, reason):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model_file.read_bytes()[: len(model_file.read_bytes()) // 2] if content is None else content)
    with pytest.raises(ModelLoadError, match=reason) as info:
        load(bad)
    assert "bad.onnx" in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="is a directory"):
        load(tmp_path)


def test_missing_or_short_external_data(tmp_path):
    onnx.save(_model_proto(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(tmp_path / "m.onnx")
    data.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load(tmp_path / "m.onnx")


def test_failed_save_leaves_no_file(model_file, tmp_path, monkeypatch):
    model = load(model_file)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "out" / "x.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_loaded_tensors_own_their_memory_so_deleted_weights_are_freed(tmp_path):
    """A weight a pass deletes must not stay alive inside the parsed protobuf: load copies every tensor out
    of it (initializers, Constant values), keeping values, names and dtypes; the protobuf is then freed."""
    proto = _model_proto()
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(3, dtype=np.int64), "c")))
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1.5, -2.0], np.float16), "half"))
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    model = load(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    tensors += [a.value for n in model.graph for a in n.attributes.values() if a.type == ir.AttributeType.TENSOR]
    # No tensor is a view into the protobuf (which would keep all of it alive), and each can be shared with torch.
    assert len(tensors) == 3 and not any(isinstance(t, ir.TensorProtoTensor) for t in tensors)
    assert all(t.numpy().flags.writeable for t in tensors)
    by_name = {t.name: t for t in tensors}
    for init in proto.graph.initializer:
        want = numpy_helper.to_array(init)
        got = by_name[init.name].numpy()
        assert got.dtype == want.dtype and np.array_equal(got, want)
    np.testing.assert_array_equal(by_name["c"].numpy(), np.arange(3))


def _external(tmp_path, location: str):
    """The test model stored with external data, its location rewritten to ``location``."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(_model_proto(), str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_at_load(tmp_path, where):
    """A location leaving the model's folder would read another file into the weights; onnx_ir refuses it only when
    a pass reads the tensor (a ValueError from inside a rewrite or save), so load names it first."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 64)  # long enough to pass for the weight's data
    location = {"absolute": str(secret), "parent": "../secret.bin", "symlink": "link.data"}[where]
    path = _external(tmp_path, location)
    (path.parent / "m.onnx.data").unlink()
    if where == "symlink":
        (path.parent / "link.data").symlink_to(secret)
    with pytest.raises(ModelLoadError, match="outside the model's folder") as info:
        load(path)
    assert "m.onnx" in str(info.value) and "fc.weight" in str(info.value)


def test_external_data_symlinked_inside_the_folder_loads(tmp_path):
    path = _external(tmp_path, "link.data")
    (path.parent / "link.data").symlink_to(path.parent / "m.onnx.data")
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(save(load(path), tmp_path / "out.onnx"), x), x @ onnx.numpy_helper.to_array(_model_proto().graph.initializer[0]))


def test_hard_linked_external_data_is_refused_at_load_naming_the_way_out(tmp_path):
    path = _external(tmp_path, "m.onnx.data")
    os.link(path.parent / "m.onnx.data", tmp_path / "other.data")
    with pytest.raises(ModelLoadError, match="hard links.*copy of its own"):
        load(path)
    (tmp_path / "other.data").unlink()
    assert "fc.weight" in load(path).graph.initializers


def test_load_refuses_what_is_no_path():
    with pytest.raises(ModelLoadError, match="path of an .onnx file, got NoneType"):
        load(None)


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_save_to_a_folder_or_under_a_file_is_refused_before_writing(model_file, tmp_path, where):
    """The OS error named the temporary file (``.adir.x1y2.tmp/adir``) or the parent, not the path given."""
    target = {"folder": tmp_path / "adir", "under_a_file": model_file / "x.onnx"}[where]
    (tmp_path / "adir").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(lora_fx.ConfigError, match=str(target.parent if where == "under_a_file" else target)):
        save(load(model_file), target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_save_onto_a_pipe_is_refused_and_leaves_it(model_file, tmp_path):
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(lora_fx.ConfigError, match="is not a regular file"):
        save(load(model_file), fifo)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_save_onto_the_inputs_external_data_file_is_refused_and_in_place_save_still_works(tmp_path):
    # -o m.onnx.data wrote the new model over the data file m.onnx reads its weights from: the input model then
    # loaded a protobuf as its weights (and the output got a m.onnx.data.data beside it).
    path = _external(tmp_path, "m.onnx.data")
    data = path.parent / "m.onnx.data"
    before = data.read_bytes()
    with pytest.raises(lora_fx.ConfigError, match="is the external data file the input model reads its weights from"):
        save(load(path), data)
    assert data.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    # Saving a model over the file it was loaded from replaces model and data together, and keeps the weights.
    x = np.ones((2, 64), np.float32)
    want = _run(path, x)
    save(load(path), path, external_data=True)
    np.testing.assert_array_equal(_run(path, x), want)


def _vendor_file(tmp_path):
    """The test model with its weights in ``model.onnx.data``, as vendors ship models: the data file's name is
    the one ``save`` gives ``model.onnx``'s own weights."""
    folder = tmp_path / "vendor"
    folder.mkdir()
    onnx.save(_model_proto(), str(folder / "vendor.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return folder / "vendor.onnx"


@pytest.mark.parametrize("external_data", [True, None])
def test_an_output_whose_data_file_would_replace_the_inputs_is_refused_before_writing(tmp_path, external_data):
    # -o model.onnx --external-data beside a vendor.onnx reading model.onnx.data replaced the input's weights
    # with the output's (exit 0): the input model was lost. None copies external weights into a data file too.
    src = _vendor_file(tmp_path)
    data = src.parent / "model.onnx.data"
    before = data.read_bytes()
    with pytest.raises(lora_fx.ConfigError, match=r"model.onnx stores its weights in model.onnx.data beside it, and .* is the "
                                                  r"external data file the input model reads its weights from"):
        save(load(src), src.parent / "model.onnx", external_data=external_data)
    # Through a symlinked folder too: the paths are compared resolved.
    (tmp_path / "link").symlink_to(src.parent)
    with pytest.raises(lora_fx.ConfigError, match="the input model reads its weights from"):
        save(load(src), tmp_path / "link" / "model.onnx", external_data=external_data)
    assert data.read_bytes() == before and sorted(p.name for p in src.parent.iterdir()) == ["model.onnx.data", "vendor.onnx"]


def test_outputs_that_write_no_clashing_file_are_written_and_run_as_the_input(tmp_path):
    src = _vendor_file(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = _run(src, x)
    # Weights inline: no model.onnx.data is written, so model.onnx beside the input is fine.
    inline = save(load(src), src.parent / "model.onnx", external_data=False)
    other = save(load(src), tmp_path / "elsewhere" / "model.onnx", external_data=True)
    for path in (src, inline, other):
        np.testing.assert_array_equal(_run(path, x), want)
    # An output whose data file would be the input model file itself (an input named like a data file).
    named = tmp_path / "w.data"
    onnx.save(_model_proto(), str(named))
    kept = named.read_bytes()
    with pytest.raises(lora_fx.ConfigError, match=r"w stores its weights in w.data beside it, and .* is the input model"):
        save(load(named), tmp_path / "w", external_data=True)
    assert named.read_bytes() == kept and not (tmp_path / "w").exists()
