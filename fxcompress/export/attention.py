"""Fuse a captured encoder's attention into one ``fxcompress.attention`` op (``MultiHeadAttention`` in the file).

torch.export keeps ``scaled_dot_product_attention`` whole, between the reshapes that split Q, K and V into heads and
the ones that merge them back. The ONNX exporter spells that out as ~15 nodes per layer, a pattern ONNX Runtime's
graph optimizer does not recognise, and at batch 1 those small nodes cost about as much as the layer's GEMMs save
when they are int8 (MiniLM: 42% of the int8 graph's kernel time). This rewrite matches

    reshape(x, [B, S, N, H]) -> transpose(1, 2)      for each of Q, K, V (x: B x S x N*H)
    -> scaled_dot_product_attention(q, k, v, mask)  no dropout, not causal, no GQA; mask None or bool (B|1, 1, S, T)
    -> [a reshape that keeps the shape] -> transpose(1, 2) -> reshape to (B, S, N*H)

and replaces it with ``attention(x_q, x_k, x_v, mask, H, scale)`` (H as a literal in the split). Anything else (a KV
cache concatenated in, rotary embeddings between the split and the attention, a per-head mask) is left as it is, and
so are graphs from ``symbolic_trace``: they carry no shapes to check the pattern against (transformers models are
captured by torch.export).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import fx

import fxcompress.ops.attention  # noqa: F401  (registers the op)

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_NO_OPS = (aten.clone.default, aten.contiguous.default, aten.alias.default)


def fuse_attention(gm: fx.GraphModule) -> int:
    """Rewrite every matching attention of ``gm`` in place; return how many.

    Example:
        >>> class SelfAttention(nn.Module):
        ...     def forward(self, x):
        ...         b, s, _ = x.shape
        ...         q, k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in (x, 2 * x, 3 * x))
        ...         return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16)
        >>> captured = torch.export.export(SelfAttention(), (torch.randn(1, 5, 16),)).module()
        >>> fuse_attention(captured), captured(torch.ones(1, 5, 16)).shape
        (1, torch.Size([1, 5, 16]))
    """
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _SDPA:
            fused += _fuse(gm, node)
    if fused:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return fused


def _fuse(gm: fx.GraphModule, sdpa: fx.Node) -> bool:
    query, key, value, mask, dropout, causal, scale, gqa = _sdpa_args(sdpa)
    if dropout or causal or gqa:
        return False
    sources = [_merged_heads(t) for t in (query, key, value)]
    merge = _merge_of(sdpa)
    if any(s is None for s in sources) or merge is None or not _mask_fits(mask, query, key):
        return False
    # The head size as the model's code writes it: a pass that prunes whole heads changes the head count and the widths
    # but not the shapes recorded on the graph, which the op therefore does not take.
    head_size = _literal_head_size(query)
    if head_size is None:
        return False
    scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)
    with gm.graph.inserting_before(merge):
        fused = gm.graph.call_function(torch.ops.fxcompress.attention.default, (*sources, mask, head_size, scale))
    fused.meta.update({k: v for k, v in merge.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
    merge.replace_all_uses_with(fused)
    _erase_unused(gm, merge)
    return True


def _erase_unused(gm: fx.GraphModule, last: fx.Node) -> None:
    """Erase ``last`` and what fed only it, back to the heads' split. (``eliminate_dead_code`` keeps an unused
    ``scaled_dot_product_attention``: its dropout makes torch count it as impure.)"""
    pending = [last]
    while pending:
        node = pending.pop()
        if node.users or node.op != "call_function" or node.target is torch.ops.fxcompress.attention.default:
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        pending += inputs


def _sdpa_args(node: fx.Node) -> tuple:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    values = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    return tuple(values[n] for n in names)


def _fake(node) -> Optional[torch.Tensor]:
    """The value torch.export recorded for ``node`` (None for constants and nodes without one)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node) -> tuple:
    val = _fake(node)
    return () if val is None else tuple(val.shape)


def _dtype(node) -> Optional[torch.dtype]:
    val = _fake(node)
    return None if val is None else val.dtype


def _same(a, b) -> bool:
    """Equal sizes, symbolic ones by name (no guard is added to the captured program)."""
    return str(a) == str(b)


def _is_transpose_1_2(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target is aten.transpose.int
        and {d % 4 for d in node.args[1:3]} == {1, 2}
        and len(_shape(node)) == 4
    )


def _merged_heads(heads: fx.Node) -> Optional[fx.Node]:
    """``x`` (B, S, N*H) when ``heads`` is ``reshape(x, [B, S, N, H]).transpose(1, 2)``, else None."""
    if not _is_transpose_1_2(heads):
        return None
    split = heads.args[0]
    if not (isinstance(split, fx.Node) and split.target in _RESHAPES):
        return None
    source = split.args[0]
    whole = _shape(source)
    if len(_shape(split)) != 4:
        return None
    b, s, n, h = _shape(split)
    if len(whole) != 3 or _dtype(source) != torch.float32:
        return None
    if not (_same(whole[0], b) and _same(whole[1], s) and isinstance(n, int) and isinstance(h, int)):
        return None
    return source if whole[2] == n * h else None


def _literal_head_size(heads: fx.Node) -> Optional[int]:
    """H when the split is ``reshape(x, [..., H])`` with H a literal that matches the recorded shape."""
    target = heads.args[0].args[1] if len(heads.args[0].args) > 1 else None
    size = target[-1] if isinstance(target, (list, tuple)) and target else None
    return size if isinstance(size, int) and size > 0 and size == _shape(heads)[3] else None


def _merge_of(sdpa: fx.Node) -> Optional[fx.Node]:
    """The node giving (B, S, N*H) back from the attention's (B, N, S, H) output, or None if the output is used any
    other way."""
    node = sdpa
    while True:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        keeps_shape = user.target in _RESHAPES and [str(d) for d in _shape(user)] == [str(d) for d in _shape(node)]
        if user.target in _NO_OPS or keeps_shape:
            node = user
            continue
        break
    if not _is_transpose_1_2(user) or len(user.users) != 1:
        return None
    merge = next(iter(user.users))
    b, s, n, h = _shape(user)
    out = _shape(merge)
    if merge.target not in _RESHAPES or len(out) != 3 or not (_same(out[0], b) and _same(out[1], s)):
        return None
    return merge if out[2] == n * h else None


def _mask_fits(mask, query: fx.Node, key: fx.Node) -> bool:
    """No mask, or a boolean one the op's single bias covers: (B or 1, 1, S, T)."""
    if mask is None:
        return True
    if _dtype(mask) != torch.bool:
        return False
    shape, (b, _, s, _), t = _shape(mask), _shape(query), _shape(key)[2]
    return (
        len(shape) == 4
        and (shape[0] == 1 or _same(shape[0], b))
        and shape[1] == 1
        and _same(shape[2], s)
        and _same(shape[3], t)
    )
