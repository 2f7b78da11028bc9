"""Custom torch ops that compressed sites are rewritten into, each beside its ONNX translation.

A compressed site becomes one opaque op (`torch.ops.fxcompress.*`) holding quantized tensors as buffers. The
op has a real torch implementation (so the compressed module runs and can be checked in torch) and, per
export target, an onnxscript translation that decides how ONNX Runtime executes it:

* ``cpu``: Linear -> ``com.microsoft.DynamicQuantizeMatMul`` (uint8 weights with zero point 128). Measured on the
  CPU EP about 3x faster than fp32 at batch 1, while ``DequantizeLinear + MatMul`` was 3.6x *slower* and grew the
  arena by the dequantized weights. uint8 (not int8) weights because the U8S8 kernel saturates its int16
  accumulators on AVX2 CPUs without VNNI; U8U8 does not.
* ``cpu-vnni``: as ``cpu`` with the int8 weights kept signed (U8S8): faster than U8U8 on CPUs with VNNI
  (measured on an AVX-512 VNNI EPYC, ORT 1.32: 2.0-2.3x for one MiniLM FFN matrix), where U8S8 does not saturate;
  on AVX2 without VNNI it would.
* ``cpu-nbits``: Linear -> ``com.microsoft.MatMulNBits`` (bits=8, accuracy_level=4): activations quantized per
  block of K instead of per tensor, so markedly more accurate on activation outliers and as fast at batch 1, but
  measured 2x slower than fp32 at batch 32 on an AVX2 CPU. Layers whose K is not a multiple of 16 keep the
  ``cpu`` lowering.
* ``cpu-weightonly``: Linear -> ``com.microsoft.MatMulNBits`` (bits=8) with accuracy_level=1, and every MatMulNBits
  (int4 too) at that level: activations stay fp32, so ORT computes what the torch module computes (weight-only
  quantization) at a speed cost. ``cuda``'s ``DequantizeLinear + MatMul`` is not that on CPU: ORT's CPU EP fuses it
  into MatMulNBits at its default accuracy_level 4.
* ``cuda``: Linear -> ``DequantizeLinear + MatMul`` (standard ONNX, runs on every EP; int8 stays int8 in the file and
  in the session, dequantized per call).

Conv and int8 Embedding use standard ops on every target: ``DequantizeLinear + Conv`` and ``Gather + Cast + Mul``;
blockwise int4 Linear and Embedding use ``com.microsoft.MatMulNBits`` and ``com.microsoft.GatherBlockQuantized``.
"""

from __future__ import annotations

from typing import Callable, Optional

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from torch import Tensor

TARGETS = ("cpu", "cpu-vnni", "cpu-nbits", "cpu-weightonly", "cuda")
ONNX_OPSET = 21
MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _dequantize(qweight: Tensor, scale: Tensor, zero_point: Optional[Tensor], axis: int) -> Tensor:
    shape = [1] * qweight.dim()
    shape[axis] = -1
    w = qweight.to(torch.float32)
    if zero_point is not None:
        w = w - zero_point.to(torch.float32).reshape(shape)
    return w * scale.reshape(shape)


