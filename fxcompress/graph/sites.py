"""Compressible sites: every Linear / Conv1d / Conv2d / Embedding in a captured graph, in one uniform shape.

A weight reaches an fx graph in several ways: a ``call_module`` on ``nn.Linear`` (symbolic_trace), a
``call_function`` on ``F.linear`` with a ``get_attr`` weight (symbolic_trace of functional code), or
``aten.linear.default`` / ``aten.conv2d.default`` / ``aten.embedding.default`` (torch.export). :func:`find_sites`
turns all of them into :class:`Site` records, so a pass reads ``site.weight`` and calls :func:`replace_site`
without knowing which form it came from. Nodes that look like a site but cannot be rewritten come back as
:class:`Skipped` with the reason, because a pass must never skip silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

SiteKind = Literal["linear", "conv1d", "conv2d", "embedding"]
aten = torch.ops.aten


@dataclass
class Site:
    """One compressible layer in the graph.

    ``input`` is the activation (or the indices for an embedding); ``weight_key`` identifies the weight's storage,
    so sites that share (tie) a weight can share its compressed form.
    """

    node: fx.Node
    kind: SiteKind
    name: str
    input_at: tuple[int, str]  # (position, keyword) of the activation/indices argument of ``node``
    weight: Tensor
    bias: Optional[Tensor]
    weight_key: tuple
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation, groups (conv only)
    # The model stores the weight [in, out] and computes addmm(bias, x, W) (transformers' Conv1D in GPT-2):
    # ``weight`` is its [out, in] view, and writes go through graph.edit.set_site_weight, which transposes back.
    transposed: bool = False

    @property
    def input(self) -> Any:
        """The activation argument, read from the node now: earlier rewrites may have replaced its producer."""
        index, name = self.input_at
        return _arg(self.node, index, name)

    @property
    def weight_bytes(self) -> int:
        return nbytes(self.weight, self.bias)


@dataclass
class Skipped:
    """A node that is a Linear/Conv/Embedding but cannot be rewritten, and why."""

    node: fx.Node
    kind: str
    name: str
    reason: str


_MODULE_KINDS: dict[type, SiteKind] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
}
_LINEAR_FNS = {F.linear, torch._C._nn.linear, aten.linear.default}
_CONV_FNS = {F.conv1d: "conv1d", F.conv2d: "conv2d", aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d"}
_EMBEDDING_FNS = {F.embedding, aten.embedding.default}


def nbytes(*tensors: Optional[Tensor]) -> int:
    """Storage bytes of the given tensors; None counts as 0 (an absent bias).

    Example:
        >>> nbytes(torch.zeros(4, dtype=torch.int8), None)
        4
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def stored_tensor(gm: fx.GraphModule, node: Any) -> Optional[Tensor]:
    """The tensor behind a get_attr node, or None when the argument is computed at run time.

    Example:
        >>> class Functional(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(2, 3))
        ...     def forward(self, x):
        ...         return F.linear(x, self.weight)
        >>> g = fx.symbolic_trace(Functional())
        >>> linear = next(n for n in g.graph.nodes if n.op == "call_function")
        >>> stored_tensor(g, linear.args[1]).shape, stored_tensor(g, linear.args[0])
        (torch.Size([2, 3]), None)
    """
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, Tensor) else None
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tup(v: Any, n: int) -> list[int]:
    return list(v) * (n if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [int(v)] * n


def _name_of(node: fx.Node, weight_node: Any) -> str:
    if isinstance(weight_node, fx.Node) and weight_node.op == "get_attr":
        target = str(weight_node.target)
        return target[: -len(".weight")] if target.endswith(".weight") else target
    return node.name


def _from_module(gm: fx.GraphModule, node: fx.Node) -> Union[Site, Skipped, None]:
    mod = gm.get_submodule(str(node.target))
    kind = _MODULE_KINDS.get(type(mod))
    if kind is None:
        return _opaque(node, mod)
    name = str(node.target)
    if kind in ("conv1d", "conv2d"):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return Skipped(
                node, kind, name, f"padding={mod.padding!r}, padding_mode={mod.padding_mode!r} not supported"
            )
        conv = dict(stride=list(mod.stride), padding=list(mod.padding), dilation=list(mod.dilation), groups=mod.groups)
    else:
        conv = {}
    if kind == "embedding" and mod.max_norm is not None:
        return Skipped(node, kind, name, "max_norm renormalizes the table in place at run time")
    w = mod.weight.detach()
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return Site(node, kind, name, (0, "input"), w, b, _key(w), conv)


def _opaque(node: fx.Node, mod: nn.Module) -> Optional[Skipped]:
    """A module the graph calls as one opaque op although it holds what would be sites: its weights stay float."""
    inner = [n for n, m in mod.named_modules() if n and type(m) in _MODULE_KINDS]
    matrices = [n for n, p in mod.named_parameters(recurse=False) if p.dim() >= 2]
    if not inner and not matrices:
        return None
    held = ", ".join((inner + matrices)[:4]) + (", ..." if len(inner) + len(matrices) > 4 else "")
    return Skipped(
        node,
        "opaque",
        str(node.target),
        f"{type(mod).__name__} is one opaque call in the captured graph "
        f"(torch.fx does not trace into it and torch.export could not capture the model): its weights "
        f"({held}) stay float",
    )


_RECURRENT = {aten.lstm.input: "LSTM", aten.gru.input: "GRU", aten.rnn_tanh.input: "RNN", aten.rnn_relu.input: "RNN"}


def _recurrent_weights(node: fx.Node, cell: str) -> list[Skipped]:
    """One record per weight matrix of an LSTM/GRU/RNN call (``aten.lstm(input, hx, params, ...)``), each named
    after the parameter the model holds, so that a user sees which bytes stay float and why."""
    params = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], (list, tuple)) else []
    matrices = [p for p in params if isinstance(p, fx.Node) and p.op == "get_attr" and "bias" not in str(p.target)]
    why = f"{cell} weights are not compressed (ONNX's {cell} op takes float weights): they stay float"
    if not matrices:
        return [Skipped(node, "recurrent", node.name, why)]
    return [Skipped(node, "recurrent", str(p.target), why) for p in matrices]


