"""Fold exactness: random adapters folded vs unfolded, in fp64, every parameter shape kept."""

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import FoldAdapters, FoldBatchNorm, InsertAdapters, KernelAdapter

from models import randomize_bn


class Site(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module | None):
        super().__init__()
        self.producer = producer
        self.bn = bn

    def forward(self, x):
        y = self.producer(x)
        return torch.relu(self.bn(y) if self.bn is not None else y)


CONVS = {
    "dense": dict(groups=1),
    "grouped": dict(groups=4),
    "depthwise": dict(groups=8),
}


def _cases():
    for name, kw in CONVS.items():
        for bias in (True, False):
            for bn in (True, False):
                yield pytest.param(
                    "conv",
                    kw["groups"],
                    bias,
                    bn,
                    id=f"conv-{name}-{'bias' if bias else 'nobias'}-{'bn' if bn else 'nobn'}",
                )
    for bias in (True, False):
        for bn in (True, False):
            yield pytest.param(
                "linear",
                1,
                bias,
                bn,
                id=f"linear-{'bias' if bias else 'nobias'}-{'bn' if bn else 'nobn'}",
            )


def _model(kind, groups, bias, bn):
    if kind == "conv":
        producer = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=bias)
        norm = nn.BatchNorm2d(16) if bn else None
        shape = (4, 8, 6, 6)
    else:
        producer = nn.Linear(8, 16, bias=bias)
        norm = nn.BatchNorm1d(16) if bn else None
        shape = (4, 8)
    return randomize_bn(Site(producer, norm)).double(), shape


def _randomize_adapters(gm: fx.GraphModule, producer: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in gm.modules():
        if isinstance(m, KernelAdapter):
            w = torch.randn(producer.weight.shape, generator=g, dtype=torch.float64)
            b = torch.randn(producer.weight.shape[0], generator=g, dtype=torch.float64)
            m.set_kernel(w, b if m.has_bias else None)
        elif hasattr(m, "pair"):
            with torch.no_grad():
                m.weight.copy_(
                    m.weight + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                )
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize(("kind", "groups", "bias", "bn"), list(_cases()))
def test_fold_is_exact_in_fp64(kind, groups, bias, bn, mode):
    model, shape = _model(kind, groups, bias, bn)
    x = torch.randn(*shape, dtype=torch.float64)
    gm = trace(model, x)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    alignment = align(trace(model, x), gm)
    assert len(alignment.pairs) == 1
    InsertAdapters(alignment, mode)(gm)
    gm.double()
    _randomize_adapters(gm, model.producer)
    with torch.no_grad():
        unfolded = gm(x)
    fold = FoldAdapters()
    result = fold(gm)
    assert result.modified and list(fold.outcome.values()) == [None]
    assert not any(hasattr(m, "pair") for m in gm.modules()), "an adapter remains"
    with torch.no_grad():
        folded = gm(x)
    rel = float((folded - unfolded).norm() / unfolded.norm())
    assert rel < 1e-10
    assert {k: v.shape for k, v in gm.state_dict().items()} == shapes


def test_fold_batchnorm_is_exact_and_removes_bn():
    model, shape = _model("conv", 4, False, True)
    x = torch.randn(*shape, dtype=torch.float64)
    gm = trace(model, x)
    with torch.no_grad():
        before = gm(x)
    result = FoldBatchNorm()(gm)
    assert result.modified
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-10, atol=1e-12)


