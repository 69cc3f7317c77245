"""Reading and writing ONNX files as ``onnx_ir`` models.

``load`` checks what a model file promises before any pass sees it: that it parses as an ONNX model,
that it has a graph, and that every external-data tensor it references is present, long enough and in
the model's folder.
``save`` writes the model (and its external data when large) under temporary names and renames
them into place only when everything is written, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from lora_fx.errors import ModelLoadError

# Above this many bytes of initializers the weights go into a ``<name>.data`` file next to the model:
# protobuf cannot hold a message over 2 GiB, and one large file is slow to rewrite anyway.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (external data supported) as an ``onnx_ir.Model``.

    Raises ``ModelLoadError`` naming the file and the reason when it is missing, unreadable,
    truncated, not an ONNX model, or refers to external data that is missing, too short, outside the
    model's folder or hard-linked (which onnx_ir refuses when it reads the data).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ModelLoadError(f"load takes the path of an .onnx file, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; pass the path of an .onnx model")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the .onnx file inside it")
    try:
        model = ir.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a whole ONNX model
        reason = str(exc).strip() or type(exc).__name__
        raise ModelLoadError(
            f"{path} could not be read as an ONNX model ({reason}); the file is truncated, corrupt or not ONNX. "
            f"Re-export it or copy it again"
        ) from None
    if len(model.graph) == 0 or not model.opset_imports:
        # Protobuf happily parses many non-ONNX byte strings as an empty message.
        raise ModelLoadError(
            f"{path} is not an ONNX model (it parses to a model with no nodes or no opset); "
            f"pass a model written by an ONNX exporter"
        )
    _check_external_data(model, path)
    _own_tensor_data(model)
    model.meta[SOURCE] = os.path.abspath(path)  # so that save refuses to write over the files this model reads
    return model


def _owned(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.TensorProtoTensor) or tensor.dtype == ir.DataType.STRING:
        return tensor  # external data is memory-mapped, and freed with its last reference
    return ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                     metadata_props=dict(tensor.metadata_props))


def _own_tensor_data(model: ir.Model) -> None:
    """Copy every tensor out of the parsed protobuf into a numpy array of its own.

    A tensor ``ir.load`` returns is a read-only view into the parsed ``ModelProto``, and protobuf frees
    that memory only when no view of it is left: one surviving Constant would keep every weight a pass
    deletes alive (``quantize_weights`` drops the float W), and torch would have to copy each weight it
    trains through, since it cannot share read-only memory. One copy of the weights at load instead.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                value.const_value = _owned(value.const_value)
    nodes = [node for graph in model.graphs() for node in graph]
    nodes += [node for function in model.functions.values() for node in function]
    for node in nodes:
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR:
                node.attributes[name] = ir.AttrTensor(name, _owned(attr.value))
            elif attr.type == ir.AttributeType.TENSORS:
                node.attributes[name] = ir.AttrTensors(name, [_owned(t) for t in attr.value])


def _external_tensors(model: ir.Model) -> list[tuple[str, ir.ExternalTensor]]:
    """Every tensor stored in external data: initializers of the graph and its subgraphs, and tensor attributes."""
    found = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                found.append((value.name, value.const_value))
        for node in graph:
            for attr in node.attributes.values():
                tensors = [attr.value] if attr.type == ir.AttributeType.TENSOR else (
                    attr.value if attr.type == ir.AttributeType.TENSORS else [])
                found += [(t.name or f"{node.name}.{attr.name}", t) for t in tensors if isinstance(t, ir.ExternalTensor)]
    return found


def _inside(path: str, folder: str) -> bool:
    folder = folder.rstrip(os.sep) + os.sep
    return path.startswith(folder)


