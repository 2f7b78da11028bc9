"""The parity report: everything :func:`fxcompress.check` measured, as text for people and JSON for machines."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from fxcompress.text import fmt_bytes, table


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
    gates: list[dict[str, Any]] = field(default_factory=list)  # every metric held to its floor, passed or not
    floors_from: str = ""  # where the floors came from: the stated recipe, the library defaults, the artifact
    localization: dict[str, Any] = field(default_factory=dict)  # per-layer divergence, when check(localize=True)

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (what ``fxcompress check --json`` writes).

        Example:
            >>> json.loads(fxcompress.check(model, "model.onnx", x, fp32_baseline=False).to_json())["passed"]
            True
        """
        return json.dumps(_strict(asdict(self)), indent=indent, allow_nan=False)

    def to_text(self) -> str:
        """A human summary: verdict, provider, metrics, bytes, memory, latency.

        Example:
            >>> print(fxcompress.check(model, "model.onnx", x, fp32_baseline=False).to_text())  # doctest: +ELLIPSIS
            parity PASSED: model.onnx
            ONNX Runtime provider that ran: CPUExecutionProvider   (export target: cpu)
            ...
        """
        w, mem, lat = self.weights, self.memory, self.latency
        lines = [
            f"parity {'PASSED' if self.passed else 'FAILED'}: {self.artifact}",
            f"ONNX Runtime provider that ran: {self.provider}   (export target: {self.target})",
            "",
        ]
        if self.gates:
            rows = [
                [
                    g["name"],
                    "" if g["output"] is None else str(g["output"]),
                    _fmt(g["value"]),
                    g["floor"],
                    "ok" if g["passed"] else "FAILED",
                ]
                for g in self.gates
            ]
            lines += [f"floors: {self.floors_from}", table(rows, ["gate", "output", "value", "floor", ""])]
        else:
            lines.append("(no metrics: the artifact did not run)")
        if w:
            by = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in w["onnx_bytes_by_dtype"].items())
            lines += [
                "",
                f"weights in file: {fmt_bytes(w['onnx_bytes'])} ({by}); fp32 model {fmt_bytes(w['reference_bytes'])}; "
                f"ratio {w['ratio']:.3f}",
            ]
            if "optimized_bytes_by_dtype" in w:
                by = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in w["optimized_bytes_by_dtype"].items())
                lines.append(f"weights after ORT graph optimization: {by}  (folded back to float: {w['folded_back']})")
            if "fused_note" in w:
                lines.append(w["fused_note"])
            if "expanded_note" in w:
                lines.append(w["expanded_note"])
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
        if self.localization:
            lines += ["", "where the error comes from (each compressed layer's output vs the model's):"]
            lines.append(self.localization["text"])
        if self.failures:
            lines += ["", "failures:"] + [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def _pair_line(label: str, d: dict, key: str, unit: str) -> str:
    v, ref = d.get(key), d.get(f"fp32_{key}")
    text = f"{label}: {v:.3g} {unit}" if v is not None else f"{label}: n/a"
    if ref and v is not None:
        text += f"   (fp32 artifact {ref:.3g} {unit}; ratio {v / ref:.2f})"
    return text


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else "n/a" if value is None else str(value)


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: strict JSON has no NaN (the gates say what was not
    finite)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
