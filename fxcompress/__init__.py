"""fxcompress: graph-rewriting compression for PyTorch models, exported to ONNX and checked on ONNX Runtime.

Example:
    >>> import fxcompress
    >>> cm = fxcompress.optimize(model, example_inputs, recipe="int8")
    >>> cm.export("model.onnx")
    >>> fxcompress.check(model, "model.onnx", example_inputs).passed
    True
"""

from fxcompress.api import CompressedModel, optimize
from fxcompress.calibration import Calibration
from fxcompress.distill import distill
from fxcompress.errors import (
    CalibrationWarning,
    CaptureError,
    ExportError,
    FxCompressError,
    InputError,
    PassError,
    RecipeError,
    RuntimeMissingError,
)
from fxcompress.parity import ParityReport, check
from fxcompress.pipeline import LayerRecord, PassConfig, PassResult, Tolerance, available_passes, parse_recipe, register_pass

__version__ = "0.1.0"
__all__ = [
    "optimize", "check", "distill", "Calibration", "CompressedModel", "ParityReport", "Tolerance", "LayerRecord", "PassConfig", "PassResult",
    "register_pass", "parse_recipe", "available_passes", "FxCompressError", "CaptureError", "InputError",
    "RecipeError", "PassError", "ExportError", "RuntimeMissingError", "CalibrationWarning",
]