# --- Linear ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxcompress::linear_q8", mutates_args=())
def linear_q8(x: Tensor, qweight: Tensor, scale: Tensor, zero_point: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """y = x @ dequant(qweight) + bias, with qweight laid out [in_features, out_features] and one scale per column.

    Example:
        >>> y = torch.ops.fxcompress.linear_q8(x, q.t().contiguous(), scale, None, bias)
    """
    y = x @ _dequantize(qweight, scale, zero_point, axis=1).to(x.dtype)
    return y + bias if bias is not None else y


@linear_q8.register_fake
def _(x, qweight, scale, zero_point, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


def _linear_q8_cpu(x, qweight, scale, zero_point=None, bias=None):
    return MSFT.DynamicQuantizeMatMul(x, qweight, scale, zero_point, bias)


def _linear_q8_qdq(x, qweight, scale, zero_point=None, bias=None):
    w = op.DequantizeLinear(qweight, scale, zero_point, axis=1)
    y = op.MatMul(x, w)
    return op.Add(y, bias) if bias is not None else y


# --- Linear as blockwise n-bit (com.microsoft.MatMulNBits) -------------------------------------------------------
def unpack_nbits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Unpack uint8 storage into ``count`` unsigned codes per row (two 4-bit codes per byte, low nibble first).

    Example:
        >>> unpack_nbits(torch.tensor([[33, 3]], dtype=torch.uint8), 4, 3)
        tensor([[1., 2., 3.]])
    """
    if bits == 8:
        codes = packed.reshape(packed.shape[0], -1)
    else:
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return codes[:, :count].to(torch.float32)


def pack_nbits(codes: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`unpack_nbits` for one row-major [rows, count] tensor of codes (odd counts padded).

    Example:
        >>> pack_nbits(torch.tensor([[1., 2., 3.]]), 4)
        tensor([[33,  3]], dtype=torch.uint8)
    """
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


@torch.library.custom_op("fxcompress::linear_nbits", mutates_args=())
def linear_nbits(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], bias: Optional[Tensor],
    k: int, n: int, bits: int, block_size: int,
) -> Tensor:
    """y = x @ W^T + bias, W [N, K] stored as MatMulNBits does.

    ``packed`` [N, K/block, block*bits/8] uint8 codes; ``scales`` [N * K/block]; ``zero_points`` [N, ceil(K/block *
    bits/8)] packed codes, or None for the symmetric default 2**(bits-1). W = (code - zero_point) * scale per block.

    Example:
        >>> y = torch.ops.fxcompress.linear_nbits(x, packed, scales, zero_points, bias, 64, 32, 4, 32)
    """
    y = x @ _nbits_weight(packed, scales, zero_points, k, n, bits, block_size).t().to(x.dtype)
    return y + bias if bias is not None else y


def _nbits_weight(packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, n: int, bits: int,
                  block_size: int) -> Tensor:
    """The float [N, K] weight that :func:`linear_nbits` stores."""
    blocks = k // block_size
    codes = unpack_nbits(packed.reshape(n, -1), bits, k).reshape(n, blocks, block_size)
    if zero_points is None:
        zp = torch.full((n, blocks, 1), float(1 << (bits - 1)))
    else:
        zp = unpack_nbits(zero_points, bits, blocks).reshape(n, blocks, 1)
    return ((codes - zp) * scales.reshape(n, blocks, 1)).reshape(n, k)


@linear_nbits.register_fake
def _(x, packed, scales, zero_points, bias, k, n, bits, block_size):
    return x.new_empty(*x.shape[:-1], n)


def _matmul_nbits(accuracy_level: int) -> Callable:
    """The MatMulNBits translation at ``accuracy_level``: 4 quantizes activations to int8 per block (the fast path
    measured on ORT's CPU EP), 1 keeps them fp32 (weight-only numerics, the ``cpu-weightonly`` target)."""

    def translate(x, packed, scales, zero_points=None, bias=None, k=0, n=0, bits=8, block_size=32):
        y = MSFT.MatMulNBits(x, packed, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                             accuracy_level=accuracy_level)
        return op.Add(y, bias) if bias is not None else y

    return translate


# --- Conv1d / Conv2d ---------------------------------------------------------------------------------------------
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
        >>> y = torch.ops.fxcompress.conv_q8(x, q, scale, None, bias, [1, 1], [1, 1], [1, 1], 1)
    """
    conv = F.conv1d if qweight.dim() == 3 else F.conv2d
    w = _dequantize(qweight, scale, zero_point, axis=0).to(x.dtype)
    return conv(x, w, bias, stride, padding, dilation, groups)


@conv_q8.register_fake
def _(x, qweight, scale, zero_point, bias, stride, padding, dilation, groups):
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], qweight.shape[2:], stride, padding, dilation)
    ]
    return x.new_empty(x.shape[0], qweight.shape[0], *spatial)


def _conv_q8(x, qweight, scale, zero_point=None, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    w = op.DequantizeLinear(qweight, scale, zero_point, axis=0)
    pads = list(padding) + list(padding)  # ONNX wants all begins, then all ends
    return op.Conv(x, w, bias, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)


# --- Embedding ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("fxcompress::embedding_q8", mutates_args=())
def embedding_q8(indices: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
    """Row lookup in an int8 table with one scale per row; only the gathered rows are dequantized.

    Example:
        >>> rows = torch.ops.fxcompress.embedding_q8(token_ids, q, scale)
    """
    return qweight[indices].to(torch.float32) * scale[indices].unsqueeze(-1)


@embedding_q8.register_fake
def _(indices, qweight, scale):
    return scale.new_empty(*indices.shape, qweight.shape[1])


def _embedding_q8(indices, qweight, scale):
    rows = op.Cast(op.Gather(qweight, indices, axis=0), to=onnx.TensorProto.FLOAT)
    row_scale = op.Unsqueeze(op.Gather(scale, indices, axis=0), op.Constant(value_ints=[-1]))
    return op.Mul(rows, row_scale)


@torch.library.custom_op("fxcompress::embedding_nbits", mutates_args=())
def embedding_nbits(indices: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor, bits: int, block_size: int) -> Tensor:
    """Row lookup in a blockwise n-bit table laid out as GatherBlockQuantized reads it.

    ``packed`` [rows, cols*bits/8] uint8 codes (low nibble first), ``scales`` [rows, cols/block], ``zero_points``
    [rows, ceil(cols/block*bits/8)] packed codes; row = (code - zero_point) * scale per block. Only gathered rows
    are unpacked.

    Example:
        >>> rows = torch.ops.fxcompress.embedding_nbits(token_ids, packed, scales, zero_points, 4, 64)
    """
    rows = packed[indices.reshape(-1)]
    cols = packed.shape[1] * 8 // bits
    blocks = scales.shape[1]
    codes = unpack_nbits(rows, bits, cols).reshape(-1, blocks, block_size)
    zp = unpack_nbits(zero_points[indices.reshape(-1)], bits, blocks).unsqueeze(-1)
    out = (codes - zp) * scales[indices.reshape(-1)].unsqueeze(-1)
    return out.reshape(*indices.shape, cols)


@embedding_nbits.register_fake
def _(indices, packed, scales, zero_points, bits, block_size):
    return scales.new_empty(*indices.shape, packed.shape[1] * 8 // bits)


def _embedding_nbits(indices, packed, scales, zero_points, bits=4, block_size=32):
    return MSFT.GatherBlockQuantized(packed, indices, scales, zero_points, gather_axis=0, quantize_axis=1,
                                     block_size=block_size, bits=bits)


# --- Gradients ---------------------------------------------------------------------------------------------------
# Distillation after quantization trains the float weights around the frozen codes (LayerNorms, biases, layers left
# float): each op passes the gradient to its activation and its bias, straight through the dequantized weight. Codes,
# scales and zero points get none, so they stay what the export will write. (The torch ops compute with float
# activations: the 8-bit rounding of activations in ORT's DynamicQuantizeMatMul is neither run nor trained against.)
def _bias_grad(grad: Tensor, has_bias: bool, channel: int) -> Optional[Tensor]:
    if not has_bias:
        return None
    return grad.sum(dim=[d for d in range(grad.dim()) if d != channel % grad.dim()])


def _linear_q8_setup(ctx, inputs, output) -> None:
    x, qweight, scale, zero_point, bias = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.has_bias = bias is not None


def _linear_q8_backward(ctx, grad):
    qweight, scale, zero_point = ctx.saved_tensors
    w = _dequantize(qweight, scale, zero_point, axis=1).to(grad.dtype)
    return grad @ w.t(), None, None, None, _bias_grad(grad, ctx.has_bias, -1)


def _linear_nbits_setup(ctx, inputs, output) -> None:
    x, packed, scales, zero_points, bias, k, n, bits, block_size = inputs
    ctx.save_for_backward(packed, scales, zero_points)
    ctx.has_bias, ctx.shape = bias is not None, (k, n, bits, block_size)


def _linear_nbits_backward(ctx, grad):
    packed, scales, zero_points = ctx.saved_tensors
    w = _nbits_weight(packed, scales, zero_points, *ctx.shape).to(grad.dtype)
    return grad @ w, None, None, None, _bias_grad(grad, ctx.has_bias, -1), None, None, None, None


def _conv_q8_setup(ctx, inputs, output) -> None:
    x, qweight, scale, zero_point, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.has_bias, ctx.x_shape, ctx.conv = bias is not None, x.shape, (stride, padding, dilation, groups)


def _conv_q8_backward(ctx, grad):
    qweight, scale, zero_point = ctx.saved_tensors
    w = _dequantize(qweight, scale, zero_point, axis=0).to(grad.dtype)
    conv_input = torch.nn.grad.conv1d_input if qweight.dim() == 3 else torch.nn.grad.conv2d_input
    grad_x = conv_input(ctx.x_shape, w, grad, *ctx.conv)
    return grad_x, None, None, None, _bias_grad(grad, ctx.has_bias, 1), None, None, None, None


def _count_inputs(ctx, inputs, output) -> None:
    ctx.inputs = len(inputs)


def _lookup_backward(ctx, grad):  # indices have no gradient, and the table's codes and scales stay frozen
    return (None,) * ctx.inputs


linear_q8.register_autograd(_linear_q8_backward, setup_context=_linear_q8_setup)
linear_nbits.register_autograd(_linear_nbits_backward, setup_context=_linear_nbits_setup)
conv_q8.register_autograd(_conv_q8_backward, setup_context=_conv_q8_setup)
embedding_q8.register_autograd(_lookup_backward, setup_context=_count_inputs)
embedding_nbits.register_autograd(_lookup_backward, setup_context=_count_inputs)


# --- ONNX Runtime contrib schemas --------------------------------------------------------------------------------
# onnx does not know ORT's com.microsoft ops; onnxscript and onnx.checker need their schemas. Inputs are
# (name, type variable, optional); attributes (name, required). Types follow ORT's contrib op docs.
_CONTRIB_SCHEMAS = {
    "DynamicQuantizeMatMul": dict(
        inputs=[("A", "T1", False), ("B", "T2", False), ("b_scale", "T1", False), ("b_zero_point", "T2", True),
                ("bias", "T1", True)],
        types=[("T1", ["tensor(float)"]), ("T2", ["tensor(int8)", "tensor(uint8)"])],
        attributes=[],
    ),
    "MatMulNBits": dict(
        inputs=[("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
                ("g_idx", "T4", True), ("bias", "T1", True)],
        types=[("T1", ["tensor(float)", "tensor(float16)"]), ("T2", ["tensor(uint8)", "tensor(int32)"]),
               ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"]), ("T4", ["tensor(int32)"])],
        attributes=[("K", True), ("N", True), ("bits", True), ("block_size", True), ("accuracy_level", False)],
    ),
    "GatherBlockQuantized": dict(
        inputs=[("data", "T1", False), ("indices", "Tind", False), ("scales", "T2", False), ("zero_points", "T1", True)],
        types=[("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"]), ("Tind", ["tensor(int32)", "tensor(int64)"]),
               ("T2", ["tensor(float)", "tensor(float16)"])],
        attributes=[("gather_axis", False), ("quantize_axis", False), ("block_size", False), ("bits", False)],
        output="T2",
    ),
}


def _register_contrib_schemas() -> None:
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    for name, spec in _CONTRIB_SCHEMAS.items():
        if onnx.defs.has(name, "com.microsoft"):
            continue
        onnx.defs.register_schema(
            OpSchema(
                name,
                "com.microsoft",
                1,
                inputs=[param(n, t, param_option=optional) if opt else param(n, t) for n, t, opt in spec["inputs"]],
                outputs=[param("Y", spec.get("output", "T1"))],
                type_constraints=[(t, allowed, "") for t, allowed in spec["types"]],
                attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=req) for a, req in spec["attributes"]],
            )
        )


_register_contrib_schemas()

_COMMON = {
    torch.ops.fxcompress.conv_q8.default: _conv_q8,
    torch.ops.fxcompress.embedding_q8.default: _embedding_q8,
    torch.ops.fxcompress.linear_nbits.default: _matmul_nbits(accuracy_level=4),
    torch.ops.fxcompress.embedding_nbits.default: _embedding_nbits,
}
_TRANSLATIONS: dict[str, dict[object, Callable]] = {
    "cpu": {**_COMMON, torch.ops.fxcompress.linear_q8.default: _linear_q8_cpu},
    "cpu-vnni": {**_COMMON, torch.ops.fxcompress.linear_q8.default: _linear_q8_cpu},
    "cpu-nbits": {**_COMMON, torch.ops.fxcompress.linear_q8.default: _linear_q8_cpu},
    "cpu-weightonly": {**_COMMON, torch.ops.fxcompress.linear_nbits.default: _matmul_nbits(accuracy_level=1),
                       torch.ops.fxcompress.linear_q8.default: _linear_q8_qdq},
    "cuda": {**_COMMON, torch.ops.fxcompress.linear_q8.default: _linear_q8_qdq},
}


def register_translation(torch_op: object, fn: Callable, targets: tuple[str, ...] = TARGETS) -> None:
    """Add the onnxscript translation of ``torch_op`` for ``targets``: how an op defined outside this module exports.

    Example:
        >>> register_translation(torch.ops.fxcompress.conv_qdq.default, _conv_qdq)
    """
    for target in targets:
        _TRANSLATIONS[target][torch_op] = fn


def all_custom_ops() -> list[object]:
    """Every op overload in the ``fxcompress`` torch library namespace (a test checks each has translations).

    Example:
        >>> torch.ops.fxcompress.linear_q8.default in all_custom_ops()
        True
    """
    names = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fxcompress::")})
    return [getattr(torch.ops.fxcompress, name).default for name in names]


def translation_table(target: str) -> dict[object, Callable]:
    """The onnxscript translations used when exporting for ``target`` (one of :data:`TARGETS`).

    Example:
        >>> table = translation_table("cpu")
        >>> torch.ops.fxcompress.linear_q8.default in table
        True
    """
    if target not in _TRANSLATIONS:
        raise ValueError(f"unknown export target {target!r}; choose one of {TARGETS}")
    return dict(_TRANSLATIONS[target])


# Ops defined in their own modules register their translations on import.
from fxcompress import ops_static  # noqa: E402,F401
