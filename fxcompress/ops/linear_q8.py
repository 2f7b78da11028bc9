"""``linear_q8``: a Linear over a per-output-channel int8 weight.

Translations (an export target picks one, :mod:`fxcompress.export.targets`):

* ``dynamic``: ``com.microsoft.DynamicQuantizeMatMul``: activations quantized to uint8 per tensor at run time, an
  integer GEMM. Measured on ORT's CPU EP about 3x faster than fp32 at batch 1, where ``DequantizeLinear + MatMul`` ran
  3.6x slower and grew the arena by the dequantized weights.
* ``qdq``: ``DequantizeLinear + MatMul``: standard ONNX, weight-only numerics, runs on every execution provider
  (ORT's CPU EP fuses the pair into ``MatMulNBits`` at accuracy_level 4 unless told otherwise).

The weight's encoding (uint8 with zero point 128, signed int8, or MatMulNBits) is chosen by the target's lowering
(:mod:`fxcompress.export.lowering`) before translation.
"""

from __future__ import annotations

from typing import Optional

import torch
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.ops.onnx_contrib import MSFT
from fxcompress.ops.packing import bias_grad, dequantize, output_slices
from fxcompress.ops.registry import register_op


@torch.library.custom_op("fxcompress::linear_q8", mutates_args=())
def linear_q8(
    x: Tensor, qweight: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """y = x @ dequant(qweight) + bias, with qweight laid out [in_features, out_features] and one scale per column.

    Example:
        >>> q = torch.tensor([[127, 0], [0, -127]], dtype=torch.int8)
        >>> torch.ops.fxcompress.linear_q8(torch.ones(1, 2), q, torch.tensor([0.5, 1.0]), None, None)
        tensor([[  63.5000, -127.0000]])
    """
    parts = [
        x
        @ dequantize(qweight[:, cols], scale[cols], None if zero_point is None else zero_point[cols], axis=1).to(
            x.dtype
        )
        for cols in output_slices(qweight.shape[1], qweight.shape[0])
    ]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y + bias if bias is not None else y


@linear_q8.register_fake
def _(x, qweight, scale, zero_point, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


# Distillation after quantization trains the float weights around the frozen codes: the gradient reaches the
# activation and the bias, straight through the dequantized weight; codes, scales and zero points get none. (The torch
# op computes with float activations: DynamicQuantizeMatMul's 8-bit rounding of activations is not trained against.)
def _setup(ctx, inputs, output) -> None:
    x, qweight, scale, zero_point, bias = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    qweight, scale, zero_point = ctx.saved_tensors
    w = dequantize(qweight, scale, zero_point, axis=1).to(grad.dtype)
    return grad @ w.t(), None, None, None, bias_grad(grad, ctx.has_bias, -1)


linear_q8.register_autograd(_backward, setup_context=_setup)


def dynamic_quantize_matmul(x, qweight, scale, zero_point=None, bias=None):
    return MSFT.DynamicQuantizeMatMul(x, qweight, scale, zero_point, bias)


def dequantize_matmul(x, qweight, scale, zero_point=None, bias=None):
    w = op.DequantizeLinear(qweight, scale, zero_point, axis=1)
    y = op.MatMul(x, w)
    return op.Add(y, bias) if bias is not None else y


register_op(
    torch.ops.fxcompress.linear_q8.default,
    {"dynamic": dynamic_quantize_matmul, "qdq": dequantize_matmul},
    default="qdq",
)
