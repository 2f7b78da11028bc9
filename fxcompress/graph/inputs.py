"""Example inputs as the model takes them: normalized, run, compared, and which of their axes may change size."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import nn

from fxcompress.errors import InputError

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
    """Run ``model`` on copies of ``inputs`` without gradients (a model that edits its input in place must not
    change the caller's tensors, nor what the next run sees); wrap failures in an InputError that says what to fix.

    Example:
        >>> run_reference(model, (torch.randn(4, 64),)).shape
        torch.Size([4, 10])
    """
    try:
        with torch.no_grad():
            return model(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception as exc:  # the user's forward can raise anything
        shapes = ", ".join(
            f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"
            if isinstance(t, torch.Tensor)
            else type(t).__name__
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
        >>> first_line(ValueError("bad shape\\nat layer fc1")), first_line(KeyError())
        ('bad shape', 'KeyError')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        raise InputError(
            f"dynamic_axes must be axis numbers, e.g. (0, 1) for batch and sequence, or one tuple of axes per "
            f"input, e.g. [(0, 1), (0,)]; got {dynamic_axes!r}"
        )
    if per_input and len(axes) != len(inputs):
        raise InputError(
            f"dynamic_axes gives axes for {len(axes)} inputs but the model takes {len(inputs)}; "
            "give one tuple per input, or plain axis numbers for every input"
        )
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
    return tuple(
        t.repeat(2, *([1] * (t.dim() - 1))) if 0 in a and t.shape[0] == 1 else t
        for t, a in zip(inputs, input_axes(inputs, axes))
    )
