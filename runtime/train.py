"""The training loop shared by every front end: AdamW on adapter parameters only.

Gradient clipping, seeding, optional bf16 autocast, a progress bar on stderr, and the metrics of
the run returned as a ``TrainResult``. The model is switched to training mode (dropout on) for the
run and back to eval mode afterwards. A run whose loss, gradients or update stop being finite ends
with ``TrainingDivergedError`` at that step, the adapters as they were before its update.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx

from lora_fx.errors import AdapterError, ConfigError, TrainingDivergedError

Batch = dict[str, Any]


@dataclass
class TrainResult:
    """What a run did. ``losses``, ``grad_norms``, ``steps`` and ``tokens_seen`` cover every step the adapters
    have been trained, those of a resumed checkpoint included; ``resumed_from_step`` is the checkpoint's step
    (0 without one) and ``steps_this_run`` the steps this call trained; ``seconds`` is this call's time."""

    losses: list[float]
    steps: int
    seconds: float
    trainable_parameters: int
    tokens_seen: int = 0
    grad_norms: list[float] = field(default_factory=list)
    resumed_from_step: int = 0

    @property
    def steps_this_run(self) -> int:
        return self.steps - self.resumed_from_step

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        d["steps_this_run"] = self.steps_this_run
        return d


def _set_mode(model: Any, training: bool) -> None:
    if isinstance(model, fx.GraphModule):
        from lora_fx.passes.fx.set_training_mode import set_training_mode

        set_training_mode(model, training)
    elif hasattr(model, "set_training_mode"):
        model.set_training_mode(training)
    elif isinstance(model, torch.nn.Module):
        model.train(training)


