"""The torch execution of ONNX graphs (``OnnxModule``) equals ONNX Runtime on whole exported models,
original and LoRA-rewritten; which initializers train, memory held, unsupported ops and attributes.
Single ops are tested against ONNX Runtime under ``tests/runtime/onnx_ops/``, one file per op family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import lora_fx
from lora_fx.errors import UnsupportedError
from lora_fx.runtime.onnx_torch import OnnxModule, check_supported, trainable_initializers, trainable_module
from tests import models
from tests.onnx_corpus import corpus
from tests.runtime import onnx_models as om
from tests.runtime.onnx_ops.single_op import check_against_ort, rng, single_op_model

TOL = 1e-5
FP16_TOL = 2e-3  # fp16 rounds at ~1e-3: torch and ORT may round intermediate results differently

CORPUS = corpus().names


def _feeds(entry, seq: int | None = None) -> dict[str, np.ndarray]:
    feeds = entry.feeds()
    if entry.name == "llama-dynamo23":
        # ORT 1.31's opset-23 RotaryEmbedding kernel rejects batch > 1 with a shared cos/sin cache; batch 1 runs
        feeds = {k: v[:1] for k, v in feeds.items()}
    if seq is not None:
        feeds = {k: v[:, :seq] if v.ndim == 2 and k != "x" else v for k, v in feeds.items()}
    return feeds


def _assert_matches_ort(path: Path, module: OnnxModule, feeds: dict[str, np.ndarray], what: str) -> None:
    out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = om.ort_run(path, feeds)
    assert len(out) == len(ref) > 0
    for (name, got), r in zip(out.items(), ref):
        got = got.detach()
        assert tuple(got.shape) == r.shape, (what, name, tuple(got.shape), r.shape)
        tol = FP16_TOL if r.dtype == np.float16 else TOL
        err = models.max_rel(got.double(), torch.from_numpy(r).double())
        assert err <= tol, f"{what} {name}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_model_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    """Original and LoRA-rewritten graphs of every corpus model, torch against ONNX Runtime."""
    entry = corpus().get(name)
    original = lora_fx.load(entry.path)
    module = OnnxModule(original)
    _assert_matches_ort(entry.path, module, _feeds(entry), f"{name} original")
    if any(v.ndim == 2 for v in entry.feeds().values()) and "x" not in entry.feeds():
        # a second sequence length through the same module: per-shape constants must not leak
        _assert_matches_ort(entry.path, module, _feeds(entry, seq=5), f"{name} original, seq 5")
    torch.manual_seed(0)
    rewritten = lora_fx.apply(lora_fx.load(entry.path), lora_fx.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert trainable_initializers(rewritten)
    path = lora_fx.save(rewritten, tmp_path / "lora.onnx")
    lora_module = OnnxModule(rewritten)
    _assert_matches_ort(Path(path), lora_module, _feeds(entry), f"{name} rewritten")
    # random A and B change the output: the comparison above is not of the base model again
    feeds = {k: torch.from_numpy(v) for k, v in _feeds(entry).items()}
    base, adapted = module(**feeds), lora_module(**feeds)
    key = next(iter(base))
    assert models.max_rel(adapted[key].detach().double(), base[key].detach().double()) > 1e-3


def test_adapter_initializers_are_the_parameters() -> None:
    model = om.add_lora(lora_fx.load(corpus().get("bert-dynamo18").path), r=2)
    module = trainable_module(model)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    meta = json.loads(model.metadata_props["lora_fx.lora"])
    assert len(trainable) == 2 * len(meta) > 0
    assert set(module.named_adapters()) == {s[k] for s in meta.values() for k in ("a", "b")}
    # frozen weights are buffers, and not in the state dict (checkpoints hold only adapters)
    assert set(module.state_dict()) == trainable
    # gradients reach A and B only
    feeds = models.inputs(2, 6)
    out = module(**feeds)
    (out["last_hidden_state"].pow(2).mean() + out["pooler_output"].pow(2).mean()).backward()  # every site in play
    grads = {n: p.grad for n, p in module.named_adapters().items()}
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith("lora_B.weight"))


def test_write_back_updates_initializers(tmp_path: Path) -> None:
    model = om.add_lora(lora_fx.load(corpus().get("gpt2-dynamo18").path), r=2)
    module = trainable_module(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.named_adapters().values():
            p.add_(0.02 * torch.randn_like(p))  # a "trained" adapter: moved, at a realistic scale
    names = module.write_back()
    for name in names:
        saved = model.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(saved, module.tensor(name).detach().numpy())
    path = Path(lora_fx.save(model, tmp_path / "wb.onnx"))
    reloaded = lora_fx.load(path)
    for name in names:
        np.testing.assert_array_equal(reloaded.graph.initializers[name].const_value.numpy(), module.tensor(name).detach().numpy())
    feeds = {k: v.numpy() for k, v in models.inputs(2, 7).items()}
    _assert_matches_ort(path, OnnxModule(reloaded), feeds, "written back")


@pytest.mark.slow
def test_torch_compile_traces_the_graph() -> None:
    model = om.add_lora(lora_fx.load(corpus().get("bert-dynamo18").path), r=2, random_b=True)
    module = OnnxModule(model)
    feeds = models.inputs(2, 8, pad=2)
    eager = module(**feeds)["last_hidden_state"]
    compiled = torch.compile(module)
    out = compiled(**feeds)["last_hidden_state"]
    assert models.max_rel(out.detach(), eager.detach()) <= 1e-5
    out.sum().backward()  # and trains through the compiled graph
    assert all(p.grad is not None for p in module.named_adapters().values())


def test_gemm_mlp_matches_onnxruntime(tmp_path: Path) -> None:
    """A hand-built MLP of Gemm + Relu + Gemm with a LoRA branch on the first layer."""
    w1, b1 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    a = rng.standard_normal((8, 2)).astype(np.float32)
    bb = rng.standard_normal((2, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("MatMul", ["x", "fc1.lora_A.weight"], ["xa"]),
        helper.make_node("MatMul", ["xa", "fc1.lora_B.weight"], ["xab"]),
        helper.make_node("Add", ["h", "xab"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[onnx.numpy_helper.from_array(v, n) for n, v in
                     {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "fc1.lora_A.weight": a, "fc1.lora_B.weight": bb}.items()],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert trainable_initializers(model) == ["fc1.lora_A.weight", "fc1.lora_B.weight"]
    check_against_ort(model, {"x": rng.standard_normal((5, 8)).astype(np.float32)}, tmp_path, tol=1e-5)


def test_unsupported_op_is_named_before_running() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="ok"),
             helper.make_node("Hardmax", ["h"], ["y"], name="the_hardmax"),
             helper.make_node("Frobnicate", ["y"], ["z"], name="custom", domain="vendor.ops")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("vendor.ops", 1)])
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(UnsupportedError) as err:
        check_supported(model)
    msg = str(err.value)
    assert "Hardmax" in msg and "the_hardmax" in msg and "Frobnicate" in msg and "vendor.ops" in msg and "custom" in msg
    with pytest.raises(UnsupportedError, match="Frobnicate"):
        OnnxModule(model)


def test_frozen_weights_share_the_models_memory_and_adapters_do_not(tmp_path: Path) -> None:
    """Training through a loaded ONNX file holds each frozen weight once (torch views the model's numpy
    array); adapters are copies, trained in place and written back with write_back()."""
    w = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"]),
             helper.make_node("MatMul", ["x", "fc.lora_A.weight"], ["xa"]),
             helper.make_node("MatMul", ["xa", "fc.lora_B.weight"], ["xab"]),
             helper.make_node("Add", ["h", "xab"], ["y"])]
    inits = {"fc.weight": w, "fc.lora_A.weight": rng.standard_normal((8, 2)).astype(np.float32),
             "fc.lora_B.weight": np.zeros((2, 6), np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(tmp_path / "m.onnx"))
    model = lora_fx.load(tmp_path / "m.onnx")
    module = OnnxModule(model)
    assert module.trainable_names == ["fc.lora_A.weight", "fc.lora_B.weight"]

    def address(name: str) -> int:
        return model.graph.initializers[name].const_value.numpy().__array_interface__["data"][0]

    assert module.tensor("fc.weight").data_ptr() == address("fc.weight")
    assert all(module.tensor(n).data_ptr() != address(n) for n in module.trainable_names)
    # A model not from lora_fx.load views read-only protobuf memory: torch gets a copy, and it works the same.
    proto_model = ir.serde.deserialize_model(onnx.load(str(tmp_path / "m.onnx")))
    x = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    torch.testing.assert_close(OnnxModule(proto_model)(x=x)["y"], module(x=x)["y"])


def test_an_attribute_the_op_function_ignores_is_refused_unless_it_holds_the_default(tmp_path: Path) -> None:
    """An op function that never reads an attribute computes the op without it: refused on the first call, naming
    the node and attribute, unless the attribute holds the schema default (then ignoring it changes nothing)."""
    x = rng.standard_normal((2, 3)).astype(np.float32)
    default = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, saturate=1)  # saturate: float8 only, default 1
    check_against_ort(single_op_model(default, {"x": x}, opset=19), {"x": x}, tmp_path)
    odd = helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.FLOAT, saturate=0)
    with pytest.raises(UnsupportedError, match=r"Cast node 'c'.*does not implement its attribute saturate=0"):
        OnnxModule(single_op_model(odd, {"x": x}, opset=19), trainable=[])(x=torch.from_numpy(x))
    unknown = helper.make_node("Relu", ["x"], ["y"], name="r", alpha=0.5)  # no such attribute in the schema
    with pytest.raises(UnsupportedError, match=r"Relu node 'r'.*attribute alpha=0.5"):
        OnnxModule(single_op_model(unknown, {"x": x}), trainable=[])(x=torch.from_numpy(x))


def test_contrib_op_attributes_use_onnxruntimes_defaults_and_compute_hints_pass(tmp_path: Path) -> None:
    """com.microsoft ops: ONNX Runtime's schema gives the defaults; accuracy_level (how ORT computes, not what)
    may stay unread, weight_prepacked (what the weight bytes mean) may not."""
    n, k, block = 4, 32, 32
    inits = {"w": rng.integers(0, 256, (n, 1, block // 2)).astype(np.uint8), "s": (rng.random(n) + 0.1).astype(np.float32)}
    x = rng.standard_normal((3, k)).astype(np.float32)
    hinted = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block, accuracy_level=4)  # ORT: int8 activations; lora_fx: float, as at level 0
    exact = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    ir.save(single_op_model(exact, {"x": x}, inits=inits), str(tmp_path / "exact.onnx"))
    got = OnnxModule(single_op_model(hinted, {"x": x}, inits=inits), trainable=[])(x=torch.from_numpy(x))["y"]
    np.testing.assert_allclose(got.numpy(), om.ort_run(tmp_path / "exact.onnx", {"x": x})[0], rtol=1e-5, atol=1e-5)
    prepacked = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="q", domain="com.microsoft", K=k, N=n,
                                 bits=4, block_size=block, weight_prepacked=1)
    with pytest.raises(UnsupportedError, match="MatMulNBits node 'q'.*weight_prepacked=1"):
        OnnxModule(single_op_model(prepacked, {"x": x}, inits=inits), trainable=[])(x=torch.from_numpy(x))


def test_weights_in_external_data_are_copied_once_and_the_file_unmapped(tmp_path: Path) -> None:
    """External data is a read-only mapping of the .data file: torch gets a copy, and the mapping is closed, so
    the file's pages do not stay in the process's memory next to the copy."""
    from lora_fx.onnx_model import save

    w = rng.standard_normal((64, 48)).astype(np.float32)  # big enough to go to the .data file
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])],
                              [onnx.numpy_helper.from_array(w, "fc.weight")])
    save(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)),
         tmp_path / "m.onnx", external_data=True)
    model = lora_fx.load(tmp_path / "m.onnx")
    tensor = model.graph.initializers["fc.weight"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    tensor.numpy()  # mapped, as a pass reading the weight leaves it
    module = OnnxModule(model, trainable=[])
    assert tensor.raw is None  # unmapped
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(module(x=torch.from_numpy(x))["y"].numpy(), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tensor.numpy(), w)  # the model still reads its weight (mapped again)


def test_intermediate_values_are_dropped_after_their_last_reader(monkeypatch) -> None:
    """A forward holds what autograd saves, not every intermediate of the graph: each value leaves the run
    once its last reader ran (an unused output right away), as torch.fx's generated code deletes it."""
    import weakref

    nodes = [helper.make_node("Neg", ["x"], ["a"], name="n0"), helper.make_node("Abs", ["a"], ["b"], name="n1"),
             helper.make_node("Dropout", ["b"], ["c", "unused_mask"], name="n2"),
             helper.make_node("Exp", ["c"], ["y"], name="n3"), helper.make_node("Neg", ["y"], ["z"], name="n4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])])
    module = OnnxModule(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                                     ir_version=10)), trainable=[])
    assert {n.label: set(n.free) for n in module._nodes} == {
        "Neg node 'n0'": {"x"}, "Abs node 'n1'": {"a"}, "Dropout node 'n2'": {"unused_mask", "b"},
        "Exp node 'n3'": {"c"}, "Neg node 'n4'": set()}  # y and z are graph outputs
    alive: dict[str, weakref.ref] = {}
    call = OnnxModule._call

    def spy(n, ctx, args):
        if n.label == "Neg node 'n4'":  # by the last node only the graph output y is left
            assert [k for k, ref in alive.items() if ref() is not None] == ["y"]
        out = call(n, ctx, args)
        for name, t in zip(n.outputs, out):
            alive[name] = weakref.ref(t)
        return out

    monkeypatch.setattr(OnnxModule, "_call", staticmethod(spy))
    with torch.no_grad():
        out = module(x=torch.randn(1000))
    torch.testing.assert_close(out["z"], -out["y"])


