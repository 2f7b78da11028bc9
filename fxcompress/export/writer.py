"""Write a captured/compressed GraphModule as ONNX with the dynamo exporter and fxcompress's op translations.

The file is written atomically: the output directory is probed before the (slow) export, the model goes to a
scratch folder beside the target, is checked with ``onnx.checker``, then moved into place. A failure at any step
leaves no file behind. Models whose weights pass :data:`EXTERNAL_DATA_BYTES` keep them in ONNX external data.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import onnx
import torch
from torch import fx

from fxcompress.errors import ExportError
from fxcompress.export.lowering import lower_for_target
from fxcompress.export.targets import AUTO, Target, auto_target, get_target
from fxcompress.graph.edit import state_bytes
from fxcompress.graph.inputs import DynamicAxes, batch_of_two, first_line, input_axes
from fxcompress.ops.onnx_contrib import ONNX_OPSET
from fxcompress.ops.registry import compressed_ops

log = logging.getLogger(__name__)
META_PREFIX = "fxcompress."


# Above this many initializer bytes the weights go to a ``<file>.data`` beside the model (ONNX external data), written
# one tensor at a time: one protobuf cannot exceed 2 GiB, and serializing a model whole holds ~3 copies of its weights
# in memory (measured: 1 GiB of weights, 4.4 GiB peak). Below it, one self-contained file.
EXTERNAL_DATA_BYTES = 512 << 20

AxisNames = dict[str, dict[int, str]]  # input name -> axis -> the symbol the ONNX file gives that axis


def _destination(path: Path) -> Path:
    """Where the file really goes: the target of a symbolic link (writing beside the link would replace it)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


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
    target: Union[str, Target] = "auto",
    metadata: Optional[dict[str, Any]] = None,
    dynamic_axes: DynamicAxes = (0,),
    external_data: Optional[bool] = None,
    output_names: Optional[Sequence[str]] = None,
    axis_names: Optional[AxisNames] = None,
) -> Path:
    """Export ``module`` to ONNX at ``path`` and return the path.

    Args:
        module: a GraphModule made by :func:`fxcompress.optimize` (or any exportable module).
        example_inputs: positional inputs used for tracing.
        path: the ``.onnx`` file to write (its directory must exist; a symbolic link is written through).
        target: an export target or its name (:mod:`fxcompress.export.targets`: ``"cpu"``, ``"cpu-vnni"``,
            ``"cpu-nbits"``, ``"cpu-weightonly"``, ``"cuda"``); picks the ONNX lowering of compressed sites. ``"auto"``
            (the default) picks one for this machine and records why in the metadata.
        metadata: stored as ``fxcompress.<key>`` metadata_props (JSON values); ``fxcompress.check`` reads them.
        dynamic_axes: the input axes left symbolic in the ONNX graph (named ``batch`` for axis 0, ``<input>_dim<k>``
            otherwise), as axis numbers for every input or one tuple per input; ``()`` fixes every shape. A module
            captured by torch.export takes only the axes it was captured with (``optimize(..., dynamic_axes=)``).
            Axes the model fixes are exported fixed, with a warning.
        external_data: write the weights to ``<path>.data`` beside the model (ONNX external data); default: when they
            exceed :data:`EXTERNAL_DATA_BYTES` (a protobuf cannot hold 2 GiB). ONNX Runtime reads the pair as one.
        output_names: names for the ONNX outputs, in order (default: the exporter's node names).
        axis_names: ``{input name: {axis: symbol}}`` for symbolic axes; one symbol on several inputs says their
            sizes are equal (e.g. every layer's cache length).

    The file appears whole or not at all (written in a scratch folder beside it, checked by ``onnx.checker``, then
    moved into place), with the permissions the umask gives new files.

    Example:
        >>> export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),), "linear.onnx")
        PosixPath('linear.onnx')
        >>> export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),), "big.onnx", external_data=True)
        PosixPath('big.onnx')
        >>> sorted(p.name for p in Path(".").glob("big.onnx*"))
        ['big.onnx', 'big.onnx.data']
    """
    path = Path(path)
    destination = _destination(path)
    choice = auto_target()[1] if target == AUTO else ""
    target = get_target(target)
    _probe_writable(destination)
    module = lower_for_target(module, target) if isinstance(module, fx.GraphModule) else module
    _check_space(destination, state_bytes(module))
    inputs = tuple(example_inputs)
    program = _export_program(module, inputs, target, input_axes(inputs, dynamic_axes), axis_names or {})
    if not program.model.graph.outputs:
        raise ExportError(f"{type(module).__name__} returns no tensor: the ONNX graph would have no output")
    if output_names is not None:
        _name_outputs(program.model, list(output_names))
    meta = dict(metadata or {})
    meta.update(target=target.name, **({"target_choice": choice} if choice else {}))
    for key, value in meta.items():
        program.model.metadata_props[META_PREFIX + key] = json.dumps(value)
    if external_data is None:
        external_data = _initializer_bytes(program.model) > EXTERNAL_DATA_BYTES
    _write(program.model, destination, external_data)
    del program, module
    gc.collect()  # the lowered copy's re-encoded weights sit in fx's reference cycles: free them now
    return path


