"""Fashion-MNIST recovery benchmark: fxkd against the few-sample baselines, side by side.

    python -m examples.benchmarks.fashion_mnist                 # full grid (hours on 2 CPU cores)
    FXKD_DATA=<dir> bash examples/tools/gpu_fashion.sh     # the same grid on one GPU (7 min, H200)
    python -m examples.benchmarks.fashion_mnist --quick  # one seed, N=100, one student (minutes)
    python -m examples.benchmarks.fashion_mnist --teachers vgg --samples 10 100 500 --seeds 0 1 2

For each teacher (shipped checkpoints, fxkd/assets), each student (L1-pruned at two ratios,
network-slimmed, decoupled rank 1) and each N of unlabelled samples drawn from the training
split (its last 5,000 images are held out for model selection and never sampled), it runs:

  none        the student as built
  fxkd-pw     fxkd.compress(mode="pointwise"): the paper's method             (no labels)
  fxkd-pre    fxkd.compress(mode="kernel", relax_rounds=0, select_channels=False): kernels
              fitted before the ReLU, on the pruner's channel maps
  fxkd-given  fxkd.compress(mode="kernel", select_channels=False): the pruner's channel maps
  fxkd-kernel fxkd.compress(mode="kernel"): whole kernels in closed form, fitted after the ReLU,
              internal channels re-targeted from the samples (the default)      (no labels)
  fxkd-polish fxkd-kernel, then 200 steps of fxkd.polish (gradient, same samples) (no labels)
  finetune    cross-entropy on the same N labelled samples                      (labels)
  fitnet      hint MSE at the same aligned points as fxkd, same N samples       (no labels)
  mir         MSE on the features before global pooling, teacher's head kept    (no labels)

The trained baselines use Adam, BatchNorm statistics frozen, and pick their learning rate and
step count on the held-out slice by accuracy (the same rule for all three). Test accuracy is on
the full 10,000-image test set; wall time is reported as a ratio to fxkd-kernel's in the same
run. Writes examples/benchmarks/results/fashion_mnist{_quick}.md, .json and PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.cli.datasets import load_fashion_mnist, normalize
from fxkd.cli.demo import accuracy, load_teacher
from fxkd.students import channel_maps_of, decouple, prune

log = logging.getLogger("fashion_mnist")
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = [
    "none",
    "fxkd-pw",
    "fxkd-pre",
    "fxkd-given",
    "fxkd-kernel",
    "fxkd-polish",
    "finetune",
    "fitnet",
    "mir",
]
POLISH_STEPS = 200  # fxkd.polish's defaults (picked on the held-out slice, never the test set)
LABELS = {"finetune"}
LRS = (1e-4, 1e-3)
CHECKPOINTS = (25, 50, 100, 200, 300)


def make_students(teacher: nn.Module, example: torch.Tensor, ratios: tuple[float, float]):
    """Students keep the teacher's last conv width and head (so MiR can keep the head)."""
    convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    keep = [convs[-1], linears[-1]]
    out = {}
    for r in ratios:
        out[f"l1-{round(r * 100)}"] = prune(
            teacher, r, importance="l1", example_inputs=example, ignored_layers=keep
        )
    out[f"slim-{round(ratios[0] * 100)}"] = prune(
        teacher, ratios[0], importance="bn", example_inputs=example, ignored_layers=keep
    )
    out["decouple-r1"] = decouple(teacher, rank=1)
    return out


@dataclass
class Splits:
    """The benchmark's data, normalised, on one device: the sampling pool (training split less
    its last 5,000 images), the selection slice (the first 2,000 of those 5,000), the other
    3,000 held-out images (never sampled, never used for selection) and the test set."""

    pool_x: torch.Tensor
    pool_y: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor]
    rest: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor]


