"""quantize_weights (QLoRA) on captured GraphModules: memory, exactness against the dequantized float
model, training through packed storage, bad input. The formats' numerics: tests/lora_fx/kernels/test_quant_formats.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lora_fx
from lora_fx.config import QuantConfig, QuantDType
from lora_fx.errors import ConfigError
from lora_fx.passes.fx.capture import meta
from lora_fx.passes.fx.quantize_weights import dequantized_weight, linear_weight_bytes, quantize_weights, quantized_nodes
from tests.models import VOCAB, inputs, main_output, max_rel, run

NF4_DQ = QuantConfig(dtype="nf4", double_quant=True)


# ---- reading the packed storage back ------------------------------------------------------
def test_dequantized_weights_handed_out_never_share_the_scratch_buffer(zoo):
    """Every layer dequantizes into one reused buffer; nothing handed out may point into it."""
    gm = lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(r=4, target_modules="all-linear"), quant=NF4_DQ)
    sites = sorted(quantized_nodes(gm))
    first = dequantized_weight(gm, sites[0])
    kept = first.clone()
    out = run(gm, inputs(2, 8))  # the forward overwrites the scratch with every layer's W
    assert torch.equal(first, kept)  # what dequantized_weight returned is the caller's own tensor
    assert torch.equal(run(gm, inputs(2, 8)), out)


# ---- on graphs --------------------------------------------------------------------------------
def _llama(hidden: int = 32, layers: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def wide_llama():
    """A one-layer Llama of width 256: big enough that per-block scales have their real weight."""
    model = _llama(hidden=256, layers=1)
    return model, lora_fx.capture(model, kwargs=inputs(2, 4))


def _dequantized_model(model: torch.nn.Module, gm: torch.fx.GraphModule) -> torch.nn.Module:
    """The eager model with every quantized site's weight replaced by its dequantized value."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for site in quantized_nodes(gm):
            mod = ref.get_submodule(site)
            w = dequantized_weight(gm, site, dtype=mod.weight.dtype)
            # GPT-2's Conv1D keeps its weight [in, out].
            mod.weight.copy_(w.t() if type(mod).__name__ == "Conv1D" else w)
    return ref


@pytest.mark.parametrize("dtype", list(QuantDType))
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_zero_adapters_on_quantized_base_equal_dequantized_model(zoo, name, dtype):
    gm = zoo.gm(name)
    quant = QuantConfig(dtype=dtype, double_quant=dtype is QuantDType.NF4, symmetric=name != "bert" or dtype is not QuantDType.INT4)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear"), quant=quant)
    sites = [s for s in lora_fx.find_sites(gm) if s.kind.value == "linear"]
    quantized = [s for s in sites if s.op.startswith("lora_fx.linear_")]
    assert quantized and {s.name for s in quantized} == set(meta(gm)["lora_sites"])
    ref = _dequantized_model(zoo.model(name), gm)
    for batch, seq, pad in [(2, 8, 0), (3, 11, 4)]:
        b = inputs(batch, seq, pad=pad, seed=batch)
        got, want = run(gm, b), run(ref, b)
        assert max_rel(got, want) <= 1e-6
        # Quantization really changed the model, so the comparison above can fail.
        assert max_rel(got, run(zoo.model(name), b)) > 1e-5


