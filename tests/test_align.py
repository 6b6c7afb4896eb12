import operator

import pytest
import torch

from fxkd.align import align, block_cuts, find_sites, is_mirror
from fxkd.capture import trace
from fxkd.errors import AlignmentError

from models import VGGStyle, make, prune_internal_resnet, prune_internal_vgg, randomize_bn


def _gm(model, shape):
    return trace(model, torch.randn(2, *shape))


def test_vgg_sites_are_every_conv_and_the_head():
    model, shape = make("vgg")
    sites, skipped = find_sites(_gm(model, shape))
    assert [s.point for s in sites] == [f"features_{i}" for i in (1, 4, 8, 11)] + ["head"]
    assert all(s.residual is None for s in sites)
    assert skipped == []


def test_resnet_sites_meet_at_residual_adds():
    model, shape = make("resnet")
    gm = _gm(model, shape)
    sites, _ = find_sites(gm)
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd)]
    assert len(adds) == 6
    at_adds = [s for s in sites if s.point in {a.name for a in adds}]
    # conv2 of each of the 6 blocks, plus the 2 projection shortcuts
    assert len(at_adds) == 8
    assert len(sites) == 1 + 6 * 2 + 2 + 1  # stem, conv1+conv2 per block, projections, head
    cuts = {n.name for n in block_cuts(gm)}
    assert {a.name for a in adds} <= cuts


def test_mirror_alignment_uses_channel_maps():
    teacher, shape = make("vgg")
    student, maps = prune_internal_vgg(teacher)
    t, s = _gm(teacher, shape), _gm(student, shape)
    assert is_mirror(t, s)
    alignment = align(t, s, channel_maps=maps)
    assert alignment.strategy == "mirror"
    assert len(alignment.pairs) == 5
    mapped = [p for p in alignment.pairs if p.channel_map is not None]
    assert len(mapped) == 3 and all(p.map_source == "given" for p in mapped)


def test_missing_channel_map_skips_with_reason():
    teacher, shape = make("resnet")
    student, _ = prune_internal_resnet(teacher)
    for block in student.blocks:  # statistics no longer match the teacher's
        block.bn1.running_mean.add_(0.01)
    alignment = align(_gm(teacher, shape), _gm(student, shape))
    inferred = [p for p in alignment.pairs if p.map_source == "inferred-weights"]
    assert len(inferred) == 6  # the filters still do: maps come from the weights
    for block in student.blocks:  # now neither matches: nothing to infer
        block.conv1.weight.data.mul_(1.01)
    alignment = align(_gm(teacher, shape), _gm(student, shape))
    reasons = [s.reason for s in alignment.skipped]
    assert len(reasons) == 6 and all("no channel map" in r for r in reasons)
    assert len(alignment.pairs) == 1 + 6 + 2 + 1


def test_unknown_channel_map_key_is_an_alignment_error():
    teacher, shape = make("vgg")
    with pytest.raises(AlignmentError, match="not conv/linear modules"):
        align(_gm(teacher, shape), _gm(teacher, shape), channel_maps={"nope": [0]})


def test_hand_designed_student_aligns_at_cuts_by_signature():
    torch.manual_seed(0)
    teacher = randomize_bn(VGGStyle((8, 16, 16, 32)))
    student = randomize_bn(VGGStyle((8, 16, 32)))
    shape = (3, 16, 16)
    alignment = align(_gm(teacher, shape), _gm(student, shape))
    assert alignment.strategy == "cuts"
    pairs = [(p.site.point, p.teacher_point) for p in alignment.pairs]
    assert pairs == [
        ("features_1", "features_1"),
        ("features_4", "features_4"),
        ("features_8", "features_11"),
        ("head", "head"),
    ]


def test_block_granularity_keeps_only_boundaries():
    teacher, shape = make("resnet")
    alignment = align(_gm(teacher, shape), _gm(teacher, shape), granularity="block")
    # stem, the 6 adds (8 sites: two projections), the head; inner conv1s are inside blocks
    assert len(alignment.pairs) == 1 + 8 + 1
    assert sum("inside a block" in s.reason for s in alignment.skipped) == 6


