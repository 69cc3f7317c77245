"""LoRA on encoder-decoder and vision architectures (T5, BART, Whisper, ViT, CLIP, Swin), on both front ends, against PEFT.

Each tiny seeded model is captured (FX) or exported by the dynamo exporter (ONNX) and rewritten with random (non-zero)
A and B; the sites lora_fx adapts must be those PEFT adapts with the same config, and the outputs (the FX graph, or
ONNX Runtime on the saved file) PEFT's, both ways: our saved adapter loaded by ``PeftModel.from_pretrained``, and a
PEFT-made adapter (and trained-in-full head) loaded by ``lora_fx.load_adapter``. Task types are the ones PEFT's
recipes use: SEQ_2_SEQ_LM for T5 and BART, none for Whisper (PEFT's int8 ASR recipe), ViT, CLIP and Swin, the image
classifiers' head trained in full (``modules_to_save=["classifier"]``). transformers 5 names ViT's and Swin's
projections ``q_proj`` / ``v_proj``, where transformers 4 (and PEFT's image-classification example) had
``query`` / ``value``.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import lora_fx
from tests.exported import ort_run
from tests.models import VOCAB


def _tokens(gen: torch.Generator, seq: int = 8, dec: int | None = 5) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.randint(3, VOCAB, (2, seq), generator=gen)}
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0  # right padding: every decoder position stays defined
    out["attention_mask"] = mask
    if dec:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, dec), generator=gen)
    return out


def _build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str | None, list[str], list[str] | None]:
    """A seeded tiny model in eval mode, its example batch, PEFT task type, classic targets and modules_to_save."""
    import transformers as tf

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    seq2seq = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2)
    vision = dict(image_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    pixels = lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}  # noqa: E731
    if name == "t5":  # gated-GELU feed-forward (flan-T5) and an untied lm_head
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0))
        case = model, _tokens(gen), "SEQ_2_SEQ_LM", ["q", "v"], None
    elif name == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(max_position_embeddings=64, decoder_start_token_id=2, **seq2seq))
        case = model, _tokens(gen), "SEQ_2_SEQ_LM", ["q_proj", "v_proj"], None
    elif name == "whisper":  # a conv front end over mel features; input length = 2 * max_source_positions
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            num_mel_bins=8, max_source_positions=16, max_target_positions=32, decoder_start_token_id=3,
            suppress_tokens=None, begin_suppress_tokens=None, **seq2seq))
        batch = {"input_features": torch.randn(2, 8, 32, generator=gen),
                 "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)}
        case = model, batch, None, ["q_proj", "v_proj"], None
    elif name == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(patch_size=8, num_labels=3, **vision))
        case = model, pixels(), None, ["q_proj", "v_proj"], ["classifier"]
    elif name == "swin":  # windowed attention with a relative position bias table (a Gather)
        model = tf.SwinForImageClassification(tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3))
        case = model, pixels(), None, ["q_proj", "v_proj"], ["classifier"]
    elif name == "clip":
        # projection_dim equals the text position table's rows on purpose: the projections reach graph outputs, and
        # the ONNX front end once took any such layer with as many outputs as some embedding table has rows for
        # the output layer, which all-linear leaves out (PEFT adapts them: CLIPModel has no output embeddings).
        text = dict(vocab_size=VOCAB, max_position_embeddings=16, **{k: v for k, v in vision.items() if k != "image_size"})
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=dict(patch_size=8, **vision), projection_dim=16))
        case = model, {**_tokens(gen, dec=None), **pixels()}, None, ["q_proj", "v_proj"], None
    else:
        raise ValueError(name)
    for module in model.modules():  # T5 gives its decoder stack a config of its own
        if getattr(getattr(module, "config", None), "use_cache", None) is not None:
            module.config.use_cache = False
    return (model.eval(), *case[1:])


def _first(out) -> torch.Tensor:
    """The output the comparisons read: logits (CLIP: logits_per_image, which both towers' projections reach)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys"):
        return next(out[k] for k in ("logits", "logits_per_image") if k in out and out[k] is not None)
    return out[0]


def _export(model: torch.nn.Module, batch: dict[str, torch.Tensor], path) -> None:
    dims = {k: {0: torch.export.Dim("batch")} | ({1: torch.export.Dim(f"seq_{k}")} if v.dim() == 2 else {})
            for k, v in batch.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=batch, dynamo=True, opset_version=18, input_names=list(batch),
                          dynamic_shapes=dims, verbose=False)


def _peft_sites(model: torch.nn.Module, config) -> set[str]:
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and len(m.lora_A)}


