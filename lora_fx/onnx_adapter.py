"""``.onnx_adapter`` files: one adapter in ONNX Runtime's own format, tied to the base it was trained on.

The file is written with ``onnxruntime.AdapterFormat`` and holds exactly the adapter tensors in
deployment layout (``<site>.lora_A.weight`` ``[in, r]``, ``<site>.lora_B.weight`` ``[r, out]``,
scale folded into B), and the parameters of modules trained in full (``modules_to_save``, the SEQ_CLS
head) under their model names (``classifier.weight``, torch layout), so plain ONNX Runtime
(``LoraAdapter.Load`` + ``RunOptions.add_active_adapter``) runs it on our exported models: ORT refuses
any tensor that is not a model input, so nothing else can live among the parameters. The base-weight
fingerprint travels in the file's ``model_version`` (31 bits) and in full in a JSON sidecar
``<file>.json`` beside it, with the per-site rank/alpha/scale and the LoraConfig needed to convert back
to PEFT's layout. Nothing is ever unpickled.

A model with head slots (``modules_to_save``) leaves the head out of its fingerprint, while an export of the
same base without them counts the head as a base weight: the head-slot model also records the fingerprints
that export can have (``HEADS_AS_BASE_KEY``), so that export's adapters run on it with the base head.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from lora_fx.errors import AdapterError, TargetNotFoundError, ort_message
from lora_fx.files import atomic_path, atomic_write_text

FORMAT = "lora_fx.onnx_adapter/1"
ADAPTER_VERSION = 1
SUFFIX = ".onnx_adapter"


@dataclass
class OnnxAdapter:
    """An adapter in deployment layout with what it was trained on."""

    tensors: dict[str, np.ndarray]
    fingerprint: str | None = None  # full sha256 hex of the base weights, or None if unknown
    short_fingerprint: int | None = None  # the 31 bits kept inside the .onnx_adapter file
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> {"r", "alpha", "scale", ...}
    config: dict[str, Any] | None = None  # LoraConfig.to_dict()

    def site_names(self) -> list[str]:
        """The sites its LoRA matrices and prefixes are for, and the modules whose trained parameters it holds
        (``classifier``: the owner of ``classifier.weight``)."""
        return sorted({site_of(name) if is_slot_name(name) else name.rpartition(".")[0] or name for name in self.tensors})


SLOT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".prefix_key", ".prefix_value")
# Model metadata: JSON {parameter name: module} of the slots of modules trained in full (modules_to_save).
# Their names (classifier.weight) say nothing by themselves, unlike the suffixes above.
SAVED_KEY = "lora_fx.modules_to_save"
# Model metadata, beside SAVED_KEY: JSON {"base_fingerprint": the model's own, "heads_as_base": [...]}, the
# fingerprints an export of the same base without head slots has (its head counted as a base weight).
HEADS_AS_BASE_KEY = "lora_fx.base_fingerprints_heads_as_base"


def is_slot_name(name: str) -> bool:
    """Adapter tensors a model exposes as slots by their names alone: LoRA matrices and attention prefixes
    (the slots of modules trained in full are listed in the model's ``SAVED_KEY`` metadata instead)."""
    return name.endswith(SLOT_SUFFIXES)


def read_saved(metadata: Mapping[str, str]) -> dict[str, str]:
    """``{parameter name: module}`` of the head slots a model's metadata lists (``{}`` when none)."""
    return read_name_map(metadata, SAVED_KEY)


def read_name_map(metadata: Mapping[str, str], key: str) -> dict[str, str]:
    """A ``{name: name}`` JSON map lora_fx keeps in model metadata under ``key`` (``{}`` when absent)."""
    text = metadata.get(key)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise AdapterError(f"model metadata {key} is not a JSON map of names; the model was changed outside lora_fx: "
                           "export it again, or apply the adapter to the original model again")
    return data


def site_of(name: str) -> str:
    for suffix in SLOT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- fingerprints ------------------------------------------------------------------------------
# Bit 30 of model_version marks a lora_fx fingerprint. Other writers of .onnx_adapter files (Olive,
# ONNX Runtime's examples) put a plain version number there, usually 1: read as a fingerprint it
# would refuse every such adapter as "trained on another base".
_SHORT_MARK = 1 << 30


def short_fingerprint(fingerprint: str) -> int:
    """The part of a fingerprint that fits AdapterFormat's (signed 32-bit) model_version, marked as ours."""
    return (int(fingerprint[:8], 16) & (_SHORT_MARK - 1)) | _SHORT_MARK


def _short_from_model_version(model_version: int) -> int | None:
    """The short fingerprint a file's model_version holds, or None where it is another writer's version number."""
    return model_version if model_version & _SHORT_MARK and 0 < model_version < 1 << 31 else None


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the sidecar's proof that it describes these tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def base_fingerprint(model: Any) -> str:
    """sha256 over the base weights of an onnx_ir Model: every initializer that is not an adapter slot
    (LoRA matrices, prefixes, the parameters of modules trained in full).

    Names do not enter the hash (re-exports may rename constants); each tensor's dtype, shape and
    bytes do, in sorted order, so the same weights give the same fingerprint.
    """
    return _combine(_base_digests(model))


def _tensor_digest(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _combine(digests: Iterable[str]) -> str:
    total = hashlib.sha256()
    for d in sorted(digests):
        total.update(d.encode())
    return total.hexdigest()


def _base_digests(model: Any) -> list[str]:
    """The per-tensor digests ``base_fingerprint`` combines."""
    from lora_fx.passes.onnx.lora_layout import adapter_names, read_records

    # The head slots (modules_to_save) are left out: each adapter brings its own head, as it brings its LoRA.
    skip = adapter_names(read_records(model)) | set(read_saved(model.metadata_props))
    graph = model.graph
    inputs = {v.name for v in graph.inputs}
    return [_tensor_digest(value.const_value.numpy()) for name, value in graph.initializers.items()
            if not (name in skip or name in inputs or value.const_value is None or _only_dropout_ratio(value))]


# Forms of the head beyond which heads_as_base_fingerprints stops: 2 per weight and per zero bias, so a
# head of 8 parameters (RoBERTa's dense + out_proj has 4) is still covered whole.
_MAX_HEAD_FORMS = 256


def heads_as_base_fingerprints(model: Any, digests: Iterable[str] | None = None) -> list[str]:
    """The base fingerprints an export of the same base *without* head slots has, for a model with head slots
    (``modules_to_save``) holding their defaults, the base head; ``[]`` for a model without head slots.

    That export counts the head among its base weights, in the form its optimizer left it: each head parameter
    as it is, transposed (a ``MatMul`` weight whose ``Transpose`` was folded: Llama's ``score``), or gone when
    all zeros (a ``Gemm``'s zero bias is dropped): one fingerprint per combination. Any of them matching means
    that export's base weights are this model's with this head, so its adapters compute here what they
    computed there. ``digests``: this model's ``_base_digests``, when already computed.
    """
    saved = read_saved(model.metadata_props)
    if not saved:
        return []
    base = list(_base_digests(model) if digests is None else digests)
    forms: list[list[str | None]] = []
    for name in sorted(saved):
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            return []  # a head slot without a default: no base head to count
        arr = value.const_value.numpy()
        options: list[str | None] = [_tensor_digest(arr)]
        if arr.ndim == 2:
            options.append(_tensor_digest(arr.T))
        if not arr.any():
            options.append(None)
        forms.append(list(dict.fromkeys(options)))
    combos = itertools.islice(itertools.product(*forms), _MAX_HEAD_FORMS)
    return list(dict.fromkeys(_combine(base + [d for d in combo if d is not None]) for combo in combos))


def model_fingerprints(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The base fingerprints adapters for a model may carry, from its metadata: its own first, then, for a
    model with head slots, those of an export of the same base without them (``heads_as_base_fingerprints``,
    as ``stamp_fingerprint`` recorded them); ``()`` for a model without one."""
    from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY

    fingerprint = metadata.get(FINGERPRINT_KEY)
    if not fingerprint:
        return ()
    text = metadata.get(HEADS_AS_BASE_KEY)
    if not text or not read_saved(metadata):
        return (fingerprint,)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    others = data.get("heads_as_base") if isinstance(data, dict) else None
    if not isinstance(others, list) or not all(isinstance(fp, str) for fp in others):
        raise AdapterError(f"model metadata {HEADS_AS_BASE_KEY} is not the JSON lora_fx writes; the model was changed "
                           "outside lora_fx: export it again")
    # Recorded beside another fingerprint (the weights changed since): it says nothing about these weights.
    if data.get("base_fingerprint") != fingerprint:
        return (fingerprint,)
    return (fingerprint, *(fp for fp in others if fp != fingerprint))


def _only_dropout_ratio(value: Any) -> bool:
    """A constant read only as a Dropout's ratio is a training setting, not a weight: an adapter trained
    with ``lora_dropout`` fits the same base as one trained without."""
    uses = list(value.uses())
    return bool(uses) and all(use.node.op_type == "Dropout" and use.idx == 1 for use in uses)


def stamp_fingerprint(model: Any) -> str:
    """Record the model's base fingerprint in its metadata (and, with head slots, ``heads_as_base_fingerprints``
    under ``HEADS_AS_BASE_KEY``); returns it."""
    from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY

    digests = _base_digests(model)
    fp = _combine(digests)
    model.metadata_props[FINGERPRINT_KEY] = fp
    others = heads_as_base_fingerprints(model, digests)
    if others:
        model.metadata_props[HEADS_AS_BASE_KEY] = json.dumps({"base_fingerprint": fp, "heads_as_base": others})
    else:
        model.metadata_props.pop(HEADS_AS_BASE_KEY, None)
    return fp


# ---- reading and writing -----------------------------------------------------------------------
def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def check_nonempty(tensors: Mapping[str, Any], where: str) -> None:
    """Refuse zero-size adapter tensors (rank 0, or prefixes of 0 virtual tokens).

    Such an adapter computes the base model, and ONNX Runtime's CUDA provider fails on zero-size
    adapter tensors (onnxruntime issue 21483), so it is refused wherever it enters."""
    for name, arr in tensors.items():
        shape = tuple(arr.shape)
        if 0 in shape:
            what = "0 virtual tokens" if ".prefix_" in name else "rank 0"
            raise AdapterError(
                f"{where}: adapter tensor {name} has shape {shape}, zero-size ({what}). A rank-0 adapter is the base "
                "model (run without an adapter), and ONNX Runtime's CUDA provider fails on zero-size adapter tensors; "
                "train or export the adapter with r >= 1"
            )


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16, the numpy dtype onnx_ir gives bfloat16 tensors. numpy files it under
    kind 'V' (void), so a float test by kind misses it; ONNX Runtime and ``torch.from_numpy`` do not take it."""
    return np.dtype(dtype).name == "bfloat16"


def non_finite(tensors: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The first float tensor (bfloat16 included) holding NaN or inf: ``(name, how many, of how many)``; None when
    all are finite. numpy arrays or torch tensors (a torch bfloat16 tensor has no numpy form)."""
    for name, arr in tensors.items():
        if hasattr(arr, "is_floating_point"):  # torch, without importing it here
            if arr.is_floating_point() or arr.is_complex():
                finite = arr.detach().isfinite()
                if not bool(finite.all()):
                    return name, int((~finite).sum()), int(arr.numel())
            continue
        arr = np.asarray(arr)
        if (arr.dtype.kind in "fc" or is_bfloat16(arr.dtype)) and not np.isfinite(arr).all():
            return name, int((~np.isfinite(arr)).sum()), int(arr.size)
    return None


def check_finite(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse NaN/inf adapter tensors where an adapter is read: served, every output of the sites they adapt
    would be NaN, with exit status 0."""
    bad = non_finite(tensors)
    if bad is not None:
        name, count, size = bad
        raise AdapterError(
            f"{where}: adapter tensor {name} holds {count} NaN or inf values of {size}; it was saved from a diverged "
            "training run: train again (lower the learning rate) or use an earlier checkpoint"
        )


def check_writable(adapter: OnnxAdapter) -> None:
    """Refuse an empty adapter, a zero-size tensor or NaN/inf (call before writing anything that goes with it)."""
    if not adapter.tensors:
        raise AdapterError("refusing to write an empty adapter: it holds no tensors")
    check_nonempty(adapter.tensors, "refusing to write the adapter")
    check_finite_to_write(adapter.tensors)


def check_finite_to_write(tensors: Mapping[str, Any]) -> None:
    """Refuse NaN/inf in adapter tensors about to be written (an ``.onnx_adapter`` file, a PEFT directory): such a
    file runs every output of the sites it adapts as NaN, with exit status 0, wherever it is loaded."""
    bad = non_finite(tensors)
    if bad is not None:
        raise AdapterError(f"adapter tensor {bad[0]} holds NaN or inf (training diverged?); nothing was written: "
                           "train again (lower the learning rate) or save from an earlier checkpoint")


def write_onnx_adapter(path: str | os.PathLike, adapter: OnnxAdapter) -> Path:
    """Write ``path`` (AdapterFormat) and its JSON sidecar; each appears whole or not at all."""
    path = Path(path)
    check_writable(adapter)
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(adapter.tensors.items())}
    side = {
        "format": FORMAT,
        "tensors_sha256": tensors_digest(arrays),
        "base_fingerprint": adapter.fingerprint,
        "sites": adapter.sites,
        "lora_config": adapter.config,
    }
    with atomic_path(path) as tmp:
        export_tensors(tmp, arrays, short_fingerprint(adapter.fingerprint) if adapter.fingerprint else None)
        atomic_write_text(sidecar_path(path), json.dumps(side, indent=2, sort_keys=True))
    return path


def export_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], model_version: int | None = None) -> None:
    """Write ``tensors`` as an AdapterFormat file at ``path`` (no sidecar, not atomic: the callers see to that)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    if model_version is not None:
        fmt.set_model_version(model_version)
    # OrtValues borrow the numpy buffers: keep the arrays alive until the file is written.
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    fmt.set_parameters({k: ort_value(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))


_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16


def ort_value(arr: np.ndarray, device: str = "cpu", device_id: int = 0) -> Any:
    """``arr`` as an OrtValue: on the CPU over the buffer of ``arr`` (or of a contiguous copy), which the OrtValue
    keeps alive; on another device a copy there.

    ONNX Runtime maps no numpy dtype to bfloat16 (ml_dtypes' is refused): such an array goes in as its 16-bit
    patterns, typed bfloat16."""
    import onnxruntime as ort

    arr = np.ascontiguousarray(arr)
    if not is_bfloat16(arr.dtype):
        if device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(arr)
        return ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
    bits = arr.view(np.uint16)
    if device == "cpu":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), _ONNX_BFLOAT16, device, device_id)
    value.update_inplace(bits)
    return value


def ort_value_to_numpy(value: Any) -> np.ndarray:
    """A copy of a CPU OrtValue's tensor as a numpy array, bfloat16 as ml_dtypes.bfloat16 (``OrtValue.numpy`` has
    no bfloat16: its bytes are read through DLPack instead, nothing unpickled)."""
    if value.data_type() != "tensor(bfloat16)":
        return np.array(value.numpy(), copy=True)
    import ml_dtypes
    import torch

    bits = torch.from_dlpack(value).view(torch.uint16)
    return bits.numpy().copy().view(ml_dtypes.bfloat16)


def _torch(arr: np.ndarray) -> Any:
    """A torch tensor holding a copy of ``arr``; bfloat16 (which ``torch.from_numpy`` refuses) bit for bit."""
    import torch

    arr = np.array(arr)
    if is_bfloat16(arr.dtype):
        return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def read_onnx_adapter(path: str | os.PathLike) -> OnnxAdapter:
    """Read an ``.onnx_adapter`` file (and its sidecar when present); zero-size and NaN/inf tensors are refused."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file (an .onnx_adapter written by lora_fx export or AdapterFormat)")
    if path.stat().st_size == 0:
        raise AdapterError(f"{path} is empty (an interrupted copy?); copy or export the adapter again")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        # Copies: the parameters' memory belongs to ``fmt``, which is freed on return.
        tensors = {k: ort_value_to_numpy(v) for k, v in fmt.get_parameters().items()}
        model_version = int(fmt.get_model_version())
    except Exception as exc:  # ORT raises RuntimeError/Fail with its own wording for bad files
        raise AdapterError(
            f"{path} is not a readable .onnx_adapter file ({_what_it_holds(path)}; ONNX Runtime: {ort_message(exc)}); "
            "copy or export the adapter again"
        ) from None
    if not tensors:
        raise AdapterError(f"{path} holds no adapter tensors; copy or export the adapter again")
    check_nonempty(tensors, str(path))
    check_finite(tensors, str(path))
    adapter = OnnxAdapter(tensors, short_fingerprint=_short_from_model_version(model_version))
    side = sidecar_path(path)
    if side.is_file():
        _read_sidecar(side, path, adapter)
    return adapter


