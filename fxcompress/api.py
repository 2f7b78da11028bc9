"""The entry point: ``optimize(model, example_inputs, recipe)`` -> :class:`CompressedModel`."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from fxcompress.calibration import Calibration
from fxcompress.capture import DynamicAxes, capture, normalize_inputs, run_reference
from fxcompress.errors import InputError, PassError
from fxcompress.export import export_onnx
from fxcompress.graph_edit import state_bytes
from fxcompress.lowering import tolerance_for
from fxcompress.pipeline import LayerRecord, PassConfig, PassContext, PassManager, RecipeLike, Tolerance, parse_recipe, recipe_tolerance
from fxcompress.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class CompressedModel:
    """The result of :func:`optimize`: a runnable torch module plus what every pass did.

    Attributes:
        module: the rewritten GraphModule; call it like the original model.
        records: one :class:`LayerRecord` per candidate layer and pass (done, or skipped with a reason).
        recipe: the parsed pass configs, in order.
        capture_method: ``"fx"`` or ``"export"``.
        bytes_before / bytes_after: parameter+buffer bytes of the original and the compressed module.
        dynamic_axes: per input, the axes that may change size (from :func:`optimize`); the export's default.
    """

    module: fx.GraphModule
    records: list[LayerRecord]
    recipe: list[PassConfig]
    example_inputs: tuple
    capture_method: str
    bytes_before: int
    bytes_after: int
    capture_note: Optional[str] = None
    dynamic_axes: DynamicAxes = (0,)
    onnx_path: Optional[Path] = field(default=None, repr=False)

    def __call__(self, *args: Any) -> Any:
        with torch.no_grad():
            return self.module(*args)

    @property
    def tolerance(self) -> Tolerance:
        """The parity floor implied by the recipe (the loosest of its passes).

        Example:
            >>> fxcompress.optimize(model, x, recipe="int8,int4").tolerance.cosine_min
            0.98
        """
        return recipe_tolerance(self.recipe)

    @property
    def compression_ratio(self) -> float:
        """bytes_before / bytes_after of the torch module's parameters and buffers.

        Example:
            >>> fxcompress.optimize(model, x, recipe="int8").compression_ratio  # ~4 for wide Linears, less for narrow ones
        """
        return self.bytes_before / max(self.bytes_after, 1)

    def export(self, path: str | os.PathLike, target: str = "cpu", dynamic_axes: Optional[DynamicAxes] = None) -> Path:
        """Write the compressed model as ONNX and return the path.

        Args:
            path: the ``.onnx`` file to write; nothing is left there if export fails.
            target: ``"cpu"`` (DynamicQuantizeMatMul for Linear, uint8 weights: safe on every x86 CPU),
                ``"cpu-vnni"`` (the same with int8 weights: ~2x faster GEMMs on CPUs with VNNI, saturates without),
                ``"cpu-nbits"`` (MatMulNBits 8-bit: more accurate, fast at batch 1, slow at large batches),
                ``"cpu-weightonly"`` (MatMulNBits with fp32 activations: ORT computes what the torch module does; slow on
                CPU, up to 30x fp32 on 4096-wide layers, for checking accuracy) or
                ``"cuda"`` (standard DequantizeLinear + MatMul: weight-only numerics, runs on every EP; ORT's CPU EP
                fuses it into MatMulNBits, which quantizes activations per block, unless the session sets
                ``session.qdq_matmulnbits_accuracy_level`` to 1).
            dynamic_axes: the input axes left symbolic in the ONNX graph; default: those given to
                :func:`optimize`. ``()`` fixes every shape.

        Example:
            >>> cm = optimize(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 16), recipe="int8")
            >>> cm.export("model.onnx").name
            'model.onnx'
        """
        quantized = any(r.action.startswith("int") for r in self.records)
        meta = {
            "recipe": [c.to_dict() for c in self.recipe],
            "tolerance": tolerance_for(self.tolerance, target, quantized).__dict__,
            "bytes_before": self.bytes_before,
            "capture": self.capture_method,
            "notes": self.notes,
        }
        self.onnx_path = export_onnx(self.module, self.example_inputs, path, target=target, metadata=meta,
                                     dynamic_axes=self.dynamic_axes if dynamic_axes is None else dynamic_axes)
        return self.onnx_path

    @property
    def notes(self) -> list[str]:
        """Caveats a reader of the artifact must know, e.g. sparsity that ONNX stores dense (no bytes saved).

        Example:
            >>> fxcompress.optimize(model, x, recipe="sparse24").notes  # doctest: +ELLIPSIS
            ['... stored dense ...']
        """
        dense = sorted({r.layer for r in self.records if r.extra.get("dense_storage")})
        if not dense:
            return []
        return [f"{len(dense)} layer(s) are sparse but stored dense ({', '.join(dense[:5])}{', ...' if len(dense) > 5 else ''}): "
                "ONNX and ONNX Runtime gain no bytes, memory or speed from the zeros; use a GPU with 2:4 sparse kernels "
                "or structured pruning (`prune`) to shrink the model"]

    def summary(self) -> str:
        """A per-layer table (kind, action, bytes before/after, error) with totals.

        Example:
            >>> print(fxcompress.optimize(model, x, recipe="int8").summary())
        """
        from fxcompress.report import layer_table

        return layer_table(self)


def optimize(
    model: nn.Module,
    example_inputs: Any,
    recipe: RecipeLike = "int8",
    *,
    calibration: Optional[Iterable[Any]] = None,
    progress: bool = False,
    dynamic_axes: DynamicAxes = (0,),
) -> CompressedModel:
    """Capture ``model``, run the recipe's rewrite passes and return the compressed module.

    The model is never modified: capture works on a deep copy.

    Args:
        model: any ``nn.Module``; captured with torch.fx, or torch.export when symbolic tracing fails.
        example_inputs: a tensor or tuple of positional tensors the model accepts.
        recipe: pass names with options (``"fold_bn,int8"``), a config, or a list of either.
        calibration: input tuples for passes that look at activations; a :class:`Calibration` can also mark
            padding so that statistics skip it.
        progress: show a progress bar over the layers being rewritten.
        dynamic_axes: the input axes that may change size between calls (default: the batch axis), as axis numbers
            for every input or one tuple per input: e.g. ``(0, 1)`` for a transformer's batch and sequence length,
            so that the module (and its export) takes any length and ``distill`` can train on batches cut to their
            longest sentence instead of padded ones.

    Returns:
        A :class:`CompressedModel`; ``.module`` runs in torch, ``.export(path)`` writes ONNX.

    Raises:
        InputError: ``example_inputs`` do not fit the model. CaptureError: the model cannot be captured.
        RecipeError: unknown pass or option. PassError: a pass failed (the message names it).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> cm = optimize(model, torch.randn(1, 64), recipe="int8")
        >>> round(cm.compression_ratio, 1)
        3.8
    """
    configs = parse_recipe(recipe)
    inputs = normalize_inputs(example_inputs)
    calib = None
    if calibration is not None:  # keeps a Calibration's token mask
        calib = Calibration((normalize_inputs(c) for c in calibration), getattr(calibration, "token_mask", None))
    captured = capture(model, inputs, dynamic_axes)
    gm = captured.graph_module
    before = state_bytes(gm)
    with progress_bar(progress, desc="fxcompress", total=len(configs)) as bar:
        ctx = PassContext(inputs, calib, progress=bar.note, teacher=model)
        records = PassManager(configs).run(gm, ctx, on_pass_done=bar.advance)
    try:  # the rewritten graph must still run on what the original ran on
        run_reference(gm, inputs)
    except InputError as exc:
        raise PassError(f"recipe {[c.name for c in configs]} produced a graph that no longer runs: {exc}") from exc
    done = [r for r in records if not r.skipped]
    if not done:
        warnings.warn(
            f"recipe {[c.name for c in configs]} found nothing to compress in {type(model).__name__}: "
            + ("; ".join(f"{r.layer}: {r.reason}" for r in records[:5]) or "no Linear/Conv/Embedding layer"),
            stacklevel=2,
        )
    return CompressedModel(gm, records, configs, inputs, captured.method, before, state_bytes(gm), captured.fx_failure,
                           captured.dynamic_axes)