def _from_addmm(gm: fx.GraphModule, node: fx.Node) -> Optional[Site]:
    """``addmm(bias, x, W)`` with a stored [in, out] weight and bias: a Linear (GPT-2's Conv1D); any other addmm
    (scaled, or of two activations) is not a layer."""
    if len(node.args) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    b_node, x, w_node = node.args
    w, b = stored_tensor(gm, w_node), stored_tensor(gm, b_node)
    if w is None or b is None or not isinstance(x, fx.Node) or w.dim() != 2 or b.shape != (w.shape[1],):
        return None
    return Site(node, "linear", _name_of(node, w_node), (1, "mat1"), w.t(), b, _key(w), transposed=True)


def _from_function(gm: fx.GraphModule, node: fx.Node) -> Union[Site, Skipped, list[Skipped], None]:
    target = node.target
    if target in _RECURRENT:
        return _recurrent_weights(node, _RECURRENT[target])
    if target is aten.addmm.default or target is torch.addmm:
        return _from_addmm(gm, node)
    if target in _LINEAR_FNS:
        kind, x_at, w_node, b_node = "linear", (0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        conv: dict[str, Any] = {}
    elif target in _CONV_FNS:
        kind = _CONV_FNS[target]
        x_at, w_node, b_node = (0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        n = 1 if kind == "conv1d" else 2
        padding = _arg(node, 4, "padding", 0)
        if isinstance(padding, str):
            return Skipped(node, kind, _name_of(node, w_node), f"padding={padding!r} not supported")
        conv = dict(
            stride=_tup(_arg(node, 3, "stride", 1), n),
            padding=_tup(padding, n),
            dilation=_tup(_arg(node, 5, "dilation", 1), n),
            groups=int(_arg(node, 6, "groups", 1)),
        )
    elif target in _EMBEDDING_FNS:
        kind, conv = "embedding", {}
        if target is F.embedding:
            x_at, w_node = (0, "input"), _arg(node, 1, "weight")
            if _arg(node, 3, "max_norm") is not None:
                return Skipped(
                    node, kind, _name_of(node, w_node), "max_norm renormalizes the table in place at run time"
                )
        else:  # aten.embedding(weight, indices, ...)
            w_node, x_at = _arg(node, 0, "weight"), (1, "indices")
        b_node = None
    else:
        return None
    name = _name_of(node, w_node)
    w = stored_tensor(gm, w_node)
    if w is None:
        return Skipped(node, kind, name, "weight is computed at run time, not a stored parameter")
    b = stored_tensor(gm, b_node) if b_node is not None else None
    if b_node is not None and b is None:
        return Skipped(node, kind, name, "bias is computed at run time, not a stored parameter")
    return Site(node, kind, name, x_at, w, b, _key(w), conv)


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Skipped]]:
    """All compressible sites of ``gm`` in graph order, and the look-alikes that cannot be rewritten.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> [s.name for s in find_sites(gm)[0]]
        ['0', '2']
    """
    sites: list[Site] = []
    skipped: list[Skipped] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            found = _from_module(gm, node)
        elif node.op == "call_function":
            found = _from_function(gm, node)
        else:
            continue
        if isinstance(found, Site):
            if found.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                found = Skipped(
                    node,
                    found.kind,
                    found.name,
                    f"weight dtype {found.weight.dtype} is not float32, float16 "
                    "or bfloat16; cast the model with .float()",
                )
            elif not isinstance(found.input, fx.Node):
                found = Skipped(node, found.kind, found.name, "input is a constant, not a graph value")
        if isinstance(found, Site):
            sites.append(found)
        elif isinstance(found, Skipped):
            skipped.append(found)
        elif isinstance(found, list):
            skipped.extend(found)
    return sites, skipped


def single_reader(sites: list[Site]) -> list[Site]:
    """The sites whose weight no other selected site reads (GPTQ and the budget fit one reader's inputs).

    Example:
        >>> [s.name for s in single_reader(find_sites(gm)[0])]
        ['0', '2']
    """
    readers = Counter(s.weight_key for s in sites)
    return [s for s in sites if readers[s.weight_key] == 1]
