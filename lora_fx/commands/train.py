"""``lora-fx train``: train the adapters of a rewritten ONNX model through torch, write them back.

Data come from ``.npz`` (arrays named after the graph inputs, plus the target array; read with
``allow_pickle=False``) or JSON lines (one example per line, the same keys). Batches are taken in
file order and cycled. The output model is written only when training finishes, atomically.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
from pathlib import Path
from collections.abc import Collection
from typing import Any

from lora_fx.errors import ConfigError, ModelLoadError, TrainingDivergedError


class Loss(enum.Enum):
    CROSS_ENTROPY = "cross_entropy"  # target: class indices, output: logits over the last dim
    MSE = "mse"  # target: same shape as the output


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the adapters of a rewritten ONNX model",
        description="Train the LoRA (or prefix) initializers of an ONNX model rewritten by lora-fx, executing the "
        "graph with PyTorch autograd, and write the model with the trained adapters.",
    )
    p.add_argument("model", help="the rewritten .onnx file (adapters as initializers)")
    p.add_argument("--data", required=True, help=".npz (arrays named after graph inputs + target, first dimension: examples; "
                   "an input of fixed shape given in that shape is fed whole to every batch) or .jsonl")
    p.add_argument("--target", default="labels", help="name of the target array in the data (default: labels)")
    p.add_argument("--output", dest="output_name", help="graph output the loss reads (default: the first output)")
    p.add_argument("--loss", choices=[m.value for m in Loss], default=Loss.CROSS_ENTROPY.value,
                   help="cross_entropy (target: class indices, output: logits over the last dim) or mse (target: the "
                   "output's shape) (default: cross_entropy)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps; the batches are cycled (default: 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 0.001)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step, taken in file order (default: 8)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default: 1.0; 0: no clipping)")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear learning-rate warmup (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the run: LoRA dropout draws (default: 0)")
    p.add_argument("-o", "--out", required=True, help="where to write the trained model (.onnx)")
    p.add_argument("--checkpoint-dir", help="save adapters + optimizer state here to resume an interrupted run")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir, if any")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result (loss curve included) as JSON")
    p.set_defaults(func=run)


def load_model(path: str) -> Any:
    import lora_fx

    from lora_fx.files import require_file

    require_file(path, "ONNX model")
    loader = getattr(lora_fx, "load", None)
    if loader is not None:
        return loader(path)
    import onnx_ir as ir

    try:
        return ir.load(path)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from None


def save_model(model: Any, path: str) -> None:
    import lora_fx

    saver = getattr(lora_fx, "save", None)
    if saver is not None:
        saver(model, path)
        return
    import onnx_ir as ir

    from lora_fx.files import atomic_path

    with atomic_path(path) as tmp:
        ir.save(model, str(tmp))


def read_data(path: str, needed: Collection[str] | None = None) -> dict[str, Any]:
    """Arrays by name from .npz or JSON lines; never unpickles.

    ``needed``: the JSON keys the run feeds (graph inputs, target; None: every key). A null, an object or a
    string among their values is named with its line; other keys (an example's text, an id) may hold anything."""
    import numpy as np

    from lora_fx.files import require_file

    p = require_file(path, "data file")
    if p.suffix == ".npz":
        from lora_fx.files import read_npz

        return read_npz(p, "data file", "np.savez(path, <input name>=array, ..., <target>=array)")
    if p.suffix in (".jsonl", ".json"):
        try:
            text = p.read_text()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc}); JSON lines are text, one object per line") from None
        rows = []
        lines = []  # the file line of each example, for messages (blank lines are skipped)
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {i} is not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {i} is a JSON {type(row).__name__}; each line must be an object "
                                  '{"<input name>": ..., "<target>": ...}')
            rows.append(row)
            lines.append(i)
        if not rows:
            raise ConfigError(f"{path} holds no examples")
        keys = set(rows[0])
        for i, row in enumerate(rows, 1):
            if set(row) != keys:
                raise ConfigError(f"{path}: example {i} has keys {sorted(row)}, the first has {sorted(keys)}")
        arrays = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            try:
                arrays[key] = np.asarray(values)
            except ValueError as exc:
                _check_json_numbers(path, key, values, lines)  # a null beside lists is "inhomogeneous" to numpy
                raise ConfigError(f"{path}: examples of different lengths ({exc}); pad them to one length") from None
            if arrays[key].dtype.kind not in "biuf" and (needed is None or key in needed):
                # Only then (the walk costs as much as the parse): numpy keeps a null, an object or a string as an
                # array of objects (or of text) whose shape the graph input check would blame instead.
                _check_json_numbers(path, key, values, lines)
        return arrays
    raise ConfigError(f"{path}: unknown data format {p.suffix!r}; use .npz or .jsonl")


def _check_json_numbers(path: str, key: str, values: list[Any], lines: list[int]) -> None:
    """Refuse the first value under ``key`` that is no number nor list of numbers, naming its line and what it is."""
    for value, line in zip(values, lines):
        found = _first_non_number(value)
        if found is not None:
            what, where = found
            at = f" at {where}" if where else ""
            raise ConfigError(f"{path} line {line}: {key!r} holds {what}{at}; each value must be a number or a list of "
                              "numbers (token ids and masks: integers), the same length in every example")


