"""ONNX Runtime sessions for models with adapter slots: one base, many adapters, switched per call.

``Session(path)`` picks the CUDA execution provider only when it really loads (ORT silently falls
back to CPU when CUDA libraries are missing, so the providers are read back from the session) and
reports the choice in ``session.providers`` and the log. ``add_adapter(name, file)`` checks the file
against the model once (base fingerprint, names, shapes, dtypes) and keeps it loaded;
``run(feeds, adapter=name)`` activates it for that call only, so threads may run different adapters
on one session at once; ``add_adapter(name, file, replace=True)`` swaps an adapter under a name while
other threads run it (each call keeps the adapter it started with). As in ONNX Runtime, an adapter may
set only some of the slots, the others keeping the model's defaults: ``add_adapter`` returns an
``AdapterInfo`` naming those sites (``default_sites``). Rank-0 (zero-size) and NaN/inf adapters are refused.
The slots are the inputs named as LoRA matrices or prefixes, and the parameters of modules trained in
full (``modules_to_save``: the SEQ_CLS head) the model's ``lora_fx.modules_to_save`` metadata lists;
these switch per call like the others, each adapter with its own head.

bfloat16 inputs and outputs are ml_dtypes.bfloat16 arrays (feeds may also be torch bfloat16 tensors), passed to
ONNX Runtime as OrtValues, since its numpy interface has no bfloat16; a float32 feed for a bfloat16 input is refused
as other lossy casts are. ORT's CPU provider has bfloat16 kernels for few ops (not Mul, not MatMul): a model it
cannot load for that reason is refused with ``ModelLoadError`` saying so and naming the ways out.

On CPU an adapter is a ``LoraAdapter`` activated with ``RunOptions.add_active_adapter``. On CUDA the
Python ``LoraAdapter.Load`` takes no allocator, so ORT would copy the adapter host-to-device on every
run: instead the tensors are copied to the device once, at ``add_adapter``, and bound with
IOBinding on each call. (The CUDA path runs only where a CUDA GPU is present; the test suite
exercises the CPU path.)
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_fx.errors import AdapterError, ConfigError, ModelLoadError, ort_message

log = logging.getLogger("lora_fx.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
# DequantizeLinear+MatMul becomes MatMulNBits; its default accuracy level 4 quantizes the activations
# to int8, so the served model would not compute what was trained. 0 keeps them float.
_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


@dataclass
class _Input:
    """A model input as ONNX Runtime declares it: numpy dtype name and shape (None or a name: free)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None


def _is_slot(name: str) -> bool:
    from lora_fx.onnx_adapter import is_slot_name

    return is_slot_name(name)


_CUDA_USABLE: bool | None = None


def _cuda_usable() -> bool:
    """Whether a CUDA driver is present at all. Probing ORT's CUDA provider without one makes ORT
    print a page of load errors for every session, so machines without a driver skip the probe."""
    global _CUDA_USABLE
    if _CUDA_USABLE is None:
        import ctypes

        try:
            ctypes.CDLL("libcuda.so.1")
            _CUDA_USABLE = True
        except OSError:
            _CUDA_USABLE = False
            log.info("no CUDA driver (libcuda.so.1) on this machine: ONNX Runtime runs on the CPU")
    return _CUDA_USABLE


@dataclass(frozen=True)
class AdapterInfo:
    """What ``Session.add_adapter`` registered.

    ``sites``: the sites whose slots the adapter sets, and the modules trained in full (``modules_to_save``,
    ``classifier``) whose head it brings. ``default_sites``: the sites and modules with slots it leaves
    alone. As in ONNX Runtime, where an active adapter overrides only the inputs it names, those run
    with the model's own initializer: zeros in a model exported by lora-fx with adapter slots (the base
    model at that site), the exported prefixes at a prefix slot, the base head at a module trained in
    full (what PEFT runs for an adapter without that module in its ``modules_to_save``). A partial
    adapter is legitimate (one trained on q and v, served by a model with q, k and v slots), so it is
    registered, not refused; check ``default_sites`` where every site should be covered.
    """

    name: str
    path: Path
    sites: list[str]
    default_sites: list[str]


