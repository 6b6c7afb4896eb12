"""Data-parallel calibration: two gloo ranks on CPU equal one process on the union."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxkd

from models import make, prune_internal_resnet


def _pair(dtype):
    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    g = torch.Generator().manual_seed(5)
    samples, held_out = torch.randn(96, *shape, generator=g), torch.randn(32, *shape, generator=g)
    return teacher.to(dtype), student.to(dtype), maps, samples.to(dtype), held_out.to(dtype)


def _run(dtype, device="cpu"):
    teacher, student, maps, samples, held_out = (
        v.to(device) if hasattr(v, "to") else v for v in _pair(dtype)
    )
    result = fxkd.compress(
        teacher, student, samples, channel_maps=maps, progress=False, chunk_size=16
    )
    with torch.no_grad():
        logits = result.model(held_out)
    errors = [r.err_after for r in result.report.calibrated]
    state = {k: v.cpu() for k, v in result.model.state_dict().items()}
    return {"state": state, "logits": logits.cpu(), "errors": errors}


def _worker(rank, world, init_file, out_dir, dtype, backend="gloo", device="cpu") -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(_run(dtype, device), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(dtype, world=2, backend="gloo", device="cpu"):
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init, tmp, dtype, backend, device), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_two_gloo_ranks_fold_the_same_adapters_as_one_process_fp64():
    """fp64: only the reduction order of the statistics differs, so the folded weights agree."""
    single = _run(torch.float64)
    for got in _spawn(torch.float64):
        for key, value in single["state"].items():
            if value.is_floating_point():
                assert _rel(got["state"][key], value) < 1e-6, key
        # reported errors are reduced over ranks: they describe all the samples
        torch.testing.assert_close(
            torch.tensor(got["errors"]), torch.tensor(single["errors"]), rtol=1e-6, atol=1e-12
        )


def test_two_gloo_ranks_give_the_same_model_as_one_process_fp32():
    """fp32: oneDNN's convolution output for a sample depends on the batch it sits in; that
    1e-7 noise moves weakly determined weight directions (up to 1e-4 measured) but not what
    the model computes."""
    single = _run(torch.float32)
    ranks = _spawn(torch.float32)
    torch.testing.assert_close(ranks[0]["state"], ranks[1]["state"], rtol=0, atol=0)
    for got in ranks:
        assert _rel(got["logits"], single["logits"]) < 1e-5
        torch.testing.assert_close(
            torch.tensor(got["errors"]), torch.tensor(single["errors"]), rtol=1e-3, atol=1e-9
        )


@pytest.mark.cuda
def test_an_nccl_rank_reduces_through_its_gpu():
    """NCCL takes only CUDA tensors: with one rank per GPU (one GPU here, so one rank) the
    statistics travel through the rank's GPU and back, and the folded model equals a run
    without a process group (fp64, on the GPU)."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs CUDA and NCCL")
    single = _run(torch.float64, "cuda")
    (got,) = _spawn(torch.float64, world=1, backend="nccl", device="cuda")
    for key, value in single["state"].items():
        if value.is_floating_point():
            assert _rel(got["state"][key], value) < 1e-9, key
    assert got["errors"] == pytest.approx(single["errors"], rel=1e-9, abs=1e-15)