_ADAPTER_ID = b"TORT"  # the file identifier of ONNX Runtime's adapter flatbuffer, at bytes 4..8
_HEAD = 4096  # bytes read to tell what a file holds


def _what_it_holds(path: Path) -> str:
    """What a file ONNX Runtime could not read as an adapter holds, told by its bytes, not its name: a text file
    named .onnx is no model, and a damaged adapter named .onnx is still an adapter."""
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if head[4:8] == _ADAPTER_ID:
        return "truncated or corrupt?"
    if _is_text(head):
        return "a text file, not an adapter"
    if len(head) >= 8 and _is_onnx_model(path):
        return "an ONNX model, not an adapter"
    return "truncated or corrupt?" if len(head) < 8 else "not in ONNX Runtime's adapter format"


def _is_text(head: bytes) -> bool:
    """UTF-8 without control characters other than whitespace: binary formats (ONNX's protobuf opens with
    0x08, safetensors with a little-endian length, AdapterFormat with a 32-bit offset) have them up front."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(head) < _HEAD or exc.start < len(head) - 3:  # not merely a character cut by the block read
            return False
        text = head[: exc.start].decode("utf-8")
    return not any((ord(ch) < 32 and ch not in "\t\n\r\f") or ord(ch) == 127 for ch in text)


def _is_onnx_model(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and the like: not a model
        return False
    return model.ir_version > 0 and len(model.opset_import) > 0 and model.HasField("graph")


def _read_sidecar(side: Path, path: Path, adapter: OnnxAdapter) -> None:
    """Fill ``adapter``'s metadata from its sidecar, refusing one that is malformed or describes other tensors."""
    way_out = "delete it to use the adapter without its metadata (scales then count as 1)"
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{side} is not valid JSON ({exc}); {way_out}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AdapterError(f"{side} is not a lora_fx adapter sidecar (format {found!r}, expected {FORMAT!r}); {way_out}")
    fields = {"base_fingerprint": (str, type(None)), "tensors_sha256": (str, type(None)), "sites": (dict, type(None)),
              "lora_config": (dict, type(None))}
    for key, types in fields.items():
        if not isinstance(data.get(key), types):
            raise AdapterError(f"{side}: {key} is a {type(data.get(key)).__name__}, not what lora_fx writes; {way_out}")
    if any(not isinstance(rec, dict) for rec in (data.get("sites") or {}).values()):
        raise AdapterError(f"{side}: sites must map each site to a record; {way_out}")
    # Written beside the adapter, not with it: a crash or a copy of one file alone pairs it with another
    # adapter's scales (to_peft reads them), and a flipped byte in the file would change weights silently.
    digest = data.get("tensors_sha256")
    if digest and digest != tensors_digest(adapter.tensors):
        raise AdapterError(
            f"{path} does not hold the tensors its sidecar {side.name} describes: the file is corrupt or the two were "
            "not written together; export the adapter again"
        )
    adapter.fingerprint = data.get("base_fingerprint")
    adapter.sites = dict(data.get("sites") or {})
    adapter.config = data.get("lora_config")
    if adapter.fingerprint and adapter.short_fingerprint not in (None, short_fingerprint(adapter.fingerprint)):
        raise AdapterError(f"{path} and its sidecar {side.name} disagree about the base model; they were not written together")


