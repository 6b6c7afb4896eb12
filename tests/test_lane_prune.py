"""Pruning through channel routing (concatenations, chunks, channel shuffles): students.lanes."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from fxkd.students import channel_maps_of, prune
from fxkd.students.lanes import prune_lanes
from fxkd.support import check_support


def _shufflenet(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval().to(dtype)
    with torch.no_grad():  # BatchNorms that are not the identity: γ and σ² away from 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


class _Dense(nn.Module):
    """Two DenseNet-style layers: each reads the concatenation of everything before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(14), nn.Conv2d(14, 6, 3, padding=1)
        self.bn3, self.head = nn.BatchNorm2d(20), nn.Linear(20, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.conv1(torch.relu(self.bn1(x)))], 1)
        x = torch.cat([x, self.conv2(torch.relu(self.bn2(x)))], 1)
        return self.head(torch.relu(self.bn3(x)).mean([2, 3]))


def _zero_removed(teacher: nn.Module, maps: dict[str, list[int]], producers) -> nn.Module:
    """The teacher with every removed filter zeroed: with BatchNorm β = μ = 0 (the init) a
    removed lane is zero everywhere, so the student must compute exactly this network."""
    masked = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in producers:
            w = masked.get_submodule(p).weight
            removed = torch.ones(w.shape[0], dtype=torch.bool)
            removed[maps[p]] = False
            w[removed] = 0
            if masked.get_submodule(p).bias is not None:
                masked.get_submodule(p).bias[removed] = 0
    return masked


def test_shufflenet_regions_are_its_stages_stem_and_last_conv():
    """Stage k's producers (branch1 and branch2 of its first block, branch2 of the others)
    meet in one concatenation-shuffle-chunk region; the stem and conv5 are regions of one."""
    teacher = _shufflenet()
    student = copy.deepcopy(teacher)
    _, regions = prune_lanes(student, 0.5, torch.randn(2, 3, 32, 32))
    by_first = {r.producers[0]: r for r in regions}
    assert len(by_first["stage2.0.branch1.2"].producers) == 2 + 3  # 4 blocks
    assert len(by_first["stage3.0.branch1.2"].producers) == 2 + 7  # 8 blocks
    assert len(by_first["stage4.0.branch1.2"].producers) == 2 + 3
    assert by_first["conv1.0"].producers == ["conv1.0"]
    assert by_first["conv5.0"].producers == ["conv5.0"]
    modules = dict(student.named_modules())
    for region in regions:
        for name, width, kept in zip(region.producers, region.widths, region.kept, strict=True):
            assert modules[name].out_channels == kept < width


def test_stage_widths_are_searched_until_the_routing_matches():
    """Stage 3 (48 channels per branch) at half width (24) would route some lanes to other
    readers than the teacher does (a chunk of a narrower tensor splits elsewhere); the nearest
    width that routes every lane like the teacher is taken instead."""
    _, regions = prune_lanes(_shufflenet(), 0.5, torch.randn(2, 3, 32, 32))
    kept = {r.producers[0]: r.kept[0] for r in regions}
    assert kept["stage2.0.branch1.2"] == 12 and kept["stage4.0.branch1.2"] == 48
    assert kept["stage3.0.branch1.2"] not in (24, 48)


@pytest.mark.parametrize("build", [_shufflenet, _Dense], ids=["shufflenet", "dense"])
def test_pruned_lanes_are_the_teacher_with_removed_filters_zeroed(build):
    """fp64: every kept producer output and the logits equal the teacher's with the removed
    filters zeroed, restricted to the kept channels in the student's order."""
    teacher = build().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    student = copy.deepcopy(teacher)
    maps, regions = prune_lanes(student, 0.5, x)
    producers = [p for r in regions for p in r.producers]
    assert producers and sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    masked = _zero_removed(teacher, maps, producers)
    seen_t, seen_s = {}, {}
    for name in maps:
        masked.get_submodule(name).register_forward_hook(
            lambda m, i, o, n=name: seen_t.__setitem__(n, o)
        )
        student.get_submodule(name).register_forward_hook(
            lambda m, i, o, n=name: seen_s.__setitem__(n, o)
        )
    with torch.no_grad():
        y_t, y_s = masked(x), student(x)
    assert torch.allclose(y_s, y_t, rtol=0, atol=1e-12 * float(y_t.abs().max()))
    for name, kept in maps.items():
        assert torch.allclose(seen_s[name], seen_t[name][:, kept], rtol=0, atol=1e-12), name


