"""The parity checker: run an ONNX artifact on ONNX Runtime and hold it against the original torch model.

One function, :func:`check`, used by the tests, the CLI and the benchmarks. It fails (``passed=False`` with a reason
per failure, each naming the gate that caught it) when the artifact cannot be loaded or run, when outputs differ in
shape, when any output has NaN or inf, when its error breaks a floor in direction, size or scale
(:mod:`fxcompress.checker.gates`), when accuracy drops, or when ONNX Runtime folds quantized weights back to float.

The floors come from what the caller states (``tolerance=``, or ``recipe=`` whose passes' floors are loosened by the
run-time activation quantization the artifact's graph really contains) or from the library's defaults, never from
the file under test unless ``trust_metadata=True``: an artifact must not set the bar it is held to.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch

from fxcompress.checker.fidelity import weight_gate
from fxcompress.checker.gates import Gate, classifier_gates, output_gates
from fxcompress.checker.localize import localize as localize_layers
from fxcompress.checker.metrics import compare, outputs_to_numpy
from fxcompress.checker.report import ParityReport
from fxcompress.checker.runtime import cpu_has_vnni, probe
from fxcompress.checker.speed import speed_note
from fxcompress.checker.weights import weight_report
from fxcompress.export.targets import TARGETS
from fxcompress.export.writer import export_onnx, read_metadata
from fxcompress.graph.capture import capture
from fxcompress.graph.edit import state_bytes
from fxcompress.graph.inputs import called_positionally, keyword_names, normalize_inputs, run_reference
from fxcompress.recipe.parse import RecipeLike, parse_recipe, recipe_tolerance
from fxcompress.recipe.tolerance import PER_BLOCK_ACTIVATIONS, PER_TENSOR_ACTIVATIONS, Tolerance

DEFAULT_RECIPE = "int8"  # the floors an artifact is held to when nobody says which recipe made it


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


def run_time_quantization(proto: onnx.ModelProto, fused_by_ort: int = 0) -> Optional[Tolerance]:
    """The floor the artifact's run-time activation quantization needs, read from the ops its graph holds (what
    runs, not what its metadata claims): DynamicQuantizeMatMul quantizes per tensor, MatMulNBits above accuracy
    level 1 (or pairs ORT fused into it) per block of K; None when activations stay float.

    Example:
        >>> run_time_quantization(onnx.load("model.onnx")).cosine_min  # an int8 artifact for the cpu target
        0.99
    """
    ops = [n for n in proto.graph.node]
    if any(n.op_type == "DynamicQuantizeMatMul" for n in ops):
        return PER_TENSOR_ACTIVATIONS
    levels = [
        next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in ops if n.op_type == "MatMulNBits"
    ]
    if fused_by_ort or any(level >= 2 for level in levels):
        return PER_BLOCK_ACTIVATIONS
    return None


def resolve_floors(
    proto: onnx.ModelProto,
    meta: dict[str, Any],
    tolerance: Optional[Tolerance],
    recipe: Optional[RecipeLike],
    trust_metadata: bool,
    fused_by_ort: int = 0,
) -> tuple[Tolerance, str]:
    """The floors to hold the artifact to, and where they came from.

    Example:
        >>> resolve_floors(onnx.ModelProto(), {}, None, "fp16", False)[1]
        "recipe 'fp16'"
    """
    if tolerance is not None:
        return tolerance, "given by the caller"
    if trust_metadata and "tolerance" in meta:
        return Tolerance.from_dict(meta["tolerance"]), "the artifact's own metadata (trusted on request)"
    configs = parse_recipe(recipe if recipe is not None else DEFAULT_RECIPE)
    floors = recipe_tolerance(configs)
    run_time = run_time_quantization(proto, fused_by_ort)
    if run_time is not None:
        floors = floors.loosest(run_time)
    names = ",".join(c.name for c in configs)
    source = (
        f"recipe '{names}'"
        if recipe is not None
        else (
            f"library defaults (recipe '{DEFAULT_RECIPE}'); state the recipe (check(..., recipe=...), --recipe) "
            "for its own floors, or trust the artifact's metadata (trust_metadata=True, --trust-metadata)"
        )
    )
    if run_time is not None:
        source += ", loosened for the activation quantization its graph runs"
    return floors, source


def _load(path: Path) -> tuple[Optional[onnx.ModelProto], dict[str, Any], Optional[str]]:
    try:
        proto = onnx.load(str(path), load_external_data=False)
        return proto, read_metadata(proto), None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, {}, f"{path} is not a readable ONNX model: {reason}"


def _shape_failures(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> list[str]:
    failures = []
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        if len(ref) != len(out):
            failures.append(f"batch {i}: the artifact returns {len(out)} outputs, the model {len(ref)}")
        for k, (r, o) in enumerate(zip(ref, out)):
            if r.shape != o.shape:
                failures.append(f"batch {i} output {k}: shape {o.shape} differs from the model's {r.shape}")
    return failures


def _gate_outputs(
    report: ParityReport,
    tol: Tolerance,
    reference: list,
    outputs: list,
    labels: Optional[torch.Tensor],
    classifier: Optional[bool],
) -> list[Gate]:
    """Every output's gates; the report's metrics are the worst output's (by cosine), plus top-1 and accuracy."""
    per_output = [compare([b[k] for b in reference], [b[k] for b in outputs]) for k in range(len(reference[0]))]
    gates = [g for k, m in enumerate(per_output) for g in output_gates(m, tol, k)]
    finite = [m for m in per_output if m["cosine"] is not None]
    report.metrics.update(min(finite, key=lambda d: d["cosine"]) if finite else per_output[0])
    logits_ref = np.concatenate([b[0] for b in reference])
    logits_out = np.concatenate([b[0] for b in outputs])
    agreement = drop = None
    if (classifier if classifier is not None else labels is not None) and np.isfinite(logits_out).all():
        agreement = float((logits_ref.argmax(-1) == logits_out.argmax(-1)).mean())
        report.metrics["top1_agreement"] = agreement
    if labels is not None:
        y = labels.detach().cpu().numpy().reshape(-1)
        if len(y) != len(logits_ref):
            report.failures.append(f"{len(y)} labels for {len(logits_ref)} evaluated samples")
        else:
            acc_ref = float((logits_ref.argmax(-1) == y).mean() * 100)
            acc_out = float((logits_out.argmax(-1) == y).mean() * 100)
            drop = acc_ref - acc_out
            report.metrics.update(accuracy_fp32_pct=acc_ref, accuracy_artifact_pct=acc_out, accuracy_drop_pp=drop)
    return gates + classifier_gates(agreement, drop, tol)


