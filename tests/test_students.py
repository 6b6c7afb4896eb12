import pytest
import torch
from torch import nn

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.students import channel_maps_of, decouple, prune

from models import make


@pytest.mark.parametrize("importance", ["l1", "bn"])
@pytest.mark.parametrize("name", ["vgg", "resnet", "grouped"])
def test_prune_records_exact_kept_channels(name, importance):
    teacher, shape = make(name)
    student = prune(teacher, 0.5, importance=importance, example_inputs=torch.randn(1, *shape))
    maps = channel_maps_of(student)
    assert maps, "no channel maps recorded"
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    for module, kept in maps.items():
        t, s = t_mods[module], s_mods[module]
        assert s.weight.shape[0] == len(kept) < t.weight.shape[0] or len(kept) == t.weight.shape[0]
        if s.bias is not None:
            assert torch.equal(s.bias, t.bias[kept])
    # a BatchNorm after a pruned conv keeps exactly the mapped channels' statistics
    for bn_name, t_bn in t_mods.items():
        if isinstance(t_bn, nn.BatchNorm2d):
            producer = _producer_of(bn_name, maps)
            if producer is not None:
                kept = maps[producer]
                assert torch.equal(s_mods[bn_name].running_mean, t_bn.running_mean[kept])
    with torch.no_grad():
        assert student(torch.randn(2, *shape)).shape == teacher(torch.randn(2, *shape)).shape


def _producer_of(bn_name: str, maps: dict) -> str | None:
    """tests/models.py pairs conv and BN as siblings: features.i / features.i+1, convN / bnN."""
    parent, _, leaf = bn_name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    named = {"gbn": "grouped", "pbn": "pw"}
    candidates = [prefix + leaf.replace("bn", "conv"), prefix + named.get(leaf, "")]
    if leaf.isdigit():
        candidates.append(prefix + str(int(leaf) - 1))
    return next((c for c in candidates if c in maps), None)


def test_pruned_student_compresses_with_no_extra_arguments():
    teacher, shape = make("resnet")
    student = prune(teacher, 0.5, example_inputs=torch.randn(1, *shape))
    result = fxkd.compress(teacher, student, torch.randn(128, *shape), progress=False)
    pairs = result.alignment.pairs
    assert result.alignment.strategy == "mirror" and not result.alignment.skipped
    # block outputs keep the builder's maps; internal channels (conv1 of each block) are
    # re-targeted from the samples in kernel mode (channel selection)
    sources = {p.site.module: p.map_source for p in pairs if p.channel_map}
    assert set(sources.values()) == {"builder", "selected"}, sources
    assert all((src == "selected") == name.endswith("conv1") for name, src in sources.items())
    for row in result.report.calibrated:
        assert row.err_after < row.err_given or row.err_given < 1e-12


@pytest.mark.parametrize("name", ["vgg", "resnet", "conv1d"])
def test_decouple_is_exact_at_full_rank(name):
    teacher, shape = make(name)
    teacher = teacher.double()
    student = decouple(teacher, rank=9)
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=1e-10, atol=1e-10)
    convs = [m for m in student.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert all(m.groups > 1 or all(k == 1 for k in m.kernel_size) for m in convs)


def test_decoupled_student_is_aligned_after_its_pointwise_convs():
    teacher, shape = make("resnet")
    student = decouple(teacher, rank=1)
    x = torch.randn(2, *shape)
    alignment = align(trace(teacher, x), trace(student, x))
    assert alignment.strategy == "mirror"
    teacher_sites = len(align(trace(teacher, x), trace(teacher, x)).pairs)
    assert len(alignment.pairs) == teacher_sites
    factorised = [s for s in alignment.skipped if "factorised" in s.reason]
    assert len(factorised) == 13  # stem + 12 block convs are 3x3: each has a depthwise half
    result = fxkd.compress(teacher, student, torch.randn(128, *shape), progress=False)
    rows = result.report.calibrated
    assert all(r.err_after < r.err_given for r in rows if r.err_given > 1e-12)
    assert sum(p.numel() for p in result.model.parameters()) == sum(
        p.numel() for p in student.parameters()
    )


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_maps_of_a_student_pruned_elsewhere_are_inferred(name):
    """A student pruned by another tool carries no maps: alignment recovers them from the
    BatchNorms (kept channels keep their statistics) and says so in the pairs."""
    teacher, shape = make(name)
    student = prune(teacher, 0.5, example_inputs=torch.randn(1, *shape))
    recorded = channel_maps_of(student)
    delattr(student, "fxkd_channel_maps")
    x = torch.randn(2, *shape)
    alignment = align(trace(teacher, x), trace(student, x))
    assert not alignment.skipped
    inferred = {
        p.site.module: list(p.channel_map) for p in alignment.pairs if p.map_source == "inferred"
    }
    assert inferred
    for module, kept in inferred.items():
        assert kept == recorded[module]
