"""The parity checker: run an ONNX artifact on ONNX Runtime and hold it against the original torch model.

One function, :func:`check`, used by the tests, the CLI and the benchmarks. It fails (``passed=False`` with a
reason per failure) when the artifact cannot be loaded or run, when outputs differ in shape, when accuracy
falls under the recipe's tolerance (read from the artifact's metadata unless given), or when ONNX Runtime folds
quantized weights back to float.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch

from fxcompress.capture import capture, normalize_inputs, run_reference
from fxcompress.export import read_metadata
from fxcompress.graph_edit import state_bytes
from fxcompress.pipeline import Tolerance
from fxcompress.report import fmt_bytes, initializer_bytes, table
from fxcompress.runtime import cpu_has_vnni, probe

QUANTIZED_DTYPES = ("int8", "uint8", "int4", "uint4")


@dataclass
class ParityReport:
    """Everything :func:`check` measured; ``passed`` is False whenever ``failures`` is non-empty."""

    passed: bool
    failures: list[str]
    artifact: str
    provider: Optional[str]
    target: Optional[str]
    tolerance: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # caveats the recipe stored in the artifact (e.g. dense sparsity)

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (what ``fxcompress check --json`` writes).

        Example:
            >>> Path("report.json").write_text(fxcompress.check(model, "model.onnx", x).to_json())
        """
        return json.dumps(asdict(self), indent=indent, default=float)

    def to_text(self) -> str:
        """A human summary: verdict, provider, metrics, bytes, memory, latency.

        Example:
            >>> print(fxcompress.check(model, "model.onnx", x).to_text())
        """
        m, w, mem, lat = self.metrics, self.weights, self.memory, self.latency
        rows = [[k, f"{v:.6g}" if isinstance(v, float) else str(v)] for k, v in m.items()]
        lines = [
            f"parity {'PASSED' if self.passed else 'FAILED'}: {self.artifact}",
            f"ONNX Runtime provider that ran: {self.provider}   (export target: {self.target})",
            "",
            table(rows, ["metric", "value"]) if rows else "(no metrics: the artifact did not run)",
        ]
        if w:
            by = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in w["onnx_bytes_by_dtype"].items())
            lines += ["", f"weights in file: {fmt_bytes(w['onnx_bytes'])} ({by}); fp32 model {fmt_bytes(w['reference_bytes'])}; "
                          f"ratio {w['ratio']:.3f}"]
            if "optimized_bytes_by_dtype" in w:
                by = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in w["optimized_bytes_by_dtype"].items())
                lines.append(f"weights after ORT graph optimization: {by}  (folded back to float: {w['folded_back']})")
            if "fused_note" in w:
                lines.append(w["fused_note"])
        if mem:
            lines.append(_pair_line("session RSS after load", mem, "rss_load_mb", "MiB"))
            lines.append(_pair_line("session RSS after runs", mem, "rss_run_mb", "MiB"))
            lines.append(_pair_line("session RSS peak", mem, "rss_peak_mb", "MiB"))
            if mem.get("gpu_mem_mb") is not None:
                lines.append(_pair_line("GPU memory", mem, "gpu_mem_mb", "MiB"))
        if lat:
            lines.append(_pair_line(f"latency p50 (batch {lat.get('batch')})", lat, "p50_ms", "ms"))
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        if self.failures:
            lines += ["", "failures:"] + [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def _pair_line(label: str, d: dict, key: str, unit: str) -> str:
    v, ref = d.get(key), d.get(f"fp32_{key}")
    text = f"{label}: {v:.3g} {unit}" if v is not None else f"{label}: n/a"
    if ref and v is not None:
        text += f"   (fp32 artifact {ref:.3g} {unit}; ratio {v / ref:.2f})"
    return text


def outputs_to_numpy(x: Any) -> list[np.ndarray]:
    """A model's (possibly nested) outputs as a flat list of arrays, in ONNX output order.

    Example:
        >>> [a.shape for a in outputs_to_numpy((torch.zeros(2, 3), [torch.zeros(4)]))]
        [(2, 3), (4,)]
    """
    flat, _ = torch.utils._pytree.tree_flatten(x)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flat]


def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
    """Error metrics of ``candidate`` against ``reference`` (lists of same-shape arrays, batch on axis 0).

    ``cosine`` is the mean per-sample cosine similarity, ``cosine_min`` the worst sample; ``max_rel`` is the
    max abs error over the max abs reference value (robust where the reference is near zero).

    Example:
        >>> compare([np.ones((2, 3))], [np.ones((2, 3))])["cosine"]
        1.0
    """
    ref = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1) for r in reference]).astype(np.float64)
    out = np.concatenate([c.reshape(c.shape[0], -1) if c.ndim else c.reshape(1, 1) for c in candidate]).astype(np.float64)
    diff = out - ref
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, (ref * out).sum(1) / np.maximum(norms, 1e-300), np.where(np.abs(diff).max(1) == 0, 1.0, 0.0))
    noise = float((diff**2).sum())
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs": float(np.abs(diff).max()),
        "max_rel": float(np.abs(diff).max() / max(np.abs(ref).max(), 1e-12)),
        "sqnr_db": 200.0 if noise == 0 else float(10 * math.log10(max(float((ref**2).sum()), 1e-300) / noise)),
    }