def _tensors_only(batch: tuple) -> tuple[np.ndarray, ...]:
    """The batch's tensor inputs as arrays: Python scalars the model takes are constants in the exported graph."""
    return tuple(t.detach().cpu().numpy() for t in batch if isinstance(t, torch.Tensor))


def check(
    model: torch.nn.Module,
    onnx_path: str | Path,
    example_inputs: Any,
    *,
    recipe: Optional[RecipeLike] = None,
    compressed: Optional[Any] = None,
    tolerance: Optional[Tolerance] = None,
    trust_metadata: bool = False,
    eval_inputs: Optional[Sequence[Any]] = None,
    labels: Optional[torch.Tensor] = None,
    classifier: Optional[bool] = None,
    provider: str = "auto",
    fp32_baseline: bool = True,
    latency_repeat: int = 20,
    localize: bool = False,
) -> ParityReport:
    """Run ``onnx_path`` on ONNX Runtime and compare it with ``model`` in torch.

    Args:
        model: the original (uncompressed) torch model: the reference. It is run as it is (in eval mode) and never
            modified.
        onnx_path: the artifact to check.
        example_inputs: inputs used when ``eval_inputs`` is not given, and to export the fp32 baseline.
        recipe: the recipe that made the artifact (text, configs or ``cm.recipe``): its passes' floors apply.
        compressed: the :class:`~fxcompress.CompressedModel` that made the artifact: its recipe's floors apply (unless
            ``recipe`` is given), and every compressed tensor in the file must be exactly what it produced (the
            ``weights`` gate: a file edited after export fails, naming the tensor).
        tolerance: explicit floors (overrides ``recipe``).
        trust_metadata: take the floors the artifact's metadata states (otherwise they are never read from it).
        eval_inputs: a list of input tuples (batches) to compare on; metrics pool over all of them.
        labels: class labels for the pooled batches: adds fp32 and artifact accuracy and the drop in points.
        classifier: report top-1 agreement (default: when labels are given).
        provider: ``"auto"`` (CUDA EP when it starts, else CPU with a note), ``"cpu"`` or ``"cuda"`` (must run there).
        fp32_baseline: also export the fp32 model and measure its memory and latency for the ratios.
        latency_repeat: timed runs on the first batch.
        localize: also compare the artifact's output at every compressed layer with the model's and name the layers
            where the error jumps (:func:`fxcompress.checker.localize.localize`), in ``report.localization``.

    Returns:
        A :class:`ParityReport`; ``passed`` is False with reasons when any check fails.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> rep = check(model, cm.export("model.onnx"), x, compressed=cm, fp32_baseline=False)
        >>> rep.passed, rep.provider, rep.floors_from
        (True, 'CPUExecutionProvider', "recipe 'int8', loosened for the activation quantization its graph runs")
        >>> [g["name"] for g in rep.gates]
        ['finite', 'cosine', 'cosine_worst', 'sqnr_db', 'max_rel', 'gain', 'weights']
    """
    path = Path(onnx_path)
    if recipe is None and compressed is not None and hasattr(compressed, "recipe"):
        recipe = compressed.recipe
    names = keyword_names(example_inputs)  # inputs given as keywords: the ONNX inputs carry those names, in order
    batches = [normalize_inputs(b, names) for b in (eval_inputs if eval_inputs is not None else [example_inputs])]
    proto, meta, unreadable = _load(path)
    if proto is None:
        floors = tolerance or Tolerance()
        return ParityReport(False, [unreadable], str(path), None, None, floors.__dict__)
    report = ParityReport(True, [], str(path), None, meta.get("target"), {}, notes=list(meta.get("notes", [])))
    was_training = model.training
    try:
        _eval(model)
        reference = [outputs_to_numpy(run_reference(called_positionally(model, names), b)) for b in batches]
        np_batches = [_tensors_only(b) for b in batches]
        run = probe(path, np_batches, provider=provider, repeat=latency_repeat)
        report.provider = run.provider
        if run.note:
            report.notes.append(run.note)
        if run.provider == "CPUExecutionProvider":
            report.notes += kernel_notes(report.target, proto, cpu_has_vnni())
        if run.load_error:
            report.failures.append(run.load_error)
            report.tolerance = (tolerance or Tolerance()).__dict__
            report.passed = False
            return report
        report.weights = weight_report(proto, state_bytes(model), path, provider, report.failures)
        floors, report.floors_from = resolve_floors(
            proto, meta, tolerance, recipe, trust_metadata, report.weights.get("fused_by_ort", 0)
        )
        report.tolerance = floors.__dict__
        shapes = _shape_failures(reference, run.outputs)
        report.failures += shapes
        if not shapes:
            gates = _gate_outputs(report, floors, reference, run.outputs, labels, classifier)
            if compressed is not None:
                gates.append(weight_gate(proto, compressed, report.target, str(path.parent)))
            report.gates = [g.to_dict() for g in gates]
            report.failures += [g.failure for g in gates if not g.passed]
        report.memory = {
            "rss_base_mb": run.rss_base_mb,
            "rss_load_mb": run.rss_load_mb,
            "rss_run_mb": run.rss_run_mb,
            "rss_peak_mb": run.rss_peak_mb,
            "gpu_mem_mb": run.gpu_mem_mb,
        }
        first = np_batches[0][0] if np_batches[0] else np.zeros(())
        report.latency = {
            "batch": int(first.shape[0]) if first.ndim else 1,
            "p50_ms": run.latency_ms_p50,
            "p90_ms": run.latency_ms_p90,
        }
        if fp32_baseline:
            _fp32_baseline(model, batches[0], provider, report, latency_repeat)
            note = speed_note(
                report.latency.get("p50_ms"), report.latency.get("fp32_p50_ms"), proto, report.provider, cpu_has_vnni()
            )
            if note:
                report.notes.append(note)
        if localize:
            where = "cuda" if "CUDA" in str(run.provider) else "cpu"
            found = localize_layers(model, path, example_inputs, provider=where)
            report.localization = {**found.to_dict(), "text": found.to_text()}
    finally:
        _set_training(model, was_training)
    report.passed = not report.failures
    return report