@pytest.mark.parametrize("dtype", list(QuantDType))
def test_a_layer_decoded_in_many_tiles_gives_the_whole_weight_s_output_and_input_gradient(dtype, monkeypatch):
    """The ops decode W a tile of rows at a time; force many tiles (the last one short) on one layer."""
    from lora_fx.kernels import tiled_linear

    monkeypatch.setattr(tiled_linear, "TILE_VALUES", 1000)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(96, 200))
    x = torch.randn(3, 7, 96)
    gm = lora_fx.capture(layer, args=(x,))
    gm = lora_fx.passes.fx.quantize_weights.quantize_weights(gm, QuantConfig(dtype=dtype, target_modules=".*")).model
    (site,) = quantized_nodes(gm)
    w = dequantized_weight(gm, site)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = main_output(gm(xq)), torch.nn.functional.linear(xr, w, layer[0].bias.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(xq.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_sites_keep_names_and_shapes(zoo):
    gm = zoo.gm("gpt2")
    before = {s.name: (s.in_features, s.out_features, s.has_bias) for s in lora_fx.find_sites(gm) if s.kind.value == "linear"}
    lora_fx.passes.fx.quantize_weights.quantize_weights(gm, QuantConfig(dtype="int4"))
    after = {s.name: (s.in_features, s.out_features, s.has_bias) for s in lora_fx.find_sites(gm) if s.kind.value == "linear"}
    assert before == after
    ops = {s.name: s.op for s in lora_fx.find_sites(gm)}
    assert ops["transformer.h.0.attn.c_attn"] == "lora_fx.linear_int4"
    assert ops["lm_head"] == "aten.linear"  # the output layer stays float by default


@pytest.mark.parametrize("quant, limit", [
    (QuantConfig(dtype="nf4", double_quant=True), 0.13),
    (QuantConfig(dtype="nf4"), 0.1407),  # fp32 absmax per 64: 4.5 bits
    (QuantConfig(dtype="int4", block_size=64), 0.14),
    (QuantConfig(dtype="int4", block_size=64, symmetric=False), 0.14),
    (QuantConfig(dtype="int8"), 0.26),
])
def test_frozen_weight_bytes_shrink(wide_llama, quant, limit):
    model, gm = wide_llama
    gm = copy.deepcopy(gm)
    float_total = linear_weight_bytes(gm)
    head = model.lm_head.weight.numel() * 4
    result = lora_fx.passes.fx.quantize_weights.quantize_weights(gm, quant)
    ratio = (linear_weight_bytes(gm) - head) / (float_total - head)
    assert ratio <= limit, ratio
    report = meta(gm)["quant"]
    assert sum(r["bytes_after"] for r in report.values()) / sum(r["bytes_before"] for r in report.values()) == pytest.approx(ratio)
    assert all(r["rel_rms_error"] < (0.02 if quant.dtype is QuantDType.INT8 else 0.2) for r in report.values())
    assert len(result.changed) == 7 and "error" in result.changed[0]
    # No float copy of a quantized weight remains on the module.
    names = {n for n, _ in gm.named_parameters()}
    assert not any(n.endswith("q_proj.weight") or n.endswith("down_proj.weight") for n in names)
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters()) - 7 * 256 * 256


def test_backward_saves_no_float_weight(zoo):
    """The op recomputes W in backward; a dequantize node feeding aten.linear would save a float W per layer."""
    gm = zoo.gm("llama")
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear"), quant=NF4_DQ)
    weight_shapes = {tuple(r["shape"]) for r in meta(gm)["quant"].values()} | {tuple(r["shape"][::-1]) for r in meta(gm)["quant"].values()}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = main_output(gm(**inputs(2, 6)))
    out.float().pow(2).mean().backward()
    float_weights = [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    assert not float_weights, float_weights
    assert saved  # the hook did see the step's saved activations


@pytest.mark.parametrize("dtype", list(QuantDType))
def test_torch_compile_trains_through_quantized_weights_like_eager(zoo, dtype):
    """AOT autograd traces the op's backward: it must see one opaque call (the input-gradient op), not the
    native decode inside it, and the compiled step must give the eager step's outputs and gradients."""
    gm = zoo.gm("llama")
    torch.manual_seed(0)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                       quant=QuantConfig(dtype=dtype))
    batch = inputs(2, 6)
    params = {n: p for n, p in gm.named_parameters() if p.requires_grad}

    def step(module):
        for p in params.values():
            p.grad = None
        out = main_output(module(**batch))
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items()}

    want_out, want_grads = step(gm)
    torch._dynamo.reset()
    got_out, got_grads = step(torch.compile(gm))
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for name in params:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5)


def test_gradients_reach_adapters_only(zoo):
    gm = zoo.gm("llama")
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), quant=NF4_DQ)
    main_output(gm(**inputs(2, 6))).pow(2).mean().backward()
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gm.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in gm.named_parameters() if n not in trainable)
    assert all(b.grad is None and not b.requires_grad for b in gm.buffers())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = _llama(dtype=dtype)
    gm = lora_fx.capture(model, kwargs=inputs(2, 4))
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear"), quant=NF4_DQ)
    assert {s.dtype for s in lora_fx.find_sites(gm) if s.op.startswith("lora_fx.")} == {str(dtype).removeprefix("torch.")}
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if ".lora_" in n)
    b = inputs(2, 6)
    got, want = run(gm, b), run(_dequantized_model(model, gm), b)
    assert got.dtype == dtype
    assert max_rel(got.float(), want.float()) <= 1e-6
    main_output(gm(**b)).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if p.requires_grad)