def _int8_kernel_notes(target: Optional[str], proto: onnx.ModelProto) -> list[str]:
    """Whether the artifact's DynamicQuantizeMatMul weight encoding suits the CPU it ran on (ORT's CPU EP)."""
    vnni = cpu_has_vnni()
    if target == "cpu-vnni" and vnni is False:
        return ["target cpu-vnni (int8 weights, ORT's U8S8 kernel) on a CPU without VNNI: that kernel can saturate its "
                "int16 sums here; export with target 'cpu' (uint8 weights) for such CPUs"]
    if target == "cpu" and vnni and any(n.op_type == "DynamicQuantizeMatMul" for n in proto.graph.node):
        return ["this CPU has VNNI: target 'cpu-vnni' (int8 weights, ORT's U8S8 kernel) runs DynamicQuantizeMatMul "
                "about 2x faster here than the 'cpu' target's uint8 weights, at the same accuracy"]
    return []


def check(
    model: torch.nn.Module,
    onnx_path: str | Path,
    example_inputs: Any,
    *,
    eval_inputs: Optional[Sequence[Any]] = None,
    labels: Optional[torch.Tensor] = None,
    classifier: Optional[bool] = None,
    tolerance: Optional[Tolerance] = None,
    provider: str = "auto",
    fp32_baseline: bool = True,
    latency_repeat: int = 20,
) -> ParityReport:
    """Run ``onnx_path`` on ONNX Runtime and compare it with ``model`` in torch.

    Args:
        model: the original (uncompressed) torch model: the reference.
        onnx_path: the artifact to check.
        example_inputs: inputs used when ``eval_inputs`` is not given, and to export the fp32 baseline.
        eval_inputs: a list of input tuples (batches) to compare on; metrics pool over all of them.
        labels: class labels for the pooled batches: adds fp32 and artifact accuracy and the drop in points.
        classifier: report top-1 agreement (default: when labels are given).
        tolerance: override the floor stored in the artifact by the recipe.
        provider: ``"auto"`` (CUDA EP when available, else CPU), ``"cpu"`` or ``"cuda"``.
        fp32_baseline: also export the fp32 model and measure its memory and latency for the ratios.
        latency_repeat: timed runs on the first batch.

    Returns:
        A :class:`ParityReport`; ``passed`` is False with reasons when any check fails.

    Example:
        >>> rep = check(model, "model.onnx", torch.randn(4, 64))
        >>> rep.passed, rep.provider
        (True, 'CPUExecutionProvider')
    """
    path = Path(onnx_path)
    batches = [normalize_inputs(b) for b in eval_inputs] if eval_inputs is not None else [normalize_inputs(example_inputs)]
    reference_model = copy.deepcopy(model).eval()
    failures: list[str] = []
    try:
        proto = onnx.load(str(path), load_external_data=False)
        meta = read_metadata(proto)
    except Exception as exc:
        return ParityReport(False, [f"{path} is not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"],
                            str(path), None, None, (tolerance or Tolerance()).__dict__)
    tol = tolerance or (Tolerance(**meta["tolerance"]) if "tolerance" in meta else Tolerance())
    report = ParityReport(True, failures, str(path), None, meta.get("target"), tol.__dict__, notes=list(meta.get("notes", [])))

    reference = [outputs_to_numpy(run_reference(reference_model, b)) for b in batches]
    np_batches = [tuple(t.detach().cpu().numpy() for t in b) for b in batches]
    run = probe(path, np_batches, provider=provider, repeat=latency_repeat)
    report.provider = run.provider
    if run.provider == "CPUExecutionProvider":
        report.notes += _int8_kernel_notes(report.target, proto)
    if run.load_error:
        failures.append(run.load_error)
        report.passed = False
        return report

    for i, (ref, out) in enumerate(zip(reference, run.outputs)):
        if len(ref) != len(out):
            failures.append(f"batch {i}: the artifact returns {len(out)} outputs, the model {len(ref)}")
        for k, (r, o) in enumerate(zip(ref, out)):
            if r.shape != o.shape:
                failures.append(f"batch {i} output {k}: shape {o.shape} differs from the model's {r.shape}")
    if not failures:
        n_out = len(reference[0])
        per_output = [compare([b[k] for b in reference], [b[k] for b in run.outputs]) for k in range(n_out)]
        worst = min(per_output, key=lambda d: d["cosine"])
        report.metrics.update(worst)
        logits_ref = np.concatenate([b[0] for b in reference])
        logits_out = np.concatenate([b[0] for b in run.outputs])
        if classifier if classifier is not None else labels is not None:
            agree = float((logits_ref.argmax(-1) == logits_out.argmax(-1)).mean())
            report.metrics["top1_agreement"] = agree
            if agree < tol.top1_agreement_min:
                failures.append(f"top-1 agreement {agree:.4f} < {tol.top1_agreement_min}")
        if labels is not None:
            y = labels.detach().cpu().numpy().reshape(-1)
            if len(y) != len(logits_ref):
                failures.append(f"{len(y)} labels for {len(logits_ref)} evaluated samples")
            else:
                acc_ref = float((logits_ref.argmax(-1) == y).mean() * 100)
                acc_out = float((logits_out.argmax(-1) == y).mean() * 100)
                report.metrics.update(accuracy_fp32_pct=acc_ref, accuracy_artifact_pct=acc_out, accuracy_drop_pp=acc_ref - acc_out)
                if acc_ref - acc_out > tol.accuracy_drop_max_pp:
                    failures.append(f"accuracy drop {acc_ref - acc_out:.2f} pp > {tol.accuracy_drop_max_pp} pp")
        if worst["cosine"] < tol.cosine_min:
            failures.append(f"cosine {worst['cosine']:.6f} < {tol.cosine_min} (worst sample {worst['cosine_min']:.6f})")

    report.weights = _weights(proto, reference_model, path, provider, failures)
    report.memory = {"rss_base_mb": run.rss_base_mb, "rss_load_mb": run.rss_load_mb, "rss_run_mb": run.rss_run_mb,
                     "rss_peak_mb": run.rss_peak_mb, "gpu_mem_mb": run.gpu_mem_mb}
    report.latency = {"batch": int(np_batches[0][0].shape[0]) if np_batches[0][0].ndim else 1, "p50_ms": run.latency_ms_p50, "p90_ms": run.latency_ms_p90}
    if fp32_baseline:
        _fp32_baseline(reference_model, batches[0], provider, report, latency_repeat)
    report.passed = not failures
    return report


