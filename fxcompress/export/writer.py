"""Write a captured/compressed GraphModule as ONNX with the dynamo exporter and fxcompress's op translations.

The file is written atomically: the output directory is probed before the (slow) export, the model goes to a
temporary file beside the target, is checked with ``onnx.checker``, then renamed into place. A failure at any
step leaves no file behind.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import onnx
import torch
from torch import fx

from fxcompress.errors import ExportError
from fxcompress.export.lowering import lower_for_target
from fxcompress.export.targets import Target, get_target
from fxcompress.graph.inputs import DynamicAxes, batch_of_two, first_line, input_axes
from fxcompress.ops.onnx_contrib import ONNX_OPSET
from fxcompress.ops.registry import compressed_ops

log = logging.getLogger(__name__)
META_PREFIX = "fxcompress."


def _probe_writable(path: Path) -> None:
    parent = path.parent
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if not parent.is_dir():
        raise ExportError(
            f"cannot write {path}: directory {parent} does not exist (or is not a directory); create it first"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".fxc-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}; choose a writable location") from exc


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    target: Union[str, Target] = "cpu",
    metadata: Optional[dict[str, Any]] = None,
    dynamic_axes: DynamicAxes = (0,),
) -> Path:
    """Export ``module`` to ONNX at ``path`` and return the path.

    Args:
        module: a GraphModule made by :func:`fxcompress.optimize` (or any exportable module).
        example_inputs: positional inputs used for tracing.
        path: the ``.onnx`` file to write (its directory must exist).
        target: an export target or its name (:mod:`fxcompress.export.targets`: ``"cpu"``, ``"cpu-vnni"``,
            ``"cpu-nbits"``, ``"cpu-weightonly"``, ``"cuda"``); picks the ONNX lowering of compressed sites.
        metadata: stored as ``fxcompress.<key>`` metadata_props (JSON values); ``fxcompress.check`` reads them.
        dynamic_axes: the input axes left symbolic in the ONNX graph (named ``batch`` for axis 0, ``<input>_dim<k>``
            otherwise), as axis numbers for every input or one tuple per input; ``()`` fixes every shape. A module
            captured by torch.export takes only the axes it was captured with (``optimize(..., dynamic_axes=)``).
            Axes the model fixes are exported fixed, with a warning.

    Example:
        >>> export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),), "linear.onnx")
        PosixPath('linear.onnx')
    """
    path = Path(path)
    target = get_target(target)
    _probe_writable(path)
    module = lower_for_target(module, target) if isinstance(module, fx.GraphModule) else module
    inputs = tuple(example_inputs)
    proto = _export_proto(module, inputs, target, input_axes(inputs, dynamic_axes))
    meta = dict(metadata or {})
    meta.update(target=target.name)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph failed onnx.checker: {exc}") from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def translation_table(target: Target) -> dict[object, Callable]:
    """The onnxscript translation of every compressed op, as ``target`` writes it.

    Example:
        >>> table = translation_table(get_target("cpu"))
        >>> table[torch.ops.fxcompress.linear_q8.default].__name__
        'dynamic_quantize_matmul'
    """
    return {op.overload: op.translation(target.variant(name)) for name, op in compressed_ops().items()}


def _export_proto(
    module: torch.nn.Module, inputs: tuple, target: Target, axes: list[tuple[int, ...]]
) -> onnx.ModelProto:
    # The exporter logs a warning per missing torchvision op and per deprecation on every call: noise to a user.
    # onnxscript's constant folder also logs each sub-graph it declines to fold (harmless).
    for name in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export_proto_inner(module, inputs, target, axes)


def _export_proto_inner(
    module: torch.nn.Module, inputs: tuple, target: Target, axes: list[tuple[int, ...]]
) -> onnx.ModelProto:
    kwargs = dict(
        dynamo=True,
        custom_translation_table=translation_table(target),
        opset_version=ONNX_OPSET,
        optimize=True,
        verbose=False,
    )
    # what was asked, then the batch axis alone, then fixed shapes: a model that fixes a size is exported fixed there
    # rather than not at all
    batch_only = [tuple(a for a in x if a == 0) for x in axes]
    attempts = [x for x in (axes, batch_only) if any(x)]
    if len(attempts) == 2 and attempts[0] == attempts[1]:
        attempts.pop()
    for wanted in attempts:
        batch = torch.export.Dim("batch")  # one symbol: every input's batch is the same
        # other axes are named per input: one name on two inputs would tell ONNX consumers they are equal (export
        # still merges the symbols of axes the graph ties together, e.g. token ids and their attention mask)
        shapes = tuple(
            {a: batch if a == 0 else f"{name}_dim{a}" for a in x} or None
            for name, x in zip(_input_names(module, len(inputs)), wanted)
        )
        try:
            return torch.onnx.export(module, batch_of_two(inputs, wanted), dynamic_shapes=shapes, **kwargs).model_proto
        except Exception as exc:
            log.warning(
                "export with dynamic axes %s failed (%s); %s",
                _describe_axes(wanted),
                _root_cause(exc),
                "trying the batch axis alone" if wanted is not attempts[-1] else "exporting with fixed shapes",
            )
    try:
        return torch.onnx.export(module, inputs, **kwargs).model_proto
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _input_names(module: torch.nn.Module, count: int) -> list[str]:
    """The names of the module's first ``count`` positional inputs (its placeholders, else its signature)."""
    if isinstance(module, fx.GraphModule):
        names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    else:
        params = inspect.signature(module.forward).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = names[:count]
    return names + [f"input{i}" for i in range(len(names), count)]


def _describe_axes(axes: list[tuple[int, ...]]) -> str:
    return ", ".join(f"input {i}: {x}" for i, x in enumerate(axes) if x)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first line: torch.onnx wraps torch.export's reason (e.g. a constraint violation
    naming the fixed size) in a generic "Failed to export" message."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)[:300]


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``fxcompress.*`` metadata of an exported model, JSON-decoded.

    Example:
        >>> read_metadata(onnx.load("model.onnx"))["target"]
        'cpu'
    """
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX) :]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(META_PREFIX) :]] = p.value
    return out
