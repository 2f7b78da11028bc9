"""Side-by-side benchmark: fp32 ONNX vs fxcompress recipes/lowerings vs ONNX Runtime's own quantize_dynamic.

Every variant is measured the same way, in one run: file size, initializer bytes, session RSS (fresh process),
p50 latency per batch size, and cosine similarity to the fp32 torch model.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx

from fxcompress.api import optimize
from fxcompress.capture import capture, normalize_inputs, run_reference
from fxcompress.export import export_onnx
from fxcompress.parity import compare, outputs_to_numpy
from fxcompress.report import fmt_bytes, initializer_bytes
from fxcompress.runtime import import_ort, probe

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


def _tile(inputs: tuple, batch: int) -> tuple[np.ndarray, ...]:
    out = []
    for t in inputs:
        a = t.detach().cpu().numpy()
        reps = -(-batch // a.shape[0])
        out.append(np.concatenate([a] * reps)[:batch])
    return tuple(out)


def _measure(name: str, path: Path, batches: Sequence[int], inputs: tuple, eval_batches: list[tuple], reference: list,
             provider: str, repeat: int) -> BenchRow:
    proto = onnx.load(str(path))
    first = probe(path, [tuple(t.numpy() for t in b) for b in eval_batches], provider=provider, repeat=repeat)
    if first.load_error:
        raise RuntimeError(f"{name}: {first.load_error}")
    cos = compare([r for b in reference for r in b[:1]], [o for b in first.outputs for o in b[:1]])["cosine"]
    lat = {}
    for b in batches:
        lat[b] = probe(path, [_tile(inputs, b)], provider=provider, repeat=repeat).latency_ms_p50
    return BenchRow(name, path.stat().st_size, sum(initializer_bytes(proto).values()), first.rss_load_mb, first.rss_run_mb, first.rss_peak_mb,
                    lat, cos, first.provider)


def run_benchmark(
    factory: Callable[[], tuple],
    *,
    recipes: Sequence[str] = ("int8",),
    targets: Sequence[str] = ("cpu", "cpu-nbits", "cuda"),
    batches: Sequence[int] = (1, 32),
    ort_quantize_dynamic: bool = True,
    provider: str = "auto",
    repeat: int = 20,
    workdir: Optional[str] = None,
) -> list[BenchRow]:
    """Benchmark fp32 vs each recipe x target vs ORT quantize_dynamic on the model ``factory()`` returns.

    Example:
        >>> rows = run_benchmark(zoo.mlp, batches=(1,))
        >>> print(format_rows(rows))
    """
    made = factory()
    model, inputs = made[0], normalize_inputs(made[1])
    eval_batches = [normalize_inputs(b) for b in made[2].inputs] if len(made) > 2 else [inputs]
    reference = [outputs_to_numpy(run_reference(model, b)) for b in eval_batches]
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="fxc-bench-", dir=workdir) as tmp:
        fp32 = export_onnx(capture(model, inputs).graph_module, inputs, Path(tmp, "fp32.onnx"))
        rows.append(_measure("fp32", fp32, batches, inputs, eval_batches, reference, provider, repeat))
        for recipe in recipes:
            cm = optimize(model, inputs, recipe=recipe)
            for target in targets:
                path = cm.export(Path(tmp, f"{recipe}-{target}.onnx".replace(":", "_").replace(",", "_")), target=target)
                rows.append(_measure(f"fxcompress {recipe} [{target}]", path, batches, inputs, eval_batches, reference, provider, repeat))
        if ort_quantize_dynamic:
            import_ort()  # a clear message before onnxruntime.quantization's bare ImportError
            from onnxruntime.quantization import QuantType, quantize_dynamic

            out = Path(tmp, "ort_dynamic.onnx")
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
            rows.append(_measure("ORT quantize_dynamic (QInt8, per-channel)", out, batches, inputs, eval_batches, reference,
                                 provider, repeat))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    """Markdown table of benchmark rows, with ratios to the fp32 row."""
    base = rows[0]
    batches = list(base.latency_ms)
    header = ["variant", "file", "weights (x fp32)", "RSS load (x fp32)", "RSS after runs", "RSS peak"] + [f"p50 b{b} ms (x fp32)" for b in batches] + ["cosine"]
    out = []
    for r in rows:
        cells = [r.variant, fmt_bytes(r.file_bytes), f"{fmt_bytes(r.weight_bytes)} ({r.weight_bytes / base.weight_bytes:.3f})",
                 f"{r.rss_load_mb:.1f} MiB ({r.rss_load_mb / max(base.rss_load_mb, 1e-9):.2f})", f"{r.rss_run_mb:.1f} MiB", f"{r.rss_peak_mb:.1f} MiB"]
        for b in batches:
            v, ref = r.latency_ms.get(b), base.latency_ms.get(b)
            cells.append(f"{v:.2f} ({v / ref:.2f})" if v and ref else "n/a")
        cells.append(f"{r.cosine:.5f}" if r.cosine is not None else "")
        out.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + out)


def rows_to_json(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
