"""ONNX-level folding: the FoldAdapters pass for pipelines that export first.

Rewrite rules (onnxscript's pattern rewriter on onnx_ir, the libraries torch's exporter uses)
that merge a producer followed by a pointwise map into one producer:

    Conv(Conv(x; W, b); Q, c)                   → Conv(x; Q·W, Q·b + c)
    Conv(BatchNormalization(Conv(x; W, b)); Q, c) → the same with ``W ← s·W``, ``b ← s(b − μ) + β``
    Gemm(Gemm(x; W, b); Q, c)                   → Gemm(x; Q·W, Q·b + c)     (B transposed or not)

where the second Conv is 1×1 (unit strides, no padding) and ``Q·W`` is taken per group: the
folded Conv keeps the first one's attributes (kernel, strides, pads, dilations, group), so it
costs what the first did. Guards, as in the fx pass: every weight, bias and BatchNorm statistic
is a constant initializer (not a graph input); the intermediate values have no other consumer and
are not graph outputs; the group structure composes (the first Conv dense, or both with the same
group count); and the folded weight is no larger than the two it replaces (so a deliberate
bottleneck-expansion pair is left alone). The arithmetic is done in float64 and cast back.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

__all__ = ["fold_adapters", "fold_rules"]

log = logging.getLogger(__name__)

Model = TypeVar("Model", onnx.ModelProto, ir.Model)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The constant array of an initializer input, or None (graph input, computed, missing)."""
    if value is None or not value.is_initializer() or value.is_graph_input():
        return None
    tensor = value.const_value
    return None if tensor is None else tensor.numpy()


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _attr_ints(node: ir.Node, name: str) -> list[int]:
    attr = node.attributes.get(name)
    return [] if attr is None else list(attr.as_ints())


def _inputs(node: ir.Node) -> tuple[ir.Value | None, ...]:
    """(x, weight, bias) with None for an absent bias."""
    ins = list(node.inputs) + [None] * (3 - len(node.inputs))
    return tuple(ins[:3])


