"""Memory options: the estimate checked before calibration, offloading held values, and
spatial subsampling of the normal equations' rows."""

import copy

import pytest
import torch

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.errors import ConfigError, MemoryBudgetError
from fxkd.passes import CalibrateAdapters, GraphRunner, InsertAdapters
from fxkd.passes.memory import estimate, peak_live_bytes

from models import make, plant, prune_internal_resnet


def _prepared(name, mode, n=128):
    teacher, shape = make(name)
    student = plant(teacher)
    x = torch.randn(n, *shape)
    t_gm, ref = trace(teacher, x[:32]), trace(student, x[:32])
    s_gm = trace(copy.deepcopy(student), x[:32])
    InsertAdapters(align(t_gm, s_gm), mode)(s_gm)
    return t_gm, s_gm, ref, x


def test_peak_live_bytes_of_a_chain():
    """Straight chain: the peak is the largest pair of consecutive values (an op's input and
    output are alive together); per sample, fp32."""
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 100), torch.nn.ReLU(), torch.nn.Linear(100, 20), torch.nn.ReLU()
    )
    gm = trace(model, torch.randn(7, 10))
    assert peak_live_bytes(gm) == (100 + 100) * 4


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_estimate_matches_what_the_runners_held(name, mode):
    """The estimate of held activations is what the lockstep runners actually held at their
    peaks (counted by storage), never below it and at most 1.1x; the run fits, so no error."""
    t_gm, s_gm, ref, x = _prepared(name, mode)
    cal = CalibrateAdapters(t_gm, x, fxkd.CompressConfig(mode=mode, progress=False), ref)
    cal(s_gm)
    measured = sum(cal.peak_held.values())
    assert set(cal.peak_held) == {"teacher", "student", "reference"}
    held = cal.memory.held["cpu"]
    assert measured <= held <= 1.1 * measured, (held, cal.peak_held)
    assert cal.memory.working > 0 and cal.memory.systems > 0


def test_estimate_scales_with_samples_and_shrinks_with_offload_on_gpu_only():
    t_gm, s_gm, ref, _ = _prepared("vgg", "kernel")
    cfg = fxkd.CompressConfig(mode="kernel")
    small, large = (estimate(t_gm, s_gm, n, cfg, ref) for n in (100, 400))
    assert large.held["cpu"] == pytest.approx(4 * small.held["cpu"], rel=1e-6)
    assert large.working == small.working  # one chunk, whatever the number of samples
    subsampled = estimate(t_gm, s_gm, 100, cfg.replace(subsample=0.25), ref)
    assert subsampled.working < small.working
    pointwise = estimate(t_gm, s_gm, 100, cfg.replace(mode="pointwise"), ref)
    assert pointwise.systems < small.systems
    # offload on a CPU calibration changes nothing: the values are in CPU memory already
    assert estimate(t_gm, s_gm, 100, cfg.replace(offload=True), ref).held == small.held


def test_too_large_a_calibration_fails_before_any_work(monkeypatch):
    """A memory_limit below the estimate raises MemoryBudgetError naming the options that
    help, before any runner is built (no layer has run on the samples); the student is
    untouched."""
    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    before = copy.deepcopy(student.state_dict())
    runners = []
    init = GraphRunner.__init__
    monkeypatch.setattr(
        GraphRunner, "__init__", lambda self, *a, **k: runners.append(1) or init(self, *a, **k)
    )
    with pytest.raises(MemoryBudgetError) as info:
        fxkd.compress(
            teacher,
            student,
            torch.randn(256, *shape),
            channel_maps=maps,
            memory_limit=1 << 20,
            chunk_size=256,
            progress=False,
        )
    msg = str(info.value)
    assert "needs about" in msg and "on cpu" in msg and "Hint:" in msg, msg
    assert "chunk_size" in msg and "mode='pointwise'" in msg, msg
    # one chunk alone exceeds the limit: fewer samples would not help, so not offered; nor is
    # offloading on a CPU calibration
    assert "num_samples=" not in msg and "offload" not in msg, msg
    assert runners == []
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fitting_hint_gives_a_sample_count_that_fits():
    t_gm, s_gm, ref, x = _prepared("vgg", "pointwise", n=256)
    cfg = fxkd.CompressConfig(mode="pointwise", progress=False)
    est = estimate(t_gm, s_gm, 256, cfg, ref)
    limit = est.working + est.systems + est.held["cpu"] // 2
    with pytest.raises(MemoryBudgetError) as info:
        CalibrateAdapters(t_gm, x, cfg.replace(memory_limit=limit), ref)(s_gm)
    fits = int(str(info.value).split("num_samples=")[1].split()[0])
    assert 100 <= fits <= 128
    assert estimate(t_gm, s_gm, fits, cfg, ref).on("cpu") <= limit


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "half"])
def test_subsample_must_be_a_share(bad):
    with pytest.raises(ConfigError, match="subsample"):
        fxkd.CompressConfig(subsample=bad)


