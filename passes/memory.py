"""Memory of a calibration, estimated before it starts, so one that cannot fit fails at once
with the options that would make it fit (never by running out of memory halfway).

Calibration holds, for all N samples, the activations that the lockstep runners keep alive;
each runner frees a value after its last user, so a network's held bytes peak at

    held = N · max_t Σ_{v live at step t} bytes_per_sample(v)

(a walk of the graph in execution order, sizes from ShapeProp's ``tensor_meta``). On top come
one chunk's transient buffers (the largest layer's input and output; a site's features and
targets shifted into GEMM layout, in kernel mode its im2col patches) and the largest normal
equations with their solve (fp64, about five Gram-sized matrices). With ``offload`` the held
activations move to CPU memory and the device keeps only the chunk buffers and the systems.
Weights made for the run (the teacher's convs with their BatchNorms folded in) count as held
on the model's device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from fxkd.config import CompressConfig
from fxkd.errors import MemoryBudgetError
from fxkd.nodes import in_place_operand
from fxkd.placement import module_device
from fxkd.solve.projection import producer_input

__all__ = ["MemoryEstimate", "available_bytes", "check_fits", "estimate", "peak_live_bytes"]

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a calibration needs. ``held``: activations kept across the samples, per device
    they live on (``cpu`` when offloading); ``working``: one chunk's buffers and ``systems``:
    the largest normal equations and their solve, both on ``device``."""

    device: torch.device
    num_samples: int
    chunk_size: int
    held: dict[str, int] = field(default_factory=dict)
    working: int = 0
    systems: int = 0

    def on(self, device: str) -> int:
        """Total bytes needed on ``device`` (``"cpu"``, ``"cuda:0"``, ...)."""
        total = self.held.get(device, 0)
        if device == _key(self.device):
            total += self.working + self.systems
        return total

    @property
    def devices(self) -> list[str]:
        return sorted({*self.held, _key(self.device)})

    def __str__(self) -> str:
        held = ", ".join(f"{_gib(b)} on {d}" for d, b in sorted(self.held.items()))
        return (
            f"held activations of {self.num_samples} samples {held or '0'}; one chunk of "
            f"{self.chunk_size}: {_gib(self.working)}; normal equations: {_gib(self.systems)}"
        )


def peak_live_bytes(
    gm: fx.GraphModule,
    deferred: dict[fx.Node, fx.Node] | None = None,
    reads: dict[fx.Node, list[fx.Node]] | None = None,
) -> int:
    """Per-sample bytes at the peak of ``gm``'s live values, each freed after its last user
    (GraphRunner's policy). ``deferred`` maps nodes that run late to the node they run just
    before (an unsolved adapter and its seen-through steps wait for their solve point, so
    their inputs stay alive until then); ``reads`` maps values to the nodes at whose run they
    are read besides their users (a projected adapter's producer input, read at its solve).
    Nodes without shapes take their first input's (inserted adapters keep their input's
    shape)."""
    deferred, reads = deferred or {}, reads or {}
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = sorted(index, key=lambda n: index[deferred[n]] - 0.5 if n in deferred else index[n])
    position = {n: i for i, n in enumerate(order)}
    sizes = _per_sample_sizes(gm)
    root = {}  # a view or an in-place result shares its input's storage: one allocation
    for n in order:
        aliases = _aliases_input(gm, n) and n.all_input_nodes
        root[n] = root.get(n.all_input_nodes[0], n) if aliases else n
        if root[n] is not n:
            sizes[n] = 0
    last_use = dict(position)  # of each storage (root): its last reader through any alias
    for n in order:
        for a in n.all_input_nodes:
            last_use[root[a]] = max(last_use[root[a]], position[n])
    for value, readers in reads.items():
        last_use[root[value]] = max(last_use[root[value]], *(position[r] for r in readers))
    # GraphRunner computes a + b into a when a's storage has no reader after it
    members: dict[fx.Node, list[fx.Node]] = {}
    for n in order:
        members.setdefault(root[n], []).append(n)
    for n in order:
        a = in_place_operand(n)
        if a is None or last_use[root[a]] != position[n] or not _same_tensor_type(n, a):
            continue
        into = root[a]
        for m in members.pop(root[n]):
            root[m] = into
            members[into].append(m)
        last_use[into] = max(last_use[into], last_use[n])
        sizes[n] = 0
    live, peak = 0, 0
    dying: dict[int, list[fx.Node]] = {}
    for n in order:
        dying.setdefault(last_use[n], []).append(n)
    for i, n in enumerate(order):
        live += sizes.get(n, 0)
        peak = max(peak, live)
        for d in dying.get(i, []):
            live -= sizes.get(d, 0)
    return math.ceil(peak)