# ---- fitting an adapter to a model -------------------------------------------------------------
def _check_heads_have_slots(adapter: OnnxAdapter, slots: Mapping[str, Slot], accepted: tuple[str, ...], where: str) -> None:
    """Refuse a head (parameters of a module trained in full) on a model without slots for it, before the
    fingerprints are compared: a model exported without head slots counts the head as a base weight, so the
    fingerprints of the same base differ there too, and "another base" would send the user the wrong way."""
    heads = sorted(n for n in adapter.tensors if not is_slot_name(n) and n not in slots)
    if not heads:
        return
    modules = sorted({n.rpartition(".")[0] or n for n in heads})
    same = not accepted or adapter.fingerprint in accepted or (
        not adapter.fingerprint and adapter.short_fingerprint in (None, *map(short_fingerprint, accepted)))
    also = "" if same else " (their base-weight fingerprints differ too, as between exports of one base with and without head slots)"
    raise AdapterError(
        f"adapter tensors {', '.join(heads[:5])} are parameters of {', '.join(modules[:3])}, trained in full "
        f"(modules_to_save), and have no adapter slot in {where}, which was exported without that module{also}: it "
        "runs on a model exported with that module's slots, as an adapter's own export is: a model trained with "
        "modules_to_save, exported by lora_fx.export_onnx(..., mode='adapters') (CLI: lora-fx export --adapters)"
    )