@dataclass
class _Loaded:
    path: Path
    host: Any  # onnxruntime.LoraAdapter (CPU path)
    device: dict[str, Any] | None  # name -> device-resident OrtValue (CUDA path)
    info: AdapterInfo


class Session:
    """An ONNX Runtime session over a model exported with adapter slots (or any ONNX model).

    ``providers``: ``None`` chooses CUDA when it loads, else CPU; or pass a list to force one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        *,
        session_options: Any = None,
        device_id: int = 0,
    ) -> None:
        import onnxruntime as ort

        from lora_fx.passes.onnx.lora_layout import FINGERPRINT_KEY

        self.path = Path(path)
        if self.path.is_dir():
            raise ModelLoadError(f"{self.path} is a directory; Session takes the .onnx model file (adapters, such as a PEFT "
                                 "directory, go to add_adapter)")
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such ONNX model file")
        options = session_options or ort.SessionOptions()
        if session_options is None:
            # ORT warns once per adapter slot that an initializer is also an input: that is the design.
            options.log_severity_level = 3
        if not _has_config_entry(options, _ACCURACY_LEVEL):
            # Also into the caller's own options (set for threads, say): the numerics must stay the trained ones.
            options.add_session_config_entry(_ACCURACY_LEVEL, "0")
        self.device_id = device_id
        self._run_log_level = _run_log_level(options, session_options is not None)
        self._session = self._create(ort, options, providers)
        self._saved = self._read_saved()
        self.providers: list[str] = list(self._session.get_providers())
        self.on_cuda = self.providers[0] == CUDA
        log.info("lora_fx.runtime.Session(%s): providers %s", self.path.name, ", ".join(self.providers))
        _warn_if_not_loaded(providers, self.providers)
        self.slots = self._read_slots()
        self._inputs = {i.name: _Input(i.name, _ORT_TYPES.get(i.type, i.type), _dims(i.shape))
                        for i in self._session.get_inputs() if not self._is_slot(i.name)}
        self.inputs = list(self._inputs)
        self.outputs = [o.name for o in self._session.get_outputs()]
        self._bf16_outputs = {o.name for o in self._session.get_outputs() if o.type == "tensor(bfloat16)"}
        self.fingerprint: str | None = self._session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
        self._fingerprints = self._read_fingerprints()
        self._adapters: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def _create(self, ort: Any, options: Any, providers: Sequence[str] | None) -> Any:
        try:
            if providers is not None:
                return ort.InferenceSession(str(self.path), options, providers=list(providers))
            if CUDA in ort.get_available_providers() and _cuda_usable():
                try:
                    session = ort.InferenceSession(str(self.path), options, providers=[(CUDA, {"device_id": self.device_id}), CPU])
                    if session.get_providers()[0] == CUDA:
                        return session
                    log.info("CUDAExecutionProvider is built in but did not load (no GPU or CUDA libraries); using CPU")
                except Exception as exc:  # a broken CUDA install must not stop CPU inference
                    log.info("CUDAExecutionProvider failed to start (%s); using CPU", str(exc).splitlines()[0] if str(exc) else exc)
            return ort.InferenceSession(str(self.path), options, providers=[CPU])
        except ModelLoadError:
            raise
        except Exception as exc:
            message = ort_message(exc)
            raise ModelLoadError(f"ONNX Runtime could not load {self.path}: {message}{_bfloat16_hint(self.path, message)}") from None

    def _read_saved(self) -> dict[str, str]:
        """``{parameter name: module}`` of the head slots the model's metadata lists."""
        from lora_fx.onnx_adapter import read_saved

        try:
            return read_saved(self._session.get_modelmeta().custom_metadata_map)
        except AdapterError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None

    def _read_fingerprints(self) -> tuple[str, ...]:
        """The base fingerprints an adapter may carry: the model's own, and for head slots those of an export of
        the same base without them (``onnx_adapter.model_fingerprints``)."""
        from lora_fx.onnx_adapter import model_fingerprints

        try:
            return model_fingerprints(self._session.get_modelmeta().custom_metadata_map)
        except AdapterError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None

    def _is_slot(self, name: str) -> bool:
        return _is_slot(name) or name in self._saved

    def _read_slots(self) -> dict[str, Any]:
        from lora_fx.onnx_adapter import Slot

        slots = {}
        # ORT lists inputs that have an initializer (the slots) apart from the required inputs.
        for inp in list(self._session.get_inputs()) + list(self._session.get_overridable_initializers()):
            if self._is_slot(inp.name):
                dims = tuple(d if isinstance(d, int) else None for d in inp.shape)
                slots[inp.name] = Slot(_ORT_TYPES.get(inp.type, inp.type), dims, self._saved.get(inp.name))
        return slots

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        with self._lock:  # a snapshot: another thread may be adding one
            return sorted(self._adapters)

    @property
    def slot_sites(self) -> list[str]:
        """The sites the model has adapter slots for, and the modules trained in full it has head slots for."""
        from lora_fx.onnx_adapter import slot_site

        return sorted({slot_site(n, self.slots) for n in self.slots})

    def adapter_info(self, name: str) -> AdapterInfo:
        """What the adapter registered under ``name`` covers (as ``add_adapter`` returned it)."""
        return self._get(name).info

    def add_adapter(self, name: str, path: str | os.PathLike, *, replace: bool = False) -> AdapterInfo:
        """Register the adapter at ``path`` under ``name`` (checked once, kept loaded): an ``.onnx_adapter`` file, or a
        PEFT LoRA adapter directory, converted to the slots' layout and dtypes on the way (``read_adapter_for``).

        Refused: a file for another base, with names, shapes or dtypes the slots do not take, with
        zero-size (rank-0) tensors, or with NaN/inf values (``read_onnx_adapter``). Returns an
        ``AdapterInfo`` whose ``default_sites`` lists the sites the adapter leaves at the model's default
        (ONNX Runtime's semantics: only the named inputs are overridden); it is logged at INFO level too.

        ``replace=True`` swaps the adapter registered under ``name`` in one step: calls already running
        finish with the old one, later calls get the new one, and no call finds the name missing (as
        it would between ``remove_adapter`` and ``add_adapter``). A refused file leaves the old one.
        """
        import onnxruntime as ort

        from lora_fx.onnx_adapter import ort_value, read_adapter_for

        if not isinstance(name, str) or not name:
            # run(adapter=None) means the base model: a non-string name could never be asked for.
            raise AdapterError(f"adapter names are non-empty strings, got {name!r}")
        if not self.slots:
            raise AdapterError(f"{self.path.name} has no adapter slots; export it with mode='adapters' (CLI: lora-fx export --adapters)")
        path = Path(path)
        adapter = read_adapter_for(path, self.slots, self._fingerprints, where=self.path.name)
        try:
            host = _private_lora_adapter(ort, adapter.tensors)
        except Exception as exc:
            raise AdapterError(f"ONNX Runtime could not load {path}: {ort_message(exc)}; copy or export the adapter again") from None
        device = None
        if self.on_cuda:
            # Resident on the GPU from now on: a switch binds these, nothing crosses the bus per call.
            device = {k: ort_value(v, "cuda", self.device_id) for k, v in adapter.tensors.items()}
        from lora_fx.onnx_adapter import slot_site

        covered = sorted({slot_site(n, self.slots) for n in adapter.tensors})
        info = AdapterInfo(name, path, covered, sorted(set(self.slot_sites) - set(covered)))
        with self._lock:
            if name in self._adapters and not replace:
                raise AdapterError(f"an adapter named {name!r} is already registered ({self._adapters[name].path}); add_adapter({name!r}, path, replace=True) swaps it")
            self._adapters[name] = _Loaded(path, host, device, info)
        log.info("adapter %r registered from %s (%d sites)", name, path, len(covered))
        if info.default_sites:
            log.info("adapter %r leaves %d of %d sites at the model's default: %s", name, len(info.default_sites),
                     len(self.slot_sites), ", ".join(info.default_sites))
        return info

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            removed = self._adapters.pop(name, None)
        if removed is None:
            raise AdapterError(f"no adapter named {name!r}; registered: {', '.join(self.adapters) or 'none'}")

    def _get(self, name: str) -> _Loaded:
        loaded = self._adapters.get(name)
        if loaded is None:
            raise AdapterError(f"no adapter named {name!r} is registered; registered: {', '.join(self.adapters) or 'none'} (add it with add_adapter)")
        return loaded

    # ---- running --------------------------------------------------------------------------------
    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = sorted(set(feeds) - set(self.inputs))
        if unknown:
            slots = [u for u in unknown if self._is_slot(u)]
            if slots:
                raise ConfigError(f"{slots[0]} is an adapter slot; pass adapters with add_adapter + run(adapter=...), not as feeds")
            raise ConfigError(f"unknown inputs {unknown}; {self.path.name} takes {self.inputs}")
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise ConfigError(f"missing inputs {missing}; {self.path.name} takes {self.inputs}")
        arrays = {k: self._check_feed(self._inputs[k], v) for k, v in feeds.items()}
        self._check_named_dims(arrays)
        return arrays

    def _check_named_dims(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Inputs sharing a dim name (``input_ids`` and ``attention_mask``: batch, sequence) must agree on
        it; ORT would fail deep inside a Reshape instead, naming a node the user never wrote."""
        seen: dict[str, tuple[str, int]] = {}
        for name, arr in arrays.items():
            for axis, dim in enumerate(self._inputs[name].shape or ()):
                if not isinstance(dim, str):
                    continue
                first = seen.setdefault(dim, (name, arr.shape[axis]))
                if first[1] != arr.shape[axis]:
                    raise ConfigError(
                        f"input {name!r} is {arr.shape} and {first[0]!r} is {arrays[first[0]].shape}, but {self.path.name} "
                        f"needs them equal along dim {dim!r}; pass inputs of one batch (same batch and sequence sizes)"
                    )

    def _check_feed(self, spec: _Input, value: Any) -> np.ndarray:
        """One feed as the array the model takes, or a refusal naming the input, what it got and the fix.

        Lists take the input's dtype; arrays are cast only where nothing is lost (int32 ids or a bool
        mask for int64 inputs); ORT's own refusals name neither the input nor the way out. A bfloat16 input takes
        ml_dtypes.bfloat16 arrays, torch bfloat16 tensors, and the bare 2-byte values an .npz keeps of bfloat16."""
        want = _numpy_dtype(spec.dtype)
        if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
            value = _tensor_to_numpy(value)
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value, dtype=want)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"input {spec.name!r} is not an array ({exc}); {self.path.name} takes {spec.dtype}") from None
        if not value.dtype.isnative:
            # ORT reads the bytes as native order: a big-endian array (an .npz from another machine, '>f4')
            # would run as garbage, silently.
            value = value.astype(value.dtype.newbyteorder("="))
        if spec.dtype == "bfloat16" and value.dtype.kind == "V" and value.dtype.itemsize == 2 and value.dtype.names is None:
            # np.save / np.savez store ml_dtypes' bfloat16 as bare 2-byte values ('|V2'): an .npz of bfloat16
            # feeds (lora-fx run --inputs) reads back so.
            value = value.view(want)
        if want is not None and value.dtype.name != spec.dtype:
            if not np.can_cast(value.dtype, want, casting="safe"):
                module = "ml_dtypes" if spec.dtype == "bfloat16" else "np"
                raise ConfigError(
                    f"input {spec.name!r} is {value.dtype.name} but {self.path.name} takes {spec.dtype}; "
                    f"pass {spec.name}.astype({module}.{spec.dtype})"
                )
            value = value.astype(want)
        if spec.shape is not None:
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
            if value.ndim != len(spec.shape) or any(value.shape[i] != d for i, d in fixed):
                want = tuple(d if d is not None else "?" for d in spec.shape)
                raise ConfigError(f"input {spec.name!r} has shape {value.shape} but {self.path.name} takes {want} (names are free dims)")
        return value

    def _check_outputs(self, output_names: str | Sequence[str] | None) -> list[str] | None:
        if output_names is None:
            return None
        names = [output_names] if isinstance(output_names, str) else list(output_names)  # a str is one name, not letters
        unknown = [n for n in names if n not in self.outputs]
        if unknown or not names:
            raise ConfigError(f"unknown output names {unknown}; {self.path.name} has outputs {self.outputs}")
        return names

    def run(
        self,
        feeds: Mapping[str, Any],
        adapter: str | Sequence[str | None] | None = None,
        output_names: str | Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Run with ``adapter`` active for this call only (``None``: the base model); ``output_names``
        (one name or a list) selects outputs, in that order. Feeds are arrays, lists or torch tensors.

        ``adapter`` may also be a list with one entry per batch row (an adapter name, or ``None`` for the
        base model): a mixed-adapter batch, as PEFT's ``adapter_names``. ONNX Runtime activates one adapter
        per run, so the rows of each adapter run as one call and the outputs come back in the rows' order."""
        feeds = self._check_feeds(feeds)
        names = self._check_outputs(output_names)
        if adapter is not None and not isinstance(adapter, str):
            return self._run_mixed(feeds, list(adapter), names)
        return self._run_one(feeds, adapter, names)

    def _run_one(self, feeds: dict[str, np.ndarray], adapter: str | None, names: list[str] | None) -> list[np.ndarray]:
        import onnxruntime as ort

        loaded = self._get(adapter) if adapter is not None else None
        try:
            options = ort.RunOptions()
            if self._run_log_level is not None:
                options.log_severity_level = self._run_log_level
            if self.on_cuda:
                return self._run_bound(feeds, loaded, names, options)
            if loaded is not None:
                options.add_active_adapter(loaded.host)
            if self._takes_bfloat16(feeds, names):
                from lora_fx.onnx_adapter import ort_value, ort_value_to_numpy

                # ORT's numpy interface has no bfloat16, in or out: such runs go through OrtValues.
                values = self._session.run_with_ort_values(names or self.outputs, {k: ort_value(v) for k, v in feeds.items()}, options)
                return [ort_value_to_numpy(v) for v in values]
            return self._session.run(names, feeds, options)
        except Exception as exc:
            if isinstance(exc, (AdapterError, ConfigError)):
                raise
            raise ConfigError(f"ONNX Runtime refused the run ({self.path.name}, adapter {adapter!r}): {ort_message(exc)}") from None

    def _batch_inputs(self, feeds: Mapping[str, np.ndarray], rows: int) -> list[str]:
        """The inputs whose first axis is the batch: those whose first axis is free (named). Exporters do not always
        give one name to the batch of every input (torch.export names ``input_ids``'s and ``attention_mask``'s
        apart when it cannot prove them equal), so the sizes decide: each must have a row per adapter entry.
        Fixed-shape inputs (a merged decoder's ``use_cache_branch``) are whole in every call."""
        firsts = {name: (spec.shape or (None,))[0] for name, spec in self._inputs.items() if spec.shape != ()}
        batched = [k for k, d in firsts.items() if isinstance(d, str)]
        unknown = [k for k, d in firsts.items() if d is None]  # might be the batch, or not
        if not batched or unknown:
            found = ", ".join(f"{k}: {v!r}" for k, v in firsts.items()) or "no inputs"
            raise ConfigError(
                f"a per-row adapter list needs the batch as the first, free axis of the inputs; {self.path.name}'s "
                f"first axes are {found}. Run each adapter's rows as its own call instead"
            )
        wrong = {k: feeds[k].shape[0] for k in batched if feeds[k].shape[0] != rows}
        if wrong:
            raise ConfigError(
                f"the adapter list has {rows} entries but the batch has "
                f"{', '.join(f'{n} rows ({k}, axis 0)' for k, n in wrong.items())}; give one adapter name (or None) per row"
            )
        return batched

    def _run_mixed(self, feeds: dict[str, np.ndarray], adapters: list[str | None], names: list[str] | None) -> list[np.ndarray]:
        bad = [a for a in adapters if a is not None and not isinstance(a, str)]
        if bad:
            raise ConfigError(f"adapter list entries are names or None, not {type(bad[0]).__name__} ({bad[0]!r})")
        for name in dict.fromkeys(a for a in adapters if a is not None):
            self._get(name)  # every name is known before any call runs
        batched = self._batch_inputs(feeds, len(adapters))
        groups: dict[str | None, np.ndarray] = {}
        for adapter in dict.fromkeys(adapters):
            groups[adapter] = np.array([i for i, a in enumerate(adapters) if a == adapter])
        if len(groups) == 1:
            return self._run_one(feeds, adapters[0] if adapters else None, names)
        results = {a: self._run_one({k: (v[rows] if k in batched else v) for k, v in feeds.items()}, a, names)
                   for a, rows in groups.items()}
        out_names = names or self.outputs
        merged = []
        for i, out_name in enumerate(out_names):
            parts = {a: r[i] for a, r in results.items()}
            if any(p.ndim == 0 or p.shape[0] != len(groups[a]) for a, p in parts.items()):
                raise ConfigError(
                    f"output {out_name!r} does not have the batch as its first axis (shapes "
                    f"{', '.join(str(p.shape) for p in parts.values())} for {', '.join(str(len(r)) for r in groups.values())} rows), "
                    "so the rows of a mixed-adapter batch cannot be put back in order; run each adapter's rows as its own call"
                )
            first = next(iter(parts.values()))
            rest = {p.shape[1:] for p in parts.values()}
            if len(rest) != 1:
                raise ConfigError(f"output {out_name!r} has shapes {sorted(rest)} past the batch axis in different adapters' rows; "
                                  "run each adapter's rows as its own call")
            out = np.empty((len(adapters), *first.shape[1:]), dtype=first.dtype)
            for a, p in parts.items():
                out[groups[a]] = p
            merged.append(out)
        return merged

    def _takes_bfloat16(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None) -> bool:
        from lora_fx.onnx_adapter import is_bfloat16

        return any(is_bfloat16(v.dtype) for v in feeds.values()) or bool(self._bf16_outputs & set(output_names or self.outputs))

    # Where ``_run_bound`` puts the outputs; the tests run it on the CPU.
    _device = "cuda"

    def _run_bound(self, feeds: dict[str, np.ndarray], loaded: _Loaded | None, output_names: Sequence[str] | None,
                   options: Any = None) -> list[np.ndarray]:
        from lora_fx.onnx_adapter import is_bfloat16, ort_value, ort_value_to_numpy

        binding = self._session.io_binding()
        bound = []  # the OrtValues of bfloat16 feeds, alive until the run is done
        for k, v in feeds.items():
            if is_bfloat16(v.dtype):
                bound.append(ort_value(v))
                binding.bind_ortvalue_input(k, bound[-1])
            else:
                binding.bind_cpu_input(k, v)
        if loaded is not None and loaded.device is not None:
            for k, v in loaded.device.items():
                binding.bind_ortvalue_input(k, v)
        names = output_names or self.outputs
        # copy_outputs_to_cpu makes numpy arrays, which have no bfloat16: with a bfloat16 output all land on the
        # host (where copy_outputs_to_cpu would have copied them anyway) and are read as OrtValues.
        host = bool(self._bf16_outputs & set(names))
        for name in names:
            binding.bind_output(name, "cpu" if host else self._device, 0 if host else self.device_id)
        self._session.run_with_iobinding(binding, options)
        if not host:
            return binding.copy_outputs_to_cpu()
        return [ort_value_to_numpy(v) for v in binding.get_outputs()]

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, providers={self.providers}, adapters={self.adapters})"


