"""ONNX insert_prefix on attention with the heads merged into the batch axis (Bloom's form), on small torch modules
exported by TorchScript (no static shapes inside the graph), against the same module computing with the prefixes.

``MatMul`` on ``[batch*heads, ...]`` → [+ a bias over the keys] → Reshape ``[batch, heads, q, -1]`` → [+ mask] →
``Softmax`` → Reshape back → ``MatMul(·, v)``. A bias numbering the keys (ALiBi, from ``cumsum(mask)`` or
``arange(keys)``) is recomputed for T + k keys as PEFT's cache makes the model compute it; Bloom itself against
PEFT is in test_insert_prefix_bloom.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.passes.onnx.find_sites import find_sites
from lora_fx.passes.onnx.insert_prefix import InsertPrefix, insert_prefix, prefix_metadata
from lora_fx.passes.onnx.prefix_nodes import is_used
from lora_fx.sites import SiteKind
from tests.passes.fx.test_insert_prefix_bloom import _Merged

T = 3
H, D = 4, 8
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


class _Alibi(torch.nn.Module):
    """Bloom's attention in small: ALiBi ``slope * position`` per key, positions from ``cumsum(mask) - 1`` (or
    ``arange(keys)`` without a mask), added by ``baddbmm`` on ``[batch*heads, ...]``. Given prefixes it computes what
    the model computes under PEFT's cache: keys and values with the prefixes in front, the mask with T ones in front."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, H * D) for _ in range(3))

    def heads(self, t, b, s):
        return t.view(b, s, H, D).transpose(1, 2).reshape(b * H, s, D)

    def forward(self, x, mask=None, pk=None, pv=None, zero_prefix_bias=False):
        """``zero_prefix_bias``: ALiBi of the real keys alone, zeros for the prefix keys (not PEFT's)."""
        b, s, _ = x.shape
        t = 0 if pk is None else pk.shape[1]
        q, k, v = (self.heads(f(x), b, s) for f in (self.q, self.k, self.v))
        if pk is not None:
            k = torch.cat([pk.repeat(b, 1, 1), k], 1)
            v = torch.cat([pv.repeat(b, 1, 1), v], 1)
        if mask is None:
            pos = torch.arange(s + t, dtype=torch.float32)[None, :].expand(b, -1)
        else:
            if t:
                mask = torch.cat([torch.ones(b, t, dtype=mask.dtype), mask], 1)
            pos = ((mask.cumsum(-1) - 1) * mask).to(torch.float32)
        if zero_prefix_bias:
            real = pos[:, :s] if mask is None else ((mask[:, t:].cumsum(-1) - 1) * mask[:, t:]).to(torch.float32)
            pos = torch.cat([torch.zeros(b, t), real], 1)
        alibi = (SLOPES[None, :, None] * pos[:, None, :]).reshape(b * H, 1, -1)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), alpha=D ** -0.5).view(b, H, s, -1)
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].to(torch.float32)) * -1e9
        p = torch.softmax(scores, dim=-1).view(b * H, s, -1)
        return torch.bmm(p, v).view(b, H, s, D).transpose(1, 2).reshape(b, s, H * D)


def _export(module, path, with_mask: bool):
    x = torch.randn(2, 6, 16)
    args, names = (x, torch.ones(2, 6, dtype=torch.long)) if with_mask else (x,), ["x", "mask"][: 1 + with_mask]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["y"], opset_version=17,
                          dynamic_axes={n: {0: "b", 1: "s"} for n in names})
    return lora_fx.load(path)


