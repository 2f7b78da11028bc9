"""Parity floors: what a compressed artifact must meet against the fp32 model (checked by :func:`fxcompress.check`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """Parity floor a compressed artifact must meet against the fp32 model.

    Example:
        >>> Tolerance().cosine_min
        0.999
    """

    cosine_min: float = 0.999
    top1_agreement_min: float = 0.98
    accuracy_drop_max_pp: float = 1.0

    def loosest(self, other: "Tolerance") -> "Tolerance":
        """The looser floor of the two: a recipe is only as exact as its lossiest pass.

        Example:
            >>> Tolerance(cosine_min=0.999).loosest(Tolerance(cosine_min=0.98)).cosine_min
            0.98
        """
        return Tolerance(
            min(self.cosine_min, other.cosine_min),
            min(self.top1_agreement_min, other.top1_agreement_min),
            max(self.accuracy_drop_max_pp, other.accuracy_drop_max_pp),
        )


EXACT = Tolerance(cosine_min=0.99999, top1_agreement_min=1.0, accuracy_drop_max_pp=0.0)
