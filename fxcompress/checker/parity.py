"""The parity checker: run an ONNX artifact on ONNX Runtime and hold it against the original torch model.

One function, :func:`check`, used by the tests, the CLI and the benchmarks. It fails (``passed=False`` with a
reason per failure) when the artifact cannot be loaded or run, when outputs differ in shape, when accuracy
falls under the recipe's tolerance (read from the artifact's metadata unless given), or when ONNX Runtime folds
quantized weights back to float.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch

from fxcompress.checker.metrics import compare, outputs_to_numpy
from fxcompress.checker.report import ParityReport
from fxcompress.checker.runtime import cpu_has_vnni, probe
from fxcompress.checker.weights import weight_report
from fxcompress.export.targets import TARGETS
from fxcompress.export.writer import export_onnx, read_metadata
from fxcompress.graph.capture import capture
from fxcompress.graph.edit import state_bytes
from fxcompress.graph.inputs import normalize_inputs, run_reference
from fxcompress.recipe.tolerance import Tolerance


def kernel_notes(target_name: Optional[str], proto: onnx.ModelProto, vnni: Optional[bool]) -> list[str]:
    """Whether the artifact's int8 weight encoding suits the CPU it ran on (ORT's CPU EP), from the target's
    declared needs.

    Example:
        >>> kernel_notes("cpu-vnni", onnx.ModelProto(), vnni=False)[0][:40]
        "target cpu-vnni (int8 weights, ORT's U8S"
    """
    target = TARGETS.get(target_name or "")
    if target is None:
        return []
    if target.requires_vnni and vnni is False:
        return [
            f"target {target.name} (int8 weights, ORT's U8S8 kernel) on a CPU without VNNI: that kernel can saturate "
            "its int16 sums here; export with target 'cpu' (uint8 weights) for such CPUs"
        ]
    if target.on_vnni_use and vnni and any(n.op_type == "DynamicQuantizeMatMul" for n in proto.graph.node):
        return [
            f"this CPU has VNNI: target '{target.on_vnni_use}' (int8 weights, ORT's U8S8 kernel) runs "
            f"DynamicQuantizeMatMul about 2x faster here than the '{target.name}' target's uint8 weights, at the "
            "same accuracy"
        ]
    return []


def _load(path: Path, tolerance: Optional[Tolerance]) -> tuple[Optional[onnx.ModelProto], ParityReport]:
    """The artifact's proto and an empty report holding its target and floor; ``proto`` is None (and the report failed)
    when the file is not a readable ONNX model."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        meta = read_metadata(proto)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        failed = ParityReport(
            False,
            [f"{path} is not a readable ONNX model: {reason}"],
            str(path),
            None,
            None,
            (tolerance or Tolerance()).__dict__,
        )
        return None, failed
    tol = tolerance or (Tolerance(**meta["tolerance"]) if "tolerance" in meta else Tolerance())
    return proto, ParityReport(
        True, [], str(path), None, meta.get("target"), tol.__dict__, notes=list(meta.get("notes", []))
    )