def _prefixes(site: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {site: (torch.randn(H, T, D, generator=gen), torch.randn(H, T, D, generator=gen))}


def _run(model, tmp_path, feeds):
    lora_fx.save(model, tmp_path / "prefixed.onnx")
    sess = ort.InferenceSession(str(tmp_path / "prefixed.onnx"), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _site(model):
    sites = [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]
    assert [(s.op, s.num_heads, s.kv_heads, s.head_dim) for s in sites] == [("merged_heads", H, H, D)]
    return sites


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_merged_heads_without_a_bias_take_prefixes_in_their_layout(tmp_path):
    torch.manual_seed(0)
    mod = _Merged(bias=False).eval()
    model = _export(mod, tmp_path / "merged.onnx", with_mask=False)
    sites = _site(model)
    prefixes = _prefixes(sites[0].name)
    InsertPrefix(lora_fx.PrefixConfig(num_virtual_tokens=T), sites, prefixes)(model)
    assert tuple(model.graph.initializers[prefix_metadata(model)["sites"][sites[0].name]["key"]].shape) == (H, T, D)
    xs = [torch.randn(b, s, 16) for b, s in [(2, 6), (3, 9), (1, 4)]]
    for x, ours in zip(xs, _run(model, tmp_path, [{"x": x.numpy()} for x in xs])):
        with torch.no_grad():
            ref = mod(x, *prefixes[sites[0].name]).numpy()
            assert _rel(ours, ref) <= 1e-5
            assert _rel(mod(x).numpy(), ref) > 1e-2


@pytest.mark.parametrize("with_mask", [True, False])
def test_alibi_is_recomputed_for_the_prefix_keys(tmp_path, with_mask):
    """From cumsum(mask) with T ones in front, or arange(T + k) without a mask: what PEFT's cache makes Bloom compute.
    The original ALiBi nodes, read by nothing once replaced, are gone; the inserted nodes have unique names."""
    torch.manual_seed(0)
    mod = _Alibi().eval()
    model = _export(mod, tmp_path / "alibi.onnx", with_mask)
    dead_before = {n.name for n in model.graph if not any(is_used(o) for o in n.outputs)}
    sites = _site(model)
    prefixes = _prefixes(sites[0].name)
    result = InsertPrefix(lora_fx.PrefixConfig(num_virtual_tokens=T), sites, prefixes)(model)
    assert result.changed == [sites[0].name]  # ALiBi's positions are no position embedding to move
    assert {n.name for n in model.graph if not any(is_used(o) for o in n.outputs)} == dead_before
    names = [n.name for n in model.graph]
    assert len(names) == len(set(names))
    cases = []
    for b, s, pad in [(2, 6, 0), (3, 9, 4), (1, 4, 0), (3, 7, 2)]:
        x, mask = torch.randn(b, s, 16), torch.ones(b, s, dtype=torch.long)
        mask[-1, :pad] = 0  # left padding
        cases.append((x, mask if with_mask else None))
    feeds = [{"x": x.numpy(), **({"mask": m.numpy()} if m is not None else {})} for x, m in cases]
    pk, pv = prefixes[sites[0].name]
    for (x, mask), ours in zip(cases, _run(model, tmp_path, feeds)):
        keep = mask.bool().numpy() if mask is not None else np.ones(x.shape[:2], bool)
        with torch.no_grad():
            ref = mod(x, mask, pk, pv).numpy()
        assert _rel(ours[keep], ref[keep]) <= 1e-5
        with torch.no_grad():
            plain = mod(x, mask).numpy()
            zeros = mod(x, mask, pk, pv, zero_prefix_bias=True).numpy()
        assert _rel(plain[keep], ref[keep]) > 1e-2
        # The check tells: ALiBi padded with zeros for the prefix keys (real keys not numbered after them) differs.
        assert _rel(zeros[keep], ref[keep]) > 1e-3


def test_a_key_bias_lora_fx_cannot_recompute_is_refused_before_any_change(tmp_path):
    """A bias over the keys computed from the hidden states: PEFT's prefix keys would need a bias lora_fx cannot
    know. Refused naming the site and the ways out; the model is as it was."""
    model = _export(_Merged(bias=True).eval(), tmp_path / "biased.onnx", with_mask=False)
    _site(model)
    before = ([n.op_type for n in model.graph], sorted(model.graph.initializers))
    with pytest.raises(UnsupportedError, match=r"adds a bias over its keys .*cannot recompute.*LoraConfig.*export_onnx"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert ([n.op_type for n in model.graph], sorted(model.graph.initializers)) == before
    assert not prefix_metadata(model)


class _FixedKeys(_Merged):
    """The scores viewed as [batch, heads, q, k] naming k (the sequence length read at run time), not -1."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (self.heads(f(x), b, s) for f in (self.q, self.k, self.v))
        p = torch.softmax((torch.bmm(q, k.transpose(1, 2)) * D ** -0.5).view(b, H, s, s), dim=-1).view(b * H, s, s)
        return torch.bmm(p, v).view(b, H, s, D).transpose(1, 2).reshape(b, s, H * D)


def test_a_view_naming_the_key_length_is_refused(tmp_path):
    model = _export(_FixedKeys(bias=False).eval(), tmp_path / "fixed.onnx", with_mask=False)
    _site(model)
    with pytest.raises(UnsupportedError, match=r"Reshape .* does not leave the key axis to be inferred"):
        insert_prefix(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert not prefix_metadata(model)


class _ThreeD(_Merged):
    """bmm-softmax-bmm on [batch*heads, ...] viewed only in 3-D (as nn.MultiheadAttention computes): no head count."""

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (self.heads(f(x), b, s) for f in (self.q, self.k, self.v))
        scores = (torch.bmm(q, k.transpose(1, 2)) * D ** -0.5).view(b * H, s, -1)
        p = torch.softmax(scores, dim=-1).view(b * H, s, -1)
        return torch.bmm(p, v).view(b, H, s, D).transpose(1, 2).reshape(b, s, H * D)


def test_attention_without_a_heads_view_is_no_site(tmp_path):
    """Without the [batch, heads, q, k] view the prefix shape is unknown: no site (as in the FX front end), and
    prefix-tuning says there is no attention rather than guessing."""
    model = _export(_ThreeD(bias=False).eval(), tmp_path / "three_d.onnx", with_mask=False)
    assert [n for n in model.graph if n.op_type == "Softmax"]
    assert not [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]
    with pytest.raises(lora_fx.errors.TargetNotFoundError, match="no attention site"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))


def test_merged_heads_whose_head_count_is_unreadable_are_refused_naming_the_fx_route(tmp_path):
    """The [batch, heads, q, k] view's head count computed in the graph and no static shape to read it from: no site,
    and prefix-tuning refuses (naming the torch route) rather than report a model without attention."""
    import onnx
    import onnx_ir as ir

    model = _export(_Merged(bias=False).eval(), tmp_path / "merged.onnx", with_mask=False)
    view = next(n for n in model.graph if n.op_type == "Softmax").inputs[0].producer()
    concat = view.inputs[1].producer()
    assert view.op_type == "Reshape" and len(concat.inputs) == 4
    # heads = Shape(x)[2] // 4 (16 // 4): a value of the graph, not a constant.
    nodes = [ir.node("Shape", [model.graph.inputs[0]], attributes={"start": 2, "end": 3}),
             ir.node("Constant", [], attributes={"value": ir.tensor(np.array([4], np.int64))})]
    nodes.append(ir.node("Div", [nodes[0].outputs[0], nodes[1].outputs[0]]))
    model.graph.insert_before(concat, nodes)
    concat.replace_input_with(1, nodes[2].outputs[0])
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
    model = ir.serde.deserialize_model(proto)
    assert not [s for s in find_sites(model) if s.kind is SiteKind.ATTENTION]
    with pytest.raises(UnsupportedError, match=r"heads merged into the batch axis.*does not say how many heads.*export_onnx"):
        lora_fx.apply(model, lora_fx.PrefixConfig(num_virtual_tokens=T))
    assert not prefix_metadata(model)