def _private_lora_adapter(ort: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    """A ``LoraAdapter`` over a private copy of the tensors ``add_adapter`` checked.

    ``LoraAdapter.Load`` memory-maps its file: over the user's file, rewriting it in place (``cp``) would
    change a registered adapter behind the checks (another base, another shape), and truncating it would
    kill the process with SIGBUS on the next run. The copy is unlinked once mapped (Linux keeps the map).
    """
    import tempfile

    from lora_fx.onnx_adapter import SUFFIX, export_tensors

    fd, tmp = tempfile.mkstemp(prefix="lora_fx-", suffix=SUFFIX)
    os.close(fd)
    try:
        export_tensors(tmp, tensors)
        host = ort.LoraAdapter()
        host.Load(tmp)
    finally:
        try:
            os.unlink(tmp)
        except OSError:  # where a mapped file cannot be unlinked (Windows) it stays in the temp folder
            pass
    return host


_NUMPY_NAMES = {"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"}


def _numpy_dtype(name: str) -> Any:
    """The numpy dtype of an input type name from ``_ORT_TYPES`` (bfloat16: ml_dtypes'); None for the others,
    which are passed to ONNX Runtime unchecked."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name) if name in _NUMPY_NAMES else None


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a numpy array on the host; bfloat16, which ``Tensor.numpy`` refuses, as ml_dtypes.bfloat16."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    import ml_dtypes

    return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


def _bfloat16_hint(path: Path, message: str) -> str:
    """For ORT's "no kernel" refusal of a model that computes in bfloat16: why, and the ways out ("" otherwise).
    ORT's CPU provider has bfloat16 kernels for few ops (not Mul, not MatMul), so nearly every bfloat16 export
    is refused there, naming only an op and a node."""
    found = _NO_KERNEL.search(message)
    if found is None or not _has_bfloat16(path):
        return ""
    op, node = found.group(1), found.group(3)
    return (f". The model computes in bfloat16, and ONNX Runtime's CPU execution provider has no bfloat16 kernel for "
            f"{op} (node {node}): run it with the CUDA execution provider (onnxruntime-gpu on a GPU), or export the "
            "model in float32 or float16; lora_fx still rewrites and trains the bfloat16 file (training runs in torch)")


def _has_bfloat16(path: Path) -> bool:
    """Whether the model's inputs, outputs or initializers are bfloat16 (its weights are not read)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # unreadable by onnx: no hint, ORT's own message stands
        return False
    bf16 = onnx.TensorProto.BFLOAT16
    values = list(graph.input) + list(graph.output)
    return (any(v.type.tensor_type.elem_type == bf16 for v in values)
            or any(t.data_type == bf16 for t in graph.initializer))


def _dims(shape: Any) -> tuple[int | str | None, ...] | None:
    """ORT's declared shape: ints fixed, names or None free; None where the rank itself is unknown."""
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, str)) or d is None else None for d in shape)