def _kinds(names: Iterable[str]) -> set[str]:
    """The adapter kinds tensors or slots of these names are for: "LoRA" (``lora_A``/``lora_B``), "prefix"."""
    kinds = set()
    for name in names:
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            kinds.add("LoRA")
        elif name.endswith((".prefix_key", ".prefix_value")):
            kinds.add("prefix")
    return kinds


def _check_same_kind(adapter: OnnxAdapter, slots: Mapping[str, Slot], where: str) -> None:
    """Refuse a prefix-tuning adapter on a model with LoRA slots, and a LoRA adapter on one with prefix slots, before
    the fingerprints are compared: the two exports of one base store it differently, so their fingerprints differ
    too, and "a different base model" would send the user the wrong way."""
    theirs, ours = _kinds(adapter.tensors), _kinds(slots)
    foreign = sorted(theirs - ours)
    if not foreign or not ours:  # no slots of either kind: refused below as a model without adapter slots
        return
    kind, have = foreign[0], " and ".join(sorted(ours))
    shown = sorted(n for n in adapter.tensors if _kinds([n]) == {kind})
    way_out = (
        "export the prefix-tuned model with adapter slots (lora_fx.export_onnx(..., mode='adapters'); CLI: lora-fx "
        "export PREFIX_MODEL.onnx --adapters -o served_prefix.onnx) and serve this adapter with that file"
        if kind == "prefix" else
        "serve it with the model exported from its LoRA model with adapter slots (lora_fx.export_onnx(..., "
        "mode='adapters'); CLI: lora-fx export LORA_MODEL.onnx --adapters -o served.onnx)"
    )
    raise AdapterError(
        f"this is a {'prefix-tuning' if kind == 'prefix' else 'LoRA'} adapter ({', '.join(shown[:2])}"
        f"{', …' if len(shown) > 2 else ''}), but {where} has {have} adapter slots only, which do not take it: "
        f"{way_out}"
    )


@dataclass
class Slot:
    """One adapter input of a model: dtype name (numpy) and shape, ``None`` for the symbolic rank;
    ``module``: for a parameter of a module trained in full (``modules_to_save``), that module."""

    dtype: str
    shape: tuple[int | None, ...]
    module: str | None = None


def slot_site(name: str, slots: Mapping[str, Slot]) -> str:
    """What a slot belongs to: its site (LoRA, prefix) or its module trained in full (``classifier``)."""
    slot = slots.get(name)
    return slot.module if slot is not None and slot.module else site_of(name)


def check_fits(adapter: OnnxAdapter, slots: Mapping[str, Slot], fingerprint: str | Iterable[str] | None,
               where: str = "the model") -> None:
    """Refuse an adapter for another base, with unknown names, or with a wrong shape, rank or dtype; a head
    (``modules_to_save``) on a model without slots for it is refused as such before the fingerprints are compared.

    ``fingerprint``: the model's base fingerprint, or all those it accepts (``model_fingerprints``: its own first,
    then for a model with head slots those of an export of the same base without them)."""
    accepted = (fingerprint,) if isinstance(fingerprint, str) else tuple(fp for fp in fingerprint or () if fp)
    if slots:
        _check_same_kind(adapter, slots, where)
        _check_heads_have_slots(adapter, slots, accepted, where)
    theirs = None
    if accepted and adapter.fingerprint and adapter.fingerprint not in accepted:
        theirs, ours = f"base-weight fingerprint {adapter.fingerprint[:12]}…", f"{accepted[0][:12]}…"
    elif accepted and not adapter.fingerprint and adapter.short_fingerprint not in (None, *map(short_fingerprint, accepted)):
        theirs, ours = f"fingerprint {adapter.short_fingerprint}", str(short_fingerprint(accepted[0]))
    if theirs:
        hint = ""
        if len(accepted) == 1 and any(slot.module for slot in slots.values()):
            # Written before head-slot models recorded the fingerprints of their exports without head slots.
            hint = (f". If it comes from an export of the same base without modules_to_save, export {where} again "
                    "with this lora_fx (it then takes such adapters, with the base head), or convert the adapter's PEFT "
                    "directory for it: peft_dir_to_onnx_adapter")
        # The fingerprint hashes the file's initializers as its exporter stored them, so another export of the same
        # checkpoint (TorchScript vs dynamo, which keeps biases and norms as Constant nodes) differs too; the
        # adapter's PEFT directory names sites by module path and loads onto any export.
        raise AdapterError(
            f"this adapter was trained on a different base model than {where} ({theirs} vs {ours}), or on another "
            "export of the same checkpoint (TorchScript and dynamo exports store the same weights differently, so their "
            "fingerprints differ). Ways out: use the model it was trained on; or load the adapter's PEFT directory "
            "instead, which loads onto any export of the same checkpoint: the one written beside it by lora-fx export "
            "--adapters (<model>.adapters/<adapter name>/) or by lora_fx.save_adapter, with "
            f"Session.add_adapter(name, peft_dir) (CLI: lora-fx run --adapter DIR); or retrain it{hint}")
    if not slots:
        raise AdapterError(f"{where} has no adapter slots; export it with mode='adapters' (CLI: lora-fx export --adapters)")
    if not adapter.tensors:
        raise AdapterError(f"the adapter holds no tensors; it would run {where} as the base model")
    check_nonempty(adapter.tensors, f"the adapter for {where}")
    unknown = sorted(set(adapter.tensors) - set(slots))
    if unknown:  # LoRA matrices and prefixes: heads without slots were refused above
        raise AdapterError(
            f"adapter tensors {', '.join(unknown[:5])} have no adapter slot in {where}; its slots are "
            f"{', '.join(sorted(slots)[:6])}{'…' if len(slots) > 6 else ''}. Was it made for another model?"
        )
    sites, prefixes = set(), set()
    for name, arr in adapter.tensors.items():
        slot = slots[name]
        if np.dtype(arr.dtype).name != slot.dtype:
            raise AdapterError(
                f"adapter tensor {name} is {np.dtype(arr.dtype).name} but {where} expects {slot.dtype}; convert the adapter "
                f"to {slot.dtype} (peft_dir_to_onnx_adapter writes a PEFT adapter in the model's dtype)"
            )
        if len(arr.shape) != len(slot.shape) or any(s is not None and s != d for s, d in zip(slot.shape, arr.shape)):
            want = tuple("r" if s is None else s for s in slot.shape)
            if slot.module:
                raise AdapterError(
                    f"adapter tensor {name} has shape {tuple(arr.shape)} but {where} expects {want} for it: {slot.module} is "
                    "trained in full (modules_to_save) and its shape is fixed by the base model; was the adapter trained "
                    "for another number of labels or another model?"
                )
            # Prefix slots fix the number of virtual tokens at export; LoRA slots leave only the rank free.
            layout = "prefixes are [kv_heads, virtual tokens, head_dim]" if ".prefix_" in name else "lora_A [in, r], lora_B [r, out]"
            raise AdapterError(f"adapter tensor {name} has shape {tuple(arr.shape)} but {where} expects {want} ({layout})")
        if ".lora_" in name:
            sites.add(site_of(name))
        elif ".prefix_" in name:
            prefixes.add(site_of(name))
    heads = sorted({slots[name].module for name in adapter.tensors if slots[name].module})
    for module in heads:
        # The rest would stay at the base values: a trained weight with the base bias is neither head.
        lacking = sorted(n for n, s in slots.items() if s.module == module and n not in adapter.tensors)
        if lacking:
            raise AdapterError(
                f"the adapter holds only some parameters of {module} (trained in full, modules_to_save): it lacks "
                f"{', '.join(lacking)}; a head comes whole, as PEFT saves it"
            )
    for site in sorted(prefixes):
        # The other one would stay at the model's default prefix: keys of one prefix attending to values of another.
        if f"{site}.prefix_key" not in adapter.tensors or f"{site}.prefix_value" not in adapter.tensors:
            raise AdapterError(f"site {site}: the adapter holds only one of prefix_key / prefix_value; both are needed")
    for site in sorted(sites):
        a, b = adapter.tensors.get(f"{site}.lora_A.weight"), adapter.tensors.get(f"{site}.lora_B.weight")
        if a is None or b is None:
            raise AdapterError(f"site {site}: the adapter holds only one of lora_A / lora_B; both are needed")
        if a.shape[1] != b.shape[0]:
            raise AdapterError(f"site {site}: lora_A has rank {a.shape[1]} but lora_B has rank {b.shape[0]}; they must agree")


