"""Export a rewritten GraphModule to ONNX: adapters folded into W, or kept as swappable slots.

The path is always ``torch.onnx.export(..., dynamo=True, optimize=False)`` (the exporter's own
optimizer renames weights and folds transposes, losing the adapter names), then the ONNX passes:
``normalize_lora`` (exported branch → contract layout), then either ``fold_lora`` and onnxscript's
optimizer, or ``serve_slots``: ``expose_adapters`` + ``hoist_lora_add``, the optimizer (which cannot
touch the adapter slots because they are graph inputs), and ``fuse_lora_add`` last. Modules trained in
full (``modules_to_save``, the SEQ_CLS head) are written as they are trained (merged) or become slots too,
defaulting to their base values (adapters). A graph holding prefixes (and no LoRA) goes to
``prefix_export.export_prefix_onnx`` instead (``expose_prefixes``: the prefixes become slots); prefixes
cannot be folded into weights, so ``mode="merged"`` refuses it with an UnsupportedError.
"""

from __future__ import annotations

import enum
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_fx.enums import parse_enum
from lora_fx.errors import ConfigError, LoraFxError, UnsupportedError

MODEL_OPSET = 20


class ExportMode(str, enum.Enum):
    MERGED = "merged"  # adapters folded into W: a plain model
    ADAPTERS = "adapters"  # adapter slots (graph inputs with base defaults: zero B, the base head) + .onnx_adapter files

    @classmethod
    def parse(cls, value: "ExportMode | str") -> "ExportMode":
        return parse_enum(cls, value, f"mode={value!r} is not an export mode; use 'merged' (fold adapters into W) or 'adapters' (swappable slots)")


@dataclass
class ExportResult:
    model_path: Path
    mode: ExportMode
    adapter_paths: list[Path] = field(default_factory=list)  # .onnx_adapter files
    peft_dirs: list[Path] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    # mode merged, quant_merge="requantize": per site, the error requantizing the merged W adds (RequantError)
    requant_errors: list = field(default_factory=list)


def adapters_dir(model_path: str | os.PathLike) -> Path:
    """``served.onnx`` → ``served.adapters/``: where its adapters are written."""
    p = Path(model_path)
    return p.with_name(p.stem + ".adapters")


