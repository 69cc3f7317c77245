"""nn.MultiheadAttention in an ONNX file, targeted as a whole, against PEFT's ``lora.MultiheadAttention``.

The attention module runs out_proj's Gemm itself, so ONNX names its node after ``attn``; the site is named after
the weight's module (``attn.out_proj``) and marked ``part_of`` the attention, as on the FX front end (see
``tests/lora_fx/test_multihead_attention.py`` for the FX side and for why outputs are compared with the model
PEFT's tensors describe rather than with PEFT's own forward).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_fx
from lora_fx.adapters import WEIGHTS_NAME
from lora_fx.passes.onnx.lora_layout import read_records
from tests.exported import ort_run, rel
from tests.lora_fx.test_multihead_attention import _merged, _peft_pairs
from tests.models import peft_lora_modules, peft_wrap


def export_block(block: torch.nn.Module, out: Path) -> dict[str, Path]:
    """``block`` exported by both exporters, with dynamic batch and sequence."""
    x = torch.randn(2, 5, 8)
    # Not under no_grad: there nn.MultiheadAttention takes its fused fast path, which TorchScript cannot export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (), str(out / "dynamo.onnx"), kwargs={"x": x}, dynamo=True, input_names=["x"],
                          dynamic_shapes={"x": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}}, verbose=False)
        torch.onnx.export(block, (x,), str(out / "torchscript.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b", 1: "s"}}, opset_version=17)
    return {k: out / f"{k}.onnx" for k in ("dynamo", "torchscript")}


@pytest.fixture(scope="module")
def exports():
    """``_Block`` (seed 0) and its two files, made once per process (tests/passes/onnx/test_find_sites.py reads them too)."""
    from tests.shared_exports import mha_exports

    return mha_exports()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["attn"], rank_pattern={"attn": 3}, alpha_pattern={"attn": 12}),
    dict(target_modules=["attn"], rank_pattern={"out_proj": 3}),  # out_proj takes the attention's rank, as in PEFT
    dict(target_modules=["attn", "fc"], exclude_modules=["out_proj"]),
    dict(target_modules=["out_proj"]),
], ids=["rank-alpha-of-attn", "out_proj-pattern", "out_proj-excluded", "out_proj-alone"])
def test_selection_rank_and_scale_equal_peft(exports, exporter, kwargs):
    """``["attn"]`` used to adapt in_proj alone (out_proj was ``attn_2``, no part of it)."""
    from lora_fx.adapters import peft_site_name

    block, paths = exports
    model = lora_fx.load(paths[exporter])
    lora_fx.apply(model, lora_fx.LoraConfig(r=2, lora_alpha=4, **kwargs))
    ours = {peft_site_name(site, rec.get("part_of")): (rec["r"], rec["scale"]) for site, rec in read_records(model).items()}
    wrapped = peft_lora_modules(peft_wrap(block, r=2, lora_alpha=4, **kwargs))
    assert ours == {n: (m.r["default"], pytest.approx(m.scaling["default"], rel=1e-12)) for n, m in wrapped.items()}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_adapted_file_computes_what_its_peft_adapter_describes(exports, exporter, tmp_path):
    """Both projections adapted in the ONNX file (run in ONNX Runtime) give the outputs of ``W + s B A`` on in_proj
    and out_proj with the tensors of the saved PEFT adapter, which PEFT loads as exactly its two adapters."""
    import peft
    from safetensors.torch import load_file

    block, paths = exports
    torch.manual_seed(3)
    model = lora_fx.apply(lora_fx.load(paths[exporter]),
                          lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False))
    assert {site: rec.get("part_of") for site, rec in read_records(model).items()} == {"attn": None, "attn.out_proj": "attn"}
    lora_fx.save_adapter(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"] == ["attn"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(block), tmp_path / "peft").eval()
    assert set(peft_lora_modules(pm)) == {"attn", "attn.base_layer.out_proj"}  # no second out_proj adapter
    assert sorted(load_file(str(tmp_path / "peft" / WEIGHTS_NAME))) == sorted(peft.get_peft_model_state_dict(pm))
    ref = _merged(block, _peft_pairs(pm), 2.0)
    lora_fx.save(model, tmp_path / "lora.onnx")
    gen = torch.Generator().manual_seed(1)
    # TorchScript bakes the example's batch and length into nn.MultiheadAttention's reshapes, dynamic axes or not.
    for b, s in [(2, 5), (3, 7)] if exporter == "dynamo" else [(2, 5)]:
        x = torch.randn(b, s, 8, generator=gen)
        got = ort_run(tmp_path / "lora.onnx", {"x": x.numpy()})
        with torch.no_grad():
            want, base = ref(x).numpy(), block(x).numpy()
        assert rel(got, want) <= 1e-5
        assert rel(got, base) > 1e-3  # the adapters matter, out_proj's too
        assert np.isfinite(got).all()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_peft_adapter_loads_into_the_onnx_file(exports, exporter, tmp_path):
    """A PEFT adapter keyed ``attn.base_layer.out_proj`` lands on the ``attn.out_proj`` slot, with the attention's
    rank and alpha (rank_pattern/alpha_pattern on ``attn``): it used to be refused as having no LoRA slot."""
    from tests.models import peft_wrap

    block, paths = exports
    torch.manual_seed(4)
    pm = peft_wrap(copy.deepcopy(block), r=2, lora_alpha=4, target_modules=["attn"], rank_pattern={"attn": 3},
                   alpha_pattern={"attn": 12}, init_lora_weights=False)
    pm.save_pretrained(tmp_path / "peft")
    model = lora_fx.load_adapter(lora_fx.load(paths[exporter]), tmp_path / "peft")
    recs = read_records(model)
    assert {s: (rec.get("part_of"), int(rec["r"])) for s, rec in recs.items()} == {"attn": (None, 3), "attn.out_proj": ("attn", 3)}
    lora_fx.save(model, tmp_path / "lora.onnx")
    ref = _merged(block, _peft_pairs(pm), 12 / 3)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    got = ort_run(tmp_path / "lora.onnx", {"x": x.numpy()})
    with torch.no_grad():
        want, base = ref(x).numpy(), block(x).numpy()
    assert rel(got, want) <= 1e-5
    assert rel(got, base) > 1e-3
    # And back: saved from the ONNX file, PEFT reads the same two adapters.
    lora_fx.save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file

    first, again = load_file(str(tmp_path / "peft" / WEIGHTS_NAME)), load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert sorted(first) == sorted(again)
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=1e-6, atol=1e-7)
