import numpy as np
import pytest
import torch

from fxkd.onnx import (
    export_onnx,
    export_onnx_counted,
    exported_elements,
    initializer_elements,
    validate_onnx,
)

from models import make


def test_export_and_validate_with_dynamic_batch(tmp_path):
    model, shape = make("resnet")
    path = export_onnx(model, torch.randn(4, *shape), tmp_path / "m.onnx")
    report = validate_onnx(path, model, torch.randn(11, *shape))  # another batch size
    assert report.passed and report.max_abs < 1e-4
    assert report.providers[-1] == "CPUExecutionProvider"
    assert initializer_elements(path) == report.initializer_elements > 0


def test_one_export_gives_the_optimised_file_and_the_unoptimised_count(tmp_path):
    """compress exports the recovered student once: the unoptimised program's initializers
    counted (BatchNorms still separate), then optimised and saved: the file
    torch.onnx.export(optimize=True) writes, node for node and weight for weight."""
    import onnx

    model, shape = make("resnet")
    x = torch.randn(2, *shape)
    path, elements = export_onnx_counted(model, x, tmp_path / "counted.onnx")
    direct = export_onnx(model, x, tmp_path / "direct.onnx")
    assert elements == exported_elements(model, x)
    assert elements != initializer_elements(direct)  # the optimiser folds (resnet's BNs)
    a, b = onnx.load(str(path)).graph, onnx.load(str(direct)).graph
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    assert sorted(t.name for t in a.initializer) == sorted(t.name for t in b.initializer)
    assert _input_dims(a) == _input_dims(b) and _input_dims(a)[0] == "batch"
    assert validate_onnx(path, model, torch.randn(5, *shape)).passed


def _input_dims(graph):
    return [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


def test_failed_validation_names_the_output_and_worst_element(tmp_path):
    model, shape = make("vgg")
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.bias.add_(1.0)  # the PyTorch model now disagrees with the file
    report = validate_onnx(path, model, torch.randn(3, *shape))
    assert not report.passed
    assert "output" in report.worst and "torch" in report.worst
    assert "FAILED" in str(report)


def test_tolerances_are_configurable(tmp_path):
    model, shape = make("vgg")
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.bias.add_(1e-3)
    x = torch.randn(3, *shape)
    assert not validate_onnx(path, model, x, atol=1e-5, rtol=0).passed
    assert validate_onnx(path, model, x, atol=1e-2, rtol=0).passed


def test_the_absolute_tolerance_scales_with_the_output():
    """atol bounds a near-zero element relative to its output's scale when that exceeds 1
    (fp32 rounding grows with the values), and stays absolute below 1."""
    from fxkd.onnx import tolerance_excess

    diff = np.array([0.0, 5e-3])
    assert tolerance_excess(diff, np.array([100.0, 0.0]), 1e-4, 1e-3).max() <= 1.0
    assert tolerance_excess(diff, np.array([10.0, 0.0]), 1e-4, 1e-3).max() > 1.0
    assert tolerance_excess(diff, np.array([0.5, 0.0]), 1e-4, 1e-3)[1] == pytest.approx(50.0)
    assert tolerance_excess(np.array([0.02]), np.array([10.0]), 0.0, 1e-3)[0] == pytest.approx(2.0)


def test_each_provider_runs_with_and_without_graph_optimisations(tmp_path):
    model, shape = make("grouped")
    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "m.onnx")
    report = validate_onnx(path, model, torch.randn(5, *shape))
    runs = set(report.per_provider)
    assert {"CPUExecutionProvider (optimized)", "CPUExecutionProvider (unoptimized)"} <= runs
    assert report.passed