def _lm_loss(out, batch):
    logits = main_output(out)[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def _train_keeps_storage(gm, batches, loss_fn, steps, lr):
    storage = {n: b.clone() for n, b in gm.named_buffers() if n.rsplit(".", 1)[-1].startswith("q")}
    assert storage
    result = lora_fx.train(gm, batches, loss_fn, steps=steps, lr=lr, progress=False)
    for n, b in gm.named_buffers():
        if n in storage:
            assert torch.equal(b, storage[n]), n
    return result


def test_training_through_packed_weights_lowers_loss(zoo):
    gm = zoo.gm("llama")
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), quant=QuantConfig(dtype="int4"))
    batches = [inputs(4, 12, seed=s) for s in range(2)]
    with torch.no_grad():
        before = sum(float(_lm_loss(gm(**b), b)) for b in batches)
    _train_keeps_storage(gm, batches, _lm_loss, steps=30, lr=1e-2)
    with torch.no_grad():
        after = sum(float(_lm_loss(gm(**b), b)) for b in batches)
    assert after < before * 0.9, (before, after)


@pytest.mark.slow
def test_qlora_training_on_minilm_lowers_loss(zoo):
    gm = lora_fx.apply(zoo.gm("minilm"), lora_fx.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), quant=NF4_DQ)
    assert len(quantized_nodes(gm)) == 37  # every linear site: 6 per layer, 6 layers, and the pooler
    torch.manual_seed(0)
    target = torch.randn(384)
    batches = [inputs(4, 8, seed=s) for s in range(2)]

    def loss_fn(out, batch):
        return (main_output(out)[:, 0] - target).pow(2).mean()

    result = _train_keeps_storage(gm, batches, loss_fn, steps=12, lr=2e-2)
    assert result.losses[-1] < result.losses[0] * 0.9, result.losses


# ---- bad input --------------------------------------------------------------------------------
def test_quantizing_twice_is_refused(zoo):
    gm = zoo.gm("llama")
    lora_fx.passes.fx.quantize_weights.quantize_weights(gm, QuantConfig(dtype="nf4"))
    with pytest.raises(ConfigError, match="already quantized.*capture the float model again"):
        lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules="all-linear"), quant=QuantConfig(dtype="int8"))
    # LoRA on the quantized sites is still fine.
    lora_fx.apply(gm, lora_fx.LoraConfig(r=2, target_modules="all-linear"))