def estimate(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    num_samples: int,
    config: CompressConfig,
    reference: fx.GraphModule | None = None,
) -> MemoryEstimate:
    """The memory a CalibrateAdapters run of ``student`` (adapters inserted) against
    ``teacher`` on ``num_samples`` samples (this rank's share) needs; see the module doc."""
    from fxkd.passes.adapter import PointwiseAdapter, adapter_points

    device = torch.device(config.device) if config.device else module_device(student)
    nodes = {n.name: n for n in student.graph.nodes}
    adapters = adapter_points(student)
    deferred, reads = {}, {}
    for node, module, point in adapters:
        if point is not None and point is not node:  # solved at a later point: waits for it
            deferred[node] = point
            deferred.update({nodes[s]: point for s in module.pair.site.steps if s in nodes})
        source = producer_input(student, node, module)
        if isinstance(module, PointwiseAdapter) and source is not None:
            reads.setdefault(source, []).append(node)  # read at the solve (fxkd.solve.projection)
    held: dict[str, int] = {}
    for gm, late, read in (
        (teacher, None, None),
        (student, deferred, reads),
        (reference, None, None),
    ):
        if gm is None:
            continue
        where = module_device(gm)
        key = "cpu" if config.offload and where.type != "cpu" else _key(where)
        held[key] = held.get(key, 0) + peak_live_bytes(gm, late, read) * num_samples
        # weights a view made for the run (BatchNorms folded into copies of their convs)
        made = getattr(gm, "fxkd_made_bytes", 0)
        if made:
            held[_key(where)] = held.get(_key(where), 0) + made
    chunk = min(config.chunk_size, num_samples)
    sizes = {**_per_sample_sizes(teacher), **_per_sample_sizes(student)}
    largest = math.ceil(max(sizes.values(), default=0) * chunk * 3)  # inputs and output
    working, systems = largest, 0
    for node, module, _ in adapters:
        site = module.pair.site
        producer = student.get_submodule(site.module)
        out_shape = _shape(node.args[0])
        if out_shape is None:
            continue
        g = site.groups
        k = site.channels // g
        positions = math.prod(out_shape[2:]) if module.dims > 0 else math.prod(out_shape[1:-1])
        share = config.subsample if module.dims > 0 else 1.0
        kernel = config.mode == "kernel" and hasattr(producer, "weight")
        if kernel:  # fewer sample rows than kernel unknowns: calibration solves it pointwise
            rows_seen = math.ceil(num_samples * _world_size() * positions * share)
            kernel = rows_seen >= producer.weight[0].numel()
        d = producer.weight[0].numel() if kernel else k
        rows = chunk * positions
        fp = 4 if _itemsize(node.args[0]) <= 4 else 8
        patches = rows * g * d * fp if kernel else 0
        shifted = math.ceil(rows * share) * g * (d + k) * fp
        target = rows * site.channels * fp * 2  # the teacher's chunk, converted and selected
        working = max(working, largest + patches + shifted + target)
        width = d + 1
        systems = max(systems, 8 * g * (5 * width * width + 3 * width * k))
    return MemoryEstimate(device, num_samples, chunk, held, working, systems)