def _give_another_user(gm: fx.GraphModule, node: fx.Node) -> None:
    """Add ``node.mean()`` to the graph's output: a second reader of ``node``'s value."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        extra = gm.graph.call_method("mean", (node,))
        total = gm.graph.call_function(torch.add, (output.args[0], extra))
    output.args = (total,)
    gm.recompile()


def test_fold_refuses_a_producer_with_other_users():
    model, shape = _model("conv", 1, True, True)
    x = torch.randn(*shape, dtype=torch.float64)
    gm = trace(model, x)
    alignment = align(trace(model, x), gm)
    InsertAdapters(alignment, "pointwise")(gm)
    gm.double()
    _randomize_adapters(gm, model.producer)
    # a toolchain later gives the producer another user: folding would change that user
    _give_another_user(gm, next(n for n in gm.graph.nodes if n.target == "producer"))
    with torch.no_grad():
        before = gm(x)
    fold = FoldAdapters()
    fold(gm)
    (reason,) = fold.outcome.values()
    assert reason is not None and "other users" in reason
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before)  # kept adapter: still the same function


def test_batchnorm_folded_view_keeps_names_and_values_and_leaves_the_model_alone():
    """The view calibration runs the teacher with: every conv → BatchNorm pair fused into one
    call under the BatchNorm's name (same value, fp64), a kept name not fused, a conv with
    another user not fused, and the traced model itself unchanged (graph and weights)."""
    from torchvision.models import resnet18

    from fxkd.passes.fold import batchnorm_folded_view

    model = randomize_bn(resnet18(num_classes=10)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    gm = trace(model, x)
    state_before = {k: v.clone() for k, v in gm.state_dict().items()}
    # a toolchain's extra user of one conv: that conv's output must stay as it is
    _give_another_user(gm, next(n for n in gm.graph.nodes if n.name == "layer1_0_conv2"))
    names_before = [n.name for n in gm.graph.nodes]

    view = batchnorm_folded_view(gm, keep={"layer2_0_conv1"})

    def values(module):
        seen = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                seen[n.name] = super().run_node(n)
                return seen[n.name]

        with torch.no_grad():
            Recorder(module).run(x)
        return seen

    want, got = values(gm), values(view)
    kinds = {n.name: type(view.get_submodule(str(n.target))) for n in view.graph.nodes
             if n.op == "call_module"}  # fmt: skip
    assert kinds["bn1"] is nn.Conv2d  # the stem's conv and BN: one call, the BN's name
    assert "conv1" not in got
    assert kinds["layer1_0_bn2"] is nn.BatchNorm2d  # its conv has another user
    assert kinds["layer2_0_bn1"] is nn.BatchNorm2d and "layer2_0_conv1" in got  # kept
    assert not any(t is nn.BatchNorm2d for n, t in kinds.items() if n not in
                   ("layer1_0_bn2", "layer2_0_bn1"))  # fmt: skip
    assert set(got) <= set(want)
    for name, value in got.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, want[name], rtol=1e-12, atol=1e-12)
    assert [n.name for n in gm.graph.nodes] == names_before
    fused = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and name not in ("layer1.0.conv2", "layer2.0.conv1")]  # fmt: skip
    assert len(fused) == 18  # 20 convs, each followed by a BatchNorm, less the two kept
    assert view.fxkd_made_bytes == sum(8 * (m.weight.numel() + m.out_channels) for m in fused)
    assert all(torch.equal(v, state_before[k]) for k, v in gm.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 20


def test_batchnorm1d_after_a_linear_on_a_sequence_is_not_folded():
    """BatchNorm1d normalizes dim 1: after a Linear on (N, L, C) that is L, not the Linear's
    features, so neither FoldBatchNorm nor the calibration's folded view may merge it (both
    did, silently changing the function); on (N, C) both still fold it, exactly."""
    from fxkd.passes.fold import batchnorm_folded_view

    class LinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.fc(x))

    for shape, folds in (((4, 8, 8), False), ((4, 8), True)):
        model = randomize_bn(LinearBN()).double()
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            want = model(x)
        view = batchnorm_folded_view(trace(model, x))
        gm = trace(model, x)
        assert FoldBatchNorm()(gm).modified is folds
        assert any(isinstance(m, nn.BatchNorm1d) for m in view.modules()) is not folds
        with torch.no_grad():
            torch.testing.assert_close(view(x), want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gm(x), want, rtol=1e-12, atol=1e-12)