def _check_private(result: MatchResult, *values: ir.Value) -> MatchResult:
    for v in values:
        if v.is_graph_output():
            return result.fail(f"{v.name} is a graph output")
        if len(v.uses()) != 1:
            return result.fail(f"{v.name} has {len(v.uses())} consumers")
    return result


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(s, t)`` with ``BN(y) = s·y + t`` in eval, or None if not constant."""
    params = [_const(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params) or _attr_int(bn, "training_mode", 0):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps_attr = bn.attributes.get("epsilon")
    eps = 1e-5 if eps_attr is None else eps_attr.as_float()
    s = gamma / np.sqrt(var + eps)
    return s, beta - s * mean


class _FoldIntoConv(pattern.RewriteRuleClassBase):
    """Base: a Conv, optionally an eval BatchNormalization, then a pointwise 1×1 Conv."""

    with_batchnorm = False

    def pattern(self, op, x):
        first = op.Conv(x, _allow_other_inputs=True, _outputs=["first"])
        if self.with_batchnorm:
            first = op.BatchNormalization(first, _allow_other_inputs=True, _outputs=["bn"])
        return op.Conv(first, _allow_other_inputs=True, _outputs=["second"])

    def check(self, context, x, first, second, bn=None) -> MatchResult:
        del context, x
        result = MatchResult()
        conv1, conv2 = first.producer(), second.producer()
        _, w, b = _inputs(conv1)
        _, q, c = _inputs(conv2)
        if _const(w) is None or (b is not None and _const(b) is None):
            return result.fail(f"{conv1.name}: weight or bias is not a constant initializer")
        if _const(q) is None or (c is not None and _const(c) is None):
            return result.fail(f"{conv2.name}: weight or bias is not a constant initializer")
        qv, wv = _const(q), _const(w)
        if any(k != 1 for k in qv.shape[2:]):
            return result.fail(f"{conv2.name} is not 1x1")
        if any(s != 1 for s in _attr_ints(conv2, "strides")) or any(
            p != 0 for p in _attr_ints(conv2, "pads")
        ):
            return result.fail(f"{conv2.name} has strides or padding")
        auto_pad = conv2.attributes.get("auto_pad")
        if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
            return result.fail(f"{conv2.name} pads automatically")
        g1, g2 = _attr_int(conv1, "group", 1), _attr_int(conv2, "group", 1)
        if not (g1 == 1 or g1 == g2):
            return result.fail(f"groups {g1} then {g2} do not compose into one conv")
        if qv.shape[0] * wv[0].size > wv.size + qv.size:
            return result.fail(f"folding {conv1.name} and {conv2.name} would grow the weights")
        private = [first] if bn is None else [first, bn]
        if bn is not None and _bn_affine(bn.producer()) is None:
            return result.fail(f"{bn.producer().name} is not an eval BatchNorm with constants")
        return _check_private(result, *private)

    def rewrite(self, op, x, first, second, bn=None):
        conv1, conv2 = first.producer(), second.producer()
        _, w, b = _inputs(conv1)
        _, q, c = _inputs(conv2)
        wv = _const(w).astype(np.float64)
        c1 = wv.shape[0]
        bv = np.zeros(c1) if b is None else _const(b).astype(np.float64)
        if bn is not None:
            s, t = _bn_affine(bn.producer())
            wv, bv = wv * s.reshape(-1, *[1] * (wv.ndim - 1)), s * bv + t
        qv = _const(q).astype(np.float64)
        c2 = qv.shape[0]
        qm = qv.reshape(c2, -1)
        g1, g2 = _attr_int(conv1, "group", 1), _attr_int(conv2, "group", 1)
        if g1 == 1 and g2 > 1:  # dense first conv: expand the block-diagonal Q
            dense = np.zeros((c2, c1))
            k2, k1 = c2 // g2, c1 // g2
            for g in range(g2):
                dense[g * k2 : (g + 1) * k2, g * k1 : (g + 1) * k1] = qm[g * k2 : (g + 1) * k2]
            qm, g2 = dense, 1
        groups = g2  # == g1, or 1 with g1 == 1
        qg = qm.reshape(groups, c2 // groups, c1 // groups)
        wg = wv.reshape(groups, c1 // groups, -1)
        new_w = (qg @ wg).reshape(c2, *wv.shape[1:])
        new_b = (qg @ bv.reshape(groups, -1, 1)).reshape(c2)
        if c is not None:
            new_b = new_b + _const(c).astype(np.float64)
        dtype = _const(w).dtype
        inputs = [x, op.initializer(ir.tensor(new_w.astype(dtype)), name=f"{w.name}_fxkd_folded")]
        if b is not None or c is not None or bn is not None:
            inputs.append(
                op.initializer(ir.tensor(new_b.astype(dtype)), name=f"{w.name}_fxkd_folded_bias")
            )
        log.info("folded %s into %s", conv2.name, conv1.name)
        return op.Conv(*inputs, **dict(conv1.attributes))


class FoldPointwiseIntoConv(_FoldIntoConv):
    """``Conv(Conv(x))`` with a 1×1 second Conv → one Conv."""


class FoldBatchNormAndPointwiseIntoConv(_FoldIntoConv):
    """``Conv(BatchNormalization(Conv(x)))`` with a 1×1 second Conv → one Conv."""

    with_batchnorm = True


class FoldGemmIntoGemm(pattern.RewriteRuleClassBase):
    """``Gemm(Gemm(x; W, b); Q, c)`` (unit alpha/beta, x not transposed) → one Gemm."""

    def pattern(self, op, x):
        first = op.Gemm(x, _allow_other_inputs=True, _outputs=["first"])
        return op.Gemm(first, _allow_other_inputs=True, _outputs=["second"])

    def check(self, context, x, first, second) -> MatchResult:
        del context, x
        result = MatchResult()
        for node in (first.producer(), second.producer()):
            _, w, b = _inputs(node)
            if _const(w) is None or (b is not None and _const(b) is None):
                return result.fail(f"{node.name}: weight or bias is not a constant initializer")
            if _attr_int(node, "transA", 0):
                return result.fail(f"{node.name} transposes its input")
            for name in ("alpha", "beta"):
                attr = node.attributes.get(name)
                if attr is not None and attr.as_float() != 1.0:
                    return result.fail(f"{node.name} scales by {name}")
        w1 = _weight_out_in(first.producer())
        w2 = _weight_out_in(second.producer())
        if w2.shape[0] * w1.shape[1] > w1.size + w2.size:
            return result.fail("folding would grow the weights")
        return _check_private(result, first)

    def rewrite(self, op, x, first, second):
        g1, g2 = first.producer(), second.producer()
        w1, w2 = _weight_out_in(g1), _weight_out_in(g2)
        b1 = _gemm_bias(g1, w1.shape[0])
        b2 = _gemm_bias(g2, w2.shape[0])
        _, w, b = _inputs(g1)
        _, _, c = _inputs(g2)
        dtype = _const(w).dtype
        inputs = [
            x,
            op.initializer(ir.tensor((w2 @ w1).astype(dtype)), name=f"{w.name}_fxkd_folded"),
        ]
        if b is not None or c is not None:
            bias = (w2 @ b1 + b2).astype(dtype)
            inputs.append(op.initializer(ir.tensor(bias), name=f"{w.name}_fxkd_folded_bias"))
        log.info("folded %s into %s", g2.name, g1.name)
        return op.Gemm(*inputs, transB=1)


def _weight_out_in(gemm: ir.Node) -> np.ndarray:
    """A Gemm's weight as (out, in) float64, whatever its transB."""
    w = _const(gemm.inputs[1]).astype(np.float64)
    return w if _attr_int(gemm, "transB", 0) else w.T