def _input_names(module: torch.nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


class _Feeds:
    """What the model takes, checked on each batch before the forward: a missing input, a value that is no
    tensor, a wrong rank, fixed size or kind of dtype otherwise fail deep inside the graph ("mat1 and mat2
    shapes cannot be multiplied", "Expected tensor for argument #1 'indices'", a failed shape guard).

    ``specs``: input name -> (dtype or None, dims or None); a dim is an int (fixed) or a str (named: inputs
    with the same name must agree there). ``exact``: ONNX graphs take their declared dtype only; a torch
    graph takes any dtype of the same kind (int32 ids where it was captured with int64)."""

    def __init__(self, required: list[str], specs: dict[str, tuple[Any, Any]], what: str, exact: bool) -> None:
        self.required, self.specs, self.what, self.exact = required, specs, what, exact

    @classmethod
    def of(cls, model: Any, module: torch.nn.Module, names: set[str] | None) -> "_Feeds":
        if not isinstance(model, torch.nn.Module):  # an onnx_ir Model
            graph = model.graph
            inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
            return cls(list(inputs), {n: (_onnx_dtype(v), v.shape) for n, v in inputs.items()}, "graph input", True)
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return cls([], {}, "model input", False)
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        specs: dict[str, tuple[Any, Any]] = {}
        if isinstance(module, fx.GraphModule) and names is not None:
            # torch.export keeps the example inputs' dtypes and shapes (symbolic where dynamic) on the placeholders.
            holders = [n for n in module.graph.nodes if n.op == "placeholder"]
            if [h.target for h in holders] != list(params):
                holders = [h for h in holders if h.target in names] if all(h.target in names for h in holders) else []
            for h in holders:
                val = h.meta.get("val")
                if isinstance(val, torch.Tensor):
                    dims = tuple(_dim_name(d) for d in val.shape)
                    specs[str(h.target)] = (val.dtype, dims)
        return cls(required, specs, "model input", False)

    def describe(self) -> str:
        def one(name: str) -> str:
            dtype, dims = self.specs.get(name, (None, None))
            parts = [str(dtype).removeprefix("torch.")] if dtype is not None else []
            if dims is not None:
                parts.append("(" + ", ".join(str(d) for d in _plain_dims(dims)) + ")")
            return name + (f" ({', '.join(parts)})" if parts else "")

        names = list(dict.fromkeys([*self.required, *self.specs]))
        return ", ".join(one(n) for n in names)

    def check(self, batch: Batch, step: int) -> None:
        missing = [n for n in self.required if n not in batch]
        if missing:
            others = [k for k in batch if k not in self.required and k not in self.specs]
            raise ConfigError(
                f"batch {step + 1} lacks the {self.what}(s) {missing}; the model takes {self.describe()}"
                + (f"; the batch's keys {others} are none of them (they reach loss_fn only)" if others else "")
            )
        present = {n: batch[n] for n in self.specs if n in batch}
        for name, value in present.items():
            if not isinstance(value, torch.Tensor) and self.exact:  # ONNX graphs are also fed numpy arrays and lists
                import numpy as np

                from lora_fx.onnx_adapter import is_bfloat16

                value = present[name] = np.asarray(value)
                if is_bfloat16(value.dtype):  # ml_dtypes' bfloat16: numpy kind 'V', and torch.from_numpy refuses it
                    dtype = torch.bfloat16
                elif value.dtype.kind not in "biuf":
                    raw = value.dtype.kind == "V" and value.dtype.itemsize == 2 and value.dtype.names is None
                    hint = ("; an .npz keeps bfloat16 as bare 2-byte values: read them back with "
                            "<array>.view(ml_dtypes.bfloat16)") if raw else ""
                    raise ConfigError(f"batch {step + 1}: {name!r} holds {value.dtype} values; the {self.what} {name!r} "
                                      f"takes numbers ({self.describe()}){hint}")
                else:
                    dtype = torch.from_numpy(np.empty(0, value.dtype.newbyteorder("="))).dtype
            elif not isinstance(value, torch.Tensor):
                raise ConfigError(f"batch {step + 1}: {name!r} is {_what(value)}; the {self.what} {name!r} takes a "
                                  f"tensor ({self.describe()})")
            else:
                dtype = value.dtype
            want = self.specs[name][0]
            if want is None:
                continue
            if (dtype != want) if self.exact else (_dtype_kind(dtype) != _dtype_kind(want)):
                short = str(want).removeprefix("torch.")
                raise ConfigError(f"batch {step + 1}: {name!r} is {str(dtype).removeprefix('torch.')}, but the "
                                  f"{self.what} {name!r} is {short}: convert it (.to(torch.{short}))")
        check_feed_shapes({n: v for n, v in present.items() if self.specs[n][1] is not None},
                          {n: self.specs[n][1] for n in present}, step=step)


def _onnx_dtype(value: Any) -> torch.dtype | None:
    if value.dtype is None:
        return None
    from lora_fx.errors import UnsupportedError
    from lora_fx.runtime.onnx_ops.registry import torch_dtype

    try:
        return torch_dtype(value.dtype.value)
    except UnsupportedError:
        return None


def _dtype_kind(dtype: torch.dtype) -> str:
    return "floating" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def _dim_name(dim: Any) -> int | str:
    """An int for a fixed dim of a captured input; for a dynamic one its symbol (inputs sharing a symbol must
    agree there)."""
    if isinstance(dim, int):
        return dim
    return str(dim.node.expr) if hasattr(dim, "node") else str(dim)


def _plain_dims(dims: Any) -> list[int | str]:
    """Dims as a user reads them: onnx_ir's SymbolicDim as its name, torch's symbols as batch/seq by axis."""
    out: list[int | str] = []
    for axis, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str):  # a torch symbol
            out.append({0: "batch", 1: "seq"}.get(axis, d))
        else:
            out.append(getattr(d, "value", None) or "?")
    return out