def _check_external_data(model: ir.Model, path: Path) -> None:
    for name, tensor in _external_tensors(model):
        base = os.path.abspath(tensor.base_dir or path.parent)
        data_path = Path(base) / tensor.location
        # onnx_ir refuses these only when a pass first reads the tensor (a ValueError deep inside a rewrite); a
        # location leaving the model's folder would otherwise read any file on the machine into the weights.
        if not (_inside(os.path.normpath(data_path), base) and _inside(os.path.realpath(data_path), os.path.realpath(base))):
            raise ModelLoadError(
                f"{path}: initializer {name!r} takes its data from {tensor.location!r}, outside the model's folder "
                f"{base}; ONNX external data must lie in the model's folder, so lora_fx refuses it (it may be an "
                f"attempt to read another file). Put the data file beside the model and re-export it"
            )
        if not data_path.is_file():
            raise ModelLoadError(
                f"{path}: initializer {name!r} is stored in external data file {data_path}, which is missing; "
                f"keep the data file next to the model under the name the model records ({tensor.location})"
            )
        if data_path.stat().st_nlink > 1:
            raise ModelLoadError(
                f"{path}: external data file {data_path} has {data_path.stat().st_nlink} hard links, which onnx_ir "
                f"refuses (a hard link can smuggle another file into the model's folder); replace it by a copy of its "
                f"own: cp {data_path} {data_path}.copy && mv {data_path}.copy {data_path}"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if data_path.stat().st_size < end:
            raise ModelLoadError(
                f"{path}: external data file {data_path} ends at byte {data_path.stat().st_size}, but initializer "
                f"{name!r} needs bytes up to {end}; the data file is truncated: copy it again"
            )


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external_data_files(model: ir.Model) -> list[Path]:
    """The files ``model``'s external-data tensors are read from."""
    return sorted({Path(os.path.abspath(Path(t.base_dir or ".") / t.location)) for _, t in _external_tensors(model)})


# ``model.meta`` key (kept in memory, never written): the .onnx file ``load`` read the model from.
SOURCE = "lora_fx.source"


def check_not_external_data(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None,
                            source: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is written, an output that would replace a file ``model`` reads: the .onnx at
    ``path`` or, where ``save(model, path, external_data=external_data)`` writes one, its ``<name>.data``, against
    each external data file of ``model`` and the .onnx it was loaded from (``source``, by default what ``load``
    recorded). Replaced, the input model would read the new bytes (or a protobuf) as its weights: the input is lost.
    Saving over the loaded .onnx itself replaces the input whole, model and data together, and is allowed.
    Resolved paths, so links and ``..`` do not hide a match."""
    from lora_fx.errors import ConfigError

    path = Path(path)
    source = source if source is not None else model.meta.get(SOURCE)
    if source is not None and os.path.realpath(source) == os.path.realpath(path):
        return
    reads = {os.path.realpath(f): "the external data file the input model reads its weights from"
             for f in external_data_files(model)}
    if source is not None:
        reads[os.path.realpath(source)] = "the input model"
    what = reads.get(os.path.realpath(path))
    if what is not None:
        raise ConfigError(f"{path} is {what}; writing the output there would break the input model: write it to "
                          f"another path")
    data = data_file(path)
    what = reads.get(os.path.realpath(data)) if writes_external_data(model, external_data) else None
    if what is not None:
        raise ConfigError(f"{path} stores its weights in {data.name} beside it, and {data} is {what}; writing the output "
                          f"there would break the input model: write it to another folder or under another name")


def data_file(path: str | os.PathLike) -> Path:
    """Where ``save`` puts the external data of a model written to ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def writes_external_data(model: ir.Model, external_data: bool | None) -> bool:
    """Whether ``save(model, ..., external_data=external_data)`` writes a ``<name>.data`` file."""
    if external_data is not None:
        return external_data
    # A tensor still stored in another file's external data would be written as a reference to that
    # file, relative to the new location: such weights are copied into our own data file instead.
    return _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD or any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data=None`` stores the weights in ``<path name>.data`` beside the model when they
    exceed ``EXTERNAL_DATA_THRESHOLD``; ``True``/``False`` force the choice. Both files are written
    under a temporary directory next to ``path`` and renamed into place (data first) only when
    both are complete. A ``path`` that is a folder, a device or pipe, a file whose folder cannot be
    written, or whose .onnx or ``.data`` would replace one of the external data files ``model`` reads its
    weights from raises ``ConfigError`` before anything is written.
    """
    path = Path(path)
    if not isinstance(model, ir.Model):
        from lora_fx.errors import ConfigError

        raise ConfigError(f"save takes an onnx_ir Model (from lora_fx.load), got {type(model).__name__}")
    check_not_external_data(model, path, external_data=external_data)
    if external_data is None:
        external_data = writes_external_data(model, None)
    elif not external_data and any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        from onnx_ir import external_data as ext

        ext.load_to_model(model)
    from lora_fx.files import check_output

    # A folder, a parent that is a file or an unwritable folder would otherwise fail with an OS error naming the
    # temporary file, not the path given.
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        ir.save(model, str(tmp_model), external_data=data_name if external_data else None)
        if external_data:
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
