"""Property-based tests: invariants that must hold for every generated network.

Profiles (tests/conftest.py): "ci" (default, a fixed, bounded number of examples) and "soak"
(``pytest tests/test_properties.py --hypothesis-profile=soak``)."""

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.errors import ConfigError
from fxkd.passes import FoldAdapters, InsertAdapters, KernelAdapter, PointwiseAdapter
from fxkd.students import prune

from models import plant
from random_nets import RandomNet, input_shape, net_specs

MODES = ("pointwise", "kernel")


def _net(spec, dtype=torch.float32):
    return RandomNet(spec).to(dtype), input_shape(spec)


@given(spec=net_specs)
def test_identity_insertion_is_exactly_a_no_op(spec):
    model, shape = _net(spec)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
    for mode in MODES:
        gm = trace(model, x)
        InsertAdapters(align(trace(model, x), gm), mode)(gm)
        with torch.no_grad():
            assert torch.equal(gm(x), expected)


@given(spec=net_specs)
def test_folding_is_exact_and_keeps_every_shape(spec):
    model, shape = _net(spec, torch.float64)
    x = torch.randn(4, *shape, dtype=torch.float64)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for mode in MODES:
        gm = trace(copy.deepcopy(model), x)
        InsertAdapters(align(trace(model, x), gm), mode)(gm)
        gm.double()
        with torch.no_grad():  # random adapters (kernel: a random kernel for each producer)
            for m in gm.children():
                if isinstance(m, PointwiseAdapter):
                    m.weight.add_(
                        0.3 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                    )
                    if m.bias is not None:
                        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
                elif isinstance(m, KernelAdapter):
                    producer = gm.get_submodule(m.pair.site.module)
                    w = torch.randn(producer.weight.shape, generator=g, dtype=torch.float64)
                    b = torch.randn(w.shape[0], generator=g, dtype=torch.float64)
                    m.set_kernel(w, b if m.has_bias else None)
            unfolded = gm(x)
        fold = FoldAdapters()
        fold(gm)
        assert all(r is None for r in fold.outcome.values()), fold.outcome
        with torch.no_grad():
            folded = gm(x)
        rel = float((folded - unfolded).norm() / unfolded.norm().clamp_min(1e-30))
        assert rel < 1e-10, (mode, rel)
        assert {k: v.shape for k, v in gm.state_dict().items()} == shapes


@given(spec=net_specs)
def test_calibration_never_worsens_a_point_and_leaves_inputs_alone(spec):
    teacher, shape = _net(spec)
    student = plant(teacher, scale=0.3, seed=spec["seed"])
    t_state = copy.deepcopy(teacher.state_dict())
    s_state = copy.deepcopy(student.state_dict())
    samples = torch.randn(48, *shape)
    for mode in MODES:
        result = fxkd.compress(teacher, student, samples, mode=mode, progress=False)
        for row in result.report.calibrated:
            # the ridge shrinks towards the identity adapter, so the data term can only drop
            assert row.err_after <= row.err_before * (1 + 1e-4) + 1e-7, (mode, row)
            assert row.folded, row
    for before, model in ((t_state, teacher), (s_state, student)):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@given(spec=net_specs)
def test_exported_onnx_validates(spec, tmp_path_factory):
    teacher, shape = _net(spec)
    student = plant(teacher, scale=0.3, seed=spec["seed"])
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    result = fxkd.compress(teacher, student, torch.randn(32, *shape), onnx=path, progress=False)
    assert result.onnx.passed, result.onnx
    assert result.onnx.same_size


@given(spec=net_specs, ratio=st.sampled_from([0.25, 0.5, 0.75]),
       importance=st.sampled_from(["l1", "bn"]))  # fmt: skip
def test_pruned_students_compute_the_teachers_output_shapes(spec, ratio, importance):
    """prune returns a student whose outputs have the teacher's shapes, or refuses with a
    typed error and a hint; never a student that computes something else."""
    teacher, shape = _net(spec)
    x = torch.randn(2, *shape)
    try:
        student = prune(teacher, ratio, importance=importance, example_inputs=x)
    except ConfigError as exc:
        assert "Hint" in str(exc), exc
        return
    with torch.no_grad():
        want = [t.shape for t in tree_flatten(teacher(x))[0]]
        got = [t.shape for t in tree_flatten(student(x))[0]]
    assert got == want
