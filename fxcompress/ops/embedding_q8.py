"""``embedding_q8``: row lookup in an int8 table with one scale per row, exported as ``Gather + Cast + Mul``."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.ops.registry import register_op


@torch.library.custom_op("fxcompress::embedding_q8", mutates_args=())
def embedding_q8(indices: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """Row lookup in an int8 table with one scale per row; only the gathered rows are dequantized.

    Example:
        >>> table = torch.tensor([[127, -127], [64, 0]], dtype=torch.int8)
        >>> torch.ops.fxcompress.embedding_q8(torch.tensor([1, 0]), table, torch.tensor([0.5, 0.25]))
        tensor([[ 16.,   0.],
                [ 63.5000, -63.5000]])
    """
    return qweight[indices].to(torch.float32) * scale[indices].unsqueeze(-1)


@embedding_q8.register_fake
def _(indices, qweight, scale):
    return scale.new_empty(*indices.shape, qweight.shape[1])


def _count_inputs(ctx, inputs, output) -> None:
    ctx.inputs = len(inputs)


def _lookup_backward(ctx, grad):  # indices have no gradient, and the table's codes and scales stay frozen
    return (None,) * ctx.inputs


embedding_q8.register_autograd(_lookup_backward, setup_context=_count_inputs)


def gather_int8(indices, qweight, scale):
    rows = op.Cast(op.Gather(qweight, indices, axis=0), to=onnx.TensorProto.FLOAT)
    row_scale = op.Unsqueeze(op.Gather(scale, indices, axis=0), op.Constant(value_ints=[-1]))
    return op.Mul(rows, row_scale)


register_op(torch.ops.fxcompress.embedding_q8.default, {"gather": gather_int8}, default="gather")