# ORT's log_severity_level: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal; -1 (unset) falls back to the
# session's level for a run (RunOptions) and to the environment's, warning, for a session (SessionOptions).
_FATAL = 4
_ERROR = 3


def _run_log_level(options: Any, callers: bool) -> int | None:
    """The ``RunOptions.log_severity_level`` for runs, or None to leave runs at the session's level.

    A failed run makes ORT log an ERROR line ("[E:onnxruntime:, sequential_executor.cc ... ExecuteKernel]") on
    the C-level stderr, and ``run`` raises a ConfigError carrying the same message: printed twice, the first
    in red before lora_fx's own. Runs therefore log FATAL only. Nothing a user needs is lost: at the
    session's own level (ERROR, which Session sets where it makes the options) warnings were not
    printed anyway, and what a run logs as an error comes back in the exception. The knob is per run
    (RunOptions), not per session: the session's level still shows ORT's messages while loading, and
    lora_fx's own log lines (providers chosen, a provider that did not load) go through Python's logging,
    untouched. A caller's options asking for more than errors (0-2: debugging) keep their level for runs.
    """
    level = options.log_severity_level
    if callers and 0 <= level < _ERROR:
        return None
    return _FATAL


def _has_config_entry(options: Any, key: str) -> bool:
    try:
        options.get_session_config_entry(key)
        return True
    except Exception:  # ORT raises RuntimeError for an entry that is not set
        return False


def _warn_if_not_loaded(asked: Sequence[Any] | None, got: Sequence[str]) -> None:
    """ORT silently drops a provider it cannot load (no GPU, missing CUDA libraries): say so."""
    names = [p[0] if isinstance(p, tuple) else p for p in asked or []]
    dropped = [n for n in names if n not in got]
    if dropped:
        log.warning("ONNX Runtime could not load %s here; running on %s", ", ".join(dropped), ", ".join(got))
