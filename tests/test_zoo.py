"""Model-zoo coverage: torchvision and transformers architectures × student kinds, random init.

For each case: at least one aligned pair per stage (spatial resolution) of the teacher, the
report lists every adapter and every skipped producer, every adapter is folded, no adapter
module is left and the parameter shapes equal the student's as given, no point's error grows
in its solve, and the ONNX export passes onnxruntime validation with the student's size. One
case per family runs by default; the rest are marked slow (examples.benchmarks.zoo_support
runs them
all and writes the README's support table)."""

import pytest
import torch

import fxkd
from fxkd.capture import trace
from fxkd.students import channel_maps_of, prune
from fxkd.students.streams import find_streams
from fxkd.support import check_support

from zoo_cases import ARCHS, HF_ARCHS, KINDS, NO_BATCHNORM, NO_CONV, build, make_case

DEFAULT = {
    ("resnet18", "l1"),
    ("vgg11_bn", "bn"),
    ("mobilenet_v2", "decouple"),
    ("vit", "l1"),
    ("resnet34", "depth"),
}
# torch-pruning cannot analyse these: prune() falls back to fxkd's own analysis (internal
# conv chains; block outputs: RegNet's residual streams, ShuffleNet's routing regions)
INTERNAL_ONLY = {"shufflenet_v2_x0_5", "regnet_x_400mf"}

CASES = [
    (a, k)
    for a in ARCHS + HF_ARCHS
    for k in KINDS
    if not (a in NO_BATCHNORM and k == "bn") and not (a in NO_CONV and k == "decouple")
]
CASES.append(("resnet34", "depth"))


@pytest.mark.parametrize(
    "arch,kind",
    [pytest.param(a, k, marks=() if (a, k) in DEFAULT else pytest.mark.slow) for a, k in CASES],
)
def test_zoo_case(arch, kind):
    case = make_case(arch, kind)
    n_params = sum(p.numel() for p in case.student.parameters())
    row = check_support(case.teacher, case.student, case.samples, keep_result=True)
    result = row.result
    assert row.pairs >= 1
    assert row.stages_aligned == row.stages, (row.stages, row.stages_aligned)
    assert len(result.report.rows) == row.pairs + row.skipped
    assert all(r.note for r in result.report.rows if r.adapter is None)  # every skip says why
    assert row.folded == row.pairs, str(result.report)
    assert row.same_shapes
    assert sum(p.numel() for p in result.model.parameters()) == n_params
    assert not row.worse, (row.worse, str(result.report))
    assert row.onnx_passed and row.onnx_same_size, result.onnx


@pytest.mark.parametrize("arch", sorted(INTERNAL_ONLY))
def test_prune_falls_back_to_fxkd_analysis_where_torch_pruning_fails(arch, caplog):
    """scope="all" refuses (torch-pruning cannot analyse the model); the default scope warns
    and prunes the chains' internal channels and the block outputs: RegNet's residual streams,
    ShuffleNet's concatenated and shuffled stages (routing regions)."""
    teacher, shape = build(arch)
    example = torch.randn(2, *shape)
    with pytest.raises(fxkd.ConfigError, match="torch-pruning could not"):
        prune(teacher, 0.5, example_inputs=example, scope="all")
    with caplog.at_level("WARNING"):
        student = prune(teacher, 0.5, example_inputs=example)
    assert "fxkd's own coupling analysis" in caplog.text
    maps = channel_maps_of(student)
    assert maps and sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    with torch.no_grad():
        assert student(example).shape == teacher(example).shape
    streams = find_streams(trace(teacher), example)
    assert bool(streams) == (arch == "regnet_x_400mf")
    modules = dict(student.named_modules())
    for stream in streams:  # every block output of the stream is pruned, maps recorded
        for name in stream.producers:
            assert modules[name].out_channels < stream.channels and name in maps
    if arch == "shufflenet_v2_x0_5":  # concatenated + shuffled block outputs: lane routing
        for stage in ("stage2", "stage3", "stage4"):
            for name in (f"{stage}.0.branch1.2", f"{stage}.1.branch2.5"):
                t_width = teacher.get_submodule(name).out_channels
                assert modules[name].out_channels < t_width and name in maps