def test_incompatible_pair_raises_alignment_error_listing_both_sides():
    teacher, _ = make("vgg")
    other, _ = make("conv1d")
    t = _gm(teacher, (3, 16, 16))
    s = _gm(other, (4, 32))
    with pytest.raises(AlignmentError, match="teacher boundaries") as info:
        align(t, s)
    assert "student sites" in str(info.value)


def test_batchnorm_without_running_stats_is_skipped_with_reason():
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 2),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    alignment = align(trace(model, x), trace(model, x))
    (skip,) = [s for s in alignment.skipped if s.node == "_0"]
    assert "running statistics" in skip.reason
    assert [p.site.producer for p in alignment.pairs] == ["_4"]


def test_per_channel_linear_steps_are_seen_through():
    """ConvNeXt-style: fc2 (channels last) → permute → layer scale → dropout → add. The site's
    point is the add, its channels are on axis 1 there; the depthwise conv's point is the
    permute before the LayerNorm."""
    model, shape = make("convnext")
    sites, skipped = find_sites(_gm(model, shape))
    by_module = {s.module: s for s in sites}
    fc2 = by_module["blocks.0.fc2"]
    assert fc2.point == "add" and fc2.residual is not None
    assert [n.split("_")[0] for n in fc2.steps] == ["permute", "mul", "blocks"]  # ..._drop
    assert (fc2.dims, fc2.channel_dim, fc2.channels) == (0, 1, 8)
    dw = by_module["blocks.0.dw"]
    assert dw.steps == ("permute",) and dw.channel_dim == 3 and dw.channels == 8
    assert skipped == []


def test_a_scale_with_zeros_is_not_seen_through():
    model, shape = make("convnext")
    with torch.no_grad():
        model.blocks[0].layer_scale[3] = 0.0  # not invertible: the site ends at the permute
    sites, _ = find_sites(_gm(model, shape))
    fc2 = next(s for s in sites if s.module == "blocks.0.fc2")
    assert fc2.steps[0].startswith("permute") and len(fc2.steps) == 1
    assert fc2.residual is None


def _plain_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(12, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 5),
    ).eval()


def _prune_plain(teacher, kept: dict[int, list[int]]):
    """Filter-prune the convs at the given indices of a BatchNorm-free Sequential (their next
    conv loses the same inputs): a student "pruned elsewhere", no map recorded."""
    import copy

    student = copy.deepcopy(teacher)
    convs = [i for i, m in enumerate(student) if isinstance(m, torch.nn.Conv2d)]
    prev = None
    for i in convs:
        conv = student[i]
        w, b = conv.weight.data, conv.bias.data
        if prev is not None:
            w = w[:, prev]
        rows = kept.get(i, list(range(w.shape[0])))
        new = torch.nn.Conv2d(w.shape[1], len(rows), 3, padding=1)
        new.weight.data, new.bias.data = w[rows].clone(), b[rows].clone()
        student[i] = new
        prev = rows
    return student


def test_channel_maps_are_inferred_from_weights_without_batchnorm():
    teacher = _plain_net()
    kept = {0: [0, 2, 3, 7], 2: [1, 4, 5, 6, 9, 11]}
    student = _prune_plain(teacher, kept)
    x = torch.randn(2, 3, 8, 8)
    alignment = align(_gm(teacher, (3, 8, 8)), trace(student, x))
    maps = {p.site.module: (p.channel_map, p.map_source) for p in alignment.pairs}
    assert maps["0"] == (tuple(kept[0]), "inferred-weights")
    assert maps["2"] == (tuple(kept[2]), "inferred-weights")  # through the pruned inputs
    assert maps["5"] == (None, None) and maps["8"] == (None, None)
    assert not alignment.skipped
