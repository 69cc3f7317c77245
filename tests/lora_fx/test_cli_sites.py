"""``lora-fx sites``: the bundled MiniLM's sites as JSON; a clear one-line error on a bad folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_fx.cli import main
from lora_fx.hf import minilm_dir

LORA_FX = Path(sys.executable).parent / "lora-fx"


def _run(*argv: str) -> subprocess.CompletedProcess:
    cmd = [str(LORA_FX)] if LORA_FX.exists() else [sys.executable, "-m", "lora_fx.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LORA_FX_DEBUG", None)
    return subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_sites_json_on_the_bundled_minilm(zoo):
    proc = _run("sites", "--hf", str(minilm_dir()), "--json")
    assert proc.returncode == 0, proc.stderr
    sites = json.loads(proc.stdout)
    assert isinstance(sites, list)
    linear = {s["name"]: s for s in sites if s["kind"] == "linear"}
    attention = [s for s in sites if s["kind"] == "attention"]
    # The reference: the nn.Linear modules of the same model loaded by transformers.
    expected = {n: (m.in_features, m.out_features) for n, m in zoo.model("minilm").named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n: (s["in_features"], s["out_features"]) for n, s in linear.items()} == expected
    assert len(expected) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output per layer; pooler
    assert len(attention) == 6 and all(s["num_heads"] == 12 and s["head_dim"] == 32 for s in attention)
    assert all({"name", "kind", "in_features", "out_features"} <= set(s) for s in sites)


@pytest.mark.slow
def test_sites_table_and_kind_filter(capsys, tmp_path):
    # A tiny BERT folder written by transformers itself, read back offline.
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    tf.BertModel(cfg).save_pretrained(tmp_path / "bert")
    assert main(["sites", "--hf", str(tmp_path / "bert"), "--kind", "attention"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.1.attention.self" in out and "heads=4 head_dim=8" in out
    assert "2 sites: 0 linear, 2 attention" in out


def test_bad_folder_fails_with_one_line(tmp_path):
    # Through the installed console script: the exit status and stderr a shell user sees.
    proc = _run("sites", "--hf", str(tmp_path), "--json")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-fx: error:") and "config.json not found" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_folder_without_safetensors_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["sites", "--hf", str(tmp_path), "--json"]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "has no .safetensors weights" in lines[0] and "never pickle" in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", "\udcff"])
def test_unreadable_config_json_is_refused_in_one_line(tmp_path, capsys, config):
    # A hand-edited or truncated config.json: named, not a json traceback.
    (tmp_path / "config.json").write_text(config, errors="surrogateescape")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["sites", "--hf", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "restore" in lines[0], captured.err
    assert captured.out == ""


def test_no_model_named_is_an_error(capsys):
    assert main(["sites"]) != 0
    assert "name a model" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sites", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--hf DIR" in out and "--json" in out
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "sites" in capsys.readouterr().out


def _tiny_bert_folder(path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    model = tf.BertModel(cfg).eval()
    model.save_pretrained(path)
    return model, {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fault,match", [
    ("renamed", "the .safetensors files lack 2 weights of BertModel (pooler.dense.bias, pooler.dense.weight)"),
    ("integer", "weight 'encoder.layer.0.attention.self.query.weight' is stored as I32, but BertModel keeps it in floating point"),
    ("reshaped", "weights in the .safetensors files have other shapes than config.json gives them"),
])
def test_safetensors_that_do_not_hold_the_models_weights_are_refused(tmp_path, capsys, fault, match):
    # transformers loaded both with a warning table and exit 0: renamed weights initialised at random, integer
    # weights cast to float; every later step then ran on numbers that were not the checkpoint's.
    from safetensors.torch import save_file

    _, state = _tiny_bert_folder(tmp_path)
    if fault == "renamed":
        state = {k.replace("pooler.", "head."): v for k, v in state.items()}
    elif fault == "integer":
        key = "encoder.layer.0.attention.self.query.weight"
        state[key] = (state[key] * 100).to(torch.int32)
    else:  # transformers' own message pointed at a table above it and at ignore_mismatched_sizes
        key = "encoder.layer.0.attention.self.query.weight"
        state[key] = state[key][:16]
    save_file(state, str(tmp_path / "model.safetensors"))
    assert main(["sites", "--hf", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert match in captured.err and captured.out == "", captured.err
    assert "ignore_mismatched_sizes" not in captured.err


def test_a_pickle_beside_the_safetensors_is_never_read(tmp_path):
    import pickle

    from lora_fx.hf import load_hf_model

    model, state = _tiny_bert_folder(tmp_path)
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    loaded = load_hf_model(tmp_path)
    assert not marker.exists()
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)


def _save_t5(path: Path) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    model.save_pretrained(path)
    return model


def _save_vit(path: Path) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("save", [_save_t5, _save_vit], ids=["t5-encoder-decoder", "vit-image"])
def test_sites_of_an_encoder_decoder_and_an_image_folder(tmp_path, capsys, save):
    # Both failed: the command captured every model with input_ids and attention_mask, and its advice (other example
    # inputs, dynamic=False) could only be followed from Python.
    model = save(tmp_path)
    assert main(["sites", "--hf", str(tmp_path), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    linear = {s["name"] for s in sites if s["kind"] == "linear"}
    # Every nn.Linear of the model runs in its forward: each is a site, under its module name.
    assert linear == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(s["kind"] == "attention" for s in sites)


def test_example_inputs_follow_the_config(tmp_path):
    from lora_fx.hf import example_inputs, load_hf_model

    _save_t5(tmp_path / "t5")
    t5 = example_inputs(load_hf_model(tmp_path / "t5"))
    assert sorted(t5) == ["attention_mask", "decoder_input_ids", "input_ids"] and int(t5["input_ids"].max()) < 100
    _save_vit(tmp_path / "vit")
    assert {k: tuple(v.shape) for k, v in example_inputs(load_hf_model(tmp_path / "vit")).items()} == {"pixel_values": (2, 3, 32, 32)}


def test_a_model_the_command_line_cannot_feed_is_refused_with_the_way_out(tmp_path, capsys):
    import transformers as tf

    torch.manual_seed(0)
    tf.Wav2Vec2Model(tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                       conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)).save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' progress bars
    assert main(["sites", "--hf", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("lora-fx")]  # not transformers' loading bar
    assert captured.out == "" and len(err) == 1, captured.err
    assert "cannot build example inputs for a wav2vec2 model (Wav2Vec2Model, forward takes input_values" in err[0]
    assert "encoder-decoders" in err[0] and "image models" in err[0] and "lora_fx.capture(model, kwargs=" in err[0]


def test_a_capture_failure_says_which_inputs_the_command_used_and_the_python_way_out(tmp_path, capsys, monkeypatch):
    # capture's own ways out (other example inputs, dynamic=False) are arguments the command line does not have.
    import lora_fx
    from lora_fx.errors import CaptureError

    _tiny_bert_folder(tmp_path)

    def refuse(model, **kwargs):
        raise CaptureError("torch.export could not capture BertModel: data-dependent control flow")

    monkeypatch.setattr(lora_fx, "capture", refuse)
    capsys.readouterr()
    assert main(["sites", "--hf", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lora-fx: error: torch.export could not capture BertModel: data-dependent control flow" in err
    assert "lora-fx sites --hf captured BertModel with input_ids, attention_mask built from its config" in err
    assert "lora_fx.capture(model, kwargs={...}, dynamic=...)" in err
