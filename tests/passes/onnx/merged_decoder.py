"""A real Hugging Face Optimum-style merged decoder (``decoder_model_merged.onnx``), built from a tiny seeded Llama.

The decoder without past and the decoder with past key values are exported with ``torch.onnx.export`` (dynamo) and
merged the way Optimum merges them: the main graph is one ``If`` named ``optimum::if`` on a bool input
``use_cache_branch`` (then: with past, else: without), the initializers de-duplicated into the main graph by value
(the branches read them from the outer scope), each branch's own values renamed apart, and the model's inputs the
union of both decoders' inputs.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 32, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
PRESENTS = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
PAST = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
OUTPUTS = ["logits", *PRESENTS]


def build_llama() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _presents(out) -> list[torch.Tensor]:
    return [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]


def cache_of(past: list[torch.Tensor]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(LAYERS):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def eager(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The reference: ``model`` (a transformers or PEFT model) on the inputs of one branch, outputs as ``OUTPUTS``."""
    from transformers import DynamicCache

    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    past = [torch.from_numpy(feeds[n]) for n in PAST]
    cache = cache_of(past) if bool(feeds["use_cache_branch"][0]) else DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return [t.numpy() for t in [out.logits, *_presents(out)]]


def _export(model: torch.nn.Module, with_past: bool, path: Path) -> onnx.ModelProto:
    base = type(model)

    # A subclass, not a wrapper module: the exporter's name scopes stay the model's own module paths.
    class NoPast(base):
        def forward(self, input_ids, attention_mask):
            from transformers import DynamicCache

            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                               past_key_values=DynamicCache(), use_cache=True)
            return (out.logits, *_presents(out))

    class WithPast(base):
        def forward(self, input_ids, attention_mask, past):
            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache_of(past),
                               use_cache=True)
            return (out.logits, *_presents(out))

    m = copy.deepcopy(model)
    m.__class__ = WithPast if with_past else NoPast
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
    if with_past:
        past = [torch.randn(2, KV_HEADS, 4, HEAD_DIM) for _ in PAST]
        args = (ids, torch.ones(2, 7, dtype=torch.long), past)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim("total")},
                  [{0: batch, 2: torch.export.Dim("past")}] * len(PAST))
        names = ["input_ids", "attention_mask", *PAST]
    else:
        args = (ids, torch.ones(2, 3, dtype=torch.long))
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
        names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, str(path), dynamo=True, opset_version=18, input_names=names, output_names=OUTPUTS,
                          dynamic_shapes=shapes, verbose=False)
    return onnx.load(str(path))


def _key(t: onnx.TensorProto) -> tuple:
    data = onnx.numpy_helper.to_array(t)
    return (t.data_type, tuple(t.dims), hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest())


def _unshaped(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """``info`` renamed, its dims unnamed: the branches name their dynamic dims differently."""
    new = onnx.ValueInfoProto()
    new.CopyFrom(info)
    new.name = name
    for dim in new.type.tensor_type.shape.dim:
        dim.Clear()
    return new


def merge(with_past: onnx.ModelProto, no_past: onnx.ModelProto) -> onnx.ModelProto:
    """Optimum's merge: ``If(use_cache_branch, then=with_past, else=no_past)`` over de-duplicated initializers."""
    inits: dict[str, onnx.TensorProto] = {}
    by_value: dict[tuple, str] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    branches = []
    for tag, proto in (("with_past", with_past), ("no_past", no_past)):
        g = proto.graph
        assert not proto.functions and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                               for n in g.node for a in n.attribute)
        rename: dict[str, str] = {}
        for t in g.initializer:
            key = _key(t)
            if key in by_value:
                rename[t.name] = by_value[key]
                continue
            name = t.name if t.name not in inits else f"{t.name}_{tag}"
            rename[t.name] = name
            copy_t = onnx.TensorProto()
            copy_t.CopyFrom(t)
            copy_t.name = name
            inits[name] = copy_t
            by_value[key] = name
        for i in g.input:
            rename[i.name] = i.name
            inputs.setdefault(i.name, i)
        for n in g.node:  # the branch's own values: unique across the model's graphs
            for o in n.output:
                if o:
                    rename.setdefault(o, f"{o}__{tag}")
        nodes = []
        for n in g.node:
            new = onnx.NodeProto()
            new.CopyFrom(n)
            new.input[:] = [rename.get(x, x) if x else x for x in n.input]
            new.output[:] = [rename.get(x, x) if x else x for x in n.output]
            nodes.append(new)
        outs = [_unshaped(o, rename[o.name]) for o in g.output]
        infos = []
        for vi in g.value_info:
            if vi.name in rename and rename[vi.name] != vi.name:
                new_vi = onnx.ValueInfoProto()
                new_vi.CopyFrom(vi)
                new_vi.name = rename[vi.name]
                infos.append(new_vi)
        branches.append(helper.make_graph(nodes, tag, [], outs, value_info=infos))
    node = helper.make_node("If", ["use_cache_branch"], OUTPUTS, name="optimum::if", then_branch=branches[0],
                            else_branch=branches[1])
    switch = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    outputs = [_unshaped(o, o.name) for o in no_past.graph.output]
    graph = helper.make_graph([node], "merged", [*inputs.values(), switch], outputs, list(inits.values()))
    return helper.make_model(graph, opset_imports=list(no_past.opset_import), ir_version=no_past.ir_version)


def merged_decoder_files(tmp: Path) -> tuple[Path, Path]:
    """``(decoder_model.onnx, decoder_model_merged.onnx)`` of ``build_llama()``, exported into the folder ``tmp``."""
    model = build_llama()
    no_past = _export(model, False, tmp / "decoder_model.onnx")
    with_past = _export(model, True, tmp / "decoder_with_past_model.onnx")
    merged = merge(with_past, no_past)
    onnx.checker.check_model(merged)
    path = tmp / "decoder_model_merged.onnx"
    onnx.save(merged, str(path))
    return tmp / "decoder_model.onnx", path


def feeds(use_cache: bool, seed: int = 0, past_len: int = 4, seq: int = 3) -> dict[str, np.ndarray]:
    """Inputs of the merged decoder for one branch (Optimum feeds an empty past to the branch without it)."""
    rng = np.random.default_rng(seed)
    past_len = past_len if use_cache else 0
    return {
        "input_ids": rng.integers(0, VOCAB, (2, seq)).astype(np.int64),
        "attention_mask": np.ones((2, past_len + seq), np.int64),
        **{n: rng.standard_normal((2, KV_HEADS, past_len, HEAD_DIM)).astype(np.float32) for n in PAST},
        "use_cache_branch": np.array([use_cache]),
    }


def train_briefly(model, steps: int = 4):
    """``lora_fx.train`` on ``model`` (a merged decoder file rewritten by lora_fx) for a few steps, the batches
    alternating between the If's branches, towards a fixed random target."""
    import lora_fx

    batches = [{k: torch.from_numpy(v) for k, v in feeds(bool(i % 2), seed=i).items()} for i in range(4)]
    target = torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lora_fx.train(model, batches, lambda out, batch: ((out["logits"] - target) ** 2).mean(), steps=steps,
                             lr=1e-2, progress=False)
