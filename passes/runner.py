"""GraphRunner: executes a GraphModule node by node over a list of sample chunks, on demand.

Calibration advances the teacher and the student in lockstep: each runs only as far as the
next solve needs. A value is freed as soon as every user has run (unless pinned), so memory is
the live activations of the samples, not the whole network's. Nodes can be *deferred* (skipped
when advancing, run explicitly later): unsolved adapters wait for their solve this way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from fxkd.errors import CalibrationError

__all__ = ["GraphRunner"]


class GraphRunner:
    """Runs ``gm`` over ``chunks`` (a list of input batches) lazily, in topological order."""

    def __init__(
        self, gm: fx.GraphModule, chunks: list[torch.Tensor], pinned: Iterable[fx.Node] = ()
    ) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise CalibrationError(
                f"{type(gm).__name__} takes {len(placeholders)} inputs; fxkd calibrates models "
                "with exactly one tensor input. Hint: wrap the model so it takes one tensor."
            )
        self.chunks = chunks
        self.remaining = {n: len(n.users) for n in self.nodes}
        self.pinned = set(pinned)
        self.env: dict[fx.Node, list] = {}
        self.done: set[fx.Node] = set()
        self.pos = 0

    def value(self, node: fx.Node) -> list:
        """The per-chunk values of a node that has run and is still held."""
        if node not in self.env:
            raise CalibrationError(f"value of node {node.name} is not held (not run, or freed)")
        return self.env[node]

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

    def run_node(self, node: fx.Node) -> None:
        """Execute one node on every chunk, then release inputs whose users have all run."""
        if node.op == "placeholder":
            out = list(self.chunks)
        elif node.op == "get_attr":
            attr = functools.reduce(getattr, str(node.target).split("."), self.gm)
            out = [attr] * len(self.chunks)
        elif node.op == "output":
            out = [
                map_arg(node.args[0], lambda a, i=i: self.env[a][i])
                for i in range(len(self.chunks))
            ]
        else:
            fn = self._callable(node)
            out = []
            for i in range(len(self.chunks)):
                args = map_arg(node.args, lambda a, i=i: self.env[a][i])
                kwargs = map_arg(node.kwargs, lambda a, i=i: self.env[a][i])
                out.append(fn(*args, **kwargs))
        self.env[node] = out
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

    def _maybe_free(self, node: fx.Node) -> None:
        if self.remaining[node] <= 0 and node not in self.pinned and node.op != "output":
            self.env.pop(node, None)

    def _callable(self, node: fx.Node):
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        if node.op == "call_function":
            return node.target
        if node.op == "call_method":
            return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
        raise CalibrationError(f"cannot run node {node.name} (op {node.op})")
