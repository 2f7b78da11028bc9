"""Per-layer records: what each pass did to each candidate layer, and in which numerics it left it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

INTEGER_FORMATS = ("int8", "int4")


@dataclass(frozen=True)
class Numerics:
    """How a rewritten layer computes: the storage format of its weights and what happens to its activations.

    ``weights``: ``"int8"``, ``"int4"``, ``"float16"``, ``"bfloat16"`` or ``"float32"`` (an exact or structural
    rewrite: folded, pruned, factorized, sparse); ``activations``: ``"float"`` (weight-only in the torch module; an
    export target may still quantize them at run time) or ``"uint8-static"`` (fixed scales from calibration).

    Example:
        >>> Numerics("int8").integer_weights, Numerics("float16").integer_weights
        (True, False)
    """

    weights: str
    activations: str = "float"

    @property
    def integer_weights(self) -> bool:
        return self.weights in INTEGER_FORMATS


@dataclass
class LayerRecord:
    """What one pass did to one layer: the rows of the report.

    ``action`` names what was done (``"int8"``, ``"folded"``, ``"skipped"``...) for a reader; ``numerics`` says in
    structured form how the layer computes now (None: the layer was not rewritten), and is what code reads.

    Example:
        >>> LayerRecord("fc", "linear", "int8", "int8", numerics=Numerics("int8")).skipped
        False
    """

    layer: str
    kind: str
    pass_name: str
    action: str
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    error: Optional[float] = None  # pass-specific: weight SQNR in dB for quantization
    error_metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific JSON data, e.g. pruned channel indices
    numerics: Optional[Numerics] = None

    @property
    def skipped(self) -> bool:
        return self.action == "skipped"
