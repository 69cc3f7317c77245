"""ONNX Runtime sessions for models with adapter slots: one base, many adapters, switched per call.

``Session(path)`` picks the CUDA execution provider only when it really loads (ORT silently falls
back to CPU when CUDA libraries are missing, so the providers are read back from the session) and
reports the choice in ``session.providers`` and the log. ``add_adapter(name, file)`` checks the file
against the model once (base fingerprint, names, shapes, dtypes) and keeps it loaded;
``run(feeds, adapter=name)`` activates it for that call only, so threads may run different adapters
on one session at once.

On CPU an adapter is a ``LoraAdapter`` activated with ``RunOptions.add_active_adapter``. On CUDA the
Python ``LoraAdapter.Load`` takes no allocator, so ORT would copy the adapter host-to-device on every
run: instead the tensors are copied to the device once, at ``add_adapter``, and bound with
IOBinding on each call. (The CUDA path runs only where a CUDA GPU is present; the test suite
exercises the CPU path.)
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_fx.errors import AdapterError, ConfigError, ModelLoadError

log = logging.getLogger("lora_fx.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
}


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


@dataclass
class _Loaded:
    path: Path
    host: Any  # onnxruntime.LoraAdapter (CPU path)
    device: dict[str, Any] | None  # name -> device-resident OrtValue (CUDA path)
    sites: list[str]


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
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such ONNX model file")
        options = session_options or ort.SessionOptions()
        if session_options is None:
            # ORT warns once per adapter slot that an initializer is also an input: that is the design.
            options.log_severity_level = 3
            # DequantizeLinear+MatMul becomes MatMulNBits; its default accuracy level 4 quantizes the
            # activations to int8, so the served model would not compute what was trained. 0 keeps them float.
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.device_id = device_id
        self._session = self._create(ort, options, providers)
        self.providers: list[str] = list(self._session.get_providers())
        self.on_cuda = self.providers[0] == CUDA
        log.info("lora_fx.runtime.Session(%s): providers %s", self.path.name, ", ".join(self.providers))
        self.slots = self._read_slots()
        self.inputs = [i.name for i in self._session.get_inputs() if not _is_slot(i.name)]
        self.outputs = [o.name for o in self._session.get_outputs()]
        self.fingerprint: str | None = self._session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
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
            raise ModelLoadError(f"ONNX Runtime could not load {self.path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None

    def _read_slots(self) -> dict[str, Any]:
        from lora_fx.onnx_adapter import Slot

        slots = {}
        # ORT lists inputs that have an initializer (the slots) apart from the required inputs.
        for inp in list(self._session.get_inputs()) + list(self._session.get_overridable_initializers()):
            if _is_slot(inp.name):
                dims = tuple(d if isinstance(d, int) else None for d in inp.shape)
                slots[inp.name] = Slot(_ORT_TYPES.get(inp.type, inp.type), dims)
        return slots

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Register the ``.onnx_adapter`` at ``path`` under ``name`` (checked once, kept loaded)."""
        import onnxruntime as ort

        from lora_fx.onnx_adapter import check_fits, read_onnx_adapter

        if not self.slots:
            raise AdapterError(f"{self.path.name} has no adapter slots; export it with mode='adapters' (CLI: lora-fx export --adapters)")
        path = Path(path)
        adapter = read_onnx_adapter(path)
        check_fits(adapter, self.slots, self.fingerprint, where=self.path.name)
        host = ort.LoraAdapter()
        try:
            host.Load(str(path))
        except Exception as exc:
            raise AdapterError(f"ONNX Runtime could not load {path}: {exc}") from None
        device = None
        if self.on_cuda:
            # Resident on the GPU from now on: a switch binds these, nothing crosses the bus per call.
            device = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", self.device_id) for k, v in adapter.tensors.items()}
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already registered ({self._adapters[name].path}); remove_adapter({name!r}) first")
            self._adapters[name] = _Loaded(path, host, device, adapter.site_names())
        log.info("adapter %r registered from %s (%d sites)", name, path, len(adapter.site_names()))

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
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
            slots = [u for u in unknown if _is_slot(u)]
            if slots:
                raise ConfigError(f"{slots[0]} is an adapter slot; pass adapters with add_adapter + run(adapter=...), not as feeds")
            raise ConfigError(f"unknown inputs {unknown}; {self.path.name} takes {self.inputs}")
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise ConfigError(f"missing inputs {missing}; {self.path.name} takes {self.inputs}")
        return {k: np.asarray(v) for k, v in feeds.items()}

    def run(self, feeds: Mapping[str, Any], adapter: str | None = None, output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run with ``adapter`` active for this call only (``None``: the base model)."""
        import onnxruntime as ort

        feeds = self._check_feeds(feeds)
        loaded = self._get(adapter) if adapter is not None else None
        try:
            if self.on_cuda:
                return self._run_bound(feeds, loaded, output_names)
            options = ort.RunOptions()
            if loaded is not None:
                options.add_active_adapter(loaded.host)
            return self._session.run(list(output_names) if output_names else None, feeds, options)
        except Exception as exc:
            if isinstance(exc, (AdapterError, ConfigError)):
                raise
            raise ConfigError(f"ONNX Runtime refused the run: {str(exc).splitlines()[0] if str(exc) else exc}") from None

    def _run_bound(self, feeds: dict[str, np.ndarray], loaded: _Loaded | None, output_names: Sequence[str] | None) -> list[np.ndarray]:
        binding = self._session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        if loaded is not None and loaded.device is not None:
            for k, v in loaded.device.items():
                binding.bind_ortvalue_input(k, v)
        for name in output_names or self.outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, providers={self.providers}, adapters={self.adapters})"
