"""Write a captured/compressed GraphModule as ONNX with the dynamo exporter and fxcompress's op translations.

The file is written atomically: the output directory is probed before the (slow) export, the model goes to a
temporary file beside the target, is checked with ``onnx.checker``, then renamed into place. A failure at any
step leaves no file behind.
"""

from __future__ import annotations

import copy
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
from fxcompress.errors import ExportError

log = logging.getLogger(__name__)
META_PREFIX = "fxcompress."


def prepare_for_target(gm: fx.GraphModule, target: str) -> fx.GraphModule:
    """A copy of ``gm`` whose quantized buffers use the encoding ``target``'s kernels want.

    For ``cpu`` the int8 Linear weights become uint8 with zero point 128 (exact: q + 128), the U8U8 encoding
    that DynamicQuantizeMatMul runs without int16 saturation on CPUs lacking VNNI.
    """
    if target not in ops.TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {ops.TARGETS}")
    gm = copy.deepcopy(gm)
    if target != "cpu":
        return gm
    converted: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.fxcompress.linear_q8.default or node.args[3] is not None:
            continue
        qnode = node.args[1]
        name = str(qnode.target)
        if name not in converted:
            q = getattr(gm, name)
            setattr(gm, name, (q.to(torch.int16) + 128).to(torch.uint8))
            zp_name = f"{name}_zero_point"
            gm.register_buffer(zp_name, torch.full((q.shape[1],), 128, dtype=torch.uint8))
            with gm.graph.inserting_after(qnode):
                converted[name] = gm.graph.get_attr(zp_name)
        args = list(node.args)
        args[3] = converted[name]
        node.args = tuple(args)
    gm.recompile()
    return gm


def _batched(inputs: tuple) -> tuple:
    """torch.export specializes size-1 dims, so trace a batch of at least 2 to keep the batch axis symbolic."""
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t for t in inputs)


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
        target: ``"cpu"`` or ``"cuda"``; picks the ONNX lowering of compressed sites (see :mod:`fxcompress.ops`).
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
    module = prepare_for_target(module, target) if isinstance(module, fx.GraphModule) else module
    inputs = _batched(tuple(example_inputs)) if dynamic_batch else tuple(example_inputs)
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
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
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