def _odd_llama() -> torch.nn.Module:
    """hidden 36 (head_dim 6), intermediate 72: with blocks of 32, nf4's flattened [36, 36] W ends on a short
    block, int4's 36-wide rows take 2 blocks (padded) and 72-wide rows 3 (a padding nibble in each row's
    zero points)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=36, intermediate_size=72, num_hidden_layers=1, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


ODD_BLOCKS = {
    "nf4-dq": QuantConfig(dtype="nf4", block_size=32, double_quant=True, double_quant_block_size=16),
    "int4": QuantConfig(dtype="int4", block_size=32),
    "int4-affine": QuantConfig(dtype="int4", block_size=32, symmetric=False),
}


def test_block_size_that_does_not_divide_is_refused_without_pad():
    gm = lora_fx.capture(_odd_llama(), kwargs=inputs(2, 4))
    with pytest.raises(ConfigError, match=r"1296 weights \(36x36\) is not a multiple of block_size=32.*pad=True"):
        quantize_weights(copy.deepcopy(gm), QuantConfig(block_size=32, pad=False))
    with pytest.raises(ConfigError, match=r"in_features 36 is not a multiple of block_size=32.*pad=True"):
        quantize_weights(copy.deepcopy(gm), QuantConfig(dtype="int4", block_size=32, pad=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ODD_BLOCKS))
def test_padded_blocks_run_in_onnx_runtime_like_torch(tmp_path, name):
    """Padding is what ONNX Runtime reads: nf4 pads W flattened (MatMulBnb4), int4 pads every row (MatMulNBits);
    the exported graph gives the torch forward, which gives the eager model with the dequantized weights."""
    import onnxruntime as ort

    from lora_fx.export import export_onnx
    from lora_fx.quant_export import onnx_translation_table

    model = _odd_llama()
    gm = quantize_weights(lora_fx.capture(model, kwargs=inputs(2, 4)), ODD_BLOCKS[name]).model
    assert len(quantized_nodes(gm)) == 7
    b = inputs(3, 7, pad=2)
    assert max_rel(run(gm, b), run(_dequantized_model(model, gm), b)) <= 1e-6
    assert max_rel(run(gm, b), run(model, b)) > 1e-4  # quantization changed W, so the comparison can fail
    torch.manual_seed(1)
    gm = lora_fx.apply(gm, lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    want = run(gm, b)
    result = export_onnx(gm, tmp_path / "q.onnx", kwargs=inputs(2, 4), mode="adapters", optimize=False, peft_dir=False,
                         custom_translation_table=onnx_translation_table())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in b.items()}, run_options)[0])
    assert max_rel(got, want) <= 1e-4


def test_quant_config_round_trip_and_validation(zoo):
    cfg = QuantConfig(dtype="NF4", block_size=32, double_quant=True, target_modules=("q_proj", "v_proj"))
    assert cfg.dtype is QuantDType.NF4 and cfg.target_modules == ["q_proj", "v_proj"]
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="nf4, int4, int8"):
        QuantConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="even integer"):
        QuantConfig(block_size=63)
    for bad in (0, -64, True, 64.0, "64"):
        with pytest.raises(ConfigError, match="block_size must be an even integer"):
            QuantConfig(block_size=bad)
    # ONNX Runtime's MatMulBnb4 / MatMulNBits run blocks of 16..256 only (powers of two): refused up front.
    for bad in (2, 8, 48, 96, 512, 4096):
        for dtype in ("nf4", "int4"):
            with pytest.raises(ConfigError, match=rf"block_size={bad} is not one ONNX Runtime's 4-bit matmuls .* run; use one of 16, 32, 64, 128, 256"):
                QuantConfig(dtype=dtype, block_size=bad)
    with pytest.raises(ConfigError, match="block_size applies to nf4 and int4 blocks only, not to int8"):
        QuantConfig(dtype="int8", block_size=48)  # int8 has no blocks
    with pytest.raises(ConfigError, match="double_quant_block_size must be an even integer"):
        QuantConfig(double_quant=True, double_quant_block_size=0)
    with pytest.raises(ConfigError, match="double_quant applies to nf4"):
        QuantConfig(dtype="int4", double_quant=True)
    with pytest.raises(ConfigError, match="double_quant applies to nf4"):
        QuantConfig(dtype="int8", double_quant=True)
    with pytest.raises(ConfigError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"dtype": "nf4", "bits": 4})
    with pytest.raises(ConfigError, match="QuantConfig"):
        lora_fx.apply(zoo.gm("llama"), lora_fx.LoraConfig(), quant="nf4")


def test_tied_output_layer_stays_float(zoo):
    gm = zoo.gm("gpt2")
    result = lora_fx.passes.fx.quantize_weights.quantize_weights(gm, QuantConfig(target_modules=["lm_head"]))
    assert not result.modified and "left in float" in result.changed[0]
    assert not quantized_nodes(gm)


# ---- ONNX export ------------------------------------------------------------------------------
def _onnx_weight_bytes(model) -> int:
    """Bytes of the initializers that feed linear sites' weights (packed storage and scales included), also
    where the exporter computes an op's input from them with constant nodes (int4's Reshape, nf4's absmax decode)."""
    from lora_fx.passes.onnx.find_sites import linear_parts

    def read(n):  # the values a node computes from: CastLike's second input (int8's activation) gives only a type
        return [i for i in (n.inputs[:1] if n.op_type == "CastLike" else n.inputs) if i is not None]

    total, seen = 0, set()
    for node in model.graph:
        parts = linear_parts(node)
        if parts is None or parts.weight is None:
            continue
        values = [parts.weight] + ([v for v in node.inputs[2:4] if v is not None] if node.domain == "com.microsoft" else [])
        values += [v for n in parts.chain for v in read(n)[1:]]
        while values:
            v = values.pop()
            if v.name in seen:
                continue
            seen.add(v.name)
            if v.const_value is not None:
                total += v.const_value.nbytes
            elif v.producer() is not None:
                values += [i for i in read(v.producer()) if i is not node.inputs[0]]
    return total


