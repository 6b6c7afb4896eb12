"""ONNX-level folding: Conv [→ BatchNormalization] → 1×1 Conv (and Gemm → Gemm) become one op,
checked with onnx.checker and onnxruntime, with the same guards as the fx pass."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.onnx import export_onnx, fold_adapters
from fxkd.passes import CalibrateAdapters, InsertAdapters

from models import make, plant, randomize_bn


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _fold_and_compare(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    before = onnx.ModelProto()
    before.CopyFrom(model)
    folded = fold_adapters(model)
    assert model == before  # the input is untouched
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-4, atol=1e-5)
    return folded


def _export(module: nn.Module, shape, tmp_path, optimize=False) -> onnx.ModelProto:
    path = export_onnx(
        module.eval(), torch.randn(2, *shape), tmp_path / "m.onnx", optimize=optimize
    )
    return onnx.load(path)


@pytest.mark.parametrize("bias", [(False, False), (True, True)])
@pytest.mark.parametrize("groups", [(1, 1), (1, 2), (4, 4), (8, 8)])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_conv_then_pointwise_folds_into_one_conv(groups, bias, batchnorm, tmp_path):
    g1, g2 = groups
    torch.manual_seed(0)
    layers = [nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=g1, bias=bias[0])]
    if batchnorm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.Conv2d(8, 8, 1, groups=g2, bias=bias[1]), nn.ReLU()]
    module = randomize_bn(nn.Sequential(*layers))
    model = _export(module, (8, 10, 10), tmp_path)
    folded = _fold_and_compare(
        model, np.random.default_rng(0).standard_normal((3, 8, 10, 10), np.float32)
    )
    assert _ops(folded) == ["Conv", "Relu"], _ops(model)
    (conv,) = [n for n in folded.graph.node if n.op_type == "Conv"]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs.get("group", 1) == g1  # the first conv's cost


def test_groups_that_do_not_compose_are_left_alone(tmp_path):
    """A depthwise conv then a dense pointwise conv (a decoupled pair) is not one conv of the
    same cost; and a thin 3×3 followed by an expanding 1×1 would grow the weights."""
    decoupled = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
    expanding = nn.Sequential(nn.Conv2d(16, 2, 3, padding=1), nn.Conv2d(2, 16, 1))
    for module, c in ((decoupled, 8), (expanding, 16)):
        model = _export(module, (c, 6, 6), tmp_path)
        folded = fold_adapters(model)
        assert _ops(folded) == _ops(model) == ["Conv", "Conv"]


def test_an_intermediate_with_another_consumer_is_left_alone(tmp_path):
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.q = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.q(y) + y

    model = _export(Branch(), (4, 6, 6), tmp_path)
    assert _ops(fold_adapters(model)) == _ops(model)


def test_hand_made_graph_with_batchnorm_and_no_biases():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    q = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)  # grouped 1x1, 2 groups
    bn = [
        rng.uniform(0.5, 1.5, 6),
        rng.standard_normal(6),
        rng.standard_normal(6),
        rng.uniform(0.5, 1.5, 6),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(q, "q")]
    inits += [
        numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(bn, "gbmv", strict=True)
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"], epsilon=1e-3),
        helper.make_node("Conv", ["z", "q"], ["out"], group=2),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6, 5, 5])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 6, 5, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded = _fold_and_compare(model, rng.standard_normal((2, 6, 5, 5)).astype(np.float32))
    assert _ops(folded) == ["Conv"]
    assert {i.name for i in folded.graph.initializer} == {"w_fxkd_folded", "w_fxkd_folded_bias"}


def test_gemm_then_gemm_folds(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(12, 6), nn.Linear(6, 6, bias=False), nn.Tanh())
    model = _export(module, (12,), tmp_path)
    folded = _fold_and_compare(model, np.random.default_rng(0).standard_normal((4, 12), np.float32))
    assert _ops(folded) == ["Gemm", "Tanh"], _ops(model)


@pytest.mark.parametrize("optimize", [False, True])
def test_exported_adapter_student_folds_to_the_fx_folded_student(optimize, tmp_path):
    """Export a calibrated student with its pointwise adapters still in the graph, fold at the
    ONNX level, and get the fx-folded student's outputs and one op fewer per adapter (with
    BatchNorms in the graph, the BN goes too)."""
    teacher, shape = make("vgg")
    student = plant(teacher)
    samples = torch.randn(128, *shape)
    cfg = fxkd.CompressConfig(num_samples=128, mode="pointwise", progress=False)
    expected = fxkd.compress(teacher, copy.deepcopy(student), samples, config=cfg).model
    teacher_gm, gm = trace(teacher, samples[:8]), trace(copy.deepcopy(student), samples[:8])
    alignment = align(teacher_gm, gm)
    InsertAdapters(alignment, cfg.mode)(gm)
    CalibrateAdapters(teacher_gm, samples, cfg)(gm)
    adapters = len(alignment.pairs)
    model = _export(gm, shape, tmp_path, optimize=optimize)
    x = np.random.default_rng(0).standard_normal((5, *shape), np.float32)
    folded = _fold_and_compare(model, x)

    def count(m, *ops):
        return sum(op in ops for op in _ops(m))

    assert count(folded, "Conv", "Gemm") == count(model, "Conv", "Gemm") - adapters
    assert count(folded, "BatchNormalization") == 0
    with torch.no_grad():
        np.testing.assert_allclose(
            _run(folded, x), expected(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("optimize", [False, True])
def test_a_reshaped_weight_above_the_constant_folding_limit_still_folds(optimize, tmp_path):
    """An adapter computes its 1×1 kernel as ``weight.reshape(...)``: ONNX exports a Reshape of
    the initializer, which onnxscript's constant folding skips above 8,192 elements (a 96×96
    adapter has 9,216). fold_adapters folds such layout ops of weights itself, so the pair
    still becomes one Conv."""

    class ReshapedAdapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 96, 3, padding=1)
            self.weight = nn.Parameter(torch.randn(96, 96) / 10)
            self.bias = nn.Parameter(torch.randn(96))

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(F.conv2d(y, self.weight.reshape(96, 96, 1, 1), self.bias))

    torch.manual_seed(0)
    model = _export(ReshapedAdapter(), (8, 6, 6), tmp_path, optimize=optimize)
    assert _ops(model).count("Conv") == 2 and "Reshape" in _ops(model)
    x = np.random.default_rng(0).standard_normal((3, 8, 6, 6), np.float32)
    folded = _fold_and_compare(model, x)
    assert _ops(folded).count("Conv") == 1 and "Reshape" not in _ops(folded)
