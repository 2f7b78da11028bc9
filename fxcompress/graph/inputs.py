"""Example inputs as the model takes them: normalized, run, compared, and which of their axes may change size."""

from __future__ import annotations

import copy
import functools
import keyword
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fxcompress.errors import InputError

# the axes of every input that may change size between calls, or one tuple of axes per input
DynamicAxes = Union[Sequence[int], Sequence[Sequence[int]]]


def normalize_inputs(example_inputs: Any, names: Optional[Sequence[str]] = None) -> tuple:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs (as the model is called, e.g.
    ``{"input_ids": ..., "attention_mask": ...}``) and return a tuple; a dict's values come in the order of ``names``
    (default: the dict's own), so that every batch of a calibration set lines up with the example's.

    Example:
        >>> normalize_inputs(torch.randn(2, 3))[0].shape
        torch.Size([2, 3])
        >>> [t.shape for t in normalize_inputs({"b": torch.zeros(1), "a": torch.zeros(2)}, names=("a", "b"))]
        [torch.Size([2]), torch.Size([1])]
    """
    if isinstance(example_inputs, Mapping):
        given = tuple(example_inputs)
        wanted = tuple(names) if names is not None else given
        if set(given) != set(wanted) or not given:
            raise InputError(
                f"keyword inputs {list(given)} do not match the example's {list(wanted)}: give every batch the same "
                "keywords as the example inputs"
                if given
                else "example_inputs is an empty dict: give the keyword inputs the model's forward takes"
            )
        return tuple(example_inputs[k] for k in wanted)
    if names is not None:
        raise InputError(
            f"the example inputs are keywords {list(names)} but a batch is {type(example_inputs).__name__}: give "
            "every batch as a dict with those keywords"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise InputError(
        "example_inputs must be a tensor, a non-empty tuple of positional inputs or a dict of keyword inputs, got "
        f"{type(example_inputs).__name__}"
    )


def keyword_names(example_inputs: Any) -> Optional[tuple[str, ...]]:
    """The keywords of inputs given as a dict (None for positional ones), checked to be names a forward can take.

    Example:
        >>> keyword_names({"input_ids": torch.zeros(1, 4, dtype=torch.long)}), keyword_names(torch.zeros(1))
        (('input_ids',), None)
    """
    if not isinstance(example_inputs, Mapping):
        return None
    bad = [k for k in example_inputs if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k)]
    if bad:
        raise InputError(f"keyword inputs must be Python identifiers (forward's parameter names), got {bad}")
    return tuple(example_inputs)


@functools.lru_cache(maxsize=None)
def _positional_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose forward takes ``names`` positionally and calls ``cls.forward`` with them as
    keywords. Generated as source so that torch.fx and torch.export (which read the code's argument names) name the
    graph inputs, and so the ONNX inputs, after them."""
    params = ", ".join(names)
    source = f"def forward(self, {params}):\n    return _forward(self, {', '.join(f'{n}={n}' for n in names)})\n"
    scope: dict[str, Any] = {"_forward": cls.forward}
    exec(compile(source, f"<fxcompress keyword call of {cls.__name__}>", "exec"), scope)
    return type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})


def called_positionally(model: nn.Module, names: Optional[Sequence[str]]) -> nn.Module:
    """``model`` as a module taking ``names`` positionally (itself when ``names`` is None): a shallow copy, so the
    user's module is untouched while its layers, and their names, are the same objects.

    Example:
        >>> class Scaled(nn.Module):
        ...     def forward(self, x, scale=1.0):
        ...         return x * scale
        >>> called_positionally(Scaled(), ("scale", "x"))(torch.tensor(3.0), torch.tensor(2.0))
        tensor(6.)
    """
    if names is None:
        return model
    twin = copy.copy(model)  # shares _modules/_parameters dicts: only the class of the copy changes below
    twin.__class__ = _positional_class(type(model), tuple(names))
    return twin


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
