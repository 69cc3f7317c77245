"""The forms of a classification head trained in full (``task_type="SEQ_CLS"``, ``modules_to_save``) that
``passes/onnx/freeze_base`` rewires and that the exporters of tests/lora_fx/test_onnx_modules_to_save.py do not make.

Hand-built graphs, named as the exporters name them (TorchScript node paths, or the dynamo exporter's
``pkg.torch.onnx.name_scopes`` / ``fx_node`` metadata), hold a small classifier ``dense -> Relu -> classifier``: a Gemm
head with ``transB=0`` (weight stored ``[in, out]``), a MatMul or Gemm head whose zero bias the dynamo optimizer
removed, the same in float16. Each is compared with the torch module it stands for (``nn.Linear`` layers with the
same weights; PEFT on it once the adapter is saved): logits, one step's head gradient and update (AdamW through
``lora_fx.train`` in float32; SGD in float16, and one AdamW step of ``lora_fx.train`` in float16), the saved PEFT
directory's ``base_model.model.classifier.*`` in torch layout and dtype, and ``lora-fx export --merge`` /
``--adapters`` in ONNX Runtime. A tiny Llama exported by TorchScript (``score``, no bias) serves two adapters with
different heads from one ONNX Runtime session.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lora_fx
from lora_fx.config import LoraConfig
from lora_fx.onnx_adapter import read_onnx_adapter, read_saved
from lora_fx.passes.onnx.freeze_base import saved_base
from lora_fx.runtime.onnx_torch import OnnxModule
from tests.exported import ort_run

IN, HID, OUT, R = 8, 16, 3, 2
LR = 3e-2
NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
TORCH = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16}


class Net(torch.nn.Module):
    """What the hand-built graphs were exported from."""

    def __init__(self, dtype: torch.dtype = torch.float32, zero_bias: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.dense = torch.nn.Linear(IN, HID)
        self.classifier = torch.nn.Linear(HID, OUT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if zero_bias:
                self.classifier.bias.zero_()
        self.to(dtype)

    def forward(self, x=None, **_):
        return self.classifier(torch.relu(self.dense(x)))


def _dynamo_meta(node: onnx.NodeProto, module: str, bias: bool) -> None:
    """The metadata the dynamo exporter gives the node of an ``nn.Linear`` call (name scopes, classes, fx node)."""
    args = f"%relu, %p_{module}_weight" + (f", %p_{module}_bias" if bias else "")
    for key, value in (
        ("pkg.torch.onnx.name_scopes", repr(["", module, "linear"])),
        ("pkg.torch.onnx.class_hierarchy", repr(["__main__.Net", "torch.nn.modules.linear.Linear", "aten.linear.default"])),
        ("pkg.torch.onnx.fx_node", f"%linear_1 : [num_users=1] = call_function[target=torch.ops.aten.linear.default]"
                                   f"(args = ({args}), kwargs = {{}})"),
    ):
        node.metadata_props.add(key=key, value=value)


def _graph(net: Net, form: str, elem: int) -> onnx.ModelProto:
    """``net`` as an exporter writes it, its head in ``form``:

    * ``gemm-transB0``: ``Gemm(h, W[in, out], b)`` with ``transB=0`` under TorchScript node names;
    * ``matmul-nobias`` / ``gemm-nobias`` / ``gemm-transB1-nobias``: the dynamo optimizer's head once it removed the
      zero bias: ``MatMul(h, W[in, out])``, ``Gemm(h, W[in, out])``, ``Gemm(h, classifier.weight, transB=1)``, each with
      the ``fx_node`` metadata of an ``aten.linear`` call that had a bias.
    """
    npt = NP[elem]
    p = {k: v.detach().numpy().astype(npt) for k, v in net.state_dict().items()}
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(p["dense.weight"].T), "onnx::MatMul_20"),
        numpy_helper.from_array(p["dense.bias"], "dense.bias"),
    ]
    dense = [helper.make_node("MatMul", ["x", "onnx::MatMul_20"], ["/dense/MatMul_output_0"], name="/dense/MatMul"),
             helper.make_node("Add", ["dense.bias", "/dense/MatMul_output_0"], ["/dense/Add_output_0"], name="/dense/Add"),
             helper.make_node("Relu", ["/dense/Add_output_0"], ["h"], name="/Relu")]
    w_in_out = np.ascontiguousarray(p["classifier.weight"].T)
    if form == "gemm-transB0":
        inits += [numpy_helper.from_array(w_in_out, "onnx::Gemm_21"), numpy_helper.from_array(p["classifier.bias"], "classifier.bias")]
        head = [helper.make_node("Gemm", ["h", "onnx::Gemm_21", "classifier.bias"], ["logits"], name="/classifier/Gemm",
                                 alpha=1.0, beta=1.0, transB=0)]
    else:
        if form == "gemm-transB1-nobias":
            inits.append(numpy_helper.from_array(p["classifier.weight"], "classifier.weight"))
            head = [helper.make_node("Gemm", ["h", "classifier.weight"], ["logits"], name="node_linear_1", transB=1)]
        else:
            inits.append(numpy_helper.from_array(w_in_out, "val_7"))
            op = "MatMul" if form == "matmul-nobias" else "Gemm"
            head = [helper.make_node(op, ["h", "val_7"], ["logits"], name="node_linear_1")]
        _dynamo_meta(head[0], "classifier", bias=True)
    graph = helper.make_graph(
        dense + head, "net", [helper.make_tensor_value_info("x", elem, ["batch", IN])],
        [helper.make_tensor_value_info("logits", elem, ["batch", OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(dtype: torch.dtype, seed: int = 0, n: int = 5) -> torch.Tensor:
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _config() -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=R, task_type="SEQ_CLS", target_modules=["dense"])


FORMS = [("gemm-transB0", TensorProto.FLOAT), ("matmul-nobias", TensorProto.FLOAT), ("gemm-nobias", TensorProto.FLOAT),
         ("gemm-transB1-nobias", TensorProto.FLOAT), ("gemm-transB0", TensorProto.FLOAT16),
         ("matmul-nobias", TensorProto.FLOAT16)]


@pytest.mark.parametrize("form,elem", FORMS)
def test_head_form_trains_saves_and_exports_as_the_torch_module(form, elem, tmp_path):
    import peft
    from safetensors.numpy import load_file

    from lora_fx.commands.export import export_file

    dtype, npt = TORCH[elem], NP[elem]
    tol = dict(atol=1e-5, rtol=1e-5) if elem == TensorProto.FLOAT else dict(atol=2e-2, rtol=2e-2)
    net = Net(dtype, zero_bias=form.endswith("nobias"))
    onnx.save(_graph(net, form, elem), tmp_path / "net.onnx")
    model = lora_fx.load(tmp_path / "net.onnx")
    lora_fx.apply(model, _config())

    # The head by its model names, torch's layout and the file's dtype; its base kept beside.
    params = ["classifier.bias", "classifier.weight"]
    assert read_saved(model.metadata_props) == {p: "classifier" for p in params}
    theirs = dict(net.named_parameters())
    for name in params:
        value = model.graph.initializers[name].const_value.numpy()
        assert value.dtype == npt
        np.testing.assert_array_equal(value, theirs[name].detach().numpy())
        np.testing.assert_array_equal(saved_base(model)[name][1], theirs[name].detach().numpy())

    x = _x(dtype)
    with torch.no_grad():
        want = net(x)
    module = OnnxModule(model)
    got = module(x=x)["logits"]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)

    # One step's gradient of the head (lora_B starts at zero: the adapter adds nothing yet).
    labels = torch.tensor([0, 1, 2, 2, 1])
    torch.nn.functional.cross_entropy(got.float(), labels).backward()
    ref = copy.deepcopy(net)
    torch.nn.functional.cross_entropy(ref(x).float(), labels).backward()
    for name in params:  # trainables train as float32 masters, whatever the graph's type
        assert module.tensor(name).grad.dtype == torch.float32
        torch.testing.assert_close(module.tensor(name).grad, dict(ref.named_parameters())[name].grad.float(), **tol)

    # One step moves the head as torch moves nn.Linear's: AdamW through lora_fx.train in float32; in float16 SGD on
    # the module's tensors, written back (lora_fx.train's AdamW in float16: test_train_on_a_float16_head).
    if elem == TensorProto.FLOAT:
        batches = [{"x": x, "labels": labels}]
        lora_fx.train(model, batches, lambda out, b: torch.nn.functional.cross_entropy(out["logits"].float(), b["labels"]),
                      steps=1, lr=LR, max_grad_norm=None, progress=False)
        torch.optim.AdamW(ref.classifier.parameters(), lr=LR, weight_decay=0.0).step()
    else:
        torch.optim.SGD([module.tensor(n) for n in module.trainable_names], lr=1.0).step()
        module.write_back()
        torch.optim.SGD(ref.classifier.parameters(), lr=1.0).step()
    trained = {n: model.graph.initializers[n].const_value.numpy() for n in params}
    for name in params:
        assert trained[name].dtype == npt
        np.testing.assert_allclose(trained[name].astype(np.float32),
                                   dict(ref.named_parameters())[name].detach().float().numpy(), **tol)
        assert not np.array_equal(trained[name], theirs[name].detach().numpy())

    # Saved as PEFT saves it: torch layout, the model's dtype; PEFT on the torch module computes what the file does.
    lora_fx.save_adapter(model, tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name in params:
        key = f"base_model.model.{name}"
        assert tensors[key].dtype == npt and tensors[key].shape == theirs[name].shape
        np.testing.assert_array_equal(tensors[key], trained[name])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "peft").eval()
    x2 = _x(dtype, seed=3, n=4)
    with torch.no_grad():
        want = loaded.base_model.model(x2).float().numpy()
        base = net(x2).float().numpy()
        np.testing.assert_allclose(OnnxModule(model)(x=x2)["logits"].float().numpy(), want, **tol)
    assert np.abs(want - base).max() > 10 * tol["atol"]

    # lora-fx export --merge / --adapters, run by ONNX Runtime.
    lora_fx.save(model, tmp_path / "lora.onnx")
    export_file(tmp_path / "lora.onnx", tmp_path / "merged.onnx", merge=True)
    export_file(tmp_path / "lora.onnx", tmp_path / "served.onnx", merge=False)
    feeds = {"x": x2.numpy()}
    merged = ort_run(tmp_path / "merged.onnx", feeds)
    assert merged.dtype == npt
    np.testing.assert_allclose(merged.astype(np.float32), want, **tol)
    adapter = tmp_path / "served.adapters" / "default.onnx_adapter"
    slots = read_onnx_adapter(adapter).tensors
    for name in params:  # the served head, as trained: torch's layout, the model's dtype
        assert slots[name].dtype == npt
        np.testing.assert_array_equal(slots[name], trained[name])
    np.testing.assert_allclose(ort_run(tmp_path / "served.onnx", feeds).astype(np.float32), base, **tol)
    np.testing.assert_allclose(ort_run(tmp_path / "served.onnx", feeds, adapter=adapter).astype(np.float32), want, **tol)


def test_train_on_a_float16_head(tmp_path):
    """AdamW ran on the float16 trainables themselves: eps=1e-8 is 0 in float16, so a zero gradient (every lora_A at
    step 1) divided by zero and the first step diverged. The trainables now train as float32 masters."""
    net = Net(torch.float16)
    onnx.save(_graph(net, "gemm-transB0", TensorProto.FLOAT16), tmp_path / "net.onnx")
    model = lora_fx.load(tmp_path / "net.onnx")
    lora_fx.apply(model, _config())
    batches = [{"x": _x(torch.float16), "labels": torch.tensor([0, 1, 2, 2, 1])}]
    lora_fx.train(model, batches, lambda out, b: torch.nn.functional.cross_entropy(out["logits"].float(), b["labels"]),
                  steps=1, lr=LR, max_grad_norm=None, progress=False)
    # The reference keeps float32 weights too: AdamW on float16 weights makes NaN itself (eps 0 in float16).
    ref = copy.deepcopy(net).float()
    torch.nn.functional.cross_entropy(ref(batches[0]["x"].float()), batches[0]["labels"]).backward()
    torch.optim.AdamW(ref.classifier.parameters(), lr=LR, weight_decay=0.0).step()
    np.testing.assert_allclose(model.graph.initializers["classifier.weight"].const_value.numpy().astype(np.float32),
                               ref.classifier.weight.detach().float().numpy(), atol=2e-2)


# ---- a bias-free head (Llama's score), TorchScript, two adapters served from one ONNX Runtime session ----------


def test_two_adapters_with_their_own_score_switch_in_one_ort_session(tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from lora_fx.commands.export import export_file
    from tests.lora_fx.test_onnx_modules_to_save import _export, _llama, _logits, _peft
    from tests.models import inputs

    model = _llama()
    _export(model, tmp_path / "llama.onnx", "torchscript")
    batch = inputs(2, 8, pad=2, seed=7)
    feeds = {k: v.numpy() for k, v in batch.items()}
    peft_models, adapters, served = [], [], []
    for seed, name in ((1, "first"), (2, "second")):
        pm = _peft(model, "llama", seed=seed)
        pm.save_pretrained(tmp_path / name)
        onnx_model = lora_fx.load(tmp_path / "llama.onnx")
        lora_fx.load_adapter(onnx_model, tmp_path / name)
        assert read_saved(onnx_model.metadata_props) == {"score.weight": "score"}  # no bias to restore
        lora_fx.save(onnx_model, tmp_path / f"{name}.onnx")
        export_file(tmp_path / f"{name}.onnx", tmp_path / f"{name}-served.onnx", merge=False, name=name)
        export_file(tmp_path / f"{name}.onnx", tmp_path / f"{name}-merged.onnx", merge=True)
        np.testing.assert_allclose(ort_run(tmp_path / f"{name}-merged.onnx", feeds), _logits(pm, batch), atol=1e-5)
        peft_models.append(pm)
        adapters.append(tmp_path / f"{name}-served.adapters" / f"{name}.onnx_adapter")
        served.append(ir.load(str(tmp_path / f"{name}-served.onnx")))
    # Both exports serve the same base: one of them runs either adapter.
    assert served[0].metadata_props["lora_fx.base_fingerprint"] == served[1].metadata_props["lora_fx.base_fingerprint"]
    slots = {v.name for v in served[0].graph.inputs}
    assert "score.weight" in slots and "score.bias" not in slots
    heads = [dict(pm.named_parameters())["base_model.model.score.modules_to_save.default.weight"] for pm in peft_models]
    for path, head in zip(adapters, heads):
        np.testing.assert_array_equal(read_onnx_adapter(path).tensors["score.weight"], head.detach().numpy())  # [out, in]

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "first-served.onnx"), opts, providers=["CPUExecutionProvider"])
    loaded = []
    for path in adapters:
        la = ort.LoraAdapter()
        la.Load(str(path))
        loaded.append(la)

    def run(i):
        run_options = None
        if i is not None:
            run_options = ort.RunOptions()
            run_options.add_active_adapter(loaded[i])
        return session.run(None, feeds, run_options)[0]

    want = [_logits(pm, batch) for pm in peft_models]
    base = _logits(model, batch)
    assert np.abs(want[0] - want[1]).max() > 0.1
    for i in (0, 1, None, 1, 0):
        np.testing.assert_allclose(run(i), base if i is None else want[i], atol=1e-5)
