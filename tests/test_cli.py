"""The `fxkd` command, run for real in a subprocess."""

import re
import subprocess
import sys

import pytest


def _fxkd(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fxkd.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def _shipped_test_images(n: int):
    """The first ``n`` shipped test images, normalised as the demo feeds them: (n, 1, 28, 28)."""
    import numpy as np
    import torch

    from fxkd.cli.datasets import normalize
    from fxkd.cli.demo import ASSETS

    images = np.load(ASSETS / "fashion_mnist_subset.npz")["test_images"][:n]
    return normalize(torch.from_numpy(images)).numpy()


def _table(text: str) -> dict[str, tuple[float, int, int]]:
    """The demo table's rows: name -> (accuracy %, parameters, MACs per sample)."""
    return {
        name: (float(acc), int(params.replace(",", "")), int(macs.replace(",", "")))
        for name, acc, params, macs in re.findall(
            r"^  (teacher|student as pruned|fxkd \w+ recovered)\s+([\d.]+)%\s+([\d,]+)\s+"
            r"([\d,]+)",
            text,
            re.M,
        )
    }


def _written(text: str) -> list[str]:
    return text.split("\nwrote:\n")[1].split()


def test_demo_writes_a_validated_onnx_file_a_picture_and_the_table(tmp_path):
    """fxkd demo --out DIR: the table's rows (accuracy, parameters, MACs), an ONNX file that
    loads, passes onnx.checker and matches the recovered student under onnxruntime, a real PNG
    of the expected size, the paths it printed, and progress lines on stderr while it works."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from matplotlib.image import imread

    from fxkd.cli.plot import SIZE

    out = _fxkd("demo", "--samples", "100", "--test-set", "shipped", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    rows = _table(text)
    assert set(rows) == {"teacher", "student as pruned", "fxkd pointwise recovered",
                         "fxkd kernel recovered"}, text  # fmt: skip
    teacher, pruned = rows["teacher"], rows["student as pruned"]
    for mode in ("pointwise", "kernel"):
        acc, params, macs = rows[f"fxkd {mode} recovered"]
        assert acc > pruned[0] + 5 and (params, macs) == pruned[1:], text
    assert teacher[0] > 90 and pruned[1] < teacher[1] / 3
    assert pruned[2] < teacher[2] / 3  # half the filters of every conv: a quarter of the MACs
    assert "accuracy on the shipped Fashion-MNIST test subset (2,000 images)" in text
    assert "fxkd report: kernel mode, mirror alignment, fx capture, 100 samples" in text
    size = re.search(r"ONNX \(kernel\): student\.onnx ([\d,]+) KiB .*validation passed", text)
    assert size, text
    onnx_file = tmp_path / "student.onnx"
    assert int(size.group(1).replace(",", "")) == round(onnx_file.stat().st_size / 1024)
    for step in ("pruning vgg", "recovering the student in kernel mode", "drawing"):
        assert f"fxkd demo: {step}" in out.stderr, out.stderr

    expected = [onnx_file, tmp_path / "student.pt", tmp_path / "fxkd-demo.png"]
    assert _written(text) == [str(p) for p in expected], text
    model = onnx.load(onnx_file)
    onnx.checker.check_model(model, full_check=True)
    student = torch.load(tmp_path / "student.pt", weights_only=False)
    x = _shipped_test_images(64)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    image = imread(tmp_path / "fxkd-demo.png")
    assert image.shape[:2] == (SIZE[1], SIZE[0]) and image.std() > 0.05


def test_demo_onnx_path_and_one_mode(tmp_path):
    """--onnx PATH puts the file there (not in OUT); --mode pointwise runs and exports one mode."""
    import onnx

    target = tmp_path / "deploy" / "vgg.onnx"
    out = _fxkd("demo", "--mode", "pointwise", "--samples", "20", "--test-set", "shipped",
                "--out", str(tmp_path / "out"), "--onnx", str(target))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert set(_table(out.stdout)) == {"teacher", "student as pruned", "fxkd pointwise recovered"}
    assert "fxkd report: pointwise mode" in out.stdout
    assert re.search(r"ONNX \(pointwise\): vgg\.onnx .*validation passed", out.stdout)
    assert _written(out.stdout) == [str(target), str(tmp_path / "out" / "student.pt"),
                                    str(tmp_path / "out" / "fxkd-demo.png")]  # fmt: skip
    assert not (tmp_path / "out" / "student.onnx").exists()
    onnx.checker.check_model(onnx.load(target))


def test_demo_without_an_extra_names_it_or_skips_the_onnx_part(tmp_path):
    """A missing onnxruntime (or matplotlib) ends the demo with status 2 and one line naming the
    extra; with --no-onnx the demo runs without onnxruntime and says the ONNX part was skipped."""

    def without(package, *args):
        code = (f"import sys; sys.modules[{package!r}] = None; from fxkd.cli.main import main; "
                f"raise SystemExit(main({list(args)!r}))")  # fmt: skip
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    for package in ("onnxruntime", "matplotlib"):
        out = without(package, "demo", "--out", str(tmp_path / package))
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"fxkd: error: the demo needs {package}: pip install " + (
            "'fxkd[demo]'" + (" (or pass --no-onnx)" if package == "onnxruntime" else "")
        )
    out = without("onnxruntime", "demo", "--no-onnx", "--mode", "pointwise", "--samples", "10",
                  "--test-set", "shipped", "--out", str(tmp_path / "plain"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ONNX: skipped (--no-onnx)" in out.stdout
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["fxkd-demo.png",
                                                                      "student.pt"]  # fmt: skip


def test_bad_arguments_exit_non_zero_with_a_reason(tmp_path, capsys):
    # end to end: argparse's errors and the demo's own checks exit 2 with one line
    out = _fxkd("demo", "--arch", "alexnet")
    assert (
        out.returncode == 2
        and out.stderr.startswith("fxkd demo: error:")
        and ("invalid choice" in out.stderr)
    )
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = _fxkd("demo", "--out", str(tmp_path / "o"), "--ratio", "1.5")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "fxkd: error: --ratio 1.5 must be in [0, 1)"
    ]
    # the rest in process (same code, no interpreter start-up per case)
    from fxkd.cli.main import main

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        ("--samples", "0"): "--samples 0",
        ("--samples", "abc"): "--samples",
        ("--device", "tpu"): "--device",
        ("--test-set", "all"): "--test-set",
        ("--no-onnx", "--onnx", "x.onnx"): "--no-onnx",
        ("--data-dir", str(tmp_path)): "--data-dir",
        ("--out", str(a_file)): "is a file",
        ("--bogus",): "unrecognized arguments",
    }
    for bad, reason in cases.items():
        argv = ["demo", *bad] if "--out" in bad else ["demo", "--out", str(tmp_path / "o"), *bad]
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse exits
            status = stop.code
        err = capsys.readouterr().err
        assert status == 2, (bad, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], (bad, err)
        assert lines[0].startswith(("fxkd: error:", "fxkd demo: error:")), (bad, err)
    out = _fxkd("demo", "--out", str(tmp_path / "o"), "--device", "cuda:7")
    if "no CUDA device" in out.stderr:  # a machine with that GPU runs the demo instead
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


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
    # a rerun of one cell (vgg/l1-50, seed 0) given last replaces that row, not adds to it
    c = tmp_path / "rerun_cell.json"
    c.write_text(json.dumps(run("vgg", "l1-50", [("fxkd-kernel", 0.7)])))
    out = subprocess.run(
        [sys.executable, "-m", "examples.benchmarks.fashion_mnist", "--from-json", str(a), str(b),
         str(c), "--tag", "rerun", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(json.loads((tmp_path / "fashion_mnist_rerun.json").read_text())["rows"]) == 3
    table = (tmp_path / "fashion_mnist_rerun.md").read_text()
    assert "| fxkd-kernel | no | 75.00% ± 7.07% |" in table  # 0.7 (the rerun) and 0.8
    assert "keeps the later run's row: 1 rows" in table