def _check_space(destination: Path, weight_bytes: int) -> None:
    """Refuse, before the export runs, a disk that cannot hold the weights (the scratch copy is written beside the
    destination, so it needs the room too)."""
    free = shutil.disk_usage(destination.parent).free
    if weight_bytes > free:
        raise ExportError(
            f"cannot write {destination}: the model's weights need {weight_bytes / 2**30:.2f} GiB and "
            f"{destination.parent} has {free / 2**30:.2f} GiB free; free space or choose another disk"
        )


def _name_outputs(model: Any, names: list[str]) -> None:
    outputs = model.graph.outputs
    if len(names) != len(outputs):
        raise ExportError(f"{len(names)} output names given for a graph with {len(outputs)} outputs")
    for value, name in zip(outputs, names):
        value.name = name


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _write(model: Any, destination: Path, external_data: bool) -> None:
    """Write the IR ``model`` (and its ``.data`` file) in a scratch folder beside ``destination``, check it, then move
    it into place: a failure leaves nothing behind, and readers never see half a file."""
    import onnx_ir as ir

    data_name = destination.name + ".data"
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.TemporaryDirectory(prefix=f".{destination.name}.", dir=destination.parent) as scratch:
        written = Path(scratch, destination.name)
        if external_data:
            # one tensor in flight at a time: onnx_ir's default (1 GiB across workers) holds serialized copies of
            # several large tensors at once, which on a 1 GiB model tripled the exporter's peak memory
            ir.save(model, written, external_data=data_name, max_workers=1, max_in_flight_bytes=1)
        else:
            ir.save(model, written)
        try:
            onnx.checker.check_model(str(written))  # by path: the check reads external data as ORT will
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported graph failed onnx.checker: {first_line(exc)}") from exc
        for f in Path(scratch).iterdir():
            f.chmod(0o666 & ~umask)
        if external_data:
            os.replace(Path(scratch, data_name), destination.parent / data_name)
        os.replace(written, destination)


def translation_table(target: Target) -> dict[object, Callable]:
    """The onnxscript translation of every compressed op, as ``target`` writes it.

    Example:
        >>> table = translation_table(get_target("cpu"))
        >>> table[torch.ops.fxcompress.linear_q8.default].__name__
        'dynamic_quantize_matmul'
    """
    return {op.overload: op.translation(target.variant(name)) for name, op in compressed_ops().items()}


def _keeps_codes(node: Any) -> Optional[bool]:
    """Constant folding's veto: a Cast of quantized codes stays in the file (the CPU targets' Conv lowering), where
    ONNX Runtime expands it when the session loads; folded at export, the file would hold the float weights. So does
    a Transpose of codes (a head reading its tied embedding's table): folded, the file would hold the table twice."""
    if node.op_type in ("Cast", "Transpose") and node.inputs and node.inputs[0] is not None:
        value = node.inputs[0].const_value
        if value is not None and str(value.dtype).lower().replace("dtype.", "") in ("int8", "uint8", "int4", "uint4"):
            return False
    return None


def _optimized(program: Any) -> Any:
    """torch.onnx.export's own optimization (onnxscript's optimizer), with :func:`_keeps_codes`'s veto."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(program.model, should_fold=_keeps_codes)
    return program


def _export_program(
    module: torch.nn.Module, inputs: tuple, target: Target, axes: list[tuple[int, ...]], axis_names: AxisNames
) -> Any:
    # The exporter logs a warning per missing torchvision op and per deprecation on every call: noise to a user.
    # onnxscript's constant folder also logs each sub-graph it declines to fold (harmless).
    for name in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _export_program_inner(module, inputs, target, axes, axis_names)


def _export_program_inner(
    module: torch.nn.Module, inputs: tuple, target: Target, axes: list[tuple[int, ...]], axis_names: AxisNames
) -> Any:
    kwargs = dict(
        dynamo=True,
        custom_translation_table=translation_table(target),
        opset_version=ONNX_OPSET,
        optimize=False,  # optimized below: constant folding must leave quantized weights quantized
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
            {a: batch if a == 0 else axis_names.get(name, {}).get(a, f"{name}_dim{a}") for a in x} or None
            for name, x in zip(_input_names(module, len(inputs)), wanted)
        )
        try:
            return _optimized(torch.onnx.export(module, batch_of_two(inputs, wanted), dynamic_shapes=shapes, **kwargs))
        except Exception as exc:
            log.warning(
                "export with dynamic axes %s failed (%s); %s",
                _describe_axes(wanted),
                _root_cause(exc),
                "trying the batch axis alone" if wanted is not attempts[-1] else "exporting with fixed shapes",
            )
    try:
        return _optimized(torch.onnx.export(module, inputs, **kwargs))
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