@pytest.mark.slow
@pytest.mark.parametrize("quant, op, limit", [
    (QuantConfig(dtype="nf4", double_quant=True), "MatMulBnb4", 0.14),
    (QuantConfig(dtype="int4", block_size=64), "MatMulNBits", 0.14),
    (QuantConfig(dtype="int8"), "DequantizeLinear", 0.26),
])
def test_onnx_runtime_runs_exported_quantized_model(tmp_path, wide_llama, quant, op, limit):
    import onnxruntime as ort

    from lora_fx.export import export_onnx
    from lora_fx.onnx_model import load
    from lora_fx.quant_export import onnx_translation_table

    model, gm = wide_llama
    float_bytes = linear_weight_bytes(gm) - model.lm_head.weight.numel() * 4
    gm = lora_fx.apply(copy.deepcopy(gm), lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), quant=quant)
    path = tmp_path / "q.onnx"
    result = export_onnx(gm, path, kwargs=inputs(2, 4), mode="adapters", optimize=False, peft_dir=False,
                         custom_translation_table=onnx_translation_table())
    onnx_model = load(path)
    assert op in {n.op_type for n in onnx_model.graph}
    sites = {s.name for s in lora_fx.find_sites(onnx_model) if s.kind.value == "linear"}
    assert set(quantized_nodes(gm)) <= sites
    ratio = (_onnx_weight_bytes(onnx_model) - model.lm_head.weight.numel() * 4) / float_bytes
    assert limit - 0.03 < ratio <= limit, ratio  # the packed bytes are counted, computed inputs included
    options = ort.SessionOptions()
    # ORT's default for DQ+MatMul fusions quantizes activations to int8; training numerics are float.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(result.adapter_paths[0]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    b = inputs(3, 7, pad=2)
    feeds = {k: v.numpy() for k, v in b.items()}
    got = torch.from_numpy(session.run(None, feeds, run_options)[0])
    assert max_rel(got, run(gm, b)) <= 1e-4
    # The random adapters matter, so the comparison above can fail: without them ORT gives another output.
    assert max_rel(torch.from_numpy(session.run(None, feeds)[0]), run(gm, b)) > 1e-3


class _TwoWeights(torch.nn.Module):
    """F.linear on two same-shape parameters of one module (and nn.MultiheadAttention's in_proj beside out_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(16, 16))
        self.w2 = torch.nn.Parameter(torch.randn(16, 16))
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        h = F.linear(torch.relu(F.linear(x, self.w1)), self.w2)
        return self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("dtype", list(QuantDType))
def test_weights_of_one_module_keep_their_own_storage(dtype):
    """Each weight's packed storage is its own: registering every weight as <module>.qweight let the last overwrite the others."""
    torch.manual_seed(0)
    model = _TwoWeights().eval()
    gm = lora_fx.capture(model, (torch.randn(2, 5, 16),))
    quantize_weights(gm, QuantConfig(dtype=dtype, target_modules="all-linear", **({} if dtype is QuantDType.INT8 else {"block_size": 16})))
    assert set(quantized_nodes(gm)) == {"w1", "w2", "attn", "attn.out_proj"}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for site, param in [("w1", ref.w1), ("w2", ref.w2), ("attn", ref.attn.in_proj_weight), ("attn.out_proj", ref.attn.out_proj.weight)]:
            param.copy_(dequantized_weight(gm, site))
        for b, s in [(2, 5), (3, 7)]:
            x = torch.randn(b, s, 16)
            assert max_rel(gm(x), ref(x)) <= 1e-5
            assert max_rel(gm(x), model(x)) > 1e-4  # quantization really changed W, so the comparison can fail


def test_transposed_weight_matmul_quantizes_like_a_linear(zoo):
    """Falcon's x @ W.T: W is already [out, in]; the W.T node goes with the float W."""
    gm = lora_fx.apply(zoo.gm("falcon"), lora_fx.LoraConfig(r=4, target_modules="all-linear"), quant=NF4_DQ)
    assert {s.op for s in lora_fx.find_sites(gm) if s.kind.value == "linear"} == {"lora_fx.linear_nf4", "aten.linear"}
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.numpy_T.default]
    ref = _dequantized_model(zoo.model("falcon"), gm)
    b = inputs(3, 11, pad=4, seed=3)
    got = run(gm, b)
    assert max_rel(got, run(ref, b)) <= 1e-6
    assert max_rel(got, run(zoo.model("falcon"), b)) > 1e-5


