"""Capture a model as an fx GraphModule: torch.fx.symbolic_trace first, torch.export as the fallback.

Both paths give a GraphModule whose compressible layers are found by :mod:`fxcompress.sites`, so passes never
care which capture ran. The user's model is deep-copied first: fx shares submodules with the traced model,
and a pass that edits a weight in place must never reach the caller's module.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence, Union

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
    dynamic_axes: list[tuple[int, ...]] | None = None  # per input, the axes that may change size


# the axes of every input that may change size between calls, or one tuple of axes per input
DynamicAxes = Union[Sequence[int], Sequence[Sequence[int]]]


def normalize_inputs(example_inputs: Any) -> tuple:
    """Accept a tensor or a tuple/list of tensors and return a tuple.

    Example:
        >>> normalize_inputs(torch.randn(2, 3))[0].shape
        torch.Size([2, 3])
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
    )


def run_reference(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """Run ``model`` on ``inputs`` without gradients; wrap failures in an InputError that says what to fix.

    Example:
        >>> outputs = run_reference(model, (torch.randn(4, 64),))
    """
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
            f"{first_line(exc)}. Pass inputs with the shapes and dtypes the model's forward expects."
        ) from exc


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a model's (possibly nested: tuple, list, dict, ModelOutput) outputs, in flattening order.

    Example:
        >>> [t.shape for t in output_tensors({"logits": torch.zeros(2, 3), "n": 1})]
        [torch.Size([2, 3])]
    """
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty).

    Example:
        >>> first_line(ValueError("bad shape\nat layer fc1")), first_line(KeyError())
        ('bad shape', 'KeyError')
    """
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


def input_axes(inputs: tuple, dynamic_axes: DynamicAxes) -> list[tuple[int, ...]]:
    """Per input, the non-negative axes to keep symbolic. ``dynamic_axes`` is either axis numbers, applied to every
    tensor input that has them, or one sequence of axes per input.

    Example:
        >>> input_axes((torch.zeros(2, 8), torch.zeros(2, 8, 4)), (0, 2))
        [(0,), (0, 2)]
        >>> input_axes((torch.zeros(2, 8), torch.zeros(2, 3)), [(0, 1), (0,)])
        [(0, 1), (0,)]
    """
    axes = list(dynamic_axes)
    per_input = bool(axes) and all(isinstance(a, (tuple, list)) for a in axes)
    if not per_input and not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise InputError(f"dynamic_axes must be axis numbers, e.g. (0, 1) for batch and sequence, or one tuple of axes per "
                         f"input, e.g. [(0, 1), (0,)]; got {dynamic_axes!r}")
    if per_input and len(axes) != len(inputs):
        raise InputError(f"dynamic_axes gives axes for {len(axes)} inputs but the model takes {len(inputs)}; "
                         "give one tuple per input, or plain axis numbers for every input")
    out = []
    for i, t in enumerate(inputs):
        rank = t.dim() if isinstance(t, torch.Tensor) else 0
        wanted = axes[i] if per_input else axes
        if per_input:
            bad = [a for a in wanted if not isinstance(a, int) or not -rank <= a < rank]
            if bad:
                raise InputError(f"dynamic_axes for input {i} ({rank} dims) names axes {bad} it does not have")
        out.append(tuple(sorted({a % rank for a in wanted if -rank <= a < rank})) if rank else ())
    return out


def batch_of_two(inputs: tuple, axes: DynamicAxes = (0,)) -> tuple:
    """torch.export specializes sizes 0 and 1, so trace a batch of at least 2 to keep the batch axis symbolic
    (inputs whose axis 0 is not in ``axes`` are left alone).

    Example:
        >>> batch_of_two((torch.randn(1, 8),))[0].shape
        torch.Size([2, 8])
    """
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) if 0 in a and t.shape[0] == 1 else t
                 for t, a in zip(inputs, input_axes(inputs, axes)))


def _export_module(model: nn.Module, inputs: tuple, axes: DynamicAxes = (0,)) -> fx.GraphModule:
    """torch.export with symbolic ``axes`` where the model allows them (Dim.AUTO never fails on one: it specializes
    instead, and the captured module then accepts only the example's size there)."""
    traced = batch_of_two(inputs, axes)
    per_input = input_axes(traced, axes)
    for i, (t, a) in enumerate(zip(traced, per_input)):
        ones = [axis for axis in a if axis and t.shape[axis] == 1]
        if ones:
            raise InputError(f"input {i} has size 1 on dynamic axes {ones}: torch.export treats sizes 0 and 1 as constants; "
                             "give example inputs with a size of 2 or more there")
    shapes = tuple({axis: torch.export.Dim.AUTO for axis in a} or None for a in per_input)
    return torch.export.export(model, traced, dynamic_shapes=shapes, strict=False).module()


def capture(model: nn.Module, example_inputs: Any, dynamic_axes: DynamicAxes = (0,)) -> Captured:
    """Capture ``model`` into a GraphModule that computes what it computes on ``example_inputs``.

    Args:
        model: the module to capture; it is deep-copied and put in eval mode, never modified.
        example_inputs: a tensor or a tuple of positional tensors.
        dynamic_axes: the axes that may change size between calls (default: the batch axis), as axis numbers for
            every input or one tuple per input. symbolic_trace graphs take any size anyway; torch.export keeps
            these axes symbolic where the model allows it (e.g. ``(0, 1)``: batch and sequence length).

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
    axes = input_axes(inputs, dynamic_axes)  # a malformed spec fails here, whichever capture runs
    work = copy.deepcopy(model).eval()
    expected = run_reference(work, inputs)

    try:
        gm = fx.symbolic_trace(work)
        if _outputs_match(run_reference(gm, inputs), expected):
            return Captured(gm, "fx", dynamic_axes=axes)
        fx_failure = "symbolic_trace produced a graph whose outputs differ from the model's"
    except InputError as exc:
        fx_failure = f"the traced graph fails on the example inputs: {exc}"
    except Exception as exc:  # symbolic tracing raises many exception types
        fx_failure = f"{type(exc).__name__}: {first_line(exc)}"
    log.info("torch.fx.symbolic_trace failed (%s); falling back to torch.export", fx_failure)

    try:
        gm = _export_module(work, inputs, axes)
    except InputError:
        raise
    except Exception as exc:
        raise CaptureError(
            f"cannot capture {type(model).__name__}: torch.fx.symbolic_trace failed ({fx_failure}) and "
            f"torch.export failed ({type(exc).__name__}: {first_line(exc)}). Make the data-dependent Python "
            "control flow named above tensor-shaped (e.g. torch.where / torch.cond), or pass a submodule that traces."
        ) from exc
    return Captured(gm, "export", fx_failure, axes)
