"""Parity floors: what a compressed artifact must meet against the fp32 model (checked by :func:`fxcompress.check`).

Direction alone is blind to scale: an artifact whose outputs are twice the model's has cosine 1. So a floor gates the
error's direction (mean and worst-sample cosine), its size (SQNR of the whole output, and the worst element relative
to the output's largest value) and a scale bias (the least-squares gain of the artifact's outputs on the model's), and
for classifiers top-1 agreement and the accuracy drop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# field -> True when larger is looser (an error bound), False when smaller is looser (a minimum)
_UPPER_BOUNDS = {"max_rel_max", "gain_max_dev", "accuracy_drop_max_pp"}


@dataclass(frozen=True)
class Tolerance:
    """Parity floor a compressed artifact must meet against the fp32 model.

    Attributes:
        cosine_min: mean per-sample cosine similarity.
        cosine_worst_min: the worst sample's cosine.
        sqnr_db_min: output energy over error energy, in dB (20 dB: the error is a tenth of the output).
        max_rel_max: the largest absolute error over the largest absolute output value.
        gain_max_dev: how far the least-squares gain <out, ref> / <ref, ref> may be from 1 (a scale error).
        top1_agreement_min: classifiers: share of samples whose argmax matches the model's.
        accuracy_drop_max_pp: with labels: accuracy lost, in percentage points.

    Example:
        >>> Tolerance().cosine_min, Tolerance().gain_max_dev
        (0.999, 0.01)
    """

    cosine_min: float = 0.999
    cosine_worst_min: float = 0.998
    sqnr_db_min: float = 25.0
    max_rel_max: float = 0.08
    gain_max_dev: float = 0.01
    top1_agreement_min: float = 0.98
    accuracy_drop_max_pp: float = 1.0

    def loosest(self, other: "Tolerance") -> "Tolerance":
        """The looser floor of the two, field by field: a recipe is only as exact as its lossiest pass.

        Example:
            >>> Tolerance(cosine_min=0.999).loosest(Tolerance(cosine_min=0.98)).cosine_min
            0.98
        """
        values = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = max(a, b) if f.name in _UPPER_BOUNDS else min(a, b)
        return Tolerance(**values)

    @classmethod
    def from_dict(cls, data: dict) -> "Tolerance":
        """A Tolerance from its ``__dict__`` (e.g. an artifact's metadata); fields it lacks keep their defaults.

        Example:
            >>> Tolerance.from_dict({"cosine_min": 0.99}).cosine_min
            0.99
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in data.items() if k in names})


EXACT = Tolerance(
    cosine_min=0.99999,
    cosine_worst_min=0.9999,
    sqnr_db_min=60.0,
    max_rel_max=1e-3,
    gain_max_dev=1e-4,
    top1_agreement_min=1.0,
    accuracy_drop_max_pp=0.0,
)
# Run-time activation quantization (DynamicQuantizeMatMul per tensor, MatMulNBits per block of K), measured on
# MiniLM: cosine 0.993 / SQNR 18.7 dB per tensor, 0.9988 / 26.2 dB per block, against 0.9995 / 30.4 dB weight-only.
PER_TENSOR_ACTIVATIONS = Tolerance(
    cosine_min=0.99,
    cosine_worst_min=0.98,
    sqnr_db_min=15.0,
    max_rel_max=0.2,
    gain_max_dev=0.02,
    top1_agreement_min=0.97,
    accuracy_drop_max_pp=1.0,
)
PER_BLOCK_ACTIVATIONS = Tolerance(
    cosine_min=0.995,
    cosine_worst_min=0.99,
    sqnr_db_min=20.0,
    max_rel_max=0.12,
    gain_max_dev=0.01,
    top1_agreement_min=0.98,
    accuracy_drop_max_pp=1.0,
)
