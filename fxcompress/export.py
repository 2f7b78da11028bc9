"""Write a captured/compressed GraphModule as ONNX with the dynamo exporter and fxcompress's op translations.

The file is written atomically: the output directory is probed before the (slow) export, the model goes to a
temporary file beside the target, is checked with ``onnx.checker``, then renamed into place. A failure at any
step leaves no file behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import onnx
import torch
from torch import fx

from fxcompress import ops
from fxcompress.capture import batch_of_two
from fxcompress.errors import ExportError
from fxcompress.lowering import lower_for_target

log = logging.getLogger(__name__)
META_PREFIX = "fxcompress."


def _probe_writable(path: Path) -> None:
    parent = path.parent
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist (or is not a directory); create it first")
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
    target: str = "cpu",
    metadata: Optional[dict[str, Any]] = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``module`` to ONNX at ``path`` and return the path.

    Args:
        module: a GraphModule made by :func:`fxcompress.optimize` (or any exportable module).
        example_inputs: positional inputs used for tracing.
        path: the ``.onnx`` file to write (its directory must exist).
        target: ``"cpu"``, ``"cpu-nbits"`` or ``"cuda"``; picks the ONNX lowering of compressed sites
            (see :mod:`fxcompress.lowering`).
        metadata: stored as ``fxcompress.<key>`` metadata_props (JSON values); ``fxcompress.check`` reads them.
        dynamic_batch: make axis 0 of every input symbolic.

    Example:
        >>> export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),), "linear.onnx")
        PosixPath('linear.onnx')
    """
    path = Path(path)
    _probe_writable(path)
    if target not in ops.TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {ops.TARGETS}")
    module = lower_for_target(module, target) if isinstance(module, fx.GraphModule) else module
    inputs = batch_of_two(tuple(example_inputs)) if dynamic_batch else tuple(example_inputs)
    proto = _export_proto(module, inputs, target, dynamic_batch)
    meta = dict(metadata or {})
    meta.update(target=target)
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


def _export_proto(module: torch.nn.Module, inputs: tuple, target: str, dynamic_batch: bool) -> onnx.ModelProto:
    # The exporter logs a warning per missing torchvision op and per deprecation on every call: noise to a user.
    # onnxscript's constant folder also logs each sub-graph it declines to fold (harmless).
    for name in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export_proto_inner(module, inputs, target, dynamic_batch)


def _export_proto_inner(module: torch.nn.Module, inputs: tuple, target: str, dynamic_batch: bool) -> onnx.ModelProto:
    kwargs = dict(dynamo=True, custom_translation_table=ops.translation_table(target), opset_version=ops.ONNX_OPSET,
                  optimize=True, verbose=False)
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
        try:
            return torch.onnx.export(module, inputs, dynamic_shapes=shapes, **kwargs).model_proto
        except Exception as exc:  # a model that fixes its batch size: export static rather than not at all
            log.warning("dynamic batch export failed (%s); exporting with the example batch size fixed", str(exc).splitlines()[0][:200])
    try:
        return torch.onnx.export(module, inputs, **kwargs).model_proto
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``fxcompress.*`` metadata of an exported model, JSON-decoded."""
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(META_PREFIX):]] = p.value
    return out
