"""The gates an artifact's outputs must pass: each metric held to its floor, by name, with the line that says why.

One gate per metric and output: ``finite`` (no NaN or inf), ``cosine`` and ``cosine_worst`` (direction), ``sqnr_db``
and ``max_rel`` (size of the error), ``gain`` (scale), and for classifiers ``top1_agreement`` and ``accuracy_drop_pp``.
Every gate is reported, passed or not, next to the floor it was held to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from fxcompress.recipe.tolerance import Tolerance


@dataclass
class Gate:
    """One metric held to its floor.

    Example:
        >>> Gate("gain", 2.0, "|gain - 1| <= 0.02", False, 0, "output 0: gain 2 ...").passed
        False
    """

    name: str
    value: Optional[float]
    floor: str
    passed: bool
    output: Optional[int] = None
    failure: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _at(output: Optional[int]) -> str:
    return f"output {output}: " if output is not None else ""


def output_gates(m: dict[str, Optional[float]], tol: Tolerance, output: int) -> list[Gate]:
    """The gates of one output's metrics (from :func:`fxcompress.checker.metrics.compare`).

    Example:
        >>> from fxcompress.checker.metrics import compare
        >>> gates = output_gates(compare([np.ones((2, 3))], [2 * np.ones((2, 3))]), Tolerance(), 0)
        >>> [g.name for g in gates if not g.passed]  # twice the model's outputs: direction right, size wrong
        ['sqnr_db', 'max_rel', 'gain']
    """
    at = _at(output)
    if m["reference_nonfinite"]:
        why = f"{at}the model's own output has {m['reference_nonfinite']} NaN/inf value(s): nothing to compare against"
        return [Gate("finite", None, "no NaN/inf in the model's output", False, output, why)]
    if m["nonfinite"]:
        why = f"{at}the artifact's output has {m['nonfinite']} NaN/inf value(s) where the model's has none"
        return [Gate("finite", float(m["nonfinite"]), "0 NaN/inf values", False, output, why)]
    gain_dev = abs(m["gain"] - 1)
    checks = [
        (
            "cosine",
            m["cosine"],
            f">= {tol.cosine_min}",
            m["cosine"] >= tol.cosine_min,
            f"cosine {m['cosine']:.6f} < {tol.cosine_min} (worst sample {m['cosine_min']:.6f})",
        ),
        (
            "cosine_worst",
            m["cosine_min"],
            f">= {tol.cosine_worst_min}",
            m["cosine_min"] >= tol.cosine_worst_min,
            f"worst-sample cosine {m['cosine_min']:.6f} < {tol.cosine_worst_min}",
        ),
        (
            "sqnr_db",
            m["sqnr_db"],
            f">= {tol.sqnr_db_min}",
            m["sqnr_db"] >= tol.sqnr_db_min,
            f"SQNR {m['sqnr_db']:.2f} dB < {tol.sqnr_db_min} dB: the error is too large for the output",
        ),
        (
            "max_rel",
            m["max_rel"],
            f"<= {tol.max_rel_max}",
            m["max_rel"] <= tol.max_rel_max,
            f"largest error {m['max_rel']:.4g} of the output's range > {tol.max_rel_max}",
        ),
        (
            "gain",
            m["gain"],
            f"|gain - 1| <= {tol.gain_max_dev}",
            gain_dev <= tol.gain_max_dev,
            f"gain {m['gain']:.4g}: the outputs are {m['gain']:.4g}x the model's (|gain - 1| > {tol.gain_max_dev})",
        ),
    ]
    gates = [Gate("finite", 0.0, "0 NaN/inf values", True, output)]
    gates += [Gate(name, value, floor, ok, output, "" if ok else at + why) for name, value, floor, ok, why in checks]
    return gates


def classifier_gates(agreement: Optional[float], drop_pp: Optional[float], tol: Tolerance) -> list[Gate]:
    """Top-1 agreement with the model, and the accuracy drop against labels (each when measured).

    Example:
        >>> [g.passed for g in classifier_gates(0.95, 0.5, Tolerance())]
        [False, True]
    """
    gates = []
    if agreement is not None:
        ok = agreement >= tol.top1_agreement_min
        gates.append(
            Gate(
                "top1_agreement",
                agreement,
                f">= {tol.top1_agreement_min}",
                ok,
                None,
                "" if ok else f"top-1 agreement {agreement:.4f} < {tol.top1_agreement_min}",
            )
        )
    if drop_pp is not None:
        ok = drop_pp <= tol.accuracy_drop_max_pp
        gates.append(
            Gate(
                "accuracy_drop_pp",
                drop_pp,
                f"<= {tol.accuracy_drop_max_pp}",
                ok,
                None,
                "" if ok else f"accuracy drop {drop_pp:.2f} pp > {tol.accuracy_drop_max_pp} pp",
            )
        )
    return gates