# ORT's CPU EP (1.32) fuses DequantizeLinear + MatMul into these at its default optimization level, with activations
# quantized at run time (session.qdq_matmulnbits_accuracy_level, default 4): the weight-only lowering is then not
# weight-only
_RUN_TIME_QUANTIZED_OPS = ("MatMulNBits",)


def _weights(proto: onnx.ModelProto, model: torch.nn.Module, path: Path, provider: str, failures: list[str]) -> dict[str, Any]:
    from fxcompress.runtime import optimized_graph

    by_dtype = initializer_bytes(proto)
    total, ref = sum(by_dtype.values()), state_bytes(model)
    w: dict[str, Any] = {"onnx_bytes_by_dtype": by_dtype, "onnx_bytes": total, "reference_bytes": ref, "ratio": total / max(ref, 1)}
    quantized = sum(v for k, v in by_dtype.items() if k in QUANTIZED_DTYPES)
    if quantized:
        try:
            graph = optimized_graph(path, provider)
        except Exception as exc:  # the run above succeeded, so this is only the inspection failing
            w["optimized_bytes_by_dtype"], w["folded_back"] = {}, None
            w["optimized_note"] = f"could not save ORT's optimized graph: {exc}"
            return w
        optimized = initializer_bytes(graph)
        fused = _count_ops(graph, _RUN_TIME_QUANTIZED_OPS) - _count_ops(proto, _RUN_TIME_QUANTIZED_OPS)
        if fused > 0:
            w["fused_by_ort"] = fused
            w["fused_note"] = (f"ONNX Runtime fused {fused} DequantizeLinear + MatMul pair(s) into MatMulNBits, which quantizes "
                               "activations per block at run time (session.qdq_matmulnbits_accuracy_level, default 4): these "
                               "layers did not run weight-only; for weight-only numerics (slower) export with target "
                               "'cpu-weightonly' (MatMulNBits at accuracy_level 1) or set that session option to 1")
        kept = sum(v for k, v in optimized.items() if k in QUANTIZED_DTYPES)
        grown = optimized.get("float32", 0) - by_dtype.get("float32", 0)
        folded = kept < 0.9 * quantized or grown > 0.5 * quantized
        w.update(optimized_bytes_by_dtype=optimized, folded_back=folded)
        if folded:
            failures.append(f"ONNX Runtime folded quantized weights back to float: {fmt_bytes(quantized)} quantized in the file, "
                            f"{fmt_bytes(kept)} after optimization, float32 grew by {fmt_bytes(grown)}")
    return w


def _count_ops(proto: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    return sum(n.op_type in op_types for n in proto.graph.node)


def _fp32_baseline(model: torch.nn.Module, inputs: tuple, provider: str, report: ParityReport, repeat: int) -> None:
    from fxcompress.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="fxc-fp32-") as tmp:
        gm = capture(model, inputs).graph_module
        fp32 = export_onnx(gm, inputs, Path(tmp, "fp32.onnx"), target=report.target or "cpu")
        base = probe(fp32, [tuple(t.detach().cpu().numpy() for t in inputs)], provider=provider, repeat=repeat)
    if base.load_error:
        report.memory["fp32_note"] = base.load_error
        return
    report.memory.update(fp32_rss_load_mb=base.rss_load_mb, fp32_rss_run_mb=base.rss_run_mb, fp32_rss_peak_mb=base.rss_peak_mb,
                         fp32_gpu_mem_mb=base.gpu_mem_mb)
    report.latency.update(fp32_p50_ms=base.latency_ms_p50, fp32_p90_ms=base.latency_ms_p90)