def _first_non_number(value: Any, where: str = "") -> tuple[str, str] | None:
    """What the first leaf of ``value`` that is no number is (and its position, as [i][j]), or None."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_number(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, bool) or isinstance(value, float):
        return None
    if isinstance(value, int):  # JSON integers are unbounded; numpy keeps one past 64 bits as an object
        return None if -(2**63) <= value < 2**64 else (f"the integer {value} (beyond 64 bits)", where)
    if value is None:
        return "null", where
    if isinstance(value, dict):
        return "an object", where
    if isinstance(value, str):
        return f"the string {value[:20]!r}" + ("..." if len(value) > 20 else ""), where
    return f"a {type(value).__name__}", where


def make_batches(model: Any, data: dict[str, Any], target: str, batch_size: int) -> list[dict[str, Any]]:
    """The data as batches of tensors, each graph input in its declared dtype (float32 data go into a bfloat16
    input rounded to bfloat16, as ``.to(torch.bfloat16)`` rounds; float data into an integer input, or values an
    input's dtype cannot hold, are refused: ``check_data_dtype``). An .npz entry of bare 2-byte values (np.savez's
    form of ml_dtypes.bfloat16) is read as bfloat16 for a bfloat16 input and refused elsewhere."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir
    import torch

    from lora_fx.onnx_adapter import is_bfloat16
    from lora_fx.runtime.onnx_torch import torch_dtype
    from lora_fx.runtime.train import check_data_dtype, check_feed_shapes

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
    missing = [n for n in inputs if n not in data]
    if missing:
        raise ConfigError(f"the data lack arrays for graph inputs {missing}; it has {sorted(data)}")
    if target not in data:
        raise ConfigError(f"the data have no target array {target!r}; it has {sorted(data)} (choose one with --target)")
    names = list(inputs) + ([target] if target not in inputs else [])
    # An input of fixed shape given in exactly that shape, where the other arrays hold another number of examples,
    # is one value for every batch (Optimum's use_cache_branch, shape [1]), not a set of examples.
    shared = {n for n, v in inputs.items() if _fixed(v.shape) and tuple(np.shape(data[n])) == tuple(v.shape)}
    per_example = [n for n in names if n not in shared]
    if shared and per_example:
        counts = {len(data[n]) for n in per_example if np.ndim(data[n])}
        shared = {n for n in shared if not np.ndim(data[n]) or counts != {len(data[n])}}
    names = [n for n in names if n not in shared]
    scalars = [n for n in names if np.ndim(data[n]) == 0]
    if scalars:  # one value is not a set of examples; len() of it would be a TypeError
        raise ConfigError(f"arrays {scalars} are single values; store one entry per example (first dimension: examples)")
    if not names:
        raise ConfigError(f"the data hold no per-example arrays (arrays {sorted(shared)} are one value for every batch)")
    sizes = {n: len(data[n]) for n in names}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"arrays differ in their first (example) dimension: {sizes}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ConfigError(f"the data hold no examples (arrays {sorted(names)} have length 0)")
    # The same check lora_fx.train makes on each batch, here on whole arrays: before any conversion or training.
    check_feed_shapes({k: np.asarray(data[k]) for k in inputs if k not in shared},
                      {k: v.shape for k, v in inputs.items()}, batch_size)
    tensors = {}
    for name in names + sorted(shared):
        arr = np.asarray(data[name])
        bf16_input = name in inputs and inputs[name].dtype == ir.DataType.BFLOAT16
        if arr.dtype.kind == "V" and arr.dtype.itemsize == 2 and arr.dtype.names is None:
            # np.savez stores ml_dtypes' bfloat16 as bare 2-byte values ('|V2'): bfloat16 where the graph takes it,
            # as lora-fx run reads them; elsewhere the bytes could be anything.
            if not bf16_input:
                raise ConfigError(
                    f"array {name!r} holds bare 2-byte values ({arr.dtype.str}), what np.savez writes for "
                    "ml_dtypes.bfloat16: an .npz cannot carry bfloat16 as numbers. Store it as float32 "
                    f"({name}.astype(np.float32), exact for bfloat16 values); float32 data are cast to a bfloat16 "
                    "graph input")
            arr = arr.view(ml_dtypes.bfloat16)
        bf16 = is_bfloat16(arr.dtype)
        if arr.dtype.kind not in "biuf" and not bf16:
            raise ConfigError(f"array {name!r} has dtype {arr.dtype}; only numbers can be fed to the graph")
        if (arr.dtype.kind == "f" or bf16) and not np.isfinite(arr).all():
            # Training would stop at the first such batch with "loss is nan ... lower the learning rate".
            where = f" (first in example {int(np.argwhere(~np.isfinite(arr))[0][0])})" if name not in shared else ""
            raise ConfigError(f"array {name!r} holds NaN or inf{where}; clean the data")
        if not arr.dtype.isnative:  # torch.from_numpy refuses other byte orders (an .npz from a big-endian machine)
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if bf16:  # torch.from_numpy refuses ml_dtypes' bfloat16: its bits
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(arr))
        if name in inputs and inputs[name].dtype is not None:
            want = torch_dtype(inputs[name].dtype.value)
            check_data_dtype(name, arr, want)  # float ids would be truncated; only casts that keep the values
            t = t.to(want)
        tensors[name] = t
    return [{k: v if k in shared else v[i : i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]


def _fixed(shape: Any) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _check_class_targets(y: Any, t: Any, target: str) -> None:
    """What F.cross_entropy needs, said in the data's terms (torch says "Target 7 is out of bounds")."""
    classes = y.shape[-1]
    if t.numel() * classes != y.numel():
        raise ConfigError(f"cross_entropy needs one class index per row of the output {tuple(y.shape)} (a target of "
                          f"shape {tuple(y.shape[:-1])}); {target!r} has {tuple(t.shape)}")
    bad = t[((t < 0) | (t >= classes)) & (t != -100)]  # -100: torch's ignore_index, a padded position
    if bad.numel():
        raise ConfigError(f"{target!r} holds class {int(bad[0])}, but the output has {classes} classes "
                          f"(0..{classes - 1}; -100 marks a position to ignore)")


def make_loss(loss: Loss, output: str, target: str) -> Any:
    import torch.nn.functional as F

    def loss_fn(out: dict, batch: dict) -> Any:
        y = out[output]
        t = batch[target]
        if loss is Loss.CROSS_ENTROPY:
            if t.dtype.is_floating_point:
                raise ConfigError(f"cross_entropy needs integer class targets; {target!r} is {t.dtype} (use --loss mse)")
            _check_class_targets(y, t, target)
            return F.cross_entropy(y.reshape(-1, y.shape[-1]).float(), t.reshape(-1).long())
        if t.shape != y.shape:
            raise ConfigError(f"mse needs a target of the output's shape {tuple(y.shape)}, {target!r} has {tuple(t.shape)}")
        return F.mse_loss(y.float(), t.float())

    return loss_fn


def check_options(args: argparse.Namespace) -> None:
    """Numbers and paths checked before the model is loaded: torch would refuse some only deep inside the
    optimizer (a traceback), accept others silently (a negative warmup turns the learning rate negative), and
    an output path that cannot be written would be found only after the last step."""
    from lora_fx.files import check_output, check_output_dir

    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir (the directory of the interrupted run)")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    # "not x > 0" refuses NaN too; argparse's float() takes "nan" and "inf".
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive, finite number (e.g. 1e-3), got {args.lr}")
    for flag, value in (("--weight-decay", args.weight_decay), ("--warmup-steps", args.warmup_steps)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number of at least 0, got {value}")
    if not args.max_grad_norm >= 0:  # inf: no clipping, as 0
        raise ConfigError(f"--max-grad-norm must be at least 0 (0: no clipping), got {args.max_grad_norm}")
    if not -(2**63) <= args.seed < 2**64:
        raise ConfigError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.checkpoint_dir:
        if args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be at least 1 (steps between checkpoints), got {args.checkpoint_every}")
        if Path(args.checkpoint_dir).resolve() == Path(args.out).resolve():
            raise ConfigError(f"--checkpoint-dir and -o are both {args.out}; the checkpoints need a folder of their own")
        if Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir} is a file; name a folder (it is created)")
        check_output_dir(args.checkpoint_dir)
    check_output(args.out, inputs=[args.model, args.data])


def run(args: argparse.Namespace) -> int:
    import lora_fx
    from lora_fx.onnx_model import check_not_external_data
    from lora_fx.runtime.onnx_torch import check_supported

    check_options(args)
    model = load_model(args.model)
    check_not_external_data(model, args.out)  # before training: save would refuse it only after the last step
    check_supported(model)  # before any work: an unsupported op is named and nothing is written
    outputs = [v.name for v in model.graph.outputs]
    output = args.output_name or outputs[0]
    if output not in outputs:
        raise ConfigError(f"the graph has no output {output!r}; its outputs are {outputs}")
    fed = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers] + [args.target]
    batches = make_batches(model, read_data(args.data, fed), args.target, args.batch_size)
    try:
        result = lora_fx.train(
            model, batches, make_loss(Loss(args.loss), output, args.target), steps=args.steps, lr=args.lr,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, warmup_steps=args.warmup_steps,
            seed=args.seed, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0, resume=args.resume,
        )
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"{exc}; {args.out} was not written", step=exc.step, loss=exc.loss,
                                    reason=exc.reason) from None
    save_model(model, args.out)
    summary = result.to_dict()
    summary.update(output_model=str(args.out), loss_output=output, checkpoint_dir=args.checkpoint_dir)
    if args.json:
        from lora_fx.cli import print_json

        print_json(summary)
    else:
        first = result.losses[0] if result.losses else float("nan")
        done = f"trained {result.steps_this_run} steps" + (
            f" (resumed at step {result.resumed_from_step}; {result.steps} in all)" if result.resumed_from_step else "")
        print(f"{done}: loss {first:.4f} -> {result.final_loss:.4f}; wrote {args.out}")
    return 0