def test_memory_limit_must_be_positive():
    with pytest.raises(ConfigError, match="memory_limit"):
        fxkd.CompressConfig(memory_limit=-1)


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_subsampled_positions_still_recover_a_planted_solution(mode):
    """A planted solution is exact on any subset of rows with enough of them: with a quarter
    of the positions the recovery stays exact, and each system saw a quarter of the rows."""
    teacher, shape = make("vgg")
    student = plant(teacher)
    calib, held_out = torch.randn(256, *shape), torch.randn(64, *shape)
    full = fxkd.compress(teacher, student, calib, mode=mode, ridge=1e-9, progress=False)
    quarter = fxkd.compress(
        teacher, student, calib, mode=mode, ridge=1e-9, subsample=0.25, progress=False
    )
    with torch.no_grad():
        expected, after = teacher(held_out), quarter.model(held_out)
        assert float((after - expected).norm() / expected.norm()) < 1e-4
        assert float((full.model(held_out) - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_subsample_takes_that_share_of_conv_rows_only(mode):
    t_gm, s_gm, _, x = _prepared("vgg", mode)
    records = {}
    for share in (1.0, 0.25):
        gm = copy.deepcopy(s_gm)
        cal = CalibrateAdapters(t_gm, x, fxkd.CompressConfig(subsample=share, progress=False))
        cal(gm)
        records[share] = cal.records
    conv = 0
    for name, full in records[1.0].items():
        quarter = records[0.25][name]
        if gm.get_submodule(name).dims > 0:  # conv sites: a quarter of each chunk's positions
            conv += 1
            assert full.rows // 4 <= quarter.rows <= full.rows // 4 + len(x), (name, quarter)
        else:  # fully-connected sites (the classifier) keep every row
            assert quarter.rows == full.rows
    assert conv >= 2


def test_offload_on_cpu_changes_nothing():
    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    x = torch.randn(96, *shape)
    kw = {"channel_maps": maps, "progress": False, "chunk_size": 32}
    plain = fxkd.compress(teacher, student, x, **kw)
    offloaded = fxkd.compress(teacher, student, x, offload=True, **kw)
    a, b = plain.model.state_dict(), offloaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_offload_on_cuda_gives_the_same_adapters_with_less_device_memory(mode):
    """Offloaded held values (pinned CPU memory, one chunk at a time on the GPU) give the
    adapters of the plain GPU run; the GPU's peak allocation is lower."""
    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    teacher, student = teacher.cuda(), student.cuda()
    x = torch.randn(512, *shape)
    kw = {"channel_maps": maps, "progress": False, "chunk_size": 32, "mode": mode}
    peaks, states = [], []
    for offload in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fxkd.compress(teacher, student, x, offload=offload, **kw)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        states.append(result.model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6)
    assert peaks[1] < peaks[0], peaks


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runner_offload_keeps_values_in_pinned_host_memory():
    gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).cuda())
    chunks = [torch.randn(3, 4, device="cuda") for _ in range(2)]
    last = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
    runner = GraphRunner(gm, chunks, pinned=[last], offload=True)
    out = runner.finish()
    assert all(v.device.type == "cpu" and v.is_pinned() for v in runner.value(last))
    assert runner.chunk(last, 0).device.type == "cuda"
    torch.testing.assert_close(out[0].cuda(), gm(chunks[0]))


