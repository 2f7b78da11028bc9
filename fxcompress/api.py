"""The entry point: ``optimize(model, example_inputs, recipe)`` -> :class:`CompressedModel`, and ``distill`` to
fine-tune one against its original."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import fx, nn

from fxcompress.algorithms.distill import DistillOptions, distill_module, varying_axes
from fxcompress.errors import InputError, PassError
from fxcompress.export.targets import Target, get_target
from fxcompress.export.writer import AxisNames, export_onnx
from fxcompress.graph.calibration import positional_calibration
from fxcompress.graph.capture import Captured, capture
from fxcompress.graph.edit import shared_copy, state_bytes, unshare
from fxcompress.graph.inputs import (
    DynamicAxes,
    called_positionally,
    input_axes,
    keyword_names,
    normalize_inputs,
    run_reference,
)
from fxcompress.graph.residency import WeightPager
from fxcompress.graph.sites import find_sites
from fxcompress.progress import progress_bar
from fxcompress.recipe.canonical import drop_idle_canonical, with_canonical
from fxcompress.recipe.manager import PassManager
from fxcompress.recipe.parse import RecipeLike, parse_recipe, recipe_tolerance
from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.registry import PassConfig, PassContext
from fxcompress.recipe.tolerance import Tolerance
from fxcompress.text import fmt_bytes, table

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
    input_names: Optional[tuple[str, ...]] = None  # the keywords of example inputs given as a dict
    output_names: Optional[tuple[str, ...]] = None  # the ONNX outputs' names (default: the exporter's)
    axis_names: Optional[AxisNames] = None  # symbols for the ONNX inputs' dynamic axes (default: per input)
    metadata: dict[str, Any] = field(default_factory=dict)  # more fxcompress.* metadata for the artifact
    onnx_path: Optional[Path] = field(default=None, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compressed module as the original is called (keyword inputs included), without gradients.

        Example:
            >>> class Scaled(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.fc = nn.Linear(4, 4)
            ...     def forward(self, x, scale):
            ...         return self.fc(x) * scale
            >>> cm = optimize(Scaled(), {"x": torch.ones(2, 4), "scale": torch.tensor(3.0)}, recipe="fp16")
            >>> cm(scale=torch.tensor(2.0), x=torch.ones(2, 4)).shape
            torch.Size([2, 4])
        """
        if kwargs and self.input_names:
            args = self._positional(args, kwargs)
            kwargs = {}
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def _positional(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """The captured module takes the example's keywords positionally, in the example's order."""
        names = list(self.input_names or ())
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise InputError(
                f"unexpected keyword input(s) {unknown}: the compressed module was captured with {names} (pass the "
                "same keywords as the example inputs given to optimize)"
            )
        given = dict(zip(names, args)) | kwargs
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"missing input(s) {missing}: the compressed module was captured with {names}")
        return tuple(given[n] for n in names)

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
            >>> round(fxcompress.optimize(model, x, recipe="int8").compression_ratio, 2)  # ~4 for wide layers
            3.61
        """
        return self.bytes_before / max(self.bytes_after, 1)

    def export(
        self,
        path: str | os.PathLike,
        target: Union[str, Target] = "auto",
        dynamic_axes: Optional[DynamicAxes] = None,
        external_data: Optional[bool] = None,
    ) -> Path:
        """Write the compressed model as ONNX and return the path.

        Args:
            path: the ``.onnx`` file to write; nothing is left there if export fails.
            target: an export target or its name: how compressed layers are lowered for the runtime's kernels
                (``fxcompress list`` and :data:`fxcompress.export.targets.TARGETS` describe each). ``"auto"`` (the
                default) picks one for this machine: ``cuda`` with onnxruntime-gpu, ``cpu-vnni`` on a CPU with VNNI,
                else ``cpu``; the artifact's metadata says which and why.
            dynamic_axes: the input axes left symbolic in the ONNX graph; default: those given to
                :func:`optimize`. ``()`` fixes every shape.
            external_data: the weights in ``<path>.data`` beside the model, written a tensor at a time (the peak
                memory of writing stays near the model's own); default: when they pass 512 MiB (one file below).

        Example:
            >>> cm = optimize(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 16), recipe="int8")
            >>> cm.export("model.onnx").name
            'model.onnx'
        """
        meta = {
            "recipe": [c.to_dict() for c in self.recipe],
            "tolerance": get_target(target).tolerance(self.tolerance, self.records).__dict__,
            "bytes_before": self.bytes_before,
            "capture": self.capture_method,
            "notes": self.notes,
            **self.metadata,
        }
        self.onnx_path = export_onnx(
            self.module,
            self.example_inputs,
            path,
            target=target,
            metadata=meta,
            dynamic_axes=self.dynamic_axes if dynamic_axes is None else dynamic_axes,
            output_names=self.output_names,
            axis_names=self.axis_names,
            external_data=external_data,
        )
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
        named = ", ".join(dense[:5]) + (", ..." if len(dense) > 5 else "")
        return [
            f"{len(dense)} layer(s) are sparse but stored dense ({named}): "
            "ONNX and ONNX Runtime gain no bytes, memory or speed from the zeros; use a GPU with 2:4 sparse kernels "
            "or structured pruning (`prune`) to shrink the model"
        ]

    def summary(self) -> str:
        """A per-layer table (kind, action, bytes before/after, error) with totals.

        Example:
            >>> print(fxcompress.optimize(model, x, recipe="int8").summary())  # doctest: +ELLIPSIS
            layer  kind    pass  action  before     after     weight SQNR
            -----  ------  ----  ------  ---------  --------  -----------
            0      linear  int8  int8    16.25 KiB  4.50 KiB  ... dB
            2      linear  int8  int8    2.54 KiB   720 B     ... dB
            <BLANKLINE>
            captured with fx; 2 layer rewrites, 0 skipped
            module bytes 18.79 KiB -> 5.20 KiB (3.61x smaller)
        """
        rows = []
        for r in self.records:
            err = f"{r.error:.1f} dB" if r.error is not None else ""
            what = r.action + (f" ({r.reason})" if r.reason else "")
            rows.append([r.layer, r.kind, r.pass_name, what, fmt_bytes(r.bytes_before), fmt_bytes(r.bytes_after), err])
        header = ["layer", "kind", "pass", "action", "before", "after", "weight SQNR"]
        body = table(rows, header) if rows else "(no candidate layers)"
        done = sum(1 for r in self.records if not r.skipped)
        return (
            f"{body}\n\ncaptured with {self.capture_method}; {done} layer rewrites, "
            f"{sum(r.skipped for r in self.records)} skipped\n"
            f"module bytes {fmt_bytes(self.bytes_before)} -> {fmt_bytes(self.bytes_after)} "
            f"({self.compression_ratio:.2f}x smaller)"
        )


def optimize(
    model: nn.Module,
    example_inputs: Any,
    recipe: Optional[RecipeLike] = "int8",
    *,
    calibration: Optional[Iterable[Any]] = None,
    progress: Optional[bool] = None,
    dynamic_axes: DynamicAxes = (0,),
    canonicalize: bool = True,
) -> CompressedModel:
    """Capture ``model``, run the recipe's rewrite passes and return the compressed module.

    The model is never modified: capture works on a deep copy.

    Args:
        model: any ``nn.Module``; captured with torch.fx, or torch.export when symbolic tracing fails.
        example_inputs: the model's inputs as it is called: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (``{"input_ids": ids, "attention_mask": mask}``), whose names the ONNX inputs keep.
        recipe: pass names with options (``"fold_bn,int8"``), a config, or a list of either; ``None`` captures
            (and canonicalizes) only: the float baseline, exported like any result.
        calibration: input batches (like ``example_inputs``: tuples, or dicts with the same keywords) for passes that
            look at activations; a :class:`Calibration` can also mark
            padding so that statistics skip it.
        progress: a progress bar on stderr over the passes, naming the layer being rewritten; default: when stderr
            is a terminal.
        dynamic_axes: the input axes that may change size between calls (default: the batch axis), as axis numbers
            for every input or one tuple per input: e.g. ``(0, 1)`` for a transformer's batch and sequence length,
            so that the module (and its export) takes any length and ``distill`` can train on batches cut to their
            longest sentence instead of padded ones.
        canonicalize: run the exact rewrites (BatchNorm folded into its conv) ahead of the recipe; their records say
            so, and the recipe kept on the result names them only where they changed something.

    Returns:
        A :class:`CompressedModel`; ``.module`` runs in torch, ``.export(path)`` writes ONNX.

    Raises:
        InputError: ``example_inputs`` do not fit the model. CaptureError: the model cannot be captured.
        RecipeError: unknown pass or option. PassError: a pass failed (the message names it).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> cm = optimize(model, torch.randn(1, 64), recipe="int8")
        >>> round(cm.compression_ratio, 1)
        3.6
    """
    prepared = prepare(model, example_inputs, calibration, dynamic_axes)
    return compress_prepared(model, prepared, recipe, progress=progress, canonicalize=canonicalize, copy=False)


def compress_prepared(
    model: nn.Module,
    prepared: Prepared,
    recipe: Optional[RecipeLike],
    *,
    progress: Optional[bool] = None,
    canonicalize: bool = True,
    copy: bool = True,
) -> CompressedModel:
    """:func:`optimize` from what :func:`prepare` made of ``model``: a caller trying many recipes on one model (the
    planner) captures it once. With ``copy`` the passes rewrite a copy of the capture that shares its weights, so
    ``prepared`` serves the next recipe unchanged.

    Example:
        >>> prepared = prepare(model, x)
        >>> [round(compress_prepared(model, prepared, r).compression_ratio, 1) for r in ("int8", "int4")]
        [3.6, 6.3]
    """
    user_configs = [] if recipe is None else parse_recipe(recipe)
    configs = with_canonical(user_configs) if canonicalize else user_configs
    called, inputs, names, calib, captured = prepared
    gm = shared_copy(captured.graph_module) if copy else captured.graph_module
    pager = WeightPager(model)  # weights mapped from a file are let go after each layer is rewritten
    pager.release()
    before = state_bytes(gm)
    show = sys.stderr.isatty() if progress is None else progress
    layers = max(len(find_sites(gm)[0]), 1) if show else 1
    # one step per layer a pass visits (so the bar's elapsed time and ETA mean something on a model of 200 layers),
    # caught up to the pass boundary when a pass visits fewer
    with progress_bar(show, desc="fxcompress", total=len(configs) * layers, unit="layer") as bar:
        done = {"passes": 0}

        def on_pass_done(label: str) -> None:
            done["passes"] += 1
            bar.advance_to(done["passes"] * layers, label)
            pager.release()

        def on_layer(name: str) -> None:
            bar.step_within(name, (done["passes"] + 1) * layers)
            pager.release()

        ctx = PassContext(inputs, calib, progress=on_layer, teacher=called)
        with pager.while_reading():
            records = PassManager(configs).run(gm, ctx, on_pass_done=on_pass_done)
    configs, records = drop_idle_canonical(configs, user_configs, records)
    unshare(gm, model)  # the compressed module never aliases the user's weights: editing one must not change the other
    try:  # the rewritten graph must still run on what the original ran on
        run_reference(gm, inputs)
    except InputError as exc:
        raise PassError(f"recipe {[c.name for c in configs]} produced a graph that no longer runs: {exc}") from exc
    asked = {c.name for c in user_configs}
    if asked and not any(not r.skipped and r.pass_name in asked for r in records):
        theirs = [r for r in records if r.pass_name in asked]
        warnings.warn(
            f"recipe {[c.name for c in user_configs]} found nothing to compress in {type(model).__name__}: "
            + ("; ".join(f"{r.layer}: {r.reason}" for r in theirs[:5]) or _nothing_found(user_configs)),
            stacklevel=2,
        )
    return CompressedModel(
        gm,
        records,
        configs,
        inputs,
        captured.method,
        before,
        state_bytes(gm),
        captured.fx_failure,
        captured.dynamic_axes,
        input_names=names,
    )


class Prepared(NamedTuple):
    """A model as the passes see it: called with positional inputs, its example and calibration batches in that
    order, the names of keyword inputs (None: positional), and its capture (weights shared with the model, never
    modified)."""

    called: nn.Module
    inputs: tuple
    input_names: Optional[tuple[str, ...]]
    calibration: Optional[Sequence[tuple]]
    captured: Captured


def prepare(
    model: nn.Module, example_inputs: Any, calibration: Optional[Any] = None, dynamic_axes: DynamicAxes = (0,)
) -> Prepared:
    """What :func:`optimize` does before its passes run: keyword inputs become positional (and the graph's named
    inputs), calibration batches are checked and put in the same order, and the model is captured.

    Example:
        >>> prepared = prepare(model, x, calibration)
        >>> prepared.captured.method, len(prepared.calibration)
        ('fx', 4)
    """
    names = keyword_names(example_inputs)
    inputs = normalize_inputs(example_inputs, names)
    calib = None
    if calibration is not None:  # keeps a Calibration's token mask
        calib = positional_calibration(calibration, names)
        _check_finite(calib)
    called = called_positionally(model, names)  # keyword inputs become the graph's (and the ONNX file's) named inputs
    return Prepared(called, inputs, names, calib, capture(called, inputs, dynamic_axes))


def _check_finite(batches: Sequence[tuple]) -> None:
    """Refuse calibration with NaN or inf before any pass fits statistics to it (it would fail deep inside one, or
    silently poison a Hessian)."""
    for i, batch in enumerate(batches):
        for k, t in enumerate(batch):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InputError(
                    f"calibration batch {i}, input {k} has {bad} NaN/inf value(s); calibrate on finite data"
                )


def _nothing_found(configs: Sequence[PassConfig]) -> str:
    return "; ".join(f"{c.name}: {type(c).nothing_found}" for c in configs)


def _check_axes(compressed: CompressedModel, batches: Sequence[tuple]) -> None:
    """A torch.export capture runs only on the sizes it was captured with outside its dynamic axes: say so before
    training rather than fail inside the first step (symbolic_trace graphs take any shape)."""
    if not batches or compressed.capture_method != "export":
        return
    captured = input_axes(compressed.example_inputs, compressed.dynamic_axes)
    fixed = {i: sorted(set(v) - set(c)) for i, (v, c) in enumerate(zip(varying_axes(batches), captured))}
    fixed = {i: axes for i, axes in fixed.items() if axes}
    if fixed:
        raise InputError(
            "distill data varies in size on axes the compressed module was captured fixed ("
            + ", ".join(f"input {i}: axes {axes}" for i, axes in fixed.items())
            + f"; captured with dynamic_axes={captured}): pass those axes to optimize(..., dynamic_axes=...) "
            "too, or pad the batches to one size"
        )


def distill(
    compressed: CompressedModel,
    teacher: nn.Module,
    data: Sequence[Any],
    steps: int = 100,
    *,
    lr: float = 1e-4,
    loss: str = "mse",
    temperature: float = 1.0,
    hidden: Union[None, str, Sequence[str]] = None,
    hidden_weight: float = 1.0,
    schedule: str = "constant",
    trainable: Optional[Callable[[str], bool]] = None,
    amp: Optional[bool] = None,
    device: str = "auto",
    progress: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> CompressedModel:
    """Fine-tune ``compressed`` against ``teacher`` on ``data`` (input tuples); returns it, with a ``distill`` record
    (loss first -> last) added. The teacher is never modified.

    ``loss``: ``mse`` | ``kl`` | ``cosine``; ``hidden``: ``"norms"`` (every LayerNorm output) or node names to match
    too, weighted by ``hidden_weight``; ``schedule``: ``constant`` | ``cosine``; ``trainable(name)`` picks the
    tensors to train; ``on_step(step, loss)`` runs after each step (see
    :func:`fxcompress.algorithms.distill.distill_module`).

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="svd:rank=8")
        >>> cm = fxcompress.distill(cm, teacher=model, data=[(x,)], steps=5, lr=1e-3)
        >>> cm.records[-1].action
        'distilled'
    """
    try:
        options = DistillOptions(
            steps=steps,
            lr=lr,
            loss=loss,
            temperature=temperature,
            hidden=hidden or (),
            hidden_weight=hidden_weight,
            schedule=schedule,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    batches = positional_calibration(data, compressed.input_names)
    _check_axes(compressed, batches)
    history = distill_module(
        compressed.module,
        called_positionally(teacher, compressed.input_names),
        batches,
        options,
        trainable=trainable,
        device=device,
        amp=amp,
        progress=progress,
        on_step=on_step,
    )
    compressed.records.append(LayerRecord("(whole model)", "model", "distill", "distilled", options.describe(history)))
    return compressed
