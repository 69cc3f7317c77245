"""lora_fx.load / lora_fx.save: external data both ways, clear errors on bad files, atomic writes."""

from __future__ import annotations

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