def load_splits(data_dir: str | None = None, device: str | torch.device = "cpu") -> Splits:
    xtr, ytr = load_fashion_mnist("train", data_dir)
    xte, yte = load_fashion_mnist("test", data_dir)
    xtr, ytr, xte, yte = (t.to(device) for t in (normalize(xtr), ytr, normalize(xte), yte))
    held_x, held_y = xtr[-5000:], ytr[-5000:]
    return Splits(
        xtr[:-5000], ytr[:-5000], (held_x[:2000], held_y[:2000]), held_x[2000:], (xte, yte)
    )


def sample_indices(pool_size: int, n: int, seed: int) -> torch.Tensor:
    """The N pool images every script of the benchmark uses for ``seed``."""
    g = torch.Generator().manual_seed(1000 * seed + n)
    return torch.randperm(pool_size, generator=g)[:n]


def tapped(model: nn.Module, names: list[str], example: torch.Tensor) -> nn.Module:
    """A traced view of ``model`` (sharing its parameters) returning (values at names, output)."""
    gm = trace(model, example)
    nodes = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((tuple(nodes[n] for n in names), output.args[0]),)
    gm.recompile()
    return gm


def prepool_node(gm: torch.fx.GraphModule) -> str:
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(
            gm.get_submodule(str(n.target)), nn.AdaptiveAvgPool2d
        ):
            return n.args[0].name
    raise ValueError("no global pooling found")


