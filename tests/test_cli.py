"""The `fxkd` command, run for real in a subprocess."""

import re
import subprocess
import sys

import pytest


def _fxkd(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fxkd.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_writes_a_validated_onnx_file_a_picture_and_the_table(tmp_path):
    """fxkd demo --out DIR: the table's rows (accuracy, parameters, MACs), an ONNX file that
    loads, passes onnx.checker and matches the recovered student under onnxruntime, a real PNG
    of the expected size, and the paths it printed."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from matplotlib.image import imread

    from fxkd.cli.plot import SIZE

    out = _fxkd("demo", "--samples", "100", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    rows = {
        name: (float(acc), int(params.replace(",", "")), int(macs.replace(",", "")))
        for name, acc, params, macs in re.findall(
            r"^  (teacher|student as pruned|fxkd \w+ recovered)\s+([\d.]+)%\s+([\d,]+)\s+"
            r"([\d,]+)",
            text,
            re.M,
        )
    }
    assert set(rows) == {"teacher", "student as pruned", "fxkd pointwise recovered",
                         "fxkd kernel recovered"}, text  # fmt: skip
    teacher, pruned = rows["teacher"], rows["student as pruned"]
    for mode in ("pointwise", "kernel"):
        acc, params, macs = rows[f"fxkd {mode} recovered"]
        assert acc > pruned[0] + 5 and (params, macs) == pruned[1:], text
    assert pruned[2] < teacher[2] / 3  # half the filters of every conv: a quarter of the MACs
    assert "fxkd report: kernel mode, mirror alignment, fx capture, 100 samples" in text
    assert re.search(r"ONNX \(kernel\): student\.onnx [\d,]+ KiB .*validation passed", text)

    printed = text.split("wrote:")[1].split()
    expected = [tmp_path / "student.onnx", tmp_path / "student.pt", tmp_path / "fxkd-demo.png"]
    assert printed == [str(p) for p in expected], text
    model = onnx.load(tmp_path / "student.onnx")
    onnx.checker.check_model(model, full_check=True)
    student = torch.load(tmp_path / "student.pt", weights_only=False)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "student.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    image = imread(tmp_path / "fxkd-demo.png")
    assert image.shape[:2] == (SIZE[1], SIZE[0]) and image.std() > 0.05


def test_bad_arguments_exit_non_zero_with_a_reason():
    out = _fxkd("demo", "--arch", "alexnet")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = _fxkd("demo", "--out", "/tmp/fxkd-demo-test", "--ratio", "1.5")
    assert out.returncode == 2 and "ratio" in out.stderr
    assert "error" in out.stderr.splitlines()[-1]
    for bad in (["--samples", "0"], ["--device", "cuda:7"], ["--onnx", "x.onnx"]):
        out = _fxkd("demo", "--out", "/tmp/fxkd-demo-test", *bad)
        if bad[0] == "--device" and "no CUDA device" not in out.stderr:
            continue  # a machine with that GPU runs the demo instead
        assert out.returncode == 2, (bad, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(("fxkd: error:", "fxkd demo: error:")), bad


@pytest.mark.slow
def test_fashion_mnist_benchmark_quick_mode(tmp_path):
    """examples/benchmarks/fashion_mnist.py --quick (needs the Fashion-MNIST files; minutes)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.benchmarks.fashion_mnist",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "fashion_mnist_quick.md").read_text()
    for method in ("none", "fxkd-pw", "fxkd-kernel", "finetune", "fitnet", "mir"):
        assert f"| {method} |" in table
    assert (tmp_path / "fashion_mnist_quick_accuracy.png").stat().st_size > 10_000


def test_compress_and_validate_commands(tmp_path):
    import torch

    from fxkd.cli.zoo import build
    from fxkd.students import prune

    torch.manual_seed(0)
    teacher = build("vgg").eval()
    student = prune(teacher, 0.5, example_inputs=torch.randn(1, 1, 28, 28))
    torch.save(teacher, tmp_path / "teacher.pt")
    torch.save(student, tmp_path / "student.pt")
    torch.save(torch.randn(64, 1, 28, 28), tmp_path / "samples.pt")
    out = _fxkd(
        "compress",
        "--teacher",
        str(tmp_path / "teacher.pt"),
        "--student",
        str(tmp_path / "student.pt"),
        "--data",
        str(tmp_path / "samples.pt"),
        "--samples",
        "64",
        "--onnx",
        str(tmp_path / "s.onnx"),
        "--out",
        str(tmp_path / "out"),
    )
    assert out.returncode == 0, out.stderr
    assert "fxkd report: kernel mode, mirror alignment, fx capture, 64 samples" in out.stdout
    assert "ONNX validation passed" in out.stdout
    assert (tmp_path / "out" / "student.pt").exists()
    out = _fxkd(
        "validate",
        str(tmp_path / "s.onnx"),
        "--reference",
        str(tmp_path / "out" / "student.pt"),
        "--data",
        str(tmp_path / "samples.pt"),
    )
    assert out.returncode == 0, out.stderr
    assert "CPUExecutionProvider (unoptimized)" in out.stdout


def test_compress_bad_inputs_give_one_line_reasons(tmp_path):
    out = _fxkd("compress", "--teacher", "nope.pt", "--student", "x:y", "--data", "fashion-mnist")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope.pt" in out.stderr
    out = _fxkd(
        "compress",
        "--teacher",
        "fxkd.cli.zoo:FashionVGG",
        "--student",
        "fxkd.cli.zoo:FashionVGG",
        "--data",
        str(tmp_path),
    )  # an empty folder
    assert out.returncode == 2 and "error" in out.stderr


def test_fashion_mnist_runs_split_over_processes_merge_into_one_table(tmp_path):
    """examples/tools/gpu_fashion.sh's merge: the .json of runs split by teacher/student (one of
    them stopped early, a .partial.json) become one table holding every row of both."""
    import importlib.util
    import json

    def run(teacher, student, accs):
        rows = [
            {"teacher": teacher, "student": student, "n": 100, "seed": seed, "method": method,
             "acc": acc, "seconds": 1.0, "ratio": 1.0, "choice": None}
            for seed, (method, acc) in enumerate(accs)
        ]  # fmt: skip
        meta = {
            "command": f"python -m examples.benchmarks.fashion_mnist --teachers {teacher}",
            "quick": False,
            "seeds": [0, 1],
            "machine": "test",
            "teacher_acc": {teacher: 0.93},
            "students": {teacher: [student]},
            "params": {teacher: {"teacher": 1000, student: 500}},
        }
        return {"meta": meta, "rows": rows, "block_reports": {}}

    a = tmp_path / "fashion_mnist_shard-vgg-l1-50.json"
    b = tmp_path / "fashion_mnist_shard-resnet-l1-75.partial.json"
    a.write_text(json.dumps(run("vgg", "l1-50", [("fxkd-kernel", 0.9), ("fxkd-kernel", 0.8)])))
    b.write_text(json.dumps(run("resnet", "l1-75", [("mir", 0.7)])))
    out = subprocess.run(
        [sys.executable, "-m", "examples.benchmarks.fashion_mnist", "--from-json", str(a), str(b),
         "--tag", "merged", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    merged = json.loads((tmp_path / "fashion_mnist_merged.json").read_text())
    assert len(merged["rows"]) == 3
    assert merged["meta"]["students"] == {"vgg": ["l1-50"], "resnet": ["l1-75"]}
    table = (tmp_path / "fashion_mnist_merged.md").read_text()
    assert "## Teacher vgg: 93.00%" in table and "## Teacher resnet: 93.00%" in table
    assert "| fxkd-kernel | no | 85.00% ± 7.07% |" in table  # mean ± std of the two seeds
    assert "one of 2 runs split by --teachers/--students" in table
    png = tmp_path / "fashion_mnist_merged_accuracy.png"
    if importlib.util.find_spec("matplotlib"):  # an optional dependency: plots only with it
        assert png.stat().st_size > 10_000
    else:
        assert not png.exists() and "matplotlib is not installed" in out.stderr


def test_demo_names_the_extra_that_brings_a_missing_package(monkeypatch):
    import importlib.util

    from fxkd.cli.main import demo_requirements

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    message = demo_requirements(onnx=True)
    assert "onnxruntime" in message and "fxkd[demo]" in message and "--no-onnx" in message
    assert demo_requirements(onnx=False) is None