# ---- training numerics --------------------------------------------------------------------------
def _lora_step(gm: torch.fx.GraphModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in gm.parameters():
        p.grad = None
    out = main_output(gm(**batch))
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", [NF4_DQ, QuantConfig(dtype="int4", block_size=16, symmetric=False), QuantConfig(dtype="int8")],
                         ids=["nf4-dq", "int4-affine", "int8"])
def test_adapter_gradients_equal_the_dequantized_float_model_s_and_both_decoders_agree_bit_for_bit(zoo, quant, monkeypatch):
    """QLoRA trains the adapters of ``x @ deq(W).T``: the adapters' gradients through the packed storage are
    those of the float model whose W is the dequantized W, the native decode and the torch fallback
    (LORA_FX_NATIVE=0) give the same step bit for bit, and the packed storage gets no gradient and stays."""
    from lora_fx.kernels import dequant

    lora = lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    gq = lora_fx.apply(zoo.gm("llama"), lora, quant=quant)
    gf = lora_fx.apply(lora_fx.capture(_dequantized_model(zoo.model("llama"), gq), kwargs=inputs(2, 8)), lora)
    adapters = {n: p for n, p in gq.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in gf.named_parameters():
            if p.requires_grad:
                p.copy_(adapters[n])
    storage = {n: b.clone() for n, b in gq.named_buffers() if n.rsplit(".", 1)[-1].startswith("q")}
    batch = inputs(2, 6, pad=1)
    out_q, grads_q = _lora_step(gq, batch)
    out_f, grads_f = _lora_step(gf, batch)
    assert grads_q.keys() == grads_f.keys() == adapters.keys()
    assert max_rel(out_q, out_f) <= 1e-6
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_f[name], rtol=1e-4, atol=1e-7)
    assert all(not b.requires_grad and b.grad is None for b in gq.buffers())
    assert all(torch.equal(b, storage[n]) for n, b in gq.named_buffers() if n in storage)
    monkeypatch.setattr(dequant, "_native", lambda: None)  # the torch-ops fallback
    out_t, grads_t = _lora_step(gq, batch)
    assert torch.equal(out_t, out_q)
    assert all(torch.equal(grads_t[n], grads_q[n]) for n in grads_q)


def test_a_refused_weight_leaves_the_model_unchanged(zoo):
    """Every site is quantized before any is rewritten: a NaN in the last site's W refuses the whole call."""
    gm = zoo.gm("llama")
    with torch.no_grad():
        gm.get_parameter("model.layers.1.mlp.down_proj.weight")[3, 4] = float("nan")
    before = {n: p.clone() for n, p in gm.named_parameters()}
    buffers = {n for n, _ in gm.named_buffers()}
    code = gm.code
    for dtype in QuantDType:
        with pytest.raises(ConfigError, match=r"site model.layers.1.mlp.down_proj: 1 of \d+ weights are NaN or infinite"):
            quantize_weights(gm, QuantConfig(dtype=dtype))
    assert gm.code == code and not quantized_nodes(gm)
    assert {n for n, _ in gm.named_buffers()} == buffers
    params = dict(gm.named_parameters())
    assert params.keys() == before.keys()
    assert all(torch.allclose(params[n], before[n], rtol=0, atol=0, equal_nan=True) for n in before)


def test_a_tied_output_layer_named_by_the_config_stays_float_and_the_embedding_keeps_working(zoo):
    """GPT-2's lm_head reads wte's weight: naming it quantizes nothing there, and the other sites still quantize."""
    gm = zoo.gm("gpt2")
    b = inputs(2, 6)
    want = run(zoo.model("gpt2"), b)
    result = quantize_weights(gm, QuantConfig(dtype="int8", target_modules=["lm_head", "c_fc"]))
    assert "lm_head" not in quantized_nodes(gm) and {s for s in quantized_nodes(gm)} == {f"transformer.h.{i}.mlp.c_fc" for i in range(2)}
    assert any(line.startswith("lm_head: weight shared with") for line in result.changed)
    assert gm.get_parameter("transformer.wte.weight").shape[0] == VOCAB
    got = run(gm, b)
    assert max_rel(got, run(_dequantized_model(zoo.model("gpt2"), gm), b)) <= 1e-6
    assert max_rel(got, want) < 0.05