def _saved_sites(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys() if ".lora_" in k}


def _assert_close(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    scale = float(np.abs(want).max())
    assert np.abs(want - base).max() > 0.05 * scale  # the adapter moves the output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


CASES = [("t5", "all-linear"), ("bart", "classic"), ("whisper", "all-linear"),
         ("vit", "classic"), ("swin", "all-linear"), ("clip", "all-linear")]
ONNX_CASES = [("t5", "classic"), ("bart", "all-linear"), ("whisper", "classic"), ("vit", "all-linear"), ("clip", "all-linear")]


def _run_case(arch: str, targets: str, front_end: str, tmp_path) -> None:
    import peft

    eager, batch, task, classic, saved = _build(arch)
    target_modules = "all-linear" if targets == "all-linear" else classic
    if front_end == "fx":
        fresh = lambda: lora_fx.capture(eager, kwargs=batch)  # noqa: E731
    else:
        _export(eager, batch, tmp_path / "base.onnx")
        fresh = lambda: lora_fx.load(tmp_path / "base.onnx")  # noqa: E731

    def run(model, name: str) -> np.ndarray:
        if front_end == "fx":
            with torch.no_grad():
                return _first(model(**batch)).numpy()
        lora_fx.save(model, tmp_path / name)
        return ort_run(tmp_path / name, {k: v.numpy() for k, v in batch.items()})

    with torch.no_grad():
        base = _first(eager(**batch)).numpy()

    # Ours -> PEFT: the same sites, and PEFT with our saved adapter computes what the rewritten graph computes.
    torch.manual_seed(1)
    model = lora_fx.apply(fresh(), lora_fx.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type=task,
                                                      modules_to_save=saved, init_lora_weights=False))
    lora_fx.save_adapter(model, tmp_path / "ours")
    want_sites = _peft_sites(eager, peft.LoraConfig(r=4, target_modules=target_modules, task_type=task, modules_to_save=saved))
    assert _saved_sites(tmp_path / "ours") == want_sites
    if targets == "all-linear":
        assert set(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]) == want_sites
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager), tmp_path / "ours").eval()
    with torch.no_grad():
        want = _first(pm(**batch)).numpy()
    _assert_close(run(model, "ours.onnx"), want, base)

    # PEFT -> ours: a PEFT adapter (and, for the image classifiers, a changed head) loads onto a fresh model.
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(eager), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=target_modules, task_type=task, modules_to_save=saved, init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = _first(pm.eval()(**batch)).numpy()
    _assert_close(run(lora_fx.load_adapter(fresh(), tmp_path / "peft"), "peft.onnx"), want, base)


@pytest.mark.slow
@pytest.mark.parametrize("arch,targets", CASES)
def test_fx_lora_matches_peft(arch, targets, tmp_path):
    _run_case(arch, targets, "fx", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch,targets", ONNX_CASES)
def test_onnx_lora_matches_peft(arch, targets, tmp_path):
    _run_case(arch, targets, "onnx", tmp_path)


def test_onnx_all_linear_adapts_a_two_label_classifier_beside_two_token_types(tmp_path):
    """A BERT binary classifier has as many outputs as its token-type table has rows; it is no output layer (PEFT's
    all-linear leaves out get_output_embeddings() only, and without SEQ_CLS adapts the classifier)."""
    import peft
    import transformers as tf

    torch.manual_seed(0)
    eager = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2)).eval()
    batch = {**_tokens(torch.Generator().manual_seed(0), dec=None), "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    _export(eager, batch, tmp_path / "base.onnx")
    torch.manual_seed(1)
    model = lora_fx.apply(lora_fx.load(tmp_path / "base.onnx"),
                          lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    lora_fx.save_adapter(model, tmp_path / "ours")
    assert "classifier" in _saved_sites(tmp_path / "ours")
    assert _saved_sites(tmp_path / "ours") == _peft_sites(eager, peft.LoraConfig(r=2, target_modules="all-linear"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(eager), tmp_path / "ours").eval()
    with torch.no_grad():
        want, base = pm(**batch).logits.numpy(), eager(**batch).logits.numpy()
    lora_fx.save(model, tmp_path / "ours.onnx")
    _assert_close(ort_run(tmp_path / "ours.onnx", {k: v.numpy() for k, v in batch.items()}), want, base)
