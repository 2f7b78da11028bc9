"""The compressed ops: each ``torch.ops.fxcompress.*`` op with its ONNX translations, looked up by name.

A compressed op lives in one module of this package with everything it needs: the torch reference implementation
(so the compressed module runs and is checked in torch), its fake (shape) function, its gradient (for distillation)
and its onnxscript translations. It registers itself here with :func:`register_op`, naming each translation variant
(e.g. ``linear_q8``: ``dynamic`` -> ``DynamicQuantizeMatMul``, ``qdq`` -> ``DequantizeLinear + MatMul``). An export
target picks a variant per op by name; an op a target does not mention exports with its ``default`` variant, so a new
op needs no change anywhere else. Modules of this package are found and imported automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx


@dataclass(frozen=True)
class CompressedOp:
    """One ``torch.ops.fxcompress`` op: its overload and its ONNX translations by variant name."""

    name: str
    overload: Any
    translations: dict[str, Callable] = field(repr=False)
    default: str

    def translation(self, variant: Optional[str] = None) -> Callable:
        """The onnxscript translation of ``variant`` (default: the op's own default).

        Example:
            >>> compressed_ops()["linear_q8"].translation("dynamic").__name__
            'dynamic_quantize_matmul'
        """
        return self.translations[variant or self.default]


_OPS: dict[str, CompressedOp] = {}


def register_op(overload: Any, translations: dict[str, Callable], default: str) -> CompressedOp:
    """Declare ``overload`` (``torch.ops.fxcompress.<name>.default``) and its translations by variant name.

    Example:
        >>> from fxcompress.ops.embedding_q8 import gather_int8
        >>> register_op(torch.ops.fxcompress.embedding_q8.default, {"gather": gather_int8}, default="gather").name
        'embedding_q8'
    """
    if default not in translations:
        raise ValueError(f"default translation {default!r} is not among {sorted(translations)}")
    name = overload._schema.name.split("::")[1]
    _OPS[name] = CompressedOp(name, overload, dict(translations), default)
    return _OPS[name]


def compressed_ops() -> dict[str, CompressedOp]:
    """Every compressed op by name (importing this package's modules registers them).

    Example:
        >>> sorted(compressed_ops())[:3]
        ['activation_qdq', 'attention', 'conv_q8']
    """
    import fxcompress.ops as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"fxcompress.ops.{info.name}")
    return dict(_OPS)


def all_custom_ops() -> list[Any]:
    """Every op overload in the ``fxcompress`` torch library namespace, registered or not (a test checks that each
    one is registered with translations).

    Example:
        >>> torch.ops.fxcompress.linear_q8.default in all_custom_ops()
        True
    """
    compressed_ops()
    names = sorted(
        {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fxcompress::")}
    )
    return [getattr(torch.ops.fxcompress, name).default for name in names]


def op_name(node: fx.Node) -> Optional[str]:
    """The compressed op ``node`` calls (``"linear_q8"``), or None for any other node.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> [op_name(n) for n in cm.module.graph.nodes if n.op == "call_function"]
        ['linear_q8', 'linear_q8']
    """
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "fxcompress":
        return None
    return node.target._schema.name.split("::")[1]


def _argument_names(node: fx.Node) -> list[str]:
    return [a.name for a in node.target._schema.arguments]


def op_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a compressed-op node by their schema names (positional and keyword alike).

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> node = next(n for n in cm.module.graph.nodes if op_name(n) == "linear_q8")
        >>> sorted(op_args(node)), op_args(node)["zero_point"] is None
        (['bias', 'qweight', 'scale', 'x', 'zero_point'], True)
    """
    names = _argument_names(node)
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    for arg in node.target._schema.arguments:
        if arg.name not in values and arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def set_op_args(node: fx.Node, **values: Any) -> None:
    """Set arguments of a compressed-op node by schema name, wherever (positional or keyword) they were given.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int8")
        >>> node = next(n for n in cm.module.graph.nodes if op_name(n) == "linear_q8")
        >>> set_op_args(node, bias=None)
        >>> op_args(node)["bias"] is None
        True
    """
    names = _argument_names(node)
    unknown = set(values) - set(names)
    if unknown:
        raise KeyError(f"{node.target} has no argument(s) {sorted(unknown)}; it takes {names}")
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for key, value in values.items():
        index = names.index(key)
        if index < len(args):
            args[index] = value
        else:
            kwargs[key] = value
    node.args, node.kwargs = tuple(args), kwargs