def exposed_slots(model: Any) -> list[str]:
    """The adapter tensors (LoRA, prefix, modules_to_save) of an onnx_ir Model that are graph inputs keeping a
    same-named initializer as their default: the slots ``expose_adapters`` / ``expose_prefixes`` made (``lora-fx
    export --adapters``). Their values are the defaults run without an adapter, not weights to fold, export or
    train. Other initializers listed as inputs (as files of IR version < 4 list them all) are not slots."""
    from lora_fx.runtime.onnx_torch import trainable_initializers

    inputs = {v.name for v in model.graph.inputs}
    return [name for name in trainable_initializers(model) if name in inputs]


def model_slots(model: Any) -> dict[str, Slot]:
    """The adapter slots of an onnx_ir Model (graph inputs that are adapter initializers), with the parameters of
    modules trained in full its metadata lists."""
    from lora_fx.passes.onnx.lora_layout import adapter_names, read_records

    saved = read_saved(model.metadata_props)
    names = adapter_names(read_records(model)) | set(saved)
    slots = {}
    for value in model.graph.initializers.values():
        if value.name in names:
            dims = tuple(d if isinstance(d, int) else None for d in value.shape) if value in model.graph.inputs else tuple(value.shape)
            slots[value.name] = Slot(value.const_value.numpy().dtype.name, dims, saved.get(value.name))
    return slots


def trained_values(model: Any, names: Iterable[str], way_out: str) -> dict[str, np.ndarray]:
    """The values ``model`` holds now for the parameters of modules trained in full (``modules_to_save``) named in
    ``names``, read before the slots' defaults take the base values; ``way_out`` ends the error for one missing."""
    out = {}
    for name in sorted(names):
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise AdapterError(f"{name}, a parameter of a module trained in full (modules_to_save), is not an initializer "
                               f"of the exported graph; {way_out}")
        out[name] = np.ascontiguousarray(value.const_value.numpy())
    return out


def current_adapter(model: Any, saved: Iterable[str] = ()) -> OnnxAdapter:
    """The adapter weights a LoRA ONNX model holds now (before ``expose_adapters`` zeroes them), with the
    parameters of modules trained in full: those its metadata lists and those named in ``saved``."""
    from lora_fx.passes.onnx.lora_layout import CONFIG_KEY, FINGERPRINT_KEY, read_records

    records = read_records(model)
    if not records:
        raise AdapterError("this model has no LoRA adapter; call lora_fx.apply(model, LoraConfig(...)) first")
    tensors = {}
    for site, rec in records.items():
        for key in ("a", "b"):
            value = model.graph.initializers[rec[key]]
            tensors[rec[key]] = np.array(value.const_value.numpy())
    tensors.update(trained_values(model, set(read_saved(model.metadata_props)) | set(saved),
                                  "export mode='merged' instead"))
    config = model.metadata_props.get(CONFIG_KEY)
    return OnnxAdapter(
        tensors,
        fingerprint=model.metadata_props.get(FINGERPRINT_KEY),
        sites={s: {k: v for k, v in rec.items() if k not in ("a", "b")} for s, rec in records.items()},
        config=json.loads(config) if config else None,
    )


# ---- PEFT layout <-> deployment layout ---------------------------------------------------------
def _site_scales(config: Any, sites: list[str]) -> dict[str, tuple[int, float, float]]:
    from lora_fx.targeting import pattern_value

    out = {}
    for site in sites:
        r = int(pattern_value(config.rank_pattern, site, config.r))
        alpha = float(pattern_value(config.alpha_pattern, site, config.lora_alpha))
        out[site] = (r, alpha, config.scaling(r, alpha))
    return out


def from_peft(config: Any, tensors: Mapping[str, Any], fingerprint: str | None = None,
              dtypes: Mapping[str, str] | None = None) -> OnnxAdapter:
    """A PEFT adapter (config + ``base_model.model.<site>.lora_X.weight`` tensors) in deployment layout.

    Parameters of modules trained in full (``base_model.model.classifier.weight``) keep their layout, under
    their model names (``classifier.weight``). ``dtypes`` (deployment name -> numpy dtype name, a model's
    slots): the float dtype each tensor is written in, as loading into a torch model casts; without it the
    PEFT file's own dtype is kept.
    """
    import torch

    from lora_fx.adapters import parse_peft_key, site_of_peft_name, split_saved, to_deployment_layout

    tensors, saved = split_saved(tensors)
    pairs: dict[str, dict[str, Any]] = {}
    parts: dict[str, str] = {}  # site -> the module PEFT wrapped it in (nn.MultiheadAttention's out_proj)
    for key, value in tensors.items():
        site, part_of = site_of_peft_name(parse_peft_key(key)[0])
        pairs.setdefault(site, {})[parse_peft_key(key)[1]] = value
        if part_of:
            parts[site] = part_of
    # A wrapped child takes the rank and alpha of the module PEFT wrapped it in, as PEFT gives it.
    by_key = _site_scales(config, sorted({parts.get(site, site) for site in pairs}))
    scales = {site: by_key[parts.get(site, site)] for site in pairs}
    out, sites = {}, {}
    for site, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"PEFT adapter has only lora_{''.join(pair)} for site {site}; both A and B are needed")
        a, b = torch.as_tensor(pair["A"]), torch.as_tensor(pair["B"])
        r, alpha, scale = scales[site]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"site {site}: lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; LoRA weights are 2-D ([r, in], [out, r])")
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"site {site}: lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; their ranks differ")
        if a.shape[0] != r:
            # The scale is alpha / r of the config's r: with another rank in the tensors it would be silently
            # wrong here, where PEFT refuses to load the directory at all.
            raise AdapterError(
                f"site {site}: the tensors have rank {a.shape[0]} but adapter_config.json gives it r={r} "
                "(r / rank_pattern); fix the config to the rank the adapter was trained with"
            )
        a_dep, b_dep = to_deployment_layout(a, b.double(), scale)
        for which, value in (("A", a_dep), ("B", b_dep)):
            name = f"{site}.lora_{which}.weight"
            # B is scaled in float64 and rounded once, into the dtype it is written in.
            out[name] = _to_numpy(value, (dtypes or {}).get(name), a.dtype)
        sites[site] = {"r": int(a.shape[0]), "alpha": alpha, "scale": scale, "in_features": int(a.shape[1]), "out_features": int(b.shape[0])}
        if site in parts:
            sites[site]["part_of"] = parts[site]
    for name, value in saved.items():
        value = torch.as_tensor(value)
        out[name] = _to_numpy(value, (dtypes or {}).get(name), value.dtype)
    return OnnxAdapter(out, fingerprint=fingerprint, sites=sites, config=config.to_dict())


