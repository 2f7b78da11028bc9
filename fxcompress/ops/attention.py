"""``attention``: multi-head scaled dot-product attention over (batch, sequence, heads x head size) tensors.

The export lowering (:mod:`fxcompress.export.attention`) puts it where a captured encoder splits Q/K/V into heads,
calls ``scaled_dot_product_attention`` and merges the heads back. Exported as-is that is ~15 ONNX nodes per layer
(Reshape/Transpose per head split, the mask's NaN guard, two MatMuls, Softmax) which ONNX Runtime's graph optimizer
does not fuse for graphs from torch.export. Translation:

* ``mha``: one ``com.microsoft.MultiHeadAttention``, the boolean mask turned into an additive bias. A query row whose
  keys are all masked gets zeros, as the exported ``scaled_dot_product_attention`` gives (its NaN guard), not the
  mean of the values the softmax of an all-masked row would give.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.errors import ExportError
from fxcompress.ops.onnx_contrib import MSFT
from fxcompress.ops.registry import register_op


@torch.library.custom_op("fxcompress::attention", mutates_args=())
def attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], head_size: int, scale: float
) -> Tensor:
    """Attention of ``query`` (B, S, N*H) over ``key``/``value`` (B, T, N*H) in heads of ``head_size`` H, ``mask``
    True where a query may attend (broadcast to (B, N, S, T)); the heads merged back: (B, S, N*Hv).

    The op takes the head size, not the head count: pruning whole heads changes N and leaves H, and a graph's recorded
    shapes are not updated by a pass that changes its weights; N is read from the tensors themselves.

    Example:
        >>> q = torch.randn(1, 3, 8)
        >>> y = torch.ops.fxcompress.attention(q, q, q, None, 4, 0.5)
        >>> heads = q.view(1, 3, 2, 4).transpose(1, 2)
        >>> reference = F.scaled_dot_product_attention(heads, heads, heads, scale=0.5).transpose(1, 2).reshape(1, 3, 8)
        >>> y.shape, torch.allclose(y, reference)
        (torch.Size([1, 3, 8]), True)
    """

    num_heads = query.shape[2] // head_size

    def heads(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], num_heads, t.shape[2] // num_heads).transpose(1, 2)

    y = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=mask, scale=scale)
    if mask is not None:  # all keys masked: zeros (torch would give NaN here, its ONNX export zeros)
        y = y.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return y.transpose(1, 2).reshape(query.shape[0], query.shape[1], value.shape[2])


@attention.register_fake
def _(query, key, value, mask, head_size, scale):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


def multi_head_attention(query, key, value, mask=None, head_size: int = 1, scale: float = 1.0):
    hidden = query.shape[-1] if query.shape is not None else None  # the exporter's shapes: traced from the weights
    if not isinstance(hidden, int) or hidden % head_size:
        raise ExportError(
            f"attention: query width {hidden} is not a whole number of {head_size}-wide heads; export with a target "
            "that leaves attention unfused (dataclasses.replace(target, fuse_attention=False))"
        )
    num_heads = hidden // head_size
    if mask is None:
        return MSFT.MultiHeadAttention(query, key, value, num_heads=num_heads, scale=scale)
    # The lowering only fuses boolean masks shaped (B or 1, 1, S, T): one bias for every head.
    bias = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=torch.finfo(torch.float32).min))
    y = MSFT.MultiHeadAttention(query, key, value, None, None, bias, num_heads=num_heads, scale=scale)
    attends = op.ReduceMax(op.Cast(mask, to=1), op.Constant(value_ints=[1, 3]), keepdims=0)  # (B or 1, S)
    return op.Mul(y, op.Unsqueeze(attends, op.Constant(value_ints=[-1])))


register_op(torch.ops.fxcompress.attention.default, {"mha": multi_head_attention}, default="mha")