class _WideHead(torch.nn.Module):
    """A conv and a Linear over its flattened 16×16 map: 2049 kernel unknowns per class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_estimate_sizes_underdetermined_kernel_systems_as_the_pointwise_ones_solved():
    """With fewer sample rows than a producer's kernel unknowns calibration solves it pointwise
    (the 10-class head on 64 samples): the estimate sizes that system, not a 2049² one that is
    never built, and the calibration it allows runs."""
    teacher = _WideHead().eval()
    student = copy.deepcopy(teacher)
    x = torch.randn(64, 3, 16, 16)
    t_gm = trace(teacher, x[:2])
    s_gm = trace(student, x[:2])
    InsertAdapters(align(t_gm, s_gm), "kernel")(s_gm)
    est = estimate(t_gm, s_gm, len(x), fxkd.CompressConfig(mode="kernel"))
    conv_kernel = 8 * (5 * 28 * 28 + 3 * 28 * 8)  # 27 unknowns + bias, 8 outputs
    head_pointwise = 8 * (5 * 11 * 11 + 3 * 11 * 10)
    assert est.systems == max(conv_kernel, head_pointwise)
    assert estimate(t_gm, s_gm, 4096, fxkd.CompressConfig(mode="kernel")).systems == (
        8 * (5 * 2049 * 2049 + 3 * 2049 * 10)  # enough rows: the head's kernel system
    )


class _TwoBranchSum(torch.nn.Module):
    """Two Linear branches of one input, summed: the sum is the peak of the live values."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(10, 100), torch.nn.Linear(10, 100)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def test_a_sum_whose_first_operand_dies_there_is_computed_into_it():
    """GraphRunner writes ``a + b`` into ``a`` when nothing reads ``a`` afterwards (fx records a
    ResNet's ``out += identity`` out of place): the values are the module's, the samples and
    the weights untouched, the held peak one activation lower (a and b, not a, b and the sum),
    and the estimate counts the same."""
    model = _TwoBranchSum().eval()
    gm = trace(model, torch.randn(4, 10))
    chunks = [torch.randn(6, 10) for _ in range(3)]
    given = [c.clone() for c in chunks]
    weights = copy.deepcopy(model.state_dict())
    runner = GraphRunner(gm, chunks)
    with torch.no_grad():  # as calibration runs (autograd's tensors are left alone)
        out = runner.finish()
    with torch.no_grad():
        for c, o in zip(chunks, out, strict=True):
            torch.testing.assert_close(o, model(c), rtol=0, atol=0)
    assert all(torch.equal(c, g) for c, g in zip(chunks, given, strict=True))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    per_sample = (10 + 100 + 100) * 4  # while b runs: x, a(x), b(x); the sum goes in a(x)
    assert peak_live_bytes(gm) == per_sample
    assert runner.peak_bytes == per_sample * 18


def test_a_sum_does_not_overwrite_an_operand_still_read():
    """A pinned first operand (a value calibration reads later) keeps its value; so does one
    with a second reader, and then the held peak has the sum as a third activation."""
    model = _TwoBranchSum().eval()
    gm = trace(model, torch.randn(4, 10))
    first = next(n for n in gm.graph.nodes if n.target == "a")
    chunks = [torch.randn(6, 10)]
    runner = GraphRunner(gm, chunks, pinned=[first])
    with torch.no_grad():
        runner.finish()
    with torch.no_grad():
        torch.testing.assert_close(runner.value(first)[0], model.a(chunks[0]), rtol=0, atol=0)
    assert runner.peak_bytes == (100 + 100 + 100) * 4 * 6

    total = next(n for n in gm.graph.nodes if n.op == "call_function" and n.args[0] is first)
    with gm.graph.inserting_after(total):
        extra = gm.graph.call_function(torch.mul, (first, 2.0))
    relu = next(iter(total.users))
    with gm.graph.inserting_after(relu):
        both = gm.graph.call_function(torch.add, (relu, extra))
    gm.graph.output_node().args = (both,)
    gm.recompile()
    with torch.no_grad():
        out = GraphRunner(gm, chunks).finish()[0]
    with torch.no_grad():
        a, b = model.a(chunks[0]), model.b(chunks[0])
    torch.testing.assert_close(out, torch.relu(a + b) + 2 * a, rtol=0, atol=0)


class _Aliases(torch.nn.Module):
    """Sums whose first operand shares its storage: with the samples (an Identity returns its
    input) and with a view still read afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = torch.nn.Identity()
        self.a, self.b = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)

    def forward(self, x):
        h = self.b(x)
        v = h.view(-1, 5, 2)
        s = self.skip(x) + self.a(x)  # x's last reader is a: only the samples' own guard
        return h + s, v


def test_a_sum_never_writes_the_samples_or_a_storage_another_value_holds():
    model = _Aliases().eval()
    gm = trace(model, torch.randn(4, 10))
    chunks = [torch.randn(6, 10), torch.randn(3, 10)]
    given = [c.clone() for c in chunks]
    with torch.no_grad():
        out = GraphRunner(gm, chunks).finish()
        for c, g, (total, view) in zip(chunks, given, out, strict=True):
            expected_total, expected_view = model(g)
            torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
            torch.testing.assert_close(view, expected_view, rtol=0, atol=0)
            assert torch.equal(c, g)


class _Table(torch.nn.Module):
    """A leaf that returns a tensor it holds as a plain attribute (neither parameter nor
    buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.randn(6, 10)

    def forward(self, x):
        return self.table


class _TablePlusLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lookup, self.lin = _Table(), torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.lookup(x) + self.lin(x)


def test_a_sum_never_writes_a_tensor_the_model_holds():
    model = _TablePlusLinear().eval()
    table = model.lookup.table.clone()
    gm = trace(model, torch.randn(6, 10), leaf_modules=(_Table,))
    x = torch.randn(6, 10)
    with torch.no_grad():
        (out,) = GraphRunner(gm, [x]).finish()
        torch.testing.assert_close(out, table + model.lin(x), rtol=0, atol=0)
    assert torch.equal(model.lookup.table, table)