_FLOATS = ("float16", "float32", "float64")


def _to_numpy(value: Any, want: str | None, default: Any) -> np.ndarray:
    """``value`` as a numpy array in ``want`` (a float dtype name, bfloat16 included: ml_dtypes') or else in torch
    dtype ``default``. Without ``want`` bfloat16 goes through float32, which holds it exactly."""
    import torch

    if want == "bfloat16" and value.is_floating_point():
        import ml_dtypes

        # Rounded once, by torch, from whatever precision the value has (B was scaled in float64).
        return value.detach().cpu().to(torch.bfloat16).view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    if want not in _FLOATS or not value.is_floating_point():
        value, want = value.to(default), None
    if value.dtype == torch.bfloat16:
        value = value.float()
    arr = value.detach().cpu().numpy()
    return arr.astype(want) if want else arr


def to_peft(adapter: OnnxAdapter) -> tuple[Any, dict[str, Any]]:
    """The PEFT config and tensors of an adapter in deployment layout.

    Without per-site scales (an .onnx_adapter from elsewhere, no sidecar) the scale is taken as 1:
    PEFT gets ``lora_alpha = r`` per site, which computes the same outputs. Parameters of modules trained
    in full go under PEFT's keys for them (``base_model.model.classifier.weight``), their modules in the
    config's ``modules_to_save``.
    """
    from lora_fx.adapters import PEFT_PREFIX, from_deployment_layout, peft_key
    from lora_fx.config import LoraConfig

    heads = {name: arr for name, arr in adapter.tensors.items() if not is_slot_name(name)}
    sites = sorted({site_of(name) for name in adapter.tensors if name not in heads})
    if not sites:
        raise AdapterError("the adapter holds no LoRA matrices (lora_A / lora_B); a PEFT LoRA adapter needs them")
    tensors = {}
    ranks, alphas = {}, {}
    for site in sites:
        a = _torch(adapter.tensors[f"{site}.lora_A.weight"])
        b = _torch(adapter.tensors[f"{site}.lora_B.weight"])
        rec = adapter.sites.get(site) or {}
        r = int(a.shape[1])
        scale = float(rec.get("scale", 1.0))
        a_p, b_p = from_deployment_layout(a, b.double(), scale)
        tensors[peft_key(site, "A")] = a_p
        tensors[peft_key(site, "B")] = b_p.to(a.dtype)
        ranks[site], alphas[site] = r, float(rec.get("alpha", r if "scale" not in rec else scale * r))
    if adapter.config:
        config = LoraConfig.from_dict(adapter.config)
    else:
        first = sites[0]
        config = LoraConfig(r=ranks[first], lora_alpha=alphas[first])
    # Exact names per site: the adapter means the same thing whatever the model's other modules are called.
    config.target_modules = sites
    config.rank_pattern = {f"^{_escape(s)}$": r for s, r in ranks.items() if r != config.r} if not adapter.config else config.rank_pattern
    config.alpha_pattern = {f"^{_escape(s)}$": a for s, a in alphas.items() if a != config.lora_alpha} if not adapter.config else config.alpha_pattern
    for name, arr in heads.items():
        tensors[f"{PEFT_PREFIX}{name}"] = _torch(arr)
    # Without its module in modules_to_save PEFT would not load the head (a file from elsewhere, no sidecar):
    # the module is the parameter's owner, which PEFT matches by suffix as it does classifier.
    owners = sorted({name.rpartition(".")[0] for name in heads} - {""})
    have = list(config.modules_to_save or [])
    missing = [m for m in owners if not any(re.match(rf"(^|.*\.){h}($|\..*)", m) for h in have)]  # PEFT's matching
    if missing:
        config.modules_to_save = have + missing
    from lora_fx.adapters import key_parts_as_peft

    return key_parts_as_peft(config, tensors, adapter.sites)


def _escape(site: str) -> str:
    import re

    return re.escape(site)


