"""Exceptions raised by fxcompress. Every message names the layer/op involved and what to do next."""

from __future__ import annotations


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class CaptureError(FxCompressError):
    """Neither torch.fx nor torch.export could capture the model."""


class InputError(FxCompressError):
    """The example inputs (or calibration/evaluation inputs) do not fit the model."""


class RecipeError(FxCompressError):
    """A recipe names an unknown pass or an invalid option."""


class PassError(FxCompressError):
    """A pass failed while rewriting the graph."""


class ExportError(FxCompressError):
    """The compressed module could not be written as ONNX."""


class RuntimeMissingError(FxCompressError):
    """ONNX Runtime is not installed."""


class CalibrationWarning(UserWarning):
    """The calibration data is too small for what a pass fits to it (the result may not generalize)."""
