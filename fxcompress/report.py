"""Human-readable tables and byte accounting shared by the API, the parity checker and the CLI."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from fxcompress.api import CompressedModel


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
        {'float32': 1280, 'uint8': 16384}
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


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, three significant figures.

    Example:
        >>> fmt_bytes(1536)
        '1.50 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned text table.

    Example:
        >>> print(table([["fc", "int8"]], ["layer", "action"]))
        layer  action
        -----  ------
        fc     int8
    """
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def layer_table(cm: "CompressedModel") -> str:
    """Per-layer table of what each pass did, then totals.

    Example:
        >>> print(layer_table(fxcompress.optimize(model, x, recipe="int8")))
    """
    rows = []
    for r in cm.records:
        err = f"{r.error:.1f} dB" if r.error is not None else ""
        what = r.action + (f" ({r.reason})" if r.reason else "")
        rows.append([r.layer, r.kind, r.pass_name, what, fmt_bytes(r.bytes_before), fmt_bytes(r.bytes_after), err])
    body = table(rows, ["layer", "kind", "pass", "action", "before", "after", "weight SQNR"]) if rows else "(no candidate layers)"
    done = sum(1 for r in cm.records if not r.skipped)
    return (
        f"{body}\n\ncaptured with {cm.capture_method}; {done} layer rewrites, {sum(r.skipped for r in cm.records)} skipped\n"
        f"module bytes {fmt_bytes(cm.bytes_before)} -> {fmt_bytes(cm.bytes_after)} ({cm.compression_ratio:.2f}x smaller)"
    )
