"""Capture a model as an fx GraphModule: torch.fx.symbolic_trace first, torch.export as the fallback.

Both paths give a GraphModule whose compressible layers are found by :mod:`fxcompress.graph.sites`, so passes never
care which capture ran. The user's module tree is copied first (fx shares submodules with the traced model), but not
its weights: a model half the size of memory can be compressed. Passes therefore replace tensors and never edit one in
place, and :func:`fxcompress.optimize` gives the compressed module its own copy of whatever it still shares at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.errors import CaptureError, InputError
from fxcompress.graph.edit import finalize, shared_copy
from fxcompress.graph.inputs import (
    DynamicAxes,
    batch_of_two,
    first_line,
    input_axes,
    normalize_inputs,
    output_tensors,
    run_reference,
)
from fxcompress.graph.residency import WeightPager

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """A captured graph plus how it was obtained."""

    graph_module: fx.GraphModule
    method: str  # "fx" or "export"
    fx_failure: str | None = None  # why symbolic_trace was not used, when method == "export"
    dynamic_axes: list[tuple[int, ...]] | None = None  # per input, the axes that may change size


def _outputs_match(a: Any, b: Any) -> bool:
    flat_a, _ = torch.utils._pytree.tree_flatten(a)
    flat_b, _ = torch.utils._pytree.tree_flatten(b)
    if len(flat_a) != len(flat_b):
        return False
    return all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(flat_a, flat_b)
    )


# torch.nn modules that symbolic_trace treats as leaves although they hold what would be sites (MultiheadAttention's
# packed in-projection, TransformerEncoderLayer's Linears, an LSTM's weight matrices)
_SITE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def opaque_leaves(gm: fx.GraphModule) -> dict[str, str]:
    """The ``call_module`` nodes of ``gm`` whose module is not a site but holds site-like weights (a Linear / Conv /
    Embedding inside, or a weight matrix of its own): name -> module type.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.MultiheadAttention(8, 2)))
        >>> opaque_leaves(gm)
        {'0': 'MultiheadAttention'}
    """
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, _SITE_MODULES):
            continue
        inner = any(isinstance(m, _SITE_MODULES) for m in mod.modules())
        matrices = any(p.dim() >= 2 for _, p in mod.named_parameters(recurse=False))
        if inner or matrices:
            found[str(node.target)] = type(mod).__name__
    return found


def _export_module(model: nn.Module, inputs: tuple, axes: DynamicAxes = (0,)) -> fx.GraphModule:
    """torch.export with symbolic ``axes`` where the model allows them (Dim.AUTO never fails on one: it specializes
    instead, and the captured module then accepts only the example's size there)."""
    traced = batch_of_two(inputs, axes)
    per_input = input_axes(traced, axes)
    for i, (t, a) in enumerate(zip(traced, per_input)):
        ones = [axis for axis in a if axis and t.shape[axis] == 1]
        if ones:
            raise InputError(
                f"input {i} has size 1 on dynamic axes {ones}: torch.export treats sizes 0 and 1 as constants; "
                "give example inputs with a size of 2 or more there"
            )
    shapes = tuple({axis: torch.export.Dim.AUTO for axis in a} or None for a in per_input)
    program = torch.export.export(model, traced, dynamic_shapes=shapes, strict=False)
    # a module that says its graph holds for sizes 0 and 1 too (a KV-cache decoder: a one-token step, an empty cache)
    # is captured without the guards that pin every symbolic size to the traced range of 2 or more
    return program.module(check_guards=not getattr(model, "sizes_0_and_1_are_general", False))


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
    work = shared_copy(model).eval()  # the structure is copied, the weights shared (see graph.edit.shared_copy)
    pager = WeightPager(work)  # file-mapped weights: about one layer resident during the reference run
    with pager.layer_by_layer(work):
        expected = run_reference(work, inputs)
    if not output_tensors(expected):
        raise InputError(
            f"{type(model).__name__} returns no tensor (got {type(expected).__name__}): there is nothing to compare "
            "or export; return the model's outputs from forward"
        )

    traced = None
    try:
        gm = fx.symbolic_trace(work)
        with pager.layer_by_layer(gm):
            matches = _outputs_match(run_reference(gm, inputs), expected)
        if matches:
            hidden = opaque_leaves(gm)
            if not hidden:
                return Captured(finalize(gm), "fx", dynamic_axes=axes)
            traced = gm  # kept if torch.export cannot see inside either; its sites then say what stays float
            fx_failure = (
                "symbolic_trace keeps "
                + ", ".join(f"{name} ({kind})" for name, kind in hidden.items())
                + (" opaque, with the weights inside")
            )
        else:
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
        if traced is not None:
            log.warning("%s, and torch.export failed (%s): their weights stay float", fx_failure, first_line(exc))
            return Captured(finalize(traced), "fx", fx_failure, axes)
        raise CaptureError(
            f"cannot capture {type(model).__name__}: torch.fx.symbolic_trace failed ({fx_failure}) and "
            f"torch.export failed ({type(exc).__name__}: {first_line(exc)}). Make the data-dependent Python "
            "control flow named above tensor-shaped (e.g. torch.where / torch.cond), or pass a submodule that traces."
        ) from exc
    # computations nothing returns (e.g. a Hugging Face encoder's pooler under a model that returns token states) are
    # dropped here, so that no pass spends calibration or bytes on layers the outputs do not depend on
    return Captured(finalize(views_as_reshapes(gm)), "export", fx_failure, axes)


def views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``aten.view`` into ``aten.reshape`` and ``aten.contiguous`` into a copy (the same values either way).

    Whether a view is legal, and whether ``contiguous()`` copies, depends on strides, and the ONNX exporter's
    decompositions lay tensors out differently from the kernels torch.export traced: T5's attention output failed
    there ("Cannot view a tensor with shape ... and strides ...") with no pass applied. Export graphs are functional,
    so no later write can observe the difference.

    Example:
        >>> class Merge(nn.Module):
        ...     def forward(self, x):
        ...         return x.transpose(1, 2).contiguous().view(2, 12)
        >>> gm = torch.export.export(Merge(), (torch.randn(2, 3, 4),)).module()
        >>> [str(n.target) for n in views_as_reshapes(gm).graph.nodes if n.op == "call_function"]
        ['aten.transpose.int', 'aten.clone.default', 'aten.reshape.default']
    """
    aten = torch.ops.aten
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
        elif node.op == "call_function" and node.target is aten.contiguous.default and len(node.args) == 1:
            node.target = aten.clone.default  # a real copy: contiguous() decides by strides the exporter's differ on
            node.kwargs = {"memory_format": torch.contiguous_format}
    gm.recompile()
    return gm