def _world_size() -> int:
    """Ranks sharing the samples (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def available_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: CUDA's free memory plus what torch's allocator caches
    unused; for the CPU, the kernel's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(est: MemoryEstimate, config: CompressConfig) -> None:
    """Raise MemoryBudgetError, naming the options that help, when ``est`` exceeds the memory
    free on any device it uses (or ``config.memory_limit``)."""
    for device in est.devices:
        need = est.on(device)
        limit = config.memory_limit or available_bytes(device)
        if need <= limit:
            continue
        raise MemoryBudgetError(
            f"calibration needs about {_gib(need)} on {device} but {_gib(limit)} is "
            f"{'allowed (memory_limit)' if config.memory_limit else 'free'} ({est}). "
            f"Hint: {'; '.join(_remedies(est, device, limit, config))}."
        )


def _remedies(est: MemoryEstimate, device: str, limit: int, config: CompressConfig) -> list[str]:
    """The options that shrink what does not fit, most effective first, with numbers."""
    held = est.held.get(device, 0)
    fixed = est.on(device) - held
    out = []
    if held:
        if device != "cpu" and not config.offload:
            out.append("offload=True keeps the held activations in CPU memory")
        if limit > fixed:
            fits = int(est.num_samples * (limit - fixed) / held)
            if fits >= 1:
                out.append(f"num_samples={fits} or fewer fits")
    if device == _key(est.device) and est.working > est.systems:
        out.append(f"a smaller chunk_size (now {est.chunk_size}) shrinks one chunk's buffers")
        if config.subsample >= 1.0:
            out.append("subsample=0.25 shrinks the Gram's per-chunk copies")
    if config.mode == "kernel" and device == _key(est.device):
        out.append("mode='pointwise' solves smaller systems on smaller features")
    out.append("memory_limit= overrides the free memory detected")
    return out


_VIEWS = {"view", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand"}


def _aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the node's value shares its first input's storage: an in-place module
    (``nn.ReLU(inplace=True)``), an ``inplace=True`` call, or a view method."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace")) or node.target is torch.flatten
    return node.op == "call_method" and node.target in _VIEWS


def _same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    """Both nodes' values (as ShapeProp saw them; an inserted node keeps its input's) have one
    shape and dtype: the sum fits in its first operand's storage."""
    ta, tb = _value_metas(a), _value_metas(b)
    if len(ta) != 1 or len(tb) != 1:
        return False
    return tuple(ta[0].shape) == tuple(tb[0].shape) and ta[0].dtype == tb[0].dtype


def _per_sample_sizes(gm: fx.GraphModule) -> dict[fx.Node, float]:
    """Bytes per sample of every node's value (parameters and the output node excluded)."""
    batch = next((s[0] for n in gm.graph.nodes if n.op == "placeholder" and (s := _shape(n))), None)
    if not batch:
        return {}
    sizes = {}
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "output"):
            continue
        metas = _value_metas(n)
        sizes[n] = sum(math.prod(m.shape) * m.dtype.itemsize for m in metas) / batch
    return sizes


def _value_metas(node: fx.Node) -> list[TensorMetadata]:
    """A node's metadata, or its first input's for a node inserted after ShapeProp ran (an
    adapter keeps its input's shape)."""
    metas = _metas(node)
    if not metas and node.args and isinstance(node.args[0], fx.Node):
        metas = _metas(node.args[0])
    return metas


def _metas(node: fx.Node) -> list[TensorMetadata]:
    """ShapeProp's metadata of a node's tensors (several for tuple outputs)."""
    found: list[TensorMetadata] = []
    stack = [node.meta.get("tensor_meta")]
    while stack:
        m = stack.pop()
        if isinstance(m, TensorMetadata):
            found.append(m)
        elif isinstance(m, (list, tuple)):
            stack.extend(reversed(m))
        elif isinstance(m, dict):
            stack.extend(m.values())
    return found


def _shape(node) -> tuple[int, ...] | None:
    metas = _metas(node) if isinstance(node, fx.Node) else []
    return tuple(metas[0].shape) if metas else None


def _itemsize(node: fx.Node) -> int:
    metas = _metas(node)
    return metas[0].dtype.itemsize if metas else 4


def _key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:.1f} MiB"
