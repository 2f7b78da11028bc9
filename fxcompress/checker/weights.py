"""What an artifact stores and what ONNX Runtime makes of it: initializer bytes by dtype, and whether ORT's graph
optimizations folded quantized weights back to float or fused layers into kernels that change their numerics."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx

from fxcompress.checker.runtime import optimized_graph
from fxcompress.text import fmt_bytes

QUANTIZED_DTYPES = ("int8", "uint8", "int4", "uint4")
# ORT's CPU EP (1.32) fuses DequantizeLinear + MatMul into these at its default optimization level, with activations
# quantized at run time (session.qdq_matmulnbits_accuracy_level, default 4): the weight-only lowering is then not
# weight-only
RUN_TIME_QUANTIZED_OPS = ("MatMulNBits",)
EXPANDED_NOTE = (
    "{size} of quantized weights are expanded to float32 when the session loads (the CPU targets' Conv lowering, and "
    "lookups at constant positions): the file is smaller, the session holds them as float and runs ONNX Runtime's "
    "float kernels, as fast as fp32; for integer convolutions, quantize activations too (int8_static)"
)
FUSED_NOTE = (
    "ONNX Runtime fused {fused} DequantizeLinear + MatMul pair(s) into MatMulNBits, which quantizes activations per "
    "block at run time (session.qdq_matmulnbits_accuracy_level, default 4): these layers did not run weight-only; for "
    "weight-only numerics (slower) export with target 'cpu-weightonly' (MatMulNBits at accuracy_level 1) or set that "
    "session option to 1"
)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    n = 1
    for d in t.dims:
        n *= d
    return n * itemsize


def initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every initializer and Constant tensor, grouped by dtype name (``"int8"``, ``"float32"``...).

    Example:
        >>> initializer_bytes(onnx.load("model.onnx"))
        {'float32': 592, 'uint8': 4810}
    """
    out: dict[str, int] = defaultdict(int)

    def add(t: onnx.TensorProto) -> None:
        out[onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name] += _tensor_bytes(t)

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            add(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    add(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return dict(sorted(out.items()))


# Ops that may read a dequantized constant table (a position embedding added to activations). A MatMul, Gemm or a
# Gather with live indices reading one is a weight folded back to float: the gate's business.
TABLE_READERS = frozenset({"Add", "Sub", "Slice", "Unsqueeze", "Reshape", "Expand", "Transpose", "Concat"})


def expanded_at_load(proto: onnx.ModelProto) -> int:
    """Bytes of quantized initializers that ONNX Runtime turns into float constants when the session loads, by design
    of the lowering: a Conv weight lowered as ``Cast + Mul`` (the CPU targets', so that the convolution runs its
    prepacked float kernels), and a table looked up at constant positions (e.g. Whisper's position embedding). Any
    other quantized weight folded to float is a defect the weights gate reports.

    Example:
        >>> expanded_at_load(onnx.load("model.onnx"))  # an MLP: no convolution weights
        0
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    live = {i.name for i in graph.input if i.name not in inits}  # values that depend on what the caller feeds
    for node in graph.node:  # nodes come in topological order
        if any(name in live for name in node.input):
            live.update(node.output)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def dequantize_muls(node: onnx.NodeProto) -> list[onnx.NodeProto]:  # Cast -> Mul (the scale)
        return [m for m in users.get(node.output[0], []) if node.op_type == "Cast" and m.op_type == "Mul"]

    def conv_weight(node: onnx.NodeProto) -> bool:  # ... -> Conv's weight input
        return any(
            c.op_type == "Conv" and len(c.input) > 1 and c.input[1] == m.output[0]
            for m in dequantize_muls(node)
            for c in users.get(m.output[0], [])
        )

    def constant_lookup(name: str, node: onnx.NodeProto) -> bool:
        return node.op_type == "Gather" and node.input[0] == name and not any(i in live for i in node.input)

    def constant_table(node: onnx.NodeProto) -> bool:  # ... read only by elementwise/shape ops: the exporter already
        # folded a lookup at constant positions (0..seq-1) into the initializer, which is added, not multiplied
        muls = dequantize_muls(node)
        readers = [r for m in muls for r in users.get(m.output[0], [])]
        return bool(muls) and bool(readers) and all(r.op_type in TABLE_READERS for r in readers)

    def expanded(name: str) -> bool:
        readers = users.get(name, [])
        return bool(readers) and all(conv_weight(n) or constant_lookup(name, n) or constant_table(n) for n in readers)

    return sum(_tensor_bytes(t) for name, t in inits.items() if _dtype(t) in QUANTIZED_DTYPES and expanded(name))


def _float_copies_of_quantized(proto: onnx.ModelProto, optimized: onnx.ModelProto) -> int:
    """Bytes of float32 initializers that ORT's optimizations created with the shape (or transposed shape) of a
    quantized initializer: a dequantized weight. A float weight merely transposed (a head tied to a float embedding)
    is not counted."""
    quantized = {tuple(t.dims) for t in proto.graph.initializer if _dtype(t) in QUANTIZED_DTYPES}
    quantized |= {dims[::-1] for dims in quantized}
    floats = {tuple(t.dims) for t in proto.graph.initializer if _dtype(t) == "float32"}
    before = {t.name for t in proto.graph.initializer}
    return sum(
        _tensor_bytes(t)
        for t in optimized.graph.initializer
        if t.name not in before
        and _dtype(t) == "float32"
        and tuple(t.dims) in quantized
        and not (tuple(t.dims) in floats or tuple(t.dims)[::-1] in floats)
    )


def _dtype(t: onnx.TensorProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name


def count_ops(proto: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    """How many nodes of the main graph are one of ``op_types``.

    Example:
        >>> count_ops(onnx.load("model.onnx"), ("DynamicQuantizeMatMul",))  # the int8 artifact of a 2-Linear model
        2
    """
    return sum(n.op_type in op_types for n in proto.graph.node)


def weight_report(
    proto: onnx.ModelProto, reference_bytes: int, path: Path, provider: str, failures: list[str]
) -> dict[str, Any]:
    """Initializer bytes by dtype against the fp32 model's ``reference_bytes``; for a quantized artifact also the
    bytes after ORT's graph optimizations, a failure when ORT folded quantized weights back to float, and a note when
    it fused layers into run-time-quantized kernels.

    Example:
        >>> report = weight_report(onnx.load("model.onnx"), 19240, Path("model.onnx"), "cpu", failures=[])
        >>> round(report["ratio"], 2), report["folded_back"]
        (0.28, False)
    """
    by_dtype = initializer_bytes(proto)
    total = sum(by_dtype.values())
    w: dict[str, Any] = {
        "onnx_bytes_by_dtype": by_dtype,
        "onnx_bytes": total,
        "reference_bytes": reference_bytes,
        "ratio": total / max(reference_bytes, 1),
    }
    quantized = sum(v for k, v in by_dtype.items() if k in QUANTIZED_DTYPES)
    if not quantized:
        return w
    try:
        graph = optimized_graph(path, provider)
    except Exception as exc:  # the artifact already ran, so only the inspection failed
        w.update(
            optimized_bytes_by_dtype={}, folded_back=None, optimized_note=f"could not save ORT's optimized graph: {exc}"
        )
        return w
    optimized = initializer_bytes(graph)
    fused = count_ops(graph, RUN_TIME_QUANTIZED_OPS) - count_ops(proto, RUN_TIME_QUANTIZED_OPS)
    if fused > 0:
        w.update(fused_by_ort=fused, fused_note=FUSED_NOTE.format(fused=fused))
    expanded = expanded_at_load(proto)
    expected = quantized - expanded  # what must stay quantized in the session
    kept = sum(v for k, v in optimized.items() if k in QUANTIZED_DTYPES)
    grown = _float_copies_of_quantized(proto, graph) - 4 * expanded
    folded = expected > 0 and (kept < 0.9 * expected or grown > 0.5 * expected)
    w.update(optimized_bytes_by_dtype=optimized, folded_back=folded)
    if expanded:
        w.update(expanded_at_load=expanded, expanded_note=EXPANDED_NOTE.format(size=fmt_bytes(expanded)))
    if folded:
        failures.append(
            f"ONNX Runtime folded quantized weights back to float: {fmt_bytes(expected)} should stay quantized, "
            f"{fmt_bytes(kept)} did after optimization, float32 grew by {fmt_bytes(grown)}"
        )
    return w