def check_data_dtype(name: str, arr: Any, want: torch.dtype) -> None:
    """Refuse a data array whose values the graph input's dtype ``want`` cannot hold, before it is cast.

    As ``lora-fx run`` feeds (``runtime.ort.Session``), a cast happens only where nothing is lost, here judged
    on the values, since training data are whole arrays: integers that fit an integer input, 0/1 for a bool
    input, integers a floating input holds exactly. Floating data go into a floating input of any precision
    (rounded, as ``.to(dtype)`` rounds: float64 data of a float32 model, float32 data of a bfloat16 one); into an
    integer or bool input never (``torch`` would truncate 3.9 to 3, silently)."""
    import numpy as np

    from lora_fx.onnx_adapter import is_bfloat16

    arr = np.asarray(arr)
    floating = arr.dtype.kind == "f" or is_bfloat16(arr.dtype)
    short = str(want).removeprefix("torch.")
    module = "ml_dtypes" if want == torch.bfloat16 else "np"
    fix = f"store it as {short}: np.savez(..., {name}=<array>.astype({module}.{short}))"
    if want.is_floating_point:
        if floating or arr.size == 0:
            return
        exact = round(2 / torch.finfo(want).eps)  # 2**(mantissa bits + 1): every integer up to it is exact
        peak = int(np.abs(arr.astype(np.int64 if arr.dtype.kind != "u" else np.uint64)).max())
        if peak <= exact:
            return
        raise ConfigError(f"array {name!r} holds integers up to {peak}, but graph input {name!r} is {short}, which holds "
                          f"integers exactly only up to {exact}: casting would change them; {fix}, if that is meant")
    if floating:
        raise ConfigError(f"array {name!r} is {arr.dtype}, but graph input {name!r} takes {short}: casting would "
                          f"truncate the values (3.9 -> 3); {fix} (ids and masks are integers)")
    if arr.size == 0 or arr.dtype.kind == "b":
        return
    lo, hi = int(arr.min()), int(arr.max())
    low, high = (0, 1) if want == torch.bool else (int(torch.iinfo(want).min), int(torch.iinfo(want).max))
    if lo < low or hi > high:
        raise ConfigError(f"array {name!r} holds values from {lo} to {hi}, but graph input {name!r} is {short} "
                          f"({low}..{high}): casting would change them; fix the data")


def check_feed_shapes(arrays: dict[str, Any], inputs: dict[str, Any], batch_size: int | None = None,
                      *, step: int | None = None) -> None:
    """Each array has its input's rank and fixed dims, and dims the input shapes name alike (a sequence length
    shared by input_ids and attention_mask) agree. Torch would otherwise fail deep in the graph, naming an op
    the user never wrote.

    ``inputs``: name -> shape (an onnx_ir Shape, or a tuple of ints and names). ``batch_size`` None: each
    array is one batch, fed as it is (``train``'s batches; ``step`` numbers it in the message); an int: each
    array holds every example of a data file, cut into batches of that size later (``lora-fx train``)."""
    whole_data = batch_size is not None
    named: dict[str, tuple[str, int]] = {}

    def label(name: str) -> str:
        return f"array {name!r}" if whole_data or step is None else repr(name)

    where = "" if whole_data or step is None else f"batch {step + 1}: "
    for name, arr in arrays.items():
        shape = inputs[name]
        if shape is None:
            continue
        raw = tuple(shape)
        want = tuple(_plain_dims(raw)) if not all(isinstance(d, int) for d in raw) else raw
        if whole_data:
            way = "store it as (examples" + "".join(f", {d}" for d in want[1:]) + ")"
        else:
            way = "give it the shape (" + ", ".join(str(d) for d in want) + ")"
        if arr.ndim != len(want) or any(isinstance(d, int) and arr.shape[i] != d
                                        for i, d in enumerate(want) if i or not whole_data):
            raise ConfigError(f"{where}{label(name)} has shape {tuple(arr.shape)}, but graph input {name!r} is "
                              f"{want}: {way}")
        if whole_data and isinstance(want[0], int) and (batch_size != want[0] or len(arr) % want[0]):
            raise ConfigError(f"graph input {name!r} has a fixed batch of {want[0]}: use --batch-size {want[0]} and a "
                              f"multiple of {want[0]} examples (the data have {len(arr)})")
        for axis, dim in enumerate(raw):
            if (whole_data and axis == 0) or isinstance(dim, int):
                continue
            key = dim if isinstance(dim, str) else getattr(dim, "value", None)
            if key is None:
                continue
            first = named.setdefault(key, (name, arr.shape[axis]))
            if first[1] != arr.shape[axis]:
                shown = _plain_dims(raw)[axis]
                what = "arrays" if whole_data or step is None else "inputs"
                raise ConfigError(f"{where}{what} {first[0]!r} and {name!r} differ along the graph's dim {shown!r} "
                                  f"({first[1]} vs {arr.shape[axis]}); pad them to one length")


