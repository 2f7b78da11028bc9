"""``conv_q8``: Conv1d/Conv2d over a per-output-channel int8 weight, exported as ``DequantizeLinear + Conv``."""

from __future__ import annotations

from typing import Optional

import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.ops.packing import bias_grad, dequantize
from fxcompress.ops.registry import register_op


@torch.library.custom_op("fxcompress::conv_q8", mutates_args=())
def conv_q8(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor],
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """Conv1d/Conv2d (chosen by weight rank) over a per-output-channel dequantized weight.

    Example:
        >>> q = torch.full((2, 1, 3, 3), 127, dtype=torch.int8)
        >>> torch.ops.fxcompress.conv_q8(torch.ones(1, 1, 3, 3), q, torch.tensor([1.0, 0.5]), None, None,
        ...                              [1, 1], [0, 0], [1, 1], 1).flatten()
        tensor([1143.0000,  571.5000])
    """
    conv = F.conv1d if qweight.dim() == 3 else F.conv2d
    w = dequantize(qweight, scale, zero_point, axis=0).to(x.dtype)
    return conv(x, w, bias, stride, padding, dilation, groups)


def conv_output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    """[batch, out channels, *spatial] of a convolution of ``x`` by ``weight``.

    Example:
        >>> conv_output_shape(torch.empty(2, 3, 8, 8), torch.empty(4, 3, 3, 3), [1, 1], [1, 1], [1, 1])
        [2, 4, 8, 8]
    """
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    return [x.shape[0], weight.shape[0], *spatial]


@conv_q8.register_fake
def _(x, qweight, scale, zero_point, bias, stride, padding, dilation, groups):
    return x.new_empty(*conv_output_shape(x, qweight, stride, padding, dilation))


def _setup(ctx, inputs, output) -> None:
    x, qweight, scale, zero_point, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.has_bias, ctx.x_shape, ctx.conv = bias is not None, x.shape, (stride, padding, dilation, groups)


def _backward(ctx, grad):  # straight through the dequantized weight to the input and the bias (see linear_q8)
    qweight, scale, zero_point = ctx.saved_tensors
    w = dequantize(qweight, scale, zero_point, axis=0).to(grad.dtype)
    conv_input = torch.nn.grad.conv1d_input if qweight.dim() == 3 else torch.nn.grad.conv2d_input
    grad_x = conv_input(ctx.x_shape, w, grad, *ctx.conv)
    return grad_x, None, None, None, bias_grad(grad, ctx.has_bias, 1), None, None, None, None


conv_q8.register_autograd(_backward, setup_context=_setup)


def dequantize_conv(x, qweight, scale, zero_point=None, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    w = op.DequantizeLinear(qweight, scale, zero_point, axis=0)
    pads = list(padding) + list(padding)  # ONNX wants all begins, then all ends
    return op.Conv(x, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


def dequantize_once_conv(
    x, qweight, scale, zero_point=None, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1
):
    # Cast + Mul of two initializers: ONNX Runtime folds them into one fp32 weight when the session loads, then
    # prepacks it for its fast float convolution kernels. DequantizeLinear is exempt from that folding (ORT keeps it
    # for QDQ fusion), so a DequantizeLinear + Conv dequantizes the weight on every call instead.
    shape = op.Constant(value_ints=[-1] + [1] * (len(stride) + 1))
    w = op.Mul(op.Cast(qweight, to=onnx.TensorProto.FLOAT), op.Reshape(scale, shape))
    pads = list(padding) + list(padding)
    return op.Conv(x, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


register_op(
    torch.ops.fxcompress.conv_q8.default,
    {"qdq": dequantize_conv, "dequantize_once": dequantize_once_conv},
    default="qdq",
)