def train(student, loss_fn, samples, labels, val, seed=0):
    """Adam on ``loss_fn(model, x, y)`` for each learning rate; the (lr, step) checkpoint with
    the best held-out accuracy wins. BatchNorm statistics stay frozen (eval mode)."""
    best, best_acc, best_choice = None, -1.0, None
    for lr in LRS:
        model = copy.deepcopy(student).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        batch = min(64, len(samples))
        for step in range(1, max(CHECKPOINTS) + 1):
            idx = torch.randperm(len(samples), generator=g)[:batch].to(samples.device)
            loss = loss_fn(model, samples[idx], None if labels is None else labels[idx], idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in CHECKPOINTS:
                acc = accuracy(model, *val)
                if acc > best_acc:
                    best, best_acc, best_choice = copy.deepcopy(model), acc, (lr, step)
    log.debug("selected lr=%g steps=%d (val %.4f)", *best_choice, best_acc)
    return best, best_choice


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_methods(teacher, student, samples, labels, val, test, seed, methods):
    """{method: accuracy, seconds, choice} plus "_reports" (fxkd's per-point errors). A method
    that fails is logged with its traceback and left out (its cells read "–"), so one failure
    does not cost the rest of a long grid."""
    out, reports = {}, {}
    for method in methods:
        try:
            out[method] = run_method(
                method, teacher, student, samples, labels, val, test, seed, reports
            )
        except Exception:
            log.exception("%s failed", method)
    if reports:
        out["_reports"] = reports
    return out


def run_method(method, teacher, student, samples, labels, val, test, seed, reports):
    example = samples[:2]
    _sync(samples.device)
    start = time.perf_counter()
    choice = None
    if method == "none":
        model = student
    elif method.startswith("fxkd"):
        mode = "pointwise" if method == "fxkd-pw" else "kernel"
        result = fxkd.compress(
            teacher,
            student,
            samples,
            mode=mode,
            num_samples=len(samples),
            progress=False,
            seed=seed,
            polish_steps=POLISH_STEPS if method == "fxkd-polish" else 0,
            relax_rounds=0 if method == "fxkd-pre" else fxkd.CompressConfig.relax_rounds,
            select_channels=method not in ("fxkd-given", "fxkd-pre"),
        )
        model = result.model
        if method != "fxkd-polish":  # its report is the closed form's (error_profile.py
            # measures the errors after the polish)
            reports[method] = [
                (r.student, r.err_given, r.err_after) for r in result.report.calibrated
            ]
    elif method == "finetune":
        model, choice = train(
            student,
            lambda m, x, y, i: F.cross_entropy(m(x), y),
            samples,
            labels,
            val,
            seed=seed,
        )
    else:
        t_gm, s_gm = trace(teacher, example), trace(student, example)
        if method == "fitnet":
            pairs = align(t_gm, s_gm, channel_maps=channel_maps_of(student)).pairs
            t_names = [p.teacher_point for p in pairs]
            s_names = [p.site.point for p in pairs]
            maps = [p.channel_map for p in pairs]
        else:
            t_names, s_names, maps = [prepool_node(t_gm)], [prepool_node(s_gm)], [None]
        with torch.no_grad():
            t_feats, _ = tapped(teacher, t_names, example)(samples)
            t_feats = [
                f if m is None else f[:, list(m)] for f, m in zip(t_feats, maps, strict=True)
            ]

        def hint(m, x, y, idx, s_names=s_names, t_feats=t_feats):
            s_feats, _ = tapped_cache(m, s_names, example)(x)
            return sum(F.mse_loss(s, t[idx]) for s, t in zip(s_feats, t_feats, strict=True))

        model, choice = train(student, hint, samples, None, val, seed=seed)
    _sync(samples.device)
    seconds = time.perf_counter() - start
    return {"acc": accuracy(model, *test), "seconds": seconds, "choice": choice, "model": model}


_TAPS: dict[int, nn.Module] = {}


def tapped_cache(model, names, example):
    key = id(model)
    if key not in _TAPS:
        _TAPS.clear()
        _TAPS[key] = tapped(model, names, example)
    return _TAPS[key]


def summarize(rows: list[dict]) -> dict:
    """Group by (teacher, student, N, method): mean and std of accuracy, mean time ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["student"], r["n"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        accs = [r["acc"] for r in rs]
        out[key] = {
            "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "ratio": statistics.mean(r["ratio"] for r in rs),
            "runs": len(rs),
        }
    return out


def write_markdown(path: Path, summary: dict, meta: dict) -> None:
    lines = [
        f"# Fashion-MNIST recovery benchmark{' (quick)' if meta['quick'] else ''}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Seeds per cell: {len(meta['seeds'])}; test set: 10,000 images; accuracy "
        "mean ± std over seeds; time = wall time / fxkd-kernel's in the same run.",
        "",
    ]
    for teacher, t_acc in meta["teacher_acc"].items():
        lines += [f"## Teacher {teacher}: {t_acc:.2%}", ""]
        for student in meta["students"][teacher]:
            lines += [
                f"### {student} ({meta['params'][teacher][student]:,} parameters vs "
                f"{meta['params'][teacher]['teacher']:,})",
                "",
            ]
            ns = sorted({k[2] for k in summary if k[0] == teacher and k[1] == student})
            lines.append("| method | labels | " + " | ".join(f"N={n}" for n in ns) + " | time |")
            lines.append("| --- | --- | " + " | ".join("---" for _ in ns) + " | --- |")
            for method in METHODS:
                cells = [summary.get((teacher, student, n, method)) for n in ns]
                if not any(cells):
                    continue
                acc = " | ".join(f"{c['mean']:.2%} ± {c['std']:.2%}" if c else "–" for c in cells)
                ratio = statistics.mean(c["ratio"] for c in cells if c)
                lines.append(
                    f"| {method} | {'yes' if method in LABELS else 'no'} | {acc} | {ratio:.2f}× |"
                )
            full = stored_full_finetune().get(f"{teacher}/{student}")
            if full:
                lines.append(
                    f"| full fine-tune (stored: 55,000 labels, {full['epochs']} epochs, "
                    f"{full['seconds']} s) | yes | "
                    + " | ".join(f"{full['acc']:.2%}" for _ in ns)
                    + " | – |"
                )
                gaps = []
                for n in ns:
                    none = summary.get((teacher, student, n, "none"))
                    best = max(
                        (summary.get((teacher, student, n, m)) for m in ("fxkd-pw", "fxkd-kernel")),
                        key=lambda c: c["mean"] if c else -1,
                    )
                    if none and best and full["acc"] > none["mean"]:
                        frac = (best["mean"] - none["mean"]) / (full["acc"] - none["mean"])
                        gaps.append(f"N={n}: {frac:.0%}")
                polished = []
                for n in ns:
                    none = summary.get((teacher, student, n, "none"))
                    pol = summary.get((teacher, student, n, "fxkd-polish"))
                    if none and pol and full["acc"] > none["mean"]:
                        frac = (pol["mean"] - none["mean"]) / (full["acc"] - none["mean"])
                        polished.append(f"N={n}: {frac:.0%}")
                if gaps:
                    lines += [
                        "",
                        "Share of the gap from *none* to *full fine-tune* that fxkd's best mode "
                        "closes: "
                        + ", ".join(gaps)
                        + "."
                        + (f" With the polish: {', '.join(polished)}." if polished else ""),
                    ]
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def stored_full_finetune() -> dict:
    """The stored full fine-tune ceilings (full_finetune.py), keyed teacher/student."""
    path = RESULTS / "full_finetune.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _grid(plt, panels: int, width: float, height: float, columns: int = 4) -> list:
    """Axes of a figure with ``panels`` panels, ``columns`` to a row; spare axes hidden."""
    cols = min(columns, panels)
    rows = -(-panels // cols)
    _, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[panels:]:
        ax.set_visible(False)
    return flat[:panels]


def plot(path: Path, summary: dict, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, s) for t in meta["students"] for s in meta["students"][t]]
    axes = _grid(plt, len(panels), 4, 3.5)
    for ax, (teacher, student) in zip(axes, panels, strict=True):
        for method in METHODS:
            pts = sorted(
                (k[2], v["mean"], v["std"])
                for k, v in summary.items()
                if k[:2] == (teacher, student) and k[3] == method
            )
            if pts:
                ns, m, s = zip(*pts, strict=True)
                ax.errorbar(ns, m, yerr=s, marker="o", capsize=3, label=method)
        ax.axhline(meta["teacher_acc"][teacher], color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_title(f"{teacher} / {student}")
        ax.set_xlabel("unlabelled samples N")
        ax.set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    fig = axes[0].figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blocks(path: Path, reports: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {  # runs stored before the polish was left out: its bars were the closed form's
        title: {m: rows for m, rows in methods.items() if m != "fxkd-polish"}
        for title, methods in reports.items()
    }
    axes = _grid(plt, len(reports), 6, 3.5)
    fig = axes[0].figure
    for ax, (title, methods) in zip(axes, reports.items(), strict=True):
        for k, (method, rows) in enumerate(methods.items()):
            names = [r[0] for r in rows]
            x = torch.arange(len(rows)).float()
            if k == 0:
                ax.bar(x - 0.3, [r[1] for r in rows], 0.3, label="student as built")
            ax.bar(x + 0.3 * k, [r[2] for r in rows], 0.3, label=f"after {method}")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_ylabel("rel. squared error, calibration samples")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LOG_LINE = re.compile(
    r"(?P<teacher>\S+) (?P<student>\S+) N=(?P<n>\d+) seed=(?P<seed>\d+) (?P<method>\S+)\s+"
    r"acc (?P<acc>[\d.]+)\s+(?P<seconds>[\d.]+)s"
)


def render_log(log_path: Path, args, command: str) -> int:
    """Tables and plots from the per-run lines a run logged (every number is one it measured);
    the teacher accuracy is measured again here."""
    rows = [m.groupdict() for m in map(LOG_LINE.search, log_path.read_text().splitlines()) if m]
    for r in rows:
        r.update(
            n=int(r["n"]),
            seed=int(r["seed"]),
            acc=float(r["acc"]),
            seconds=float(r["seconds"]),
            choice=None,
        )
    ref = {
        (r["teacher"], r["student"], r["n"], r["seed"]): r["seconds"]
        for r in rows
        if r["method"] == "fxkd-kernel"
    }
    for r in rows:
        r["ratio"] = r["seconds"] / max(
            ref.get((r["teacher"], r["student"], r["n"], r["seed"]), 1.0), 1e-9
        )
    students: dict[str, list[str]] = {}
    for r in rows:
        students.setdefault(r["teacher"], [])
        if r["student"] not in students[r["teacher"]]:
            students[r["teacher"]].append(r["student"])
    xte, yte = load_fashion_mnist("test", args.data_dir)
    teacher_acc, params = {}, {}
    for tname in students:
        teacher = load_teacher(tname)
        teacher_acc[tname] = accuracy(teacher, normalize(xte), yte)
        built = make_students(teacher, normalize(xte[:1]), tuple(args.ratios))
        params[tname] = {k: sum(p.numel() for p in v.parameters()) for k, v in built.items()}
        params[tname]["teacher"] = sum(p.numel() for p in teacher.parameters())
    meta = {
        "command": f"{command} (tables from the log of: {log_path.name})",
        "quick": False,
        "seeds": sorted({r["seed"] for r in rows}),
        "machine": _machine(),
        "teacher_acc": teacher_acc,
        "students": students,
        "params": params,
    }
    write_outputs(
        Path(args.out), "fashion_mnist" + (f"_{args.tag}" if args.tag else ""), rows, meta, {}
    )
    return 0


def render_json(paths: list[Path], args) -> int:
    """Tables (and, when merging, plots) from the .json of earlier runs; several runs of one
    grid split over processes merge into one (a cell, teacher/student/N/seed/method, that
    several runs hold keeps the row of the run given last: a rerun replaces)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if len(runs) == 1:
        run = runs[0]
        out, stem = paths[0].parent, paths[0].stem
        write_outputs(out, stem, run["rows"], run["meta"], run.get("block_reports", {}))
        return 0
    meta = copy.deepcopy(runs[0]["meta"])
    commands = list(dict.fromkeys(r["meta"]["command"] for r in runs))
    meta["command"] = (
        f"{commands[0]} (one of {len(runs)} runs split by --teachers/--students, merged with "
        "--from-json)"
        if len(commands) == 1 or all(_same_but_cells(commands[0], c) for c in commands)
        else f"{len(runs)} runs merged with --from-json: " + " ; ".join(commands)
    )
    meta["seeds"] = sorted({s for r in runs for s in r["meta"]["seeds"]})
    for key in ("teacher_acc", "students", "params"):
        for r in runs[1:]:
            for teacher, value in r["meta"][key].items():
                if key == "teacher_acc":
                    meta[key][teacher] = value
                elif key == "students":
                    have = meta[key].setdefault(teacher, [])
                    have += [s for s in value if s not in have]
                else:
                    meta[key].setdefault(teacher, {}).update(value)
    latest = {_cell(row): row for r in runs for row in r["rows"]}  # a later run's row wins
    rows = list(latest.values())
    replaced = sum(len(r["rows"]) for r in runs) - len(rows)
    if replaced:
        meta["command"] += f" (a cell in several runs keeps the later run's row: {replaced} rows)"
    blocks = {k: v for r in runs for k, v in r.get("block_reports", {}).items()}
    stem = "fashion_mnist" + (f"_{args.tag}" if args.tag else "")
    write_outputs(Path(args.out), stem, rows, meta, blocks)
    return 0


def _cell(row: dict) -> tuple:
    return row["teacher"], row["student"], row["n"], row["seed"], row["method"]


def _same_but_cells(a: str, b: str) -> bool:
    """Whether two commands differ only in their --teachers/--students/--tag values."""

    def rest(cmd: str) -> str:
        return re.sub(r"--(teachers|students|tag) [^-]*", "", cmd)

    return rest(a) == rest(b)


def _machine(device: torch.device | None = None) -> str:
    import platform

    text = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    if device is not None and device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def write_outputs(out: Path, stem: str, rows: list[dict], meta: dict, block_reports: dict) -> None:
    summary = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    stored = {"meta": meta, "rows": rows, "block_reports": block_reports}
    (out / f"{stem}.json").write_text(json.dumps(stored, indent=1) + "\n")
    write_markdown(out / f"{stem}.md", summary, meta)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (tables and .json written)")
    else:
        plot(out / f"{stem}_accuracy.png", summary, meta)
        if block_reports:
            plot_blocks(out / f"{stem}_blocks.png", block_reports)
    print((out / f"{stem}.md").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, N=100, one student, VGG")
    p.add_argument("--teachers", nargs="+", default=["vgg", "resnet"])
    p.add_argument("--students", nargs="+", default=None, help="subset of student names")
    p.add_argument("--samples", nargs="+", type=int, default=[10, 50, 100, 500])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--ratios", nargs=2, type=float, default=[0.5, 0.75])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu", help="where every method runs (cpu, cuda, ...)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument(
        "--from-log",
        default=None,
        help="write the tables and plots from the per-run lines of an earlier run's "
        "log (e.g. one stopped before it finished) instead of running",
    )
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="rewrite the markdown tables of an earlier run from its .json (e.g. after "
        "full_finetune.py stored new ceilings) instead of running; several files "
        "(runs split over processes) are merged into fashion_mnist_<tag>",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return render_json([Path(f) for f in args.from_json], args)
    if args.quick:
        args.teachers, args.samples, args.seeds = ["vgg"], [100], [0]
        args.students = args.students or ["l1-75"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxkd").setLevel(logging.WARNING)
    command = "python -m examples.benchmarks.fashion_mnist " + " ".join(argv or sys.argv[1:])
    torch.manual_seed(0)

    if args.from_log:
        return render_log(Path(args.from_log), args, command)
    device = torch.device(args.device)
    data = load_splits(args.data_dir, device)
    pool_x, pool_y, val, test = data.pool_x, data.pool_y, data.val, data.test

    rows, meta_students, params, teacher_acc, block_reports = [], {}, {}, {}, {}
    stem = ("fashion_mnist_quick" if args.quick else "fashion_mnist") + (
        f"_{args.tag}" if args.tag else ""
    )
    meta = {  # its dicts fill in as the run goes
        "command": command,
        "quick": args.quick,
        "seeds": args.seeds,
        "machine": _machine(device),
        "teacher_acc": teacher_acc,
        "students": meta_students,
        "params": params,
    }
    partial = Path(args.out) / f"{stem}.partial.json"  # rows so far: a stopped run keeps them
    for tname in args.teachers:
        teacher = load_teacher(tname)
        students = make_students(teacher, pool_x[:1].cpu(), tuple(args.ratios))
        if args.students:
            students = {k: v for k, v in students.items() if k in args.students}
        teacher = teacher.to(device)
        students = {k: v.to(device) for k, v in students.items()}
        teacher_acc[tname] = accuracy(teacher, *test)
        meta_students[tname] = list(students)
        params[tname] = {"teacher": sum(p.numel() for p in teacher.parameters())}
        for sname, student in students.items():
            params[tname][sname] = sum(p.numel() for p in student.parameters())
            for n in args.samples:
                for seed in args.seeds:
                    idx = sample_indices(len(pool_x), n, seed).to(device)
                    res = run_methods(
                        teacher, student, pool_x[idx], pool_y[idx], val, test, seed, args.methods
                    )
                    reports = res.pop("_reports", {})
                    if n == 100 and seed == args.seeds[0] and reports:
                        block_reports[f"{tname} / {sname}, N=100"] = reports
                    ref = res.get("fxkd-kernel", {}).get("seconds") or 1.0
                    for method, r in res.items():
                        rows.append(
                            {
                                "teacher": tname,
                                "student": sname,
                                "n": n,
                                "seed": seed,
                                "method": method,
                                "acc": r["acc"],
                                "seconds": r["seconds"],
                                "ratio": r["seconds"] / ref,
                                "choice": r["choice"],
                            }
                        )
                        log.info(
                            "%s %s N=%d seed=%d %-11s acc %.4f  %.1fs",
                            tname,
                            sname,
                            n,
                            seed,
                            method,
                            r["acc"],
                            r["seconds"],
                        )
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(
                        json.dumps({"meta": meta, "rows": rows, "block_reports": block_reports})
                    )
    write_outputs(Path(args.out), stem, rows, meta, block_reports)
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