class _Mixed(nn.Module):
    """a, b concatenated then added to c (a residual add: not a routing region); d returned
    as the model's output; e read by one conv: the only region that can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
        self.e, self.f = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) + self.c(x)
        return self.d(y), self.f(torch.relu(self.e(y)))


def test_regions_that_meet_an_add_or_the_output_keep_their_width():
    model = _Mixed()
    maps, regions = prune_lanes(model, 0.5, torch.randn(2, 3, 8, 8))
    assert [r.producers for r in regions] == [["e"]]
    assert set(maps) == {"e"} and model.e.out_channels == 4 and model.f.in_channels == 4
    assert (model.a.out_channels, model.c.out_channels, model.d.out_channels) == (4, 8, 8)


def test_skipped_producers_keep_their_region():
    model = _Dense()
    maps, regions = prune_lanes(model, 0.5, torch.randn(2, 3, 8, 8), skip={"conv1"})
    assert regions == [] and maps == {}  # stem, conv1 and conv2 all meet in bn3's input


def test_bn_importance_scores_lanes_by_the_gammas_they_pass():
    """importance="bn": a lane's score is the summed |γ| of every BatchNorm on its path."""
    model = _Dense()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.fill_(0.1)
        model.bn3.weight[[1, 3, 5, 7]] = 5.0  # stem channels 1, 3, 5, 7
    maps, _ = prune_lanes(model, 0.5, torch.randn(2, 3, 8, 8), importance="bn")
    assert sorted(maps["stem"]) == [1, 3, 5, 7]


def test_prune_falls_back_to_lanes_and_compress_recovers_shufflenet(caplog):
    """prune() on ShuffleNet (torch-pruning cannot analyse its shuffle): block outputs are
    pruned through lane routing, the maps are recorded, and compress aligns and folds every
    point with those maps, making none worse."""
    teacher = _shufflenet()
    example = torch.randn(2, 3, 32, 32)
    with caplog.at_level("WARNING"):
        student = prune(teacher, 0.5, example_inputs=example)
    assert "routing region" in caplog.text
    maps = channel_maps_of(student)
    assert student.stage2[1].branch2[5].out_channels == 12 and "stage2.1.branch2.5" in maps
    row = check_support(teacher, student, torch.randn(32, 3, 32, 32), keep_result=True)
    mapped = {p.site.module for p in row.result.alignment.pairs if p.channel_map is not None}
    assert {"conv1.0", "stage2.1.branch2.5", "stage3.7.branch2.5"} <= mapped
    assert row.folded == row.pairs and row.same_shapes and not row.worse
    assert row.stages_aligned == row.stages and row.onnx_passed


class _Softmax(nn.Module):
    """A softmax over channels between two convs: removing a channel changes every other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.flat = nn.Flatten(1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.b(torch.softmax(self.a(x), dim=1))
        return self.head(self.flat(nn.functional.adaptive_avg_pool2d(self.c(torch.relu(y)), 1)))


def test_channel_mixing_activations_keep_their_width_and_flatten_routes():
    """a's lanes meet a softmax over channels: kept; b's pass a ReLU to c: pruned; c's are
    flattened by an nn.Flatten module and read by the head: pruned."""
    model = _Softmax()
    maps, regions = prune_lanes(model, 0.5, torch.randn(2, 3, 8, 8))
    assert sorted(p for r in regions for p in r.producers) == ["b", "c"] == sorted(maps)
    assert model.a.out_channels == 8 and model.b.out_channels == 4 and model.head.in_features == 2


def test_a_failing_lane_analysis_leaves_the_fallback_student_as_it_was(monkeypatch, caplog):
    """prune's fallback never breaks on the lane analysis: when it raises, the block outputs
    keep their width, the rest of the fallback stands and a warning says why."""
    import fxkd.students.pruning

    def broken(*args, **kwargs):
        raise RuntimeError("an op the tag run does not model")

    monkeypatch.setattr(fxkd.students.pruning, "prune_lanes", broken)
    teacher = _shufflenet()
    with caplog.at_level("WARNING"):
        student = prune(teacher, 0.5, example_inputs=torch.randn(2, 3, 32, 32))
    assert "could not prune the routed block outputs" in caplog.text
    assert student.stage2[1].branch2[5].out_channels == 24  # block outputs: full width
    assert student.stage2[1].branch2[0].out_channels == 12  # the chains are still pruned