def _dynamic_shapes(kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim():
            out[k] = {i: torch.export.Dim.AUTO for i in range(min(v.dim(), 2))}
        else:
            out[k] = None
    return out


def ignore_leafspec_warning() -> None:
    """Silence torch 2.13's FutureWarning about ``LeafSpec`` inside a ``warnings.catch_warnings()`` block: torch
    raises it itself when it deep-copies an output spec (the exporter does, as does deep-copying a GraphModule),
    and the user can do nothing about it."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def to_onnx_ir(gm: Any, kwargs: dict[str, Any], custom_translation_table: dict | None = None) -> Any:
    """``torch.onnx.export`` with names kept, dynamic batch and sequence dims; returns an onnx_ir Model."""
    import contextlib
    import io
    import logging

    import torch

    import warnings

    from lora_fx.passes.fx.capture import widened_examples

    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def export(example: dict[str, Any]) -> Any:
        # The exporter warns that an exported GraphModule is "in training mode": dropout is baked in the
        # graph instead (set_training_mode), so the flag means nothing here.
        with torch.no_grad(), contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            ignore_leafspec_warning()
            return torch.onnx.export(
                gm, (), kwargs=example, dynamo=True, optimize=False, opset_version=MODEL_OPSET,
                dynamic_shapes=_dynamic_shapes(example), verbose=False, report=False,
                custom_translation_table=custom_translation_table,
            )

    # A batch or sequence of 1 in the example is fixed at 1 by the exporter (0/1 specialization), though the file
    # still names the dim: it then fails in ONNX Runtime at any other size. As capture does, trace repeated rows
    # (tokens) instead; where the graph refuses that (a dim that really is 1), only the batch, then the example.
    widenings = [wide for _, wide in widened_examples((), kwargs)]
    for wide in widenings:
        try:
            program = export(wide)
            break
        except Exception:  # not an input this graph takes: try the next
            continue
    else:
        try:
            program = export(kwargs)
        except LoraFxError:
            raise
        except Exception as exc:  # the exporter raises many kinds; the user needs what failed, not its advice
            raise UnsupportedError(f"torch.onnx.export could not export this graph: {type(exc).__name__}: "
                                   f"{exporter_reason(exc)}") from None
        if widenings:
            warnings.warn("export_onnx: the example has batch or sequence size 1 and the graph takes no larger one, so "
                          "the ONNX model may only run at size 1 there; pass a batch of 2 and a sequence of 2 or more",
                          stacklevel=3)
    _name_outputs(program.model, getattr(gm, "_out_spec", None))
    return program.model


def _leaf_names(spec: Any, prefix: str = "") -> list[str]:
    """Names for the leaves of an output TreeSpec: a dict's or ModelOutput's keys, a tuple's indices."""
    if spec.is_leaf():
        return [prefix or "output"]
    context = spec.context
    keys = context if isinstance(context, (list, tuple)) and len(context) == spec.num_children else range(spec.num_children)
    names: list[str] = []
    for key, child in zip(keys, spec.children()):
        names += _leaf_names(child, f"{prefix}.{key}" if prefix else str(key))
    return names


def _name_outputs(model: Any, spec: Any) -> None:
    """Graph outputs named like the model's (``last_hidden_state``, ``logits``, ``past_key_values.0.1``),
    not the exporter's ``layer_norm_12``: the names a user passes to ``lora-fx train --output-name`` or
    reads in ONNX Runtime. Left as exported when the structure does not line up or a name is taken."""
    if spec is None or spec.is_leaf():
        return
    names = _leaf_names(spec)
    outputs = list(model.graph.outputs)
    taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    taken |= {o.name for node in model.graph for o in node.outputs} - {o.name for o in outputs}
    if len(names) != len(outputs) or len(set(names)) != len(names) or taken & set(names):
        return
    if len({id(o) for o in outputs}) != len(outputs) or any(o.is_graph_input() or o.const_value is not None for o in outputs):
        return  # one value behind two outputs, or an output that is an input or a constant: renaming would merge them
    for value, name in zip(outputs, names):
        value.name = name


def optimize_keeping_slots(model: Any) -> Any:
    """onnxscript's optimizer (constant folding, dead-code removal); adapter slots stay, and are optimized
    as the inputs they are: their defaults are out of the optimizer's sight while it runs."""
    import onnxscript.optimizer

    from lora_fx.onnx_adapter import read_saved
    from lora_fx.passes.onnx.lora_layout import adapter_names, read_records

    # The graph as it was, tensors shared: onnxscript 0.7.2 leaves a TorchScript BART with a node reading a value
    # nothing defines, a file ONNX Runtime refuses; such a result is dropped for this copy.
    unoptimized = model.clone()
    graph = model.graph
    names = adapter_names(read_records(model)) | set(read_saved(model.metadata_props))
    before = {n for n in names if n in graph.initializers}
    # The optimizer reads a slot's default as a constant although it is an input: it dropped a Gemm's
    # all-zero base bias (a head slot), so the adapter's trained bias was never added.
    hidden = {}
    for name in sorted(before):
        value = graph.initializers[name]
        if value in graph.inputs:
            hidden[name] = (value, value.const_value)
            graph.initializers.pop(name)
            value.const_value = None
    # Double-quantized nf4 absmaxes too: folding their decode would store them as float absmaxes (4x the
    # bytes, and no longer the format the model was quantized in).
    from lora_fx.passes.onnx.quantized_weight import double_quant_constants

    stored = [v for v in double_quant_constants(graph) if v not in graph.inputs]
    for value in stored:
        hidden[value.name] = (value, value.const_value)
        graph.initializers.pop(value.name)
        value.const_value = None
        graph.inputs.append(value)
    # It logs a warning per slot it may not deduplicate (graph inputs): that is the point of a slot.
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    dedup.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize(model)
    finally:
        dedup.setLevel(level)
        for value, default in hidden.values():
            value.const_value = default
            if value in graph.inputs:
                graph.register_initializer(value)
        for value in stored:
            graph.inputs.remove(value)
    undefined = undefined_inputs(model.graph)
    if undefined:
        _restore(model, unoptimized)
        warnings.warn(
            f"the ONNX optimizer (onnxscript {onnxscript.__version__}) broke this graph ({undefined[0]}), so the model is "
            "written unoptimized: it runs the same, without the optimizer's constant folding", stacklevel=2)
        return model
    lost = sorted(before - set(model.graph.initializers))
    if lost:  # a regression in the optimizer would silently drop slots: refuse rather than ship it
        raise UnsupportedError(f"the ONNX optimizer removed adapter initializers {lost[:3]}; export with optimize=False")
    return model


def undefined_inputs(graph: Any, outer: frozenset[int] = frozenset()) -> list[str]:
    """Node inputs of ``graph`` (and its subgraphs) that no graph input, initializer, outer-scope value or earlier
    node defines, as ``"node N reads V"``: ONNX Runtime refuses such a file. One pass over the nodes, where the
    ONNX checker would first copy every weight into a protobuf."""
    defined = set(outer) | {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    found: list[str] = []
    for node in graph:
        found += [f"node {node.name or node.op_type} reads {v.name!r}" for v in node.inputs
                  if v is not None and id(v) not in defined]
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type.name == "GRAPH" else attr.value if attr.type.name == "GRAPHS" else []
            for sub in subgraphs:
                found += undefined_inputs(sub, frozenset(defined))
        defined.update(id(o) for o in node.outputs)
    return found


def _restore(model: Any, saved: Any) -> None:
    """Put ``saved`` (``model.clone()`` from before a pass) back into ``model``, which callers hold."""
    model.graph = saved.graph
    model.functions.clear()
    model.functions.update(saved.functions)


def serve_slots(model: Any, *, optimize: bool = True, saved: dict[str, tuple[str, Any]] | None = None) -> Any:
    """The adapter-slot deployment of a contract-form LoRA model, in place: slots exposed, each branch
    summed in front of its bias (ORT's bias fusions survive), optimized, and fused into one Gemm per site.
    ``saved`` (``{parameter name: (module, base value)}``): parameters of modules trained in full that become
    slots too, defaulting to their base values (before the optimizer, which cannot fold an input)."""
    from lora_fx.passes.onnx.expose_adapters import expose_adapters
    from lora_fx.passes.onnx.fuse_lora_add import fuse_lora_add
    from lora_fx.passes.onnx.hoist_lora_add import hoist_lora_add

    expose_adapters(model, saved)
    hoist_lora_add(model)
    if optimize:
        optimize_keeping_slots(model)
    fuse_lora_add(model)
    return model


def export_onnx(
    gm: Any,
    path: str | os.PathLike,
    kwargs: dict[str, Any] | None = None,
    mode: ExportMode | str = ExportMode.MERGED,
    *,
    adapter_name: str = "default",
    optimize: bool = True,
    peft_dir: bool = True,
    custom_translation_table: dict | None = None,
    quant_merge: Any = None,
) -> ExportResult:
    """Export a GraphModule from ``lora_fx.capture`` + ``lora_fx.apply`` to ONNX at ``path``.

    ``mode="merged"``: the adapters are folded into the weights (a plain model, the base's nodes).
    Modules trained in full (``modules_to_save``, the SEQ_CLS head) are written with the weights they hold now.
    ``mode="adapters"``: the adapters become ONNX Runtime adapter slots and the current weights are
    written to ``<stem>.adapters/<adapter_name>.onnx_adapter`` (and, with ``peft_dir``, the same adapter
    as a PEFT directory ``<stem>.adapters/<adapter_name>/``). The parameters of modules trained in full
    become slots too (graph inputs under their model names, ``classifier.weight``), whose defaults are the
    base values, so no active adapter is the base model; their trained values go into the adapter files
    (under PEFT's keys in the PEFT directory), and the base fingerprint leaves them out. ``kwargs`` are
    example inputs, as for ``capture`` (the names, dtypes and ranks it was captured with: others are refused before the
    export); batch and sequence dims stay dynamic, also for an example of size 1 there. Output paths and
    ``adapter_name`` (one plain name) are checked before the export. Every file is written whole or not at all.
    ``custom_translation_table`` goes to ``torch.onnx.export`` (custom ops such as a dequantize step).
    ``quant_merge`` (``QuantMerge.FLOAT`` / ``REQUANTIZE``, or "float" / "requantize"): how ``mode="merged"``
    folds into a quantized (QLoRA) W; required when an adapted site's W is quantized. With REQUANTIZE the
    per-site requantization errors are in ``ExportResult.requant_errors``.
    """
    import torch.fx as fx

    from lora_fx.onnx_adapter import SUFFIX, check_writable, current_adapter, stamp_fingerprint, to_peft, write_onnx_adapter
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.set_training_mode import set_training_mode
    from lora_fx.passes.onnx.fold_lora import FoldLora, QuantMerge
    from lora_fx.passes.onnx.normalize_lora import normalize_lora

    mode = ExportMode.parse(mode)
    quant_merge = QuantMerge.parse(quant_merge)
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(_not_a_graph_module(gm))
    if not kwargs:
        raise ConfigError("export_onnx needs example inputs: export_onnx(gm, path, kwargs={'input_ids': ..., 'attention_mask': ...})")
    _check_outputs(Path(path), mode, adapter_name, peft_dir)  # before the export: found after it, a bad path costs it all
    check_example(gm, kwargs)
    info = meta(gm)
    configs = info.get("adapters", {})
    if info.get("quant"):  # QLoRA: packed weights export as ONNX Runtime's quantized matmuls, still packed
        from lora_fx.quant_export import onnx_translation_table

        custom_translation_table = {**onnx_translation_table(), **(custom_translation_table or {})}
    if any(type(c).__name__ == "PrefixConfig" for c in configs.values()) and mode is ExportMode.MERGED:
        raise UnsupportedError(
            "prefix-tuning adapters cannot be folded into weights; export with mode='adapters' (CLI: --adapters)"
        )
    if info.get("prefix") and not info.get("lora_sites"):
        from lora_fx.prefix_export import export_prefix_onnx  # prefixes: slots + .onnx_adapter + PEFT dir

        return export_prefix_onnx(gm, path, dict(kwargs), adapter_name=adapter_name, optimize=optimize,
                                  peft_dir=peft_dir, custom_translation_table=custom_translation_table)
    records = info.get("lora_sites", {})
    _refuse_shared_sites(gm)
    if mode is ExportMode.ADAPTERS and not records:
        raise ConfigError("this model has no LoRA adapter to expose; call lora_fx.apply(gm, LoraConfig(...)) first, or export mode='merged'")
    was_training = bool(info.get("training", False))
    if was_training:
        set_training_mode(gm, False)  # export what inference runs: dropout off
    try:
        model = to_onnx_ir(gm, dict(kwargs), custom_translation_table)
    finally:
        if was_training:
            set_training_mode(gm, True)
    config = configs.get("default")
    if records:
        normalize_lora(model, records, config)
    path = Path(path)
    adapter = None
    requant_errors: list = []
    if mode is ExportMode.MERGED:
        if records:
            folder = FoldLora(quant_merge)
            folder(model)
            requant_errors = folder.errors
        if optimize:
            optimize_keeping_slots(model)
    else:
        saved = _saved_slots(gm)
        adapter = current_adapter(model, saved)  # the graph holds the trained head, as exported
        check_writable(adapter)  # before any file: a refused adapter must not leave a model behind
        serve_slots(model, optimize=optimize, saved=saved)
        adapter.fingerprint = stamp_fingerprint(model)
    result = ExportResult(path, mode, sites=sorted(records), fingerprint=adapter.fingerprint if adapter else None,
                          requant_errors=requant_errors)
    if adapter is None:
        save_model(model, path)
        return result
    from lora_fx.adapters import key_parts_as_peft, write_peft_dir
    from lora_fx.files import write_with_adapters

    out_dir = adapters_dir(path)
    peft = key_parts_as_peft(*to_peft(adapter), records) if peft_dir else None

    def write_adapters(stage: Any) -> None:
        write_onnx_adapter(stage.path(f"{adapter_name}{SUFFIX}"), adapter)
        if peft is not None:
            write_peft_dir(stage.path(adapter_name), *peft)

    # The adapter files first, staged, then the model: a failure leaves no model without its adapters.
    write_with_adapters(model, path, out_dir, write_adapters, save_model)
    result.adapter_paths.append(out_dir / f"{adapter_name}{SUFFIX}")
    if peft is not None:
        result.peft_dirs.append(out_dir / adapter_name)
    return result


def _not_a_graph_module(model: Any) -> str:
    """The refusal of what is no GraphModule. An ONNX model (``lora_fx.load`` + ``lora_fx.apply``) is ONNX already:
    its merge and adapter slots are the ``lora-fx export`` command's work on the saved file, which the message names."""
    import onnx
    import onnx_ir as ir

    got = type(model).__name__
    if isinstance(model, ir.Model):
        save = "lora_fx.save(model, 'lora.onnx')"
    elif isinstance(model, onnx.ModelProto):
        save = "onnx.save(model, 'lora.onnx')"
    else:
        return f"export_onnx takes a GraphModule from lora_fx.capture(...) (+ lora_fx.apply), got {got}"
    return (f"export_onnx exports a GraphModule from lora_fx.capture(...) (+ lora_fx.apply) to ONNX, and this {got} is an "
            f"ONNX model already. Save it ({save}), then merge its adapters into the weights with "
            "`lora-fx export lora.onnx -o merged.onnx --merge` (a quantized base: add --float or --requantize), or "
            "export it with adapter slots and its adapter files with `lora-fx export lora.onnx -o served.onnx --adapters`")


def _check_outputs(path: Path, mode: ExportMode, adapter_name: str, peft_dir: bool) -> None:
    """Every path ``export_onnx`` writes, refused now if it could not be written (``lora_fx.files``' checks)."""
    from lora_fx.files import check_adapter_name, check_adapter_outputs, check_output
    from lora_fx.onnx_adapter import SUFFIX

    check_output(path)
    if mode is ExportMode.ADAPTERS:
        check_adapter_outputs(adapters_dir(path), check_adapter_name(adapter_name, "adapter_name"), SUFFIX, peft_dir=peft_dir)


def _saved_slots(gm: Any) -> dict[str, tuple[str, Any]]:
    """``{parameter name: (module, base value as numpy)}`` of the modules ``gm`` trains in full."""
    from lora_fx.passes.fx.capture import meta
    from lora_fx.passes.fx.freeze_base import MODULES_TO_SAVE, saved_base

    modules = (meta(gm).get(MODULES_TO_SAVE) or {}).get("modules") or []
    out = {}
    for name, base in saved_base(gm).items():
        module = next((m for m in modules if name.startswith(f"{m}.")), name.rpartition(".")[0])
        base = base.detach().cpu()
        # numpy has no bfloat16; float32 holds it exactly, and the slot takes the graph's dtype when exposed.
        out[name] = (module, (base.float() if base.dtype.is_floating_point and base.itemsize < 4 else base).numpy())
    return out


def check_example(gm: Any, kwargs: dict[str, Any]) -> None:
    """Refuse example ``kwargs`` that do not match what ``gm`` was captured with: a missing or unknown name, a
    tensor of another dtype or rank. The exporter finds these too, deep in its tracing, and says so in a
    page of its own diagnostics; here the message names the input and what the capture takes."""
    import difflib

    import torch

    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_children != 2 or spec.children()[0].num_children or not isinstance(spec.children()[1].context, list):
        return  # not a keyword-only capture (positional example inputs): the exporter checks those itself
    taken_spec = spec.children()[1]
    taken = list(taken_spec.context)
    given = list(kwargs)
    where = f"the capture takes {', '.join(taken)}: pass export_onnx the inputs passed to lora_fx.capture"
    unknown = [k for k in given if k not in taken]
    if unknown:
        close = difflib.get_close_matches(unknown[0], taken, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"export_onnx kwargs have {', '.join(map(repr, unknown))}{hint}, which the captured graph does not take; {where}")
    missing = [k for k in taken if k not in kwargs]
    if missing:
        raise ConfigError(f"export_onnx kwargs lack {', '.join(map(repr, missing))}; {where}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != taken_spec.num_leaves:
        return  # lora_fx passes added inputs: the leaves no longer line up with the names
    start = 0
    for name, child in zip(taken, taken_spec.children()):
        node, start = (placeholders[start] if child.is_leaf() else None), start + child.num_leaves
        want, value = node.meta.get("val") if node is not None else None, kwargs[name]
        if not (isinstance(want, torch.Tensor) and isinstance(value, torch.Tensor)):
            continue
        if value.dtype != want.dtype or value.dim() != want.dim():
            raise ConfigError(
                f"export_onnx kwargs[{name!r}] is a {value.dim()}-d {str(value.dtype).removeprefix('torch.')} tensor, but the "
                f"capture took a {want.dim()}-d {str(want.dtype).removeprefix('torch.')} one; pass an example of the "
                "dtype and rank passed to lora_fx.capture (the exported model takes those)")


def exporter_reason(exc: BaseException) -> str:
    """The exporter's message without terminal colours and without its advice that leads nowhere here (the
    ``Next steps:`` list, ``report=True`` hints): its first line and its exception summary, in a few lines."""
    import re

    lines = [line.rstrip() for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip().splitlines()]
    if not lines:
        return type(exc).__name__
    head = re.sub(r"\s*Next steps:\s*$", "", lines[0])
    summary = next((i for i, line in enumerate(lines) if line.lstrip("# ").lower().startswith("exception summary")), 0)
    rest = [line for line in lines[summary + 1:] if line.strip() and not line.lstrip().startswith(("- ", "#"))
            and not line.strip().lower().startswith(("next steps", "(refer to")) and "report=True" not in line]
    return "\n".join([head] + rest[:5])


def _refuse_shared_sites(gm: Any) -> None:
    """An adapted module that runs several times per forward (ALBERT's layers share one set of weights)
    exports as one adapter read by several branches, which the ONNX passes cannot fold or expose yet:
    say so before the export, not as a broken chain deep in the ONNX passes."""
    import collections

    from lora_fx.passes.fx.find_sites import linear_site_name
    from lora_fx.passes.fx.insert_lora import ADAPTED

    calls = collections.Counter(linear_site_name(n) for n in gm.graph.nodes if n.meta.get(ADAPTED))
    shared = sorted(name for name, count in calls.items() if count > 1)
    if shared:
        raise UnsupportedError(
            f"adapted modules that run more than once per forward (weights shared across layers): {', '.join(shared[:4])}"
            f"{', ...' if len(shared) > 4 else ''}; ONNX export of such adapters is not supported. Training and "
            "save_adapter work: merge the saved adapter in PEFT (merge_and_unload) and export that model, or exclude "
            "these modules (exclude_modules=...) before apply"
        )


def save_model(model: Any, path: str | os.PathLike) -> Path:
    """Save an onnx_ir Model atomically (weights beside it when large): ``lora_fx.save``."""
    from lora_fx.onnx_model import save

    undefined = undefined_inputs(model.graph)
    if undefined:  # a pass left a dangling value: ONNX Runtime would refuse the file, so none is written
        raise UnsupportedError(f"the exported graph is invalid ({'; '.join(undefined[:3])}), a file ONNX Runtime would "
                               f"refuse, so nothing was written to {path}; this is a lora_fx bug: please report it with the model")
    return save(model, path)