# ---- control flow from a real export: torch.cond becomes If -------------------------------------------


class _CondModel(torch.nn.Module):
    """h = lin(x); torch.cond(sum(h) > 0): lin2(h) + x, else relu(2h - x). The dynamo exporter writes an If whose
    branches read h, x and lin2's weights from the main graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.lin2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.cond(h.sum() > 0, lambda h, x: self.lin2(h) + x, lambda h, x: (h * 2 - x).relu(), (h, x))


@pytest.fixture(scope="module")
def cond_export(tmp_path_factory) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    import warnings

    model = _CondModel().eval()
    path = tmp_path_factory.mktemp("cond") / "cond.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(3, 4),), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    xs = {"then": 10 * v, "else": -10 * v}
    with torch.no_grad():
        signs = {k: bool(model.lin(x).sum() > 0) for k, x in xs.items()}
    if not signs["then"]:
        xs = {"then": xs["else"], "else": xs["then"]}
    return path, model, xs


@pytest.mark.slow
def test_torch_cond_export_matches_onnxruntime_and_eager_gradients(cond_export) -> None:
    """Both branches: outputs equal ONNX Runtime's; gradients for the input and for the weights the branches
    read from the main graph equal eager torch's (lin2 is read by the then-branch alone: no gradient otherwise)."""
    path, eager, xs = cond_export
    assert [n.op_type for n in ir.load(str(path)).graph].count("If") == 1
    module = OnnxModule(lora_fx.load(path), trainable=["lin.weight", "lin2.weight", "lin2.bias"])
    for branch, x in xs.items():
        module.zero_grad()
        eager.zero_grad()
        want_y = om.ort_run(path, {"x": x.numpy()})[0]
        x_ours, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = module(x=x_ours)["y"]
        np.testing.assert_allclose(y.detach().numpy(), want_y, rtol=1e-6, atol=1e-6)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        (y * g).sum().backward()
        (eager(x_eager) * g).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_eager.grad)
        torch.testing.assert_close(module.tensor("lin.weight").grad, eager.lin.weight.grad)
        lin2_grad = module.tensor("lin2.weight").grad
        if branch == "then":
            torch.testing.assert_close(lin2_grad, eager.lin2.weight.grad)
            assert lin2_grad.abs().max() > 0
        else:
            for grad in (eager.lin2.weight.grad, lin2_grad):  # eager torch.cond gives zeros, lora_fx none
                assert grad is None or not grad.any()


@pytest.mark.slow
def test_torch_cond_export_with_lora_matches_onnxruntime_and_trains(cond_export, tmp_path: Path) -> None:
    path, _, xs = cond_export
    torch.manual_seed(0)
    model = lora_fx.apply(lora_fx.load(path), lora_fx.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))
    module = OnnxModule(model)
    saved = om.save(model, tmp_path / "cond_lora.onnx")
    for x in xs.values():
        np.testing.assert_allclose(module(x=x)["y"].detach().numpy(), om.ort_run(saved, {"x": x.numpy()})[0], rtol=1e-6, atol=1e-6)
    target = torch.zeros(3, 4)
    batches = [{"x": x, "target": target} for x in xs.values()]
    result = lora_fx.train(model, batches, lambda out, b: ((out["y"] - b["target"]) ** 2).mean(), steps=20, lr=1e-2,
                           progress=False)
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