def _batches(source: Sequence[Batch] | Iterable[Batch] | Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    if callable(source) and not isinstance(source, (list, tuple)):
        return _epochs(source)
    if isinstance(source, Sequence):
        if len(source) == 0:
            raise ConfigError("batches is empty")
        return itertools.cycle(source)
    return iter(source)


def _epochs(make: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """The batches of ``make()``, called again for each epoch. An epoch without batches is refused: calling
    again would spin forever."""
    for epoch in itertools.count(1):
        got = make()
        if isinstance(got, (str, bytes, Mapping)) or not _iterable(got):
            raise ConfigError(f"batches() returned {_what(got)} in epoch {epoch}; the callable must return a fresh "
                              "iterable of batches (a list or generator of dicts) each time it is called")
        empty = True
        for batch in got:
            empty = False
            yield batch
        if empty:
            raise ConfigError(f"batches() returned no batches in epoch {epoch}; it must return a fresh iterable of "
                              "batches each time it is called (a generator is used up after one pass: return a new one)")


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _what(value: Any) -> str:
    """A value named for a message: its type, and the value itself when short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else f"a {type(value).__name__}"


def _check_arguments(batches: Any, loss_fn: Any, on_step: Any, checkpoint_dir: Any, checkpoint_every: Any,
                     resume: Any) -> None:
    """Refuse before any work what would otherwise fail inside the loop (a TypeError from itertools or the
    loss call) or only after the last step (a checkpoint_dir that is a file)."""
    if isinstance(batches, Mapping):
        raise ConfigError("batches is a single batch (a dict); pass a list of batches, e.g. [batch]")
    if batches is None or isinstance(batches, (str, bytes)) or not (callable(batches) or _iterable(batches)):
        raise ConfigError(f"batches must be a list of batches (dicts of model input name -> tensor, plus what loss_fn "
                          f"reads), an iterable of them, or a callable returning a fresh iterable per epoch; got "
                          f"{_what(batches)}")
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function loss_fn(outputs, batch) returning the scalar loss tensor (e.g. "
                          f"lora_fx.runtime.train.cross_entropy_on('logits')); got {_what(loss_fn)}")
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"on_step must be a function on_step(step, loss) or None; got {_what(on_step)}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral) or checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be an integer of at least 0 (0: only at the end), got {checkpoint_every!r}")
    if checkpoint_every and not checkpoint_dir:
        raise ConfigError("checkpoint_every needs checkpoint_dir: name the directory the checkpoints go to")
    if resume and not checkpoint_dir:
        raise ConfigError("resume=True needs checkpoint_dir: the directory of the run to continue")
    if checkpoint_dir:
        from lora_fx.files import check_output_dir

        if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
            raise ConfigError(f"checkpoint_dir {checkpoint_dir} is a file; name a folder (it is created)")
        check_output_dir(checkpoint_dir)


def _check_loss(loss: Any, step: int) -> None:
    """The loss must be one floating number autograd can go back from to the adapters."""
    want = "loss_fn must return a scalar floating torch tensor computed from the model's outputs"
    where = f"at step {step + 1}"
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"loss_fn returned {_what(loss)} {where}; {want} (e.g. F.cross_entropy(out['logits'], ...))")
    if not loss.dtype.is_floating_point:
        raise ConfigError(f"loss_fn returned a tensor of dtype {str(loss.dtype).removeprefix('torch.')} {where}; {want}: "
                          "integers (argmax, counts of correct labels) have no gradient")
    if loss.numel() != 1:
        raise ConfigError(f"loss_fn returned a tensor of shape {tuple(loss.shape)} {where}; {want}: reduce it to one "
                          "number (.mean() or .sum())")
    if not loss.requires_grad:
        raise ConfigError(f"loss_fn returned a tensor that does not depend on the model's outputs {where} (it needs no "
                          f"gradient: detached, .item() made into a tensor again, or computed from the batch alone); {want}")


# torch's words for an embedding (or index_select) lookup past its table; on CPU an IndexError.
_OUT_OF_RANGE = "index out of range in self"
# Ops that pass a tensor's values on unchanged: an embedding's ids reached through them are still a model input's.
_SAME_VALUES = {"view", "reshape", "_unsafe_view", "_to_copy", "to", "clone", "contiguous", "unsqueeze", "squeeze",
                "expand", "flatten", "alias", "long", "int"}


@dataclass
class _Table:
    """An embedding table of the model: its weight's name, its rows, and the model input whose values index it
    directly (None where the ids are computed, such as positions, or not traceable)."""

    name: str
    rows: int
    feed: str | None


def _forward(module: torch.nn.Module, inputs: Batch, step: int) -> Any:
    """``module(**inputs)``, with torch's bare IndexError of an out-of-range lookup said in the data's terms.

    The check costs nothing on a good step: the tables and the batch's ids are looked at only once torch has
    refused the lookup (checking every batch's ids against every table would be a device sync per step)."""
    try:
        return module(**inputs)
    except IndexError as exc:
        if _OUT_OF_RANGE not in str(exc):
            raise
        raise _out_of_range(module, inputs, step) from None


def _out_of_range(module: torch.nn.Module, inputs: Batch, step: int) -> ConfigError:
    """Which input holds ids its embedding table lacks, and the table's size; failing that, every table and the
    range of every integer input, so the user can match them."""
    tables = _embedding_tables(module)
    ranges = _integer_ranges(inputs)
    way = ("tokenize the data with the model's own tokenizer (another tokenizer's ids can run past this vocabulary), "
           "and check padding and special-token ids")
    for table in tables:
        if table.feed in ranges:
            lo, hi = ranges[table.feed]
            if lo < 0 or hi >= table.rows:
                bad = hi if hi >= table.rows else lo
                # input_ids index the vocabulary (Hugging Face's name); other inputs (token_type_ids) smaller tables.
                tokens = table.feed == "input_ids"
                return ConfigError(
                    f"batch {step + 1}: index out of range: {table.feed!r} holds the id {bad} (its values run from {lo} "
                    f"to {hi}), but it indexes the embedding {table.name} of {table.rows} rows"
                    + (f" (a vocabulary of {table.rows})" if tokens else "")
                    + f": ids must be in 0..{table.rows - 1}; "
                    + (way if tokens else f"check the data's {table.feed!r} values"))
    known = "; ".join(f"{t.name}: {t.rows} rows" + (f" (indexed by {t.feed!r})" if t.feed else "") for t in tables)
    seen = ", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in ranges.items())
    return ConfigError(
        f"batch {step + 1}: index out of range in the model's forward (torch: {_OUT_OF_RANGE!r}): an input holds an "
        f"id at or beyond the size of the table it indexes, or a negative one"
        + (f". The model's embedding tables: {known}" if known else "")
        + (f". The batch's integer inputs: {seen}" if seen else "")
        + f"; ids must be below the size of their table: {way}")


def _integer_ranges(inputs: Batch) -> dict[str, tuple[int, int]]:
    return {name: (int(value.min()), int(value.max())) for name, value in inputs.items()
            if isinstance(value, torch.Tensor) and value.numel() and not value.dtype.is_floating_point
            and not value.dtype.is_complex and value.dtype != torch.bool}


def _embedding_tables(module: torch.nn.Module) -> list[_Table]:
    """The embedding lookups of a captured graph (aten.embedding or F.embedding nodes), each with the input
    feeding it; of any other module, its nn.Embedding layers (their inputs unknown)."""
    if not isinstance(module, fx.GraphModule):
        return [_Table(name + ".weight", m.num_embeddings, None) for name, m in module.named_modules()
                if isinstance(m, torch.nn.Embedding)]
    tables = []
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.embedding.default,
                                                              torch.nn.functional.embedding):
            continue
        weight, ids = (node.args + (None, None))[:2]
        shape = _node_shape(module, weight)
        if shape:
            tables.append(_Table(_weight_name(module, weight), int(shape[0]), _input_of(ids)))
    return tables


def _weight_name(module: fx.GraphModule, node: fx.Node) -> str:
    """The name a user knows the table by: a weight tied to the output head (GPT-2's wte and lm_head) is
    captured under one of its names, not always the embedding's; the first registered is the embedding's."""
    if node.op != "get_attr":
        return str(node.target) if node.op == "placeholder" else node.name
    try:
        tensor = _attribute(module, str(node.target))
    except AttributeError:
        return str(node.target)
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p is tensor]
    return names[0] if names else str(node.target)


def _node_shape(module: fx.GraphModule, node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            return tuple(_attribute(module, str(node.target)).shape)
        except AttributeError:
            pass
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _attribute(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _input_of(node: Any) -> str | None:
    """The model input whose values reach ``node`` unchanged (through views and casts), if any."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return str(node.target)
        # aten overloads are named "view.default", call_method targets "view", torch functions "reshape".
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op not in ("call_function", "call_method") or not node.args or op not in _SAME_VALUES:
            return None
        node = node.args[0]
    return None


def _torch_module(model: Any) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        if isinstance(model, fx.GraphModule):
            _check_graph_has_adapters(model)
        if hasattr(model, "trainable_names"):  # perhaps an OnnxModule (import it only then: onnx_torch is heavy)
            from lora_fx.runtime.onnx_torch import OnnxModule

            if isinstance(model, OnnxModule):
                _check_no_slots(model._model)
        return model
    from lora_fx.api import _is_onnx

    if _is_onnx(model):
        from lora_fx.runtime.onnx_torch import trainable_module  # ONNX graphs train through torch

        _check_no_slots(model)
        return trainable_module(model)  # refuses a graph without adapters ("apply one first")
    raise ConfigError(f"train takes a rewritten GraphModule or ONNX model, got {type(model).__name__}")


def _check_graph_has_adapters(gm: fx.GraphModule) -> None:
    """A captured graph without LoRA or prefix parameters and without modules trained in full (``apply``
    forgotten) would fine-tune every base weight, and those are the tensors of the user's own nn.Module."""
    from lora_fx.passes.fx.freeze_base import is_adapter_parameter, saved_base

    if any(is_adapter_parameter(n) for n, _ in gm.named_parameters()) or saved_base(gm):
        return
    raise ConfigError(
        "the model has no adapter (no LoRA or prefix site, no modules_to_save): training it would change every base "
        "weight, which are the tensors of the nn.Module it was captured from. Apply a LoraConfig or PrefixConfig "
        "first: gm = lora_fx.apply(gm, lora_fx.LoraConfig(target_modules=[...]))"
    )


def _check_no_slots(model: Any) -> None:
    """A served export (``lora-fx export --adapters``) holds adapter slots: graph inputs whose initializers are
    the defaults ONNX Runtime runs without an adapter (LoRA's A and B both zero, so every gradient is zero), and
    what moved would change the file's "no adapter" run, which must stay the base model (``lora-fx export``
    refuses such a file the same way)."""
    from lora_fx.onnx_adapter import exposed_slots

    slots = exposed_slots(model)
    if slots:
        raise AdapterError(
            f"the model has adapter slots ({len(slots)}, e.g. {slots[0]!r}): it was exported for serving (lora-fx "
            "export --adapters), and its adapter initializers are the defaults run without an adapter (LoRA's are "
            "zero: every gradient would be zero), not weights to train. Train the rewritten model it was exported "
            "from (the file lora-fx rewrite or lora_fx.apply wrote), loading the adapter to continue into it first "
            "if needed: lora_fx.load_adapter(model, '<served>.adapters/<name>'), the PEFT folder export wrote"
        )


def train(
    model: Any,
    batches: Sequence[Batch] | Iterable[Batch] | Callable[[], Iterable[Batch]],
    loss_fn: Callable[[Any, Batch], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    seed: int | None = 0,
    bf16: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> TrainResult:
    """Train the adapter parameters of ``model`` for ``steps`` steps.

    ``batches``: a list (cycled), an iterable (one pass: a warning when it ends before ``steps``), or a
    callable returning a fresh iterable per epoch; each batch is a dict whose keys that name model inputs
    are passed to the model. Each batch is checked against what the model takes before its forward: the
    inputs a captured graph or an ONNX graph needs, their rank and fixed dims, dims they share, and their
    dtype (its kind for a captured graph, the declared dtype for an ONNX graph).
    ``loss_fn(outputs, batch)`` returns the loss: a scalar floating tensor computed from the outputs
    (anything else is refused, naming what it returned). Gradients are on inside train, even when called
    under ``torch.no_grad()``.
    ``checkpoint_dir``/``checkpoint_every``: save adapters, optimizer, step and RNG state every N
    steps (and at the end); ``resume=True`` continues from the checkpoint there, if any, on the
    same loss curve (the data must be the same; the first ``step`` batches are skipped). A checkpoint
    already past ``steps`` trains nothing more: a warning says so, the model holds the checkpoint's
    adapters, and the result counts ``steps_this_run`` apart from the ``steps`` trained in all.
    An ONNX model's trained adapters are written back into its initializers when train returns.

    A model with nothing to train as an adapter is refused before the first step: a captured graph without
    LoRA or prefix sites or modules_to_save (``ConfigError``: it would fine-tune the captured nn.Module's own
    weights; apply a LoraConfig or PrefixConfig first), an ONNX model without adapter initializers
    (``ConfigError``), and a served export with adapter slots (``AdapterError``; train the file it came from).
    Bad arguments (``batches``, ``loss_fn``, a ``checkpoint_dir`` that is a file) raise ``ConfigError``
    before the first step; a batch or loss that does not fit, at the step it comes in, before its update (ids
    past an embedding table too: the ``ConfigError`` names the input, the table and its size).

    Raises ``TrainingDivergedError`` (a FloatingPointError) at the first step whose loss or gradient
    norm is nan/inf or whose update would make an adapter weight non-finite (or overflows float32 in
    the optimizer, as a huge ``lr`` does); the adapters then keep their values from before that step.
    """
    _check_numbers(steps=steps, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   warmup_steps=warmup_steps, seed=seed)
    _check_arguments(batches, loss_fn, on_step, checkpoint_dir, checkpoint_every, resume)
    module = _torch_module(model)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: apply a LoraConfig (or PrefixConfig) first")
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    names = _input_names(module)
    feeds = _Feeds.of(model, module, names)
    source = _batches(batches)
    losses: list[float] = []
    norms: list[float] = []
    tokens = 0
    first_step = 0
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if resume:
        from lora_fx.runtime.checkpoint import find_checkpoint, load_checkpoint

        if find_checkpoint(checkpoint_dir) is not None:  # refuses a summary whose tensor file is missing
            state = load_checkpoint(checkpoint_dir, params=trained, optimizer=opt, scheduler=sched)
            first_step, losses, norms, tokens = state["step"], state["losses"], state["grad_norms"], state["tokens"]
            if first_step > steps:
                # As Hugging Face's Trainer does with a checkpoint past max_steps: train nothing more, and say so.
                warnings.warn(
                    f"the checkpoint in {checkpoint_dir} is already at step {first_step}, past the {steps} steps asked "
                    f"for: nothing was trained; the model holds the adapters of step {first_step}. Pass steps above "
                    f"{first_step} to train on, or another checkpoint_dir to start over",
                    stacklevel=2,
                )
            for _ in range(min(first_step, steps)):  # the data position of the interrupted run
                next(source, None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(first_step, steps), desc="train", file=sys.stderr, dynamic_ncols=True, leave=False)
    mode_target = model if isinstance(model, fx.GraphModule) else module
    # Where each step's update starts from: a diverging update is undone from here (one copy of the adapters).
    before = [torch.empty_like(p) for p in params]
    _set_mode(mode_target, True)
    start = time.perf_counter()
    try:
        for step in range(first_step, steps):
            try:
                batch = next(source)
            except StopIteration:
                if not losses:
                    raise ConfigError("batches yielded no batch; pass a list of batches (it is cycled), or a callable "
                                      "returning a fresh iterable per epoch") from None
                warnings.warn(f"batches ran out after step {step} of {steps}: an iterable is one pass; pass a list "
                              "(cycled) or a callable returning a fresh iterable per epoch to train all steps",
                              stacklevel=2)
                break
            if not isinstance(batch, Mapping):
                raise ConfigError(f"batch {step + 1} is {_what(batch)}; each batch must be a dict of model input "
                                  "name -> tensor (plus what loss_fn reads, such as labels)")
            feeds.check(batch, step)
            inputs = {k: v for k, v in batch.items() if names is None or k in names}
            # enable_grad: a caller's torch.no_grad() would otherwise leave the loss without a graph to train on.
            with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = _forward(module, inputs, step)
                loss = loss_fn(out, batch)
            _check_loss(loss, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(step, steps, value, lr, "the loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            if max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            else:
                norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                # Clipping by a nan/inf norm turns every gradient into nan or zero: stop before the update.
                raise _diverged(step, steps, value, lr, f"the gradient norm is {norm}")
            if max_grad_norm is not None:
                norms.append(norm)
            _update(opt, params, before, step, steps, value, lr)
            sched.step()
            losses.append(value)
            ids = batch.get("input_ids")
            tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if checkpoint_dir and ((checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == steps):
                from lora_fx.runtime.checkpoint import save_checkpoint

                save_checkpoint(checkpoint_dir, step=step + 1, params=trained, optimizer=opt, scheduler=sched,
                                losses=losses, grad_norms=norms, tokens=tokens)
    finally:
        _set_mode(mode_target, False)
        if hasattr(module, "write_back"):  # ONNX models: trained adapters back into the initializers
            module.write_back()
        if bar is not None:
            bar.close()
    return TrainResult(
        losses=losses, steps=len(losses), seconds=time.perf_counter() - start,
        trainable_parameters=sum(p.numel() for p in params), tokens_seen=tokens, grad_norms=norms,
        resumed_from_step=first_step,
    )


def _check_numbers(*, steps: Any, lr: Any, weight_decay: Any, max_grad_norm: Any, warmup_steps: Any, seed: Any) -> None:
    """Refuse what torch would take and train badly with (a zero or negative lr, a negative warmup or clip
    norm flips or stalls the updates) or fail on deep inside the optimizer (nan, inf, a seed out of range)."""

    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)

    def integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not integer(steps) or steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps!r}")
    if not (math.isfinite(number("lr", lr)) and lr > 0):
        raise ConfigError(f"lr must be a positive, finite number (e.g. 1e-3), got {lr!r}")
    if not (math.isfinite(number("weight_decay", weight_decay)) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number of at least 0, got {weight_decay!r}")
    if max_grad_norm is not None and not number("max_grad_norm", max_grad_norm) > 0:  # inf: no clipping; nan refused
        raise ConfigError(f"max_grad_norm must be above 0 (None: no clipping), got {max_grad_norm!r}")
    if not integer(warmup_steps) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an integer of at least 0, got {warmup_steps!r}")
    if seed is not None and (not integer(seed) or not -(2**63) <= seed < 2**64):
        raise ConfigError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")


def _update(opt: torch.optim.Optimizer, params: list[torch.Tensor], before: list[torch.Tensor],
            step: int, steps: int, loss: float, lr: float) -> None:
    """``opt.step()``, undone when it overflows float32 or leaves an adapter weight non-finite."""
    with torch.no_grad():
        torch._foreach_copy_(before, [p.detach() for p in params])
    try:
        opt.step()
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one device sync per step
        reason = None if finite else "the update made adapter weights non-finite"
    except RuntimeError as exc:
        # AdamW's step size lr / (1 - beta1^t) is a Python float torch converts to float32: lr above ~3e37 fails.
        if "overflow" not in str(exc):
            raise
        reason = "the optimizer update overflowed float32"
    if reason is not None:
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], before)
        raise _diverged(step, steps, loss, lr, reason)


def _diverged(step: int, steps: int, loss: float, lr: float, reason: str) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training diverged at step {step + 1} of {steps} (loss {loss:.6g}): {reason}. Lower the learning rate "
        f"(now {lr:g}) or check the data (NaN/inf or extreme values in this step's batch); the adapters keep their "
        "values from before this step",
        step=step + 1, loss=loss, reason=reason,
    )


def cross_entropy_on(output_key: str, target_key: str = "labels") -> Callable[[Any, Batch], torch.Tensor]:
    """A loss_fn: cross entropy between ``output[output_key]`` and ``batch[target_key]``."""

    def loss_fn(out: Any, batch: Batch) -> torch.Tensor:
        logits = out[output_key] if not isinstance(out, torch.Tensor) else out
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[target_key].reshape(-1))

    return loss_fn


__all__ = ["TrainResult", "check_data_dtype", "check_feed_shapes", "cross_entropy_on", "train"]