def onnx_adapter_to_peft_dir(path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write an ``.onnx_adapter`` as a PEFT adapter directory (loads with ``PeftModel.from_pretrained``)."""
    from lora_fx.adapters import write_peft_dir

    config, tensors = to_peft(read_onnx_adapter(path))
    return write_peft_dir(directory, config, tensors)


def peft_dir_to_onnx_adapter(directory: str | os.PathLike, model: Any, path: str | os.PathLike) -> Path:
    """Convert a PEFT adapter directory into an ``.onnx_adapter`` for ``model`` (an .onnx path or onnx_ir Model
    with adapter slots); the adapter is checked against the model's slots and stamped with its fingerprint."""
    where = "the model"
    if not hasattr(model, "graph"):
        import onnx_ir as ir

        where, model = Path(model).name, ir.load(str(model))
    if not Path(directory).is_dir():
        from lora_fx.adapters import read_peft_dir

        read_peft_dir(directory)  # refuses it in its own words
    adapter = read_adapter_for(directory, model_slots(model), model_fingerprints(model.metadata_props), where)
    return write_onnx_adapter(path, adapter)


def read_adapter_for(path: str | os.PathLike, slots: Mapping[str, Slot], fingerprints: Iterable[str],
                     where: str = "the model") -> OnnxAdapter:
    """The adapter at ``path`` for a model with these slots, checked to fit it (``check_fits``): an ``.onnx_adapter``
    file, or a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) converted on
    the way to the deployment layout in the slots' dtypes. A PEFT directory records no base model, so it is
    stamped with the model's own fingerprint, as ``peft_dir_to_onnx_adapter`` stamps it."""
    path = Path(path)
    fingerprints = tuple(fingerprints)
    if not path.is_dir():
        adapter = read_onnx_adapter(path)
    else:
        from lora_fx.adapters import read_peft_dir
        from lora_fx.config import ADAPTER_CONFIG_NAME

        config_path = path / ADAPTER_CONFIG_NAME
        if not config_path.is_file():
            raise AdapterError(f"{path} is a folder without {ADAPTER_CONFIG_NAME}; pass an .onnx_adapter file or a "
                               "PEFT adapter directory (what PeftModel.save_pretrained or lora_fx.save_adapter writes)")
        peft_type = _peft_type_of(config_path)
        if peft_type not in (None, "LORA"):
            raise AdapterError(
                f"{path} is a {peft_type} PEFT adapter; only LoRA directories convert on the way in. Serve a prefix "
                "adapter as the .onnx_adapter its export writes: load the directory onto the captured model "
                "(lora_fx.load_adapter), then lora_fx.export_onnx(..., mode='adapters')"
            )
        config, tensors = read_peft_dir(path)
        dtypes = {name: slot.dtype for name, slot in slots.items()}
        adapter = from_peft(config, tensors, fingerprints[0] if fingerprints else None, dtypes)
    check_fits(adapter, slots, fingerprints, where=where)
    if path.is_dir():  # its tensors fit the slots: so must the config PEFT builds the adapter from
        lora_sites = sorted({site_of(n) for n in slots if n.endswith((".lora_A.weight", ".lora_B.weight"))})
        check_config_targets(config, adapter.sites, lora_sites, config_path, where)
    return adapter


def check_config_targets(config: Any, sites: Mapping[str, Mapping[str, Any]], available: Iterable[str],
                         config_path: Any, where: str) -> None:
    """Refuse a PEFT directory whose config does not target the sites its tensors are for (``sites``: from_peft's
    records, with ``part_of``). PEFT builds the adapter from ``target_modules`` first and loads the tensors into it:
    a config matching no module is refused ("Target modules ... not found in the base model"), and tensors for
    modules it does not target are left unloaded without a word, so serving them would run an adapter PEFT never
    runs. A targeted site without tensors is accepted: PEFT leaves its B at zero, as the slot's default does.
    ``available``: the sites the model takes LoRA at, named as the way out."""
    from lora_fx.config import ALL_LINEAR
    from lora_fx.sites import IRKind, Site, SiteKind
    from lora_fx.targeting import matches_target, unmatched_error

    tm = config.target_modules
    if tm is None or isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        return  # resolved by the model's type or its linear layers, which a served file does not record
    # A site adapted as part of a module PEFT wraps whole (nn.MultiheadAttention's out_proj) is targeted by that module.
    missed = sorted(site for site, rec in sites.items() if not matches_target(config, tm, rec.get("part_of") or site))
    if not missed:
        return
    trained = sorted({(sites[s].get("part_of") or s).rsplit(".", 1)[-1] for s in sites})
    fix = f"set target_modules in {config_path} to the modules the adapter was trained on (its tensors name {trained!r})"
    names = sorted(set(available) | set(sites))
    if not any(matches_target(config, tm, n) for n in names + [r["part_of"] for r in sites.values() if r.get("part_of")]):
        listing = str(unmatched_error(config, [Site(n, SiteKind.LINEAR, IRKind.ONNX) for n in names])).split("\n", 1)[-1]
        raise TargetNotFoundError(
            f"target_modules={tm!r} in {config_path} matches none of the sites its tensors are for, nor any site {where} "
            f"has adapter slots for. PEFT builds the adapter from target_modules before it loads the tensors: it refuses "
            f"a config that matches no module (Target modules not found in the base model), and leaves tensors of "
            f"modules it does not target unloaded: {fix}.\n{listing}"
        )
    raise AdapterError(
        f"target_modules={tm!r} in {config_path} leaves out sites its tensors are for: {', '.join(missed[:4])}"
        f"{', …' if len(missed) > 4 else ''}. PEFT builds the adapter from target_modules and would leave those tensors "
        f"unloaded, so serving them would run another adapter than PEFT runs: {fix}, or remove those tensors"
    )


def _peft_type_of(config_path: Path) -> str | None:
    """The ``peft_type`` an adapter_config.json names (PEFT writes "LORA"; ``None`` when it names none)."""
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path} is not readable JSON ({exc}); copy or save the adapter again") from None
    value = data.get("peft_type") if isinstance(data, dict) else None
    return str(value).rpartition(".")[2].upper() if value is not None else None


# ---- adapter state of an onnx_ir model (lora_fx.save_adapter / load_adapter) -------------------
def save_onnx_adapter(model: Any, directory: str | os.PathLike) -> Path:
    """The LoRA weights an ONNX model holds, as a PEFT adapter directory."""
    from lora_fx.adapters import write_peft_dir

    config, tensors = to_peft(current_adapter(model))
    return write_peft_dir(directory, config, tensors)