def _gemm_bias(gemm: ir.Node, out: int) -> np.ndarray:
    _, _, b = _inputs(gemm)
    return np.zeros(out) if b is None else np.broadcast_to(_const(b), (out,)).astype(np.float64)


_LAYOUT_OPS = frozenset({"Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Flatten"})


def _fold_weight_layout(node: ir.Node) -> bool | None:
    """Constant-fold a layout op of initializers whatever its size (None: the default rule,
    which skips inputs over onnxscript's size limit, e.g. a 96×96 adapter weight)."""
    if node.op_type in _LAYOUT_OPS and all(v is None or _const(v) is not None for v in node.inputs):
        return True
    return None


def fold_rules() -> pattern.RewriteRuleSet:
    """The rules, for use in an onnxscript rewrite pipeline of one's own."""
    return pattern.RewriteRuleSet(
        [
            FoldBatchNormAndPointwiseIntoConv().rule(),
            FoldPointwiseIntoConv().rule(),
            FoldGemmIntoGemm().rule(),
        ]
    )


def fold_adapters(model: Model) -> Model:
    """Fold every pointwise map (1×1 Conv or Gemm adapter, with an eval BatchNormalization
    between) into its producer in an ONNX model; returns a new model of the same type
    (``ModelProto`` or ``onnx_ir.Model``), the input untouched. Constant subexpressions are
    folded first (so biases an exporter computes from shapes count as constants); unused
    nodes and initializers go afterwards."""
    proto = isinstance(model, onnx.ModelProto)
    work = ir.serde.deserialize_model(model if proto else ir.serde.serialize_model(model))
    # e.g. an unoptimised export's computed zero biases; layout ops on weights (an adapter's
    # ``weight.reshape``) always, whatever their size: the rules need the weights constant
    optimizer.fold_constants(work, should_fold=_fold_weight_layout)
    count = fold_rules().apply_to_model(work)
    work = common_passes.RemoveUnusedNodesPass()(work).model
    log.info("fold_adapters: %d pointwise maps folded", count)
    return ir.serde.serialize_model(work) if proto else work
