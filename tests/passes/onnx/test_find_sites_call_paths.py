"""Site names of TorchScript exports whose call paths are shorter than the module paths (``CallPathLeads``).

TorchScript names a module by its last name part, so a wrapper that reaches into its model, as Optimum's
``decoder_model.onnx`` wraps a seq2seq decoder with its head (``self.model.model.decoder(...)``,
``self.model.lm_head(...)``), leaves node names ``/decoder/...`` and ``/lm_head/...``. Sites must carry the module
paths PEFT keys its adapters by (``model.model.decoder...``, ``model.lm_head``), also where a weight has no stored
name (a bias-less head: TorchScript stores its transposed weight anonymously), or PEFT leaves those adapters out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import lora_fx
from lora_fx.passes.onnx.find_sites import call_path_leads, find_sites
from lora_fx.sites import SiteKind
from tests.runtime import onnx_models as om


class DecoderWithHead(torch.nn.Module):
    """A seq2seq decoder and its LM head, called through the task model as Optimum's decoder export does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                          encoder_attention_mask=encoder_attention_mask, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden) + self.model.final_logits_bias


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {"input_ids": rng.integers(1, 100, (2, 6)).astype(np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 7, 32)).astype(np.float32),
            "encoder_attention_mask": np.ones((2, 7), np.int64)}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> tuple[DecoderWithHead, Path]:
    import transformers

    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_position_embeddings=64, use_cache=False)
    wrapper = DecoderWithHead(transformers.BartForConditionalGeneration(config).eval()).eval()
    path = tmp_path_factory.mktemp("call_paths") / "decoder.onnx"
    feeds = {k: torch.from_numpy(v) for k, v in _feeds().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (), str(path), kwargs=feeds, dynamo=False, opset_version=17, input_names=list(feeds),
                          output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "s"}, "encoder_hidden_states": {0: "b", 1: "e"},
                                                                        "encoder_attention_mask": {0: "b", 1: "e"}})
    return wrapper, path


def test_torchscript_sites_of_a_wrapper_are_named_by_module_path(decoder) -> None:
    wrapper, path = decoder
    model = ir.load(str(path))
    assert any(n.name.startswith("/lm_head/") for n in model.graph)  # the shortened call path this is about
    modules = dict(wrapper.named_modules())
    linear = [s.name for s in find_sites(model) if s.kind is SiteKind.LINEAR]
    assert "model.lm_head" in linear and not [n for n in linear if n not in modules]
    leads = call_path_leads(model.graph)
    assert leads.by_first == {"decoder": "model.model."} and leads.wrapped == "model."


def test_a_torchscript_head_adapter_round_trips_through_peft(decoder, tmp_path: Path) -> None:
    """The PEFT directory of the rewritten file loads every adapter key into the torch wrapper (no "missing adapter
    keys"), and PEFT's outputs match ONNX Runtime's on the rewritten file."""
    from peft import PeftModel

    wrapper, path = decoder
    torch.manual_seed(1)
    lora = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                              init_lora_weights=False))
    feeds = _feeds()
    want = om.ort_run(om.save(lora, tmp_path / "lora.onnx"), feeds)[0]
    assert np.abs(want - om.ort_run(path, feeds)[0]).max() > 1e-2  # the adapters change the output
    lora_fx.save_adapter(lora, tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(wrapper, str(tmp_path / "peft")).eval()
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message).lower()]
    with torch.no_grad():
        got = peft_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("root_params,head", [
    # OPTForCausalLM exported itself: it calls self.model.decoder(...) and its own lm_head, every stored parameter
    # lies under model.decoder, which the root does not merely wrap: the head keeps its call path.
    ([], "lm_head"),
    # A wrapper holding the task model (parameters under model., final_logits_bias in the task model itself).
    (["model.final_logits_bias"], "model.lm_head"),
])
def test_call_paths_without_stored_names_take_the_learnt_leads(root_params: list[str], head: str) -> None:
    """Decoder linears without a stored name (bias-less fc2) take the lead learnt from their neighbours' biases;
    a root call with nothing learnt (the head) is placed under the wrapped module only where the root wraps one."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"onnx::MatMul_{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.zeros(8, np.float32), name)
              for name in ["model.decoder.layers.0.fc1.bias", *root_params]]
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_0"], ["h0"], name="/decoder/layers.0/fc1/MatMul"),
        helper.make_node("Add", ["model.decoder.layers.0.fc1.bias", "h0"], ["h1"], name="/decoder/layers.0/fc1/Add"),
        helper.make_node("MatMul", ["h1", "onnx::MatMul_1"], ["h2"], name="/decoder/layers.0/fc2/MatMul"),
        helper.make_node("MatMul", ["h2", "onnx::MatMul_2"], ["y"], name="/lm_head/MatMul"),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 3, 8])], [helper.make_tensor_value_info("y", f, None)], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    names = [s.name for s in find_sites(model)]
    assert names == ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2", head]
