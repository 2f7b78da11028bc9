"""Capture a model as an fx GraphModule: torch.fx.symbolic_trace first, torch.export as the fallback.

Both paths give a GraphModule whose compressible layers are found by :mod:`fxcompress.sites`, so passes never
care which capture ran. The user's model is deep-copied first: fx shares submodules with the traced model,
and a pass that edits a weight in place must never reach the caller's module.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from fxcompress.errors import CaptureError, InputError

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """A captured graph plus how it was obtained."""

    graph_module: fx.GraphModule
    method: str  # "fx" or "export"
    fx_failure: str | None = None  # why symbolic_trace was not used, when method == "export"


def normalize_inputs(example_inputs: Any) -> tuple:
    """Accept a tensor or a tuple/list of tensors and return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
    )


def run_reference(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """Run ``model`` on ``inputs`` without gradients; wrap failures in an InputError that says what to fix."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:  # the user's forward can raise anything
        shapes = ", ".join(
            f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__
            for t in inputs
        )
        raise InputError(
            f"{type(model).__name__} cannot run on the example inputs ({shapes}): {type(exc).__name__}: "
            f"{_first_line(exc)}. Pass inputs with the shapes and dtypes the model's forward expects."
        ) from exc


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a model's (possibly nested: tuple, list, dict, ModelOutput) outputs, in flattening order.

    Example:
        >>> [t.shape for t in output_tensors({"logits": torch.zeros(2, 3), "n": 1})]
        [torch.Size([2, 3])]
    """
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _outputs_match(a: Any, b: Any) -> bool:
    flat_a, _ = torch.utils._pytree.tree_flatten(a)
    flat_b, _ = torch.utils._pytree.tree_flatten(b)
    if len(flat_a) != len(flat_b):
        return False
    return all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(flat_a, flat_b)
    )


def batch_of_two(inputs: tuple) -> tuple:
    """torch.export specializes size-1 dims, so trace a batch of at least 2 to keep the batch axis symbolic."""
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t for t in inputs)


def _export_module(model: nn.Module, inputs: tuple, axes: tuple[int, ...] = (0,)) -> fx.GraphModule:
    """torch.export with symbolic ``axes`` (the batch axis) where the model allows them (Dim.AUTO never fails on
    one: it specializes instead)."""
    traced = batch_of_two(inputs)
    shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes if axis < t.dim()} or None
                   if isinstance(t, torch.Tensor) else None for t in traced)
    return torch.export.export(model, traced, dynamic_shapes=shapes, strict=False).module()


def capture(model: nn.Module, example_inputs: Any) -> Captured:
    """Capture ``model`` into a GraphModule that computes what it computes on ``example_inputs``.

    Args:
        model: the module to capture; it is deep-copied and put in eval mode, never modified.
        example_inputs: a tensor or a tuple of positional tensors.

    Returns:
        A :class:`Captured` with the graph and the method that produced it ("fx" or "export").

    Raises:
        InputError: the model cannot run on ``example_inputs``.
        CaptureError: neither symbolic tracing nor torch.export can capture the model; the message names
            the construct each one stopped at.

    Example:
        >>> cap = capture(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 4))
        >>> cap.method
        'fx'
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    expected = run_reference(work, inputs)

    try:
        gm = fx.symbolic_trace(work)
        if _outputs_match(run_reference(gm, inputs), expected):
            return Captured(gm, "fx")
        fx_failure = "symbolic_trace produced a graph whose outputs differ from the model's"
    except InputError as exc:
        fx_failure = f"the traced graph fails on the example inputs: {exc}"
    except Exception as exc:  # symbolic tracing raises many exception types
        fx_failure = f"{type(exc).__name__}: {_first_line(exc)}"
    log.info("torch.fx.symbolic_trace failed (%s); falling back to torch.export", fx_failure)

    try:
        gm = _export_module(work, inputs)
    except Exception as exc:
        raise CaptureError(
            f"cannot capture {type(model).__name__}: torch.fx.symbolic_trace failed ({fx_failure}) and "
            f"torch.export failed ({type(exc).__name__}: {_first_line(exc)}). Make the data-dependent Python "
            "control flow named above tensor-shaped (e.g. torch.where / torch.cond), or pass a submodule that traces."
        ) from exc
    return Captured(gm, "export", fx_failure)