def load_onnx_adapter(model: Any, config: Any, tensors: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> Any:
    """Set an ONNX model's LoRA weights from a PEFT adapter (applying the config first if it has none).

    ``saved``: the adapter's modules trained in full (``modules_to_save``, by model name), which are not loaded
    into an ONNX model's weights: refused by name (served models take them as slots, through ``.onnx_adapter`` files)."""
    import onnx_ir as ir

    from lora_fx.errors import UnsupportedError
    from lora_fx.passes.onnx.lora_layout import read_records

    if saved:
        raise UnsupportedError(
            f"this adapter trains {', '.join(sorted(saved)[:4])} in full (modules_to_save={config.modules_to_save!r}); "
            "lora_fx loads such adapters onto captured torch models only (lora_fx.capture, then load_adapter), or "
            "export that model with lora_fx.export_onnx; a model exported with mode='adapters' from one trained with "
            "that module has it as slots: convert the adapter with peft_dir_to_onnx_adapter and serve it with runtime.Session"
        )

    reloading = bool(read_records(model))
    if not reloading:
        from lora_fx.adapters import _check_tensors
        from lora_fx.api import apply
        from lora_fx.passes.onnx.insert_lora import select_onnx_targets

        # Checked against the sites the config would adapt before apply changes anything: a refused
        # adapter leaves the model as it was.
        from lora_fx.adapters import peft_site_name

        planned = {peft_site_name(t.site.name, t.part_of): {"A": (t.r, t.site.in_features), "B": (t.site.out_features, t.r)}
                   for t in select_onnx_targets(model, config)}
        _check_tensors(tensors, planned, "the adapter")
        apply(model, config)
    slots = {name: Slot(s.dtype, tuple(s.shape), s.module) for name, s in model_slots(model).items()}
    adapter = from_peft(config, tensors, dtypes={name: slot.dtype for name, slot in slots.items()})
    check_fits(adapter, slots, None)
    # A head slot (modules_to_save) keeps its base default, never written here: the head PEFT runs for an adapter
    # without that module.
    missing = sorted(n for n, slot in slots.items() if not slot.module and n not in adapter.tensors)
    if missing:
        raise AdapterError(f"the adapter lacks tensors for: {', '.join(missing[:10])}")
    if reloading:
        _check_config_fits_graph(model, config)  # the tensors fit: so must the config recorded with them
    # PEFT builds the adapter from the loaded config: its dropout, as its scales (folded into B), become the graph's.
    dropout = _plan_dropout(model, float(config.lora_dropout)) if reloading else []
    for name, arr in adapter.tensors.items():
        model.graph.initializers[name].const_value = ir.tensor(arr, name=name)
    if reloading:
        _set_dropout(model, dropout, float(config.lora_dropout))
        _record_loaded(model, config, adapter)
    return model


def _check_config_fits_graph(model: Any, config: Any) -> None:
    """Loading onto an ONNX model that has adapters keeps its sites and ranks (as ``adapters._check_config_fits_graph``
    does for FX): refuse a config that would adapt other sites, or give them other ranks, than the graph has, rather
    than record a config the graph does not run. The sites are the graph's base linear layers, which ``find_sites``
    still finds under the LoRA branches, selected as ``apply`` selects them."""
    from lora_fx.adapters import peft_site_name, site_rank_mismatch
    from lora_fx.errors import ConfigError, UnsupportedError
    from lora_fx.passes.onnx.insert_lora import select_onnx_targets
    from lora_fx.passes.onnx.lora_layout import read_records

    way_out = "load it onto the model without adapters (lora_fx.load the original file again), which applies its config first"
    have = {peft_site_name(site, rec.get("part_of")): rec for site, rec in read_records(model).items()}
    try:
        planned = {peft_site_name(t.site.name, t.part_of): t.r for t in select_onnx_targets(model, config)}
    except (AdapterError, ConfigError, TargetNotFoundError, UnsupportedError) as exc:
        raise AdapterError(f"the adapter's config does not fit this model's adapter ({exc}); {way_out}") from None
    what = site_rank_mismatch(planned, {s: int(rec["r"]) for s, rec in have.items()})
    if what:
        raise AdapterError(
            f"the adapter's config (target_modules={config.target_modules!r}, r={config.r}, rank_pattern="
            f"{config.rank_pattern!r}) does not describe the adapter this model has: {what}. {way_out[0].upper()}{way_out[1:]}"
        )


def _record_loaded(model: Any, config: Any, adapter: OnnxAdapter) -> None:
    """The site records and the config of an ONNX model that loaded ``adapter`` onto its adapter: what runs now (the
    loaded ranks, alphas and scales, its dropout), so save_adapter writes the loaded config, not the one applied."""
    from lora_fx.passes.onnx.lora_layout import CONFIG_KEY, read_records, write_records

    records = read_records(model)
    for site, rec in records.items():
        rec.update({k: v for k, v in adapter.sites.get(site, {}).items() if k in ("r", "alpha", "scale")})
        rec.pop("dropout", None)
        if config.lora_dropout > 0:
            rec["dropout"] = float(config.lora_dropout)
    write_records(model, records)
    model.metadata_props[CONFIG_KEY] = config.to_json()


def _plan_dropout(model: Any, p: float) -> list[tuple[str, Any, Any]]:
    """The branches whose Dropout must change for ``p``: ``(site, branch, its Dropout or None)``, found before anything
    changes; a branch lora_fx cannot rewrite (an optimizer fused it) is refused naming both rates."""
    from lora_fx.errors import UnsupportedError
    from lora_fx.passes.onnx.lora_layout import find_branches, read_records

    plan = []
    for site, rec in read_records(model).items():
        was = float(rec.get("dropout", 0.0))
        if was == p:
            continue
        way_out = (f"load the adapter onto the model without adapters (lora_fx.load the original file again), which "
                   f"applies its config first")
        try:
            branches = find_branches(model.graph, site, rec)
        except UnsupportedError as exc:
            raise AdapterError(f"the adapter's lora_dropout={p} cannot replace this model's {was} at site {site}: its "
                               f"LoRA branch is not in the form lora_fx rewrites ({exc}); {way_out}") from None
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if p > 0 and opset < 7:
            raise AdapterError(f"the adapter's lora_dropout={p} cannot replace this model's {was}: ONNX's Dropout needs "
                               f"opset 7 or later and this model imports opset {opset}; convert it with "
                               f"onnx.version_converter, or {way_out}")
        for branch in branches:
            drop = branch.nodes[0] if branch.nodes and branch.nodes[0].op_type == "Dropout" else None
            plan.append((site, branch, drop))
    return plan


def _set_dropout(model: Any, plan: list[tuple[str, Any, Any]], p: float) -> None:
    """Give the planned branches ``Dropout(x, p)`` in front of ``MatMul(x, A)``, in ``insert_lora``'s layout (ratio a
    scalar initializer ``<site>.lora_dropout.ratio``, an attribute below opset 12), or none when ``p`` is 0."""
    import onnx_ir as ir

    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    tags: dict[str, int] = {}
    for site, branch, drop in plan:
        tag = tags.get(site, 0)
        tags[site] = tag + 1
        ratio_name = f"{site}.lora_dropout.ratio"
        if drop is not None:  # replaced whole: a ratio attribute (below opset 12) changes with it
            branch.matmul_a.replace_input_with(0, drop.inputs[0])
            branch.graph.remove(drop, safe=True)
        if p == 0:
            continue
        x = branch.matmul_a.inputs[0]
        meta = {k: v for k, v in branch.matmul_a.metadata_props.items() if k.startswith("lora_fx.")}
        name = f"{site}/lora_dropout/Dropout"
        if opset >= 12:  # ratio became an input in opset 12
            ratio = graph.initializers.get(ratio_name)
            if ratio is None:
                ratio = ir.Value(name=ratio_name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                                 const_value=ir.tensor(np.array(p, np.float32), name=ratio_name))
                graph.register_initializer(ratio)
            new = ir.node("Dropout", [x, ratio], name=name, metadata_props=meta)
        else:
            new = ir.node("Dropout", [x], attributes={"ratio": p}, name=name, metadata_props=meta)
        new.outputs[0].name = f"{site}/lora_dropout/output{f'.{tag}' if tag else ''}"
        new.outputs[0].dtype, new.outputs[0].shape = x.dtype, x.shape
        branch.graph.insert_before(branch.matmul_a, new)
        branch.matmul_a.replace_input_with(0, new.outputs[0])
    for site in tags:  # a site's ratio, read by each of its branches: the new rate, or gone with them
        ratio = graph.initializers.get(f"{site}.lora_dropout.ratio")
        if ratio is None:
            continue
        if list(ratio.uses()):
            ratio.const_value = ir.tensor(np.array(p, np.float32), name=ratio.name)
        elif not ratio.is_graph_input():
            graph.initializers.pop(ratio.name)


def onnx_base_weight(model: Any, name: str) -> Any:
    """The base value of parameter ``name`` of an ONNX model in torch's layout (numpy), or None where lora_fx cannot
    read it: a module trained in full's base copy, an initializer of that name, or the weight or bias a linear site of
    the module reads (a tied ``lm_head.weight`` is the embedding's, read through a Transpose)."""
    from lora_fx.passes.onnx.find_sites import const_tensor, find_sites, linear_parts
    from lora_fx.passes.onnx.freeze_base import saved_base
    from lora_fx.sites import SiteKind

    base = saved_base(model).get(name)
    if base is not None:
        return base[1]
    value = model.graph.initializers.get(name)
    if value is not None and value.const_value is not None and not value.is_graph_input():
        return np.array(value.const_value.numpy())
    module, _, param = name.rpartition(".")
    site = next((s for s in find_sites(model) if s.kind is SiteKind.LINEAR and s.name == module), None)
    parts = linear_parts(site.handle) if site is not None and param in ("weight", "bias") else None
    if parts is None or any(n.op_type != "Transpose" for n in parts.chain):
        return None
    if param == "bias":
        bias = const_tensor(parts.bias)
        return None if bias is None else np.array(bias.numpy()).reshape(-1)
    stored = const_tensor(parts.weight)
    if stored is None:
        return None
    arr = np.array(stored.numpy())
    return arr if parts.stored_out_in else arr.T
