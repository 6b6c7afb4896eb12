"""GraphRunner: executes a GraphModule node by node over a list of sample chunks, on demand.

Calibration advances the teacher and the student in lockstep: each runs only as far as the
next solve needs. A value is freed as soon as every user has run (unless pinned), so memory is
the live activations of the samples, not the whole network's. Nodes can be *deferred* (skipped
when advancing, run explicitly later): unsolved adapters wait for their solve this way.

With ``offload=True`` the held values live in CPU memory (pinned when computing on a GPU) and
each chunk's inputs travel to the compute device only while a node runs on them: device memory
is then one chunk's working set, whatever the number of samples. The runner counts the bytes it
holds (``held_bytes``, ``peak_bytes``; storages shared by views counted once) on the compute
device, or in CPU memory when offloading.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves, tree_map

from fxkd.errors import CalibrationError
from fxkd.inputs import Inputs
from fxkd.nodes import in_place_operand

__all__ = ["GraphRunner"]


class GraphRunner:
    """Runs ``gm`` over ``chunks`` (a list of input batches: tensors, or
    :class:`~fxkd.inputs.Inputs` for several inputs) lazily, in topological order."""

    def __init__(
        self,
        gm: fx.GraphModule,
        chunks: list[torch.Tensor] | list[Inputs],
        pinned: Iterable[fx.Node] = (),
        *,
        device: torch.device | str | None = None,
        offload: bool = False,
    ) -> None:
        self.gm = gm
        inputs = [Inputs.of(c) for c in chunks]
        self.device = torch.device(device) if device is not None else inputs[0].device
        self.offload = offload and self.device.type != "cpu"
        self.held_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, references]
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self._placeholder = {
            n: i for i, n in enumerate(n for n in self.nodes if n.op == "placeholder")
        }
        # per chunk, the value of each placeholder (several for several inputs)
        self.chunks = [
            [
                self._store(v)
                for v in (c if self.offload else c.to(self.device)).placeholder_values(gm)
            ]
            for c in inputs
        ]
        # storages the runner must never write: the samples handed in and the model's tensors
        held = [v for c in self.chunks for v in c if isinstance(v, torch.Tensor)]
        self._foreign = {t.untyped_storage().data_ptr() for t in (*held, *_model_tensors(gm))}
        self.remaining = {n: len(n.users) for n in self.nodes}
        self.pinned = set(pinned)
        self.env: dict[fx.Node, list] = {}
        self.done: set[fx.Node] = set()
        self.pos = 0

    def value(self, node: fx.Node) -> list:
        """The per-chunk values of a node that has run and is still held, as stored (in CPU
        memory when offloading; ``chunk`` brings one to the compute device)."""
        if node not in self.env:
            raise CalibrationError(f"value of node {node.name} is not held (not run, or freed)")
        return self.env[node]

    def chunk(self, node: fx.Node, i: int):
        """Chunk ``i`` of a held value, on the compute device."""
        return self._fetch(self.value(node)[i])

    def run_until(self, node: fx.Node, defer: Iterable[fx.Node] = ()) -> None:
        """Run every node before ``node`` in order, except deferred ones."""
        defer = set(defer)
        stop = self.index[node]
        while self.pos < stop:
            n = self.nodes[self.pos]
            self.pos += 1
            if n not in self.done and n not in defer:
                self.run_node(n)

    def run_through(self, node: fx.Node, defer: Iterable[fx.Node] = ()) -> list:
        """Run up to and including ``node``; its per-chunk values."""
        self.run_until(node, defer)
        if node not in self.done:
            self.run_node(node)
        return self.value(node)

    def run_node(self, node: fx.Node, via=None) -> None:
        """Execute one node on every chunk, then release inputs whose users have all run.
        ``via(i)``, when given, computes chunk i's value another way (the caller vouches that
        it is the node's; e.g. a projected adapter through its producer's input)."""
        if node.op == "placeholder":
            out = [c[self._placeholder[node]] for c in self.chunks]
        elif node.op == "get_attr":
            attr = functools.reduce(getattr, str(node.target).split("."), self.gm)
            out = [attr] * len(self.chunks)
        elif node.op == "output":
            out = [
                map_arg(node.args[0], lambda a, i=i: self.env[a][i])
                for i in range(len(self.chunks))
            ]
        elif via is not None:
            out = [self._store(via(i)) for i in range(len(self.chunks))]
        else:
            fn = self._callable(node)
            get = self._fetch if self.offload else _same
            in_place = self._in_place_add(node)
            out = []
            for i in range(len(self.chunks)):
                args = map_arg(node.args, lambda a, i=i: get(self.env[a][i]))
                kwargs = (
                    map_arg(node.kwargs, lambda a, i=i: get(self.env[a][i])) if node.kwargs else {}
                )
                if in_place and self._writable(args[0], args[1]):
                    out.append(args[0].add_(args[1]))
                    continue
                out.append(self._store(fn(*args, **kwargs)))
        self.env[node] = out
        if node.op != "get_attr":
            self._count(out, +1)
        self.done.add(node)
        for a in node.all_input_nodes:
            self.remaining[a] -= 1
            self._maybe_free(a)

    def unpin(self, node: fx.Node) -> None:
        self.pinned.discard(node)
        self._maybe_free(node)

    def finish(self) -> list:
        """Run to the end; the per-chunk outputs."""
        output = self.nodes[-1]
        return self.run_through(output)

    def _in_place_add(self, node: fx.Node) -> bool:
        """``a + b`` whose first operand dies here may be computed into ``a``: fx records
        ``out += identity`` (a ResNet block's residual) as an out-of-place ``add``, which
        allocates and writes a fresh activation the eager model does not (a quarter of
        resnet50's held peak). Only when nothing else will read ``a`` (this node is its last
        user, it is not pinned, not an input) and the values stay on the compute device;
        ``_writable`` checks each chunk's tensors. ``fxkd.passes.memory`` counts the same."""
        a = in_place_operand(node)
        return (
            a is not None and not self.offload and self.remaining[a] == 1 and a not in self.pinned
        )

    def _writable(self, a, b) -> bool:
        """``a.add_(b)`` gives ``a + b`` and overwrites only what the runner alone holds: a
        tensor made here (not the samples, not a parameter or buffer) whose storage no other
        held value shares, with the sum's shape and dtype."""
        if type(a) is not torch.Tensor or not isinstance(b, torch.Tensor | int | float):
            return False
        if isinstance(b, torch.Tensor) and (
            b.device != a.device or torch.broadcast_shapes(a.shape, b.shape) != a.shape
        ):
            return False
        if torch.result_type(a, b) != a.dtype or a.requires_grad or not _dense(a):
            return False
        key = a.untyped_storage().data_ptr()
        entry = self._storages.get(key)
        return key not in self._foreign and entry is not None and entry[1] == 1

    def _maybe_free(self, node: fx.Node) -> None:
        if self.remaining[node] <= 0 and node not in self.pinned and node.op != "output":
            out = self.env.pop(node, None)
            if out is not None and node.op != "get_attr":
                self._count(out, -1)

    def _store(self, value):
        """A node's output as held: moved to (pinned) CPU memory when offloading."""
        if not self.offload:
            return value
        return tree_map(_to_host, value)

    def _fetch(self, value):
        """A held value on the compute device (a no-op unless offloading)."""
        if not self.offload:
            return value
        return tree_map(
            lambda v: (
                v.to(self.device, non_blocking=True)
                if isinstance(v, torch.Tensor) and v.device != self.device
                else v
            ),
            value,
        )

    def _count(self, out: list, sign: int) -> None:
        """Track the bytes of distinct storages held (views of one storage count once)."""
        plain = all(type(t) is torch.Tensor for t in out)  # the usual case: skip the pytree walk
        for t in out if plain else tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self._storages.get(key)
            if sign > 0:
                if entry is None:
                    self._storages[key] = [storage.nbytes(), 1]
                    self.held_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.held_bytes)
                else:
                    entry[1] += 1
            elif entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._storages[key]
                    self.held_bytes -= entry[0]

    def _callable(self, node: fx.Node):
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        if node.op == "call_function":
            return node.target
        if node.op == "call_method":
            return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
        raise CalibrationError(f"cannot run node {node.name} (op {node.op})")


def _model_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Every tensor the model owns: parameters, buffers, and plain tensor attributes of its
    modules (a leaf module may return one as its output)."""
    found = [*gm.parameters(), *gm.buffers()]
    for module in gm.modules():
        found += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    return found


def _dense(t: torch.Tensor) -> bool:
    """Each element its own memory (no expanded or overlapping strides): safe to write."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _same(v):
    return v


def _to_host(v):
    """A device tensor copied into pinned CPU memory (other values unchanged)."""
    if not isinstance(v, torch.Tensor) or v.device.type == "cpu":
        return v
    host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
    host.copy_(v)
    return host
