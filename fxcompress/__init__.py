"""fxcompress: graph-rewriting compression for PyTorch models, exported to ONNX and checked on ONNX Runtime.

The data path, one folder per stage: ``graph/`` (capture the model, find its sites) -> ``passes/`` (rewrite them,
with ``ops/``, ``recipe/`` and ``algorithms/``) -> ``export/`` (lower for a target, write ONNX) -> ``check/`` (run it
on ONNX Runtime against the original); ``planner`` chooses a recipe, ``llm/`` makes causal LMs KV-cache decoders.
Names below load on first use, so ``import fxcompress`` (and the CLI's ``--help``) does not import torch.

Example:
    >>> import fxcompress
    >>> cm = fxcompress.optimize(model, x, recipe="int8")
    >>> rep = fxcompress.check(model, cm.export("model.onnx"), x, fp32_baseline=False)
    >>> rep.passed
    True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "fxcompress.api",
    "distill": "fxcompress.api",
    "CompressedModel": "fxcompress.api",
    "check": "fxcompress.checker.parity",
    "optimize_decoder": "fxcompress.llm.compress",
    "check_decoder": "fxcompress.llm.check",
    "OrtDecoder": "fxcompress.llm.generate",
    "plan": "fxcompress.planner",
    "ParityReport": "fxcompress.checker.report",
    "Calibration": "fxcompress.graph.calibration",
    "Tolerance": "fxcompress.recipe.tolerance",
    "LayerRecord": "fxcompress.recipe.records",
    "Numerics": "fxcompress.recipe.records",
    "PassConfig": "fxcompress.recipe.registry",
    "PassResult": "fxcompress.recipe.registry",
    "register_pass": "fxcompress.recipe.registry",
    "available_passes": "fxcompress.recipe.registry",
    "parse_recipe": "fxcompress.recipe.parse",
    "Target": "fxcompress.export.targets",
    "TARGETS": "fxcompress.export.targets",
    **{
        name: "fxcompress.errors"
        for name in (
            "FxCompressError",
            "CaptureError",
            "InputError",
            "RecipeError",
            "PassError",
            "ExportError",
            "RuntimeMissingError",
            "CalibrationWarning",
        )
    },
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
