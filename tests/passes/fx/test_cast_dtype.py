"""gm.to(dtype) / .half() / .bfloat16() / .float() on a rewritten captured graph behave as on a PEFT model.

torch.export bakes the capture dtype into the graph (``aten.to`` targets, ``_assert_tensor_metadata`` checks); without
``cast_dtype`` the first call after ``gm.to(torch.bfloat16)`` fails with torch's "Tensor dtype mismatch". The
reference is PEFT's model cast the same way, with the same adapter tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from lora_fx.config import InitLoraWeights
from lora_fx.errors import UnsupportedError
from lora_fx.passes.fx.capture import meta
from tests.models import build, copy_ours_into_peft, inputs, max_rel, peft_wrap, run

# One bfloat16 (float16) rounding of the activations compounds over two layers; fp32 vs fp32 is ~1e-6.
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
SHAPES = [(2, 8, 0), (3, 11, 4)]  # the capture example and another size with padding


def _lora(name: str, **kw):
    base = build(name)
    gm = lora_fx.capture(copy.deepcopy(base), kwargs=inputs(2, 8))
    # Random B: with PEFT's zero B the adapters would not show in the outputs.
    lora_fx.apply(gm, lora_fx.LoraConfig(r=4, lora_alpha=8, init_lora_weights=InitLoraWeights.RANDOM, **kw))
    pm = peft_wrap(base, r=4, lora_alpha=8, **kw)
    copy_ours_into_peft(gm, pm)
    return gm, pm


def _assert_close(gm, pm, dtype, shapes=SHAPES):
    for batch, seq, pad in shapes:
        b = inputs(batch, seq, pad=pad, seed=batch + seq)
        ours, theirs = run(gm, b), run(pm, b)
        assert ours.dtype == theirs.dtype == dtype
        keep = b["attention_mask"].bool()
        assert max_rel(ours[keep].float(), theirs[keep].float()) < TOL.get(dtype, 1e-5)


def _cast(module, how, dtype):
    return module.to(dtype) if how == "to" else getattr(module, how)()


@pytest.mark.parametrize("name", ["gpt2", "llama", pytest.param("minilm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("how,dtype", [("to", torch.bfloat16), ("half", torch.float16)])
def test_lora_cast_matches_peft_cast_the_same_way(name, how, dtype):
    gm, pm = _lora(name, target_modules=None if name != "minilm" else ["query", "value", "dense"])
    assert _cast(gm, how, dtype) is gm
    _cast(pm, how, dtype)
    assert {p.dtype for _, p in gm.named_parameters()} == {dtype}  # adapters too, as nn.Module.to does in PEFT
    _assert_close(gm, pm, dtype)
    gm.float(), pm.float()  # and back: the graph computes in float32 again, as PEFT's model does
    _assert_close(gm, pm, torch.float32)


def test_deliberate_float32_upcasts_stay_float32():
    """Llama computes its RMSNorm variance and rotary angles in float32 whatever the model's dtype
    (``.to(torch.float32)``, ``dtype=torch.float``); ``cos.to(dtype=x.dtype)`` and ``.to(input_dtype)`` follow it."""
    gm, _ = _lora("llama")
    gm.to(torch.bfloat16)
    aten = torch.ops.aten
    targets = {}
    for node in gm.graph.nodes:
        if node.target is aten.to.dtype or node.target is aten.to.device:
            line = node.meta["stack_trace"].strip().splitlines()[-1]
            dtype = node.args[1] if node.target is aten.to.dtype else node.args[2]
            if dtype.is_floating_point:  # the masks' bool conversions are not the model's dtype
                targets.setdefault(line.strip(), set()).add(dtype)
    kept = {line: d for line, d in targets.items() if "torch.float" in line}
    followed = {line: d for line, d in targets.items() if "torch.float" not in line}
    assert kept and all(d == {torch.float32} for d in kept.values()), targets
    assert followed and all(d == {torch.bfloat16} for d in followed.values()), targets
    assert meta(gm)["dtype"] == "bfloat16"


def test_qlora_cast_keeps_packed_storage_and_matches_peft_on_the_dequantized_weights():
    """As bitsandbytes: the codes (uint8) and block scales (float32) stay as they are; W is decoded into the
    compute dtype. Reference: PEFT on the same model with W replaced by the dequantized weights, cast the same way."""
    from lora_fx.passes.fx.quantize_weights import dequantized_weight, quantized_nodes

    base = build("llama")
    gm = lora_fx.capture(copy.deepcopy(base), kwargs=inputs(2, 8))
    lora_fx.apply(gm, lora_fx.LoraConfig(r=4, init_lora_weights=InitLoraWeights.RANDOM), quant=lora_fx.QuantConfig())
    storage = {n: b for n, b in gm.named_buffers() if ".q" in n}
    assert {b.dtype for b in storage.values()} >= {torch.uint8, torch.float32}
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for site in quantized_nodes(gm):
            ref.get_submodule(site).weight.copy_(dequantized_weight(gm, site))
    pm = peft_wrap(ref, r=4)
    copy_ours_into_peft(gm, pm)
    saved = {n: b.clone() for n, b in storage.items()}
    gm.to(torch.bfloat16), pm.to(torch.bfloat16)
    after = dict(gm.named_buffers())
    for n, b in saved.items():
        assert after[n].dtype == b.dtype and torch.equal(after[n], b), n
    _assert_close(gm, pm, torch.bfloat16)
    # The sites still report themselves quantized, now computing in bfloat16.
    qsites = [s for s in lora_fx.find_sites(gm) if s.name in quantized_nodes(gm)]
    assert qsites and {s.dtype for s in qsites} == {"bfloat16"}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_cast_matches_peft(tmp_path, name):
    import peft

    base = build(name)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(copy.deepcopy(base), kwargs=inputs(2, 8))
    lora_fx.load_adapter(gm, tmp_path)
    gm.to(torch.bfloat16), pm.to(torch.bfloat16)
    assert {p.dtype for n, p in gm.named_parameters() if "prefix" in n} == {torch.bfloat16}
    _assert_close(gm, pm, torch.bfloat16)


def test_training_after_the_cast_moves_the_adapters_and_peft_loads_them(tmp_path):
    import peft

    base = build("gpt2")
    gm = lora_fx.capture(copy.deepcopy(base), kwargs=inputs(2, 8))
    lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules=["c_attn"]))
    gm.to(torch.bfloat16)
    batch = inputs(2, 8)

    def loss_fn(out, b):
        return out["logits"].float().logsumexp(-1).mean()

    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    result = lora_fx.train(gm, [batch], loss_fn, steps=3, lr=1e-2, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    moved = [n for n, p in gm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(".lora_" in n for n in moved)
    assert all(p.dtype == torch.bfloat16 for _, p in gm.named_parameters())
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path).eval()
    _assert_close(gm, pm, torch.bfloat16)


def test_device_moves_and_copies_keep_working():
    gm, pm = _lora("gpt2")
    assert gm.to("cpu") is gm and gm.cpu() is gm
    twin = copy.deepcopy(gm)
    twin.to(torch.bfloat16)
    _assert_close(gm, pm, torch.float32)  # the original is untouched
    _assert_close(twin, pm.to(torch.bfloat16), torch.bfloat16)


class _FixedMatmul(torch.nn.Module):
    """Upcasts its input to float32 and multiplies by its own weight: fails in eager bfloat16 too."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.mm(self.proj(x).to(torch.float32), self.w)


