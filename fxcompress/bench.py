"""Side-by-side benchmark: fp32 ONNX vs fxcompress recipes/lowerings vs ONNX Runtime's own quantizers
(``quantize_dynamic`` and ``MatMulNBitsQuantizer`` with RTN or GPTQ on the same calibration data).

Every variant is measured the same way, in one run: file size, initializer bytes, session RSS (fresh process),
p50 latency per batch size, cosine similarity to the fp32 torch model and, for classifiers, accuracy. Latency ratios
to fp32 are timed side by side (:func:`fxcompress.checker.timing.relative_latency`), not divided from two timings.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx

from fxcompress.api import optimize
from fxcompress.checker.metrics import compare, outputs_to_numpy
from fxcompress.checker.runtime import import_ort, probe
from fxcompress.checker.timing import relative_latency
from fxcompress.checker.weights import initializer_bytes
from fxcompress.errors import InputError
from fxcompress.export.targets import AUTO, auto_target, target_names
from fxcompress.export.writer import export_onnx
from fxcompress.graph.capture import capture
from fxcompress.graph.inputs import called_positionally, keyword_names, normalize_inputs, run_reference
from fxcompress.text import fmt_bytes


@dataclass
class BenchRow:
    variant: str
    file_bytes: int
    weight_bytes: int
    rss_load_mb: float
    rss_run_mb: float
    rss_peak_mb: float
    latency_ms: dict[int, Optional[float]] = field(default_factory=dict)
    cosine: Optional[float] = None
    provider: str = ""
    accuracy: Optional[float] = None
    gpu_mem_mb: Optional[float] = None
    # per batch size: this variant's latency over fp32's, the two timed in alternating rounds in one process
    # (the p50s above are timed one variant after another and drift with the machine's load)
    relative: dict[int, float] = field(default_factory=dict)


def _tile(inputs: tuple, batch: int) -> tuple[np.ndarray, ...]:
    out = []
    for t in inputs:
        a = t.detach().cpu().numpy()
        reps = -(-batch // a.shape[0])
        out.append(np.concatenate([a] * reps)[:batch])
    return tuple(out)


def _measure(
    name: str,
    path: Path,
    batches: Sequence[int],
    inputs: tuple,
    eval_batches: list[tuple],
    reference: list,
    provider: str,
    repeat: int,
    labels: Optional[np.ndarray] = None,
) -> BenchRow:
    proto = onnx.load(str(path))
    first = probe(path, [tuple(t.numpy() for t in b) for b in eval_batches], provider=provider, repeat=repeat)
    if first.load_error:
        raise RuntimeError(f"{name}: {first.load_error}")
    cos = compare([r for b in reference for r in b[:1]], [o for b in first.outputs for o in b[:1]])["cosine"]
    acc = None
    if labels is not None:
        acc = 100.0 * float((np.concatenate([b[0] for b in first.outputs]).argmax(-1) == labels).mean())
    lat = {}
    for b in batches:
        lat[b] = probe(path, [_tile(inputs, b)], provider=provider, repeat=repeat).latency_ms_p50
    return BenchRow(
        name,
        path.stat().st_size,
        sum(initializer_bytes(proto).values()),
        first.rss_load_mb,
        first.rss_run_mb,
        first.rss_peak_mb,
        lat,
        cos,
        first.provider,
        acc,
        first.gpu_mem_mb,
    )


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm(A, B^T const, C)`` as ``MatMul(A, B) + C`` (same numbers): ORT's MatMulNBitsQuantizer only
    quantizes MatMul, and torch's exporter writes 2-D Linear layers as Gemm.

    Example:
        >>> from fxcompress.export.writer import export_onnx
        >>> path = export_onnx(fx.symbolic_trace(nn.Linear(4, 2)), (torch.randn(2, 4),), "fp32.onnx")
        >>> ops = lambda model: [n.op_type for n in model.graph.node]
        >>> ops(onnx.load(path)), ops(gemm_to_matmul(onnx.load(path)))
        (['Gemm'], ['MatMul', 'Add'])
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not simple or node.input[1] not in inits:
            nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        inits[node.input[1]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(b.T if attrs.get("transB", 0) else b), node.input[1])
        )
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _calibration_reader(names: Sequence[str], calibration: Optional[Sequence[tuple]]):
    """ORT's CalibrationDataReader over fxcompress calibration batches (tuples of tensors in input order)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([dict(zip(names, (t.numpy() for t in b))) for b in calibration or []])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def _ort_static(fp32: Path, out: Path, calibration: Sequence[tuple]) -> Path:
    """ORT's static int8 as its docs recommend for CNNs on CPU: QDQ, per-channel signed weights, uint8 activations
    (MinMax calibration over the same batches fxcompress calibrates on)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input]
    quantize_static(
        str(fp32),
        str(out),
        _calibration_reader(names, calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return out


def _ort_nbits(fp32: Path, out: Path, algo: str, block: int, calibration: Optional[Sequence[tuple]]) -> Path:
    """ORT's own blockwise int4 (MatMulNBitsQuantizer, asymmetric, accuracy_level 4) by RTN or GPTQ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    model = gemm_to_matmul(onnx.load(str(fp32)))
    reader = _calibration_reader([i.name for i in model.graph.input], calibration)
    cfg = RTNWeightOnlyQuantConfig() if algo == "rtn" else GPTQWeightOnlyQuantConfig(reader, block_size=block)
    quantizer = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False, accuracy_level=4, algo_config=cfg)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def run_benchmark(
    factory: Callable[[], tuple],
    *,
    recipes: Sequence[str] = ("int8",),
    targets: Optional[Sequence[str]] = None,
    batches: Sequence[int] = (1, 32),
    ort_quantize_dynamic: bool = True,
    ort_quantize_static: bool = False,
    ort_nbits: Sequence[str] = (),
    nbits_block: int = 32,
    calibration: Optional[Sequence[tuple]] = None,
    provider: str = "auto",
    repeat: int = 20,
    workdir: Optional[str] = None,
    progress: Callable[[str], None] = lambda line: None,
) -> list[BenchRow]:
    """Benchmark fp32 vs each recipe x target (default: every target) vs ORT's quantizers on the model ``factory()``
    returns.

    ``ort_quantize_static`` adds ORT's static int8 (QDQ, per-channel); ``ort_nbits`` names the ORT
    MatMulNBitsQuantizer algorithms to add ("rtn", "gptq"), at ``nbits_block``; ``calibration`` feeds fxcompress
    recipes, ORT's static quantization and ORT's GPTQ; ``targets`` may include ``"auto"``; ``progress`` gets one
    line per variant before it is built and measured (the CLI prints them).

    Example:
        >>> rows = run_benchmark(zoo.mlp, targets=("cpu",), batches=(1,), ort_quantize_dynamic=False, repeat=2)
        >>> [r.variant for r in rows]
        ['fp32', 'fxcompress int8 [cpu]']
    """
    made = factory()
    names = keyword_names(made[1])
    model, inputs = called_positionally(made[0], names), normalize_inputs(made[1], names)
    eval_batches = [normalize_inputs(b, names) for b in made[2].inputs] if len(made) > 2 else [inputs]
    labels = made[2].labels.numpy() if len(made) > 2 and made[2].labels is not None else None
    calib = [normalize_inputs(c, names) for c in calibration] if calibration is not None else None
    reference = [outputs_to_numpy(run_reference(model, b)) for b in eval_batches]
    targets = list(targets or target_names())
    if ort_quantize_static and not calib:
        raise InputError("ort_quantize_static needs calibration batches: run_benchmark(..., calibration=[...])")
    total = 1 + len(recipes) * len(targets) + bool(ort_quantize_dynamic) + bool(ort_quantize_static) + len(ort_nbits)
    done = 0

    def measure(name: str, path: Path) -> BenchRow:
        nonlocal done
        done += 1
        progress(f"[{done}/{total}] measuring {name}")
        row = _measure(name, path, batches, inputs, eval_batches, reference, provider, repeat, labels)
        if path != fp32:  # its latency over fp32's, the two timed side by side
            runs = max(3, repeat // 4)
            for b in batches:
                row.relative[b] = relative_latency(path, fp32, _tile(inputs, b), provider, runs=runs).ratio
        return row

    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="fxc-bench-", dir=workdir) as tmp:
        progress("exporting the fp32 model")
        fp32 = export_onnx(capture(model, inputs).graph_module, inputs, Path(tmp, "fp32.onnx"))
        rows.append(measure("fp32", fp32))
        for i, recipe in enumerate(recipes):
            progress(f"compressing with recipe {recipe!r}")
            cm = optimize(model, inputs, recipe=recipe, calibration=calib)
            for target in targets:
                path = cm.export(Path(tmp, f"recipe{i}-{target}.onnx"), target=target)
                label = f"auto: {auto_target()[0].name}" if target == AUTO else target
                rows.append(measure(f"fxcompress {recipe} [{label}]", path))
        if ort_quantize_dynamic:
            import_ort()  # a clear message before onnxruntime.quantization's bare ImportError
            from onnxruntime.quantization import QuantType, quantize_dynamic

            out = Path(tmp, "ort_dynamic.onnx")
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
            rows.append(measure("ORT quantize_dynamic (QInt8, per-channel)", out))
        if ort_quantize_static:
            import_ort()
            out = _ort_static(fp32, Path(tmp, "ort_static.onnx"), calib)
            rows.append(measure("ORT quantize_static (QDQ, per-channel)", out))
        for algo in ort_nbits:
            out = _ort_nbits(fp32, Path(tmp, f"ort_nbits_{algo}.onnx"), algo, nbits_block, calib)
            rows.append(measure(f"ORT MatMulNBitsQuantizer {algo.upper()} int4 b{nbits_block}", out))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    """Markdown table of benchmark rows, with ratios to the fp32 row.

    Example:
        >>> rows = [BenchRow("fp32", 4000, 3600, 10.0, 11.0, 12.0, {1: 2.0}, 1.0),
        ...         BenchRow("int8", 1200, 900, 5.0, 6.0, 7.0, {1: 1.0}, 0.9999, "CPUExecutionProvider")]
        >>> print(format_rows(rows))  # doctest: +ELLIPSIS
        | variant | provider | file | weights (x fp32) | RSS load (x fp32) | ... | p50 b1 ms (x fp32) | cosine |
        | --- | --- | --- | --- | --- | --- | --- | --- | --- |
        | fp32 |  | 3.91 KiB | 3.52 KiB (1.000) | 10.0 MiB (1.00) | ... | 2.00 (1.00) | 1.00000 |
        | int8 | CPU | 1.17 KiB | 900 B (0.250) | 5.0 MiB (0.50) | ... | 1.00 (0.50) | 0.99990 |
    """
    base = rows[0]
    batches = list(base.latency_ms)
    with_acc = any(r.accuracy is not None for r in rows)
    with_gpu = any(r.gpu_mem_mb is not None for r in rows)
    header = (
        ["variant", "provider", "file", "weights (x fp32)", "RSS load (x fp32)", "RSS after runs", "RSS peak"]
        + (["GPU memory"] if with_gpu else [])
        + [f"p50 b{b} ms (x fp32{', side by side' if any(r.relative for r in rows) else ''})" for b in batches]
        + ["cosine"]
        + (["accuracy %"] if with_acc else [])
    )
    out = []
    for r in rows:
        cells = [
            r.variant,
            r.provider.replace("ExecutionProvider", ""),
            fmt_bytes(r.file_bytes),
            f"{fmt_bytes(r.weight_bytes)} ({r.weight_bytes / base.weight_bytes:.3f})",
            f"{r.rss_load_mb:.1f} MiB ({r.rss_load_mb / max(base.rss_load_mb, 1e-9):.2f})",
            f"{r.rss_run_mb:.1f} MiB",
            f"{r.rss_peak_mb:.1f} MiB",
        ]
        if with_gpu:
            cells.append(f"{r.gpu_mem_mb:.0f} MiB" if r.gpu_mem_mb is not None else "n/a")
        for b in batches:
            v, ref = r.latency_ms.get(b), base.latency_ms.get(b)
            ratio = r.relative.get(b, v / ref if v and ref else None)
            cells.append(f"{v:.2f} ({ratio:.2f})" if v and ratio else "n/a")
        cells.append(f"{r.cosine:.5f}" if r.cosine is not None else "")
        if with_acc:
            cells.append(f"{r.accuracy:.2f}" if r.accuracy is not None else "")
        out.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + out)


def rows_to_json(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    """Benchmark rows as JSON-ready dicts (what ``fxcompress bench --json`` writes).

    Example:
        >>> rows_to_json([BenchRow("fp32", 4000, 3600, 10.0, 11.0, 12.0, {1: 2.0}, 1.0)])[0]["latency_ms"]
        {1: 2.0}
    """
    return [asdict(r) for r in rows]