def _shape_failures(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> list[str]:
    failures = []
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        if len(ref) != len(out):
            failures.append(f"batch {i}: the artifact returns {len(out)} outputs, the model {len(ref)}")
        for k, (r, o) in enumerate(zip(ref, out)):
            if r.shape != o.shape:
                failures.append(f"batch {i} output {k}: shape {o.shape} differs from the model's {r.shape}")
    return failures


def _accuracy(
    report: ParityReport,
    tol: Tolerance,
    reference: list,
    outputs: list,
    labels: Optional[torch.Tensor],
    classifier: Optional[bool],
) -> None:
    """Output metrics (the worst output's), top-1 agreement and accuracy against ``labels``, each held to ``tol``."""
    failures = report.failures
    per_output = [compare([b[k] for b in reference], [b[k] for b in outputs]) for k in range(len(reference[0]))]
    worst = min(per_output, key=lambda d: d["cosine"])
    report.metrics.update(worst)
    logits_ref = np.concatenate([b[0] for b in reference])
    logits_out = np.concatenate([b[0] for b in outputs])
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
            report.metrics.update(
                accuracy_fp32_pct=acc_ref, accuracy_artifact_pct=acc_out, accuracy_drop_pp=acc_ref - acc_out
            )
            if acc_ref - acc_out > tol.accuracy_drop_max_pp:
                failures.append(f"accuracy drop {acc_ref - acc_out:.2f} pp > {tol.accuracy_drop_max_pp} pp")
    if worst["cosine"] < tol.cosine_min:
        failures.append(f"cosine {worst['cosine']:.6f} < {tol.cosine_min} (worst sample {worst['cosine_min']:.6f})")


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
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> rep = check(model, cm.export("model.onnx"), x, fp32_baseline=False)
        >>> rep.passed, rep.provider
        (True, 'CPUExecutionProvider')
    """
    path = Path(onnx_path)
    batches = (
        [normalize_inputs(b) for b in eval_inputs] if eval_inputs is not None else [normalize_inputs(example_inputs)]
    )
    proto, report = _load(path, tolerance)
    if proto is None:
        return report
    tol = Tolerance(**report.tolerance)
    reference_model = copy.deepcopy(model).eval()
    reference = [outputs_to_numpy(run_reference(reference_model, b)) for b in batches]
    np_batches = [tuple(t.detach().cpu().numpy() for t in b) for b in batches]
    run = probe(path, np_batches, provider=provider, repeat=latency_repeat)
    report.provider = run.provider
    if run.note:
        report.notes.append(run.note)
    if run.provider == "CPUExecutionProvider":
        report.notes += kernel_notes(report.target, proto, cpu_has_vnni())
    if run.load_error:
        report.failures.append(run.load_error)
        report.passed = False
        return report
    report.failures += _shape_failures(reference, run.outputs)
    if not report.failures:
        _accuracy(report, tol, reference, run.outputs, labels, classifier)
    report.weights = weight_report(proto, state_bytes(reference_model), path, provider, report.failures)
    report.memory = {
        "rss_base_mb": run.rss_base_mb,
        "rss_load_mb": run.rss_load_mb,
        "rss_run_mb": run.rss_run_mb,
        "rss_peak_mb": run.rss_peak_mb,
        "gpu_mem_mb": run.gpu_mem_mb,
    }
    first = np_batches[0][0]
    report.latency = {
        "batch": int(first.shape[0]) if first.ndim else 1,
        "p50_ms": run.latency_ms_p50,
        "p90_ms": run.latency_ms_p90,
    }
    if fp32_baseline:
        _fp32_baseline(reference_model, batches[0], provider, report, latency_repeat)
    report.passed = not report.failures
    return report


def _fp32_baseline(model: torch.nn.Module, inputs: tuple, provider: str, report: ParityReport, repeat: int) -> None:
    """Export the float model and measure its session memory and latency beside the artifact's."""
    with tempfile.TemporaryDirectory(prefix="fxc-fp32-") as tmp:
        gm = capture(model, inputs).graph_module
        fp32 = export_onnx(
            gm, inputs, Path(tmp, "fp32.onnx"), target=report.target if report.target in TARGETS else "cpu"
        )
        base = probe(fp32, [tuple(t.detach().cpu().numpy() for t in inputs)], provider=provider, repeat=repeat)
    if base.load_error:
        report.memory["fp32_note"] = base.load_error
        return
    report.memory.update(
        fp32_rss_load_mb=base.rss_load_mb,
        fp32_rss_run_mb=base.rss_run_mb,
        fp32_rss_peak_mb=base.rss_peak_mb,
        fp32_gpu_mem_mb=base.gpu_mem_mb,
    )
    report.latency.update(fp32_p50_ms=base.latency_ms_p50, fp32_p90_ms=base.latency_ms_p90)