def test_a_graph_that_cannot_run_in_the_new_dtype_is_refused_and_left_as_it_was():
    torch.manual_seed(0)
    model = _FixedMatmul()
    x = torch.randn(3, 4)
    gm = lora_fx.capture(model, (x,), dynamic=False)
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules=["proj"]))
    want = gm(x)
    code = gm.code
    with pytest.raises(UnsupportedError, match=r"cannot cast this captured graph from float32 to bfloat16.*lora_fx.capture\(model.to\(torch.bfloat16\)"):
        gm.to(torch.bfloat16)
    assert gm.code == code and all(p.dtype == torch.float32 for p in gm.parameters())
    torch.testing.assert_close(gm(x), want)


def test_a_device_move_retargets_the_devices_the_graph_names():
    """Export records the capture device in ``to``/``_assert_tensor_metadata``/factory nodes; after ``gm.to(device)``
    they name the new one (``meta`` stands in for an accelerator here: the graph then runs on meta inputs)."""
    gm, _ = _lora("gpt2")
    gm.to("meta")
    named = {a for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)}
    assert named == {torch.device("meta")}
    out = gm(**{k: v.to("meta") for k, v in inputs(3, 5).items()})
    assert out["logits"].device.type == "meta" and out["logits"].shape == (3, 5, 96)