def _eval(model: torch.nn.Module) -> None:
    """Eval mode for the comparison (restored afterwards)."""
    _set_training(model, False)


def _set_training(model: torch.nn.Module, training: bool) -> None:
    """A ``torch.export(...).module()`` refuses ``train()`` and ``eval()``: its dropout and norm behaviour was fixed
    when it was traced, so it is left as it is."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


def export_float(model: torch.nn.Module, example_inputs: Any, path: str | Path, target: Optional[str] = None) -> Path:
    """The float model exported as it is: the baseline that memory and latency ratios are taken against.

    Example:
        >>> export_float(nn.Linear(16, 4), torch.randn(1, 16), "fp32.onnx").name
        'fp32.onnx'
    """
    inputs = normalize_inputs(example_inputs, keyword_names(example_inputs))
    gm = capture(model, inputs).graph_module
    return export_onnx(gm, inputs, Path(path), target=target if target in TARGETS else "cpu")


def onnx_feed(example_inputs: Any) -> tuple[np.ndarray, ...]:
    """``example_inputs`` as the arrays an exported model takes, in its input order.

    Example:
        >>> [a.shape for a in onnx_feed({"ids": torch.zeros(1, 4, dtype=torch.long), "scale": 2.0})]
        [(1, 4)]
    """
    return _tensors_only(normalize_inputs(example_inputs, keyword_names(example_inputs)))


def _fp32_baseline(model: torch.nn.Module, inputs: tuple, provider: str, report: ParityReport, repeat: int) -> None:
    """Export the float model and measure its session memory and latency beside the artifact's."""
    with tempfile.TemporaryDirectory(prefix="fxc-fp32-") as tmp:
        fp32 = export_float(model, inputs, Path(tmp, "fp32.onnx"), report.target)
        base = probe(fp32, [_tensors_only(inputs)], provider=provider, repeat=repeat)
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
