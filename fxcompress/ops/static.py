"""Static int8 ops: activations quantized with calibrated scales, for ORT's QDQ -> QLinearConv / QLinearMatMul fusion.

Each op fake-quantizes its input (uint8, per tensor), runs the layer on per-channel int8 weights and fake-quantizes
its output, exactly what the exported ``QuantizeLinear -> DequantizeLinear`` pairs compute. ORT's CPU EP matches
``DQ(x), DQ(w), DQ(bias int32) -> Conv -> Q`` and replaces it by one ``QLinearConv`` (``MatMul`` by
``QLinearMatMul``), so the model runs in integer arithmetic between the pairs.

Weights are symmetric int8 from the pass; the CPU targets' lowerings re-encode them as uint8 with zero point 128
(``w_zero_point``), because ORT's U8S8 kernels saturate int16 accumulators on AVX2 CPUs without VNNI: measured on the
digits CNN, int8 weights gave max |ORT - torch| = 3.0 on the logits and -0.33 pp accuracy, uint8 weights 0.0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.ops.conv_q8 import conv_output_shape
from fxcompress.ops.packing import dequantize
from fxcompress.ops.registry import register_op

QMIN, QMAX = 0, 255  # uint8 activations


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """QuantizeLinear then DequantizeLinear to uint8 (round half to even, as ONNX does).

    Example:
        >>> fake_quant(torch.tensor([0.25, 0.75]), torch.tensor(0.5), torch.tensor(0, dtype=torch.uint8)).tolist()
        [0.0, 1.0]
    """
    zp = zero_point.to(torch.float32)
    return (torch.clamp(torch.round(x / scale) + zp, QMIN, QMAX) - zp) * scale


def _qdq(x, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


# --- Conv --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxcompress::conv_qdq", mutates_args=())
def conv_qdq(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero_point: Optional[Tensor],
    qbias: Optional[Tensor],
    y_scale: Tensor,
    y_zero_point: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """Conv1d/2d with uint8 input/output and per-channel 8-bit weights; ``qbias`` int32 at scale x_scale * w_scale.

    Example:
        >>> y = torch.ops.fxcompress.conv_qdq(x, xs, xz, q, ws, None, qbias, ys, yz, [1, 1], [0, 0], [1, 1], 1)
    """
    conv = F.conv1d if qweight.dim() == 3 else F.conv2d
    w = dequantize(qweight, w_scale, w_zero_point, axis=0)
    bias = qbias.to(torch.float32) * x_scale * w_scale if qbias is not None else None
    y = conv(fake_quant(x, x_scale, x_zero_point), w, bias, stride, padding, dilation, groups)
    return fake_quant(y, y_scale, y_zero_point)


@conv_qdq.register_fake
def _(
    x,
    x_scale,
    x_zero_point,
    qweight,
    w_scale,
    w_zero_point,
    qbias,
    y_scale,
    y_zero_point,
    stride,
    padding,
    dilation,
    groups,
):
    return x.new_empty(*conv_output_shape(x, qweight, stride, padding, dilation))


def qdq_conv(
    x,
    x_scale,
    x_zero_point,
    qweight,
    w_scale,
    w_zero_point=None,
    qbias=None,
    y_scale=None,
    y_zero_point=None,
    stride=(1,),
    padding=(0,),
    dilation=(1,),
    groups=1,
):
    w = op.DequantizeLinear(qweight, w_scale, w_zero_point, axis=0)
    bias = op.DequantizeLinear(qbias, op.Mul(x_scale, w_scale), axis=0) if qbias is not None else None
    y = op.Conv(
        _qdq(x, x_scale, x_zero_point),
        w,
        bias,
        strides=list(stride),
        pads=list(padding) + list(padding),
        dilations=list(dilation),
        group=groups,
    )
    return _qdq(y, y_scale, y_zero_point)


# --- Linear ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxcompress::linear_qdq", mutates_args=())
def linear_qdq(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    w_zero_point: Optional[Tensor],
    bias: Optional[Tensor],
    y_scale: Tensor,
    y_zero_point: Tensor,
) -> Tensor:
    """x @ W with uint8 input, int8 per-column weights ([K, N]) and a uint8 product; the float bias is added after
    the product's quantization (the ``QLinearMatMul`` output), so the bias itself loses nothing.

    Example:
        >>> y = torch.ops.fxcompress.linear_qdq(x, xs, xz, q, ws, None, bias, ys, yz)
    """
    y = fake_quant(x, x_scale, x_zero_point) @ dequantize(qweight, w_scale, w_zero_point, axis=1)
    y = fake_quant(y, y_scale, y_zero_point)
    return y + bias if bias is not None else y


@linear_qdq.register_fake
def _(x, x_scale, x_zero_point, qweight, w_scale, w_zero_point, bias, y_scale, y_zero_point):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


def qdq_matmul(
    x, x_scale, x_zero_point, qweight, w_scale, w_zero_point=None, bias=None, y_scale=None, y_zero_point=None
):
    y = op.MatMul(_qdq(x, x_scale, x_zero_point), op.DequantizeLinear(qweight, w_scale, w_zero_point, axis=1))
    y = _qdq(y, y_scale, y_zero_point)
    return op.Add(y, bias) if bias is not None else y


# --- Activations -------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxcompress::activation_qdq", mutates_args=())
def activation_qdq(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """An activation rounded to uint8 at a calibrated scale: placed around a residual Add, so that ORT sees
    ``DQ, DQ -> Add -> Q`` and runs it as ``QLinearAdd`` between two integer convolutions.

    Example:
        >>> torch.ops.fxcompress.activation_qdq(torch.tensor([0.25, 0.75]), torch.tensor(0.5),
        ...                                     torch.tensor(0, dtype=torch.uint8)).tolist()
        [0.0, 1.0]
    """
    return fake_quant(x, scale, zero_point)


@activation_qdq.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


def qdq_activation(x, scale, zero_point):
    return _qdq(x, scale, zero_point)


register_op(torch.ops.fxcompress.activation_qdq.default, {"qdq": qdq_activation}, default="qdq")
register_op(torch.ops.fxcompress.conv_qdq.default, {"qdq": qdq_conv}, default="qdq")
register_op(torch.ops.fxcompress.linear_qdq.default, {"qdq": qdq_matmul}, default="qdq")