def test_depth_student_matches_every_stage_output():
    """ResNet-34 teacher, ResNet-18 student: each student stage's last block is matched with
    the teacher stage's last block (its output), and the stem and head with theirs."""
    case = make_case("resnet34", "depth", samples=8)
    result = fxkd.compress(
        case.teacher, case.student, case.samples, progress=False, mode="pointwise"
    )
    assert result.alignment.strategy == "cuts"
    matched = {p.site.point: p.teacher_point for p in result.alignment.pairs}
    # student adds: 2 per stage (add, add_1 | add_2, add_3 | ...); teacher: 3, 4, 6, 3 blocks
    assert [matched[f"add_{i}" if i else "add"] for i in (1, 3, 5, 7)] == [
        "add_2",
        "add_6",
        "add_12",
        "add_15",
    ]
    assert matched["fc"] == "fc" and matched["bn1"] == "bn1"
    order = [int(t.split("_")[1]) if "_" in t else 0 for t in matched.values() if "add" in t]
    assert order == sorted(order)


def test_shared_point_sites_share_one_teacher_point():
    case = make_case("resnet34", "depth", samples=8)
    result = fxkd.compress(
        case.teacher, case.student, case.samples, progress=False, mode="pointwise"
    )
    by_point: dict[str, set[str]] = {}
    for p in result.alignment.pairs:
        by_point.setdefault(p.site.point, set()).add(p.teacher_point)
    assert all(len(t) == 1 for t in by_point.values()), by_point
    assert any(
        len([p for p in result.alignment.pairs if p.site.point == pt]) == 2 for pt in by_point
    )


def test_transformer_mlp_output_is_seen_through_dropout():
    case = make_case("vit", "l1", samples=16)
    result = fxkd.compress(case.teacher, case.student, case.samples, progress=False)
    fc2 = [p.site for p in result.alignment.pairs if p.site.module.endswith("mlp.3")]
    assert len(fc2) == 2 and all(s.residual is not None and s.steps for s in fc2)
    assert torch.isfinite(result.model(case.samples[:2])).all()


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_attention_output_projection_gets_a_folded_adapter(mode):
    """nn.MultiheadAttention is a torch.fx leaf; its ``[0]`` output is out_proj's, so the
    adapter there folds into out_proj (pointwise in either mode: out_proj's input is internal).
    Planted: every Linear of the ViT (out_proj included) mixed by an invertible matrix; the
    recovery is exact on held-out inputs."""
    from models import plant

    teacher, shape = build("vit")
    student = plant(teacher)
    x, held_out = torch.randn(256, *shape), torch.randn(16, *shape)
    result = fxkd.compress(teacher, student, x, mode=mode, ridge=1e-9, progress=False)
    attn = [p.site for p in result.alignment.pairs if p.site.module.endswith("out_proj")]
    assert len(attn) == 2 and all(s.residual is not None for s in attn)
    assert all(r.folded for r in result.report.calibrated)
    with torch.no_grad():
        expected, before, after = teacher(held_out), student(held_out), result.model(held_out)
    assert float((before - expected).norm() / expected.norm()) > 0.05
    assert float((after - expected).norm() / expected.norm()) < 1e-4


def test_densenet_concatenations_prune_and_calibrate():
    """A small torchvision DenseNet: torch-pruning's concat indices go stale after earlier
    groups shrink a concatenation (fxkd's scoring skips those members); the pruned student
    still aligns, calibrates, folds and exports."""
    import torchvision.models as tvm

    from fxkd.students import prune

    torch.manual_seed(0)
    teacher = tvm.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=5
    ).eval()
    x = torch.randn(32, 3, 32, 32)
    student = prune(teacher, 0.5, example_inputs=x[:2])
    row = check_support(teacher, student, x, keep_result=True)
    assert row.ok, (row, str(row.result.report))
    assert not row.result.alignment.skipped
