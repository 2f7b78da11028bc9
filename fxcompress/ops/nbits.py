"""``linear_nbits`` and ``embedding_nbits``: blockwise n-bit weights laid out as ORT's ``MatMulNBits`` and
``GatherBlockQuantized`` read them.

``linear_nbits`` translations: ``per_block_activations`` (``MatMulNBits`` accuracy_level 4: activations quantized to
int8 per block of K at run time, the fast path on ORT's CPU EP) and ``weight_only`` (accuracy_level 1: fp32
activations, what the torch op computes).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from onnxscript import opset21 as op
from torch import Tensor

from fxcompress.ops.onnx_contrib import MSFT
from fxcompress.ops.packing import bias_grad, output_slices, unpack_nbits
from fxcompress.ops.registry import register_op


@torch.library.custom_op("fxcompress::linear_nbits", mutates_args=())
def linear_nbits(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Optional[Tensor],
    bias: Optional[Tensor],
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> Tensor:
    """y = x @ W^T + bias, W [N, K] stored as MatMulNBits does.

    ``packed`` [N, K/block, block*bits/8] uint8 codes; ``scales`` [N * K/block]; ``zero_points`` [N, ceil(K/block *
    bits/8)] packed codes, or None for the symmetric default 2**(bits-1). W = (code - zero_point) * scale per block.

    Example:
        >>> packed = torch.full((2, 1, 8), 0x99, dtype=torch.uint8)  # every 4-bit code 9: zero point 8, so W = scale
        >>> scales = torch.tensor([0.5, 1.0])
        >>> torch.ops.fxcompress.linear_nbits(torch.ones(1, 16), packed, scales, None, None, 16, 2, 4, 16)
        tensor([[ 8., 16.]])
    """
    blocks = k // block_size
    parts = []
    for rows in output_slices(n, k):  # a slice of output channels at a time: never the whole float weight
        count = rows.stop - rows.start
        zp = None if zero_points is None else zero_points[rows]
        scale = scales.reshape(n, blocks)[rows].reshape(-1)
        w = nbits_weight(packed.reshape(n, -1)[rows], scale, zp, k, count, bits, block_size)
        parts.append(x @ w.t().to(x.dtype))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y + bias if bias is not None else y


def nbits_weight(
    packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, n: int, bits: int, block_size: int
) -> Tensor:
    """The float [N, K] weight that :func:`linear_nbits` stores.

    Example:
        >>> nbits_weight(torch.full((1, 1, 8), 0x99, dtype=torch.uint8), torch.tensor([0.5]), None, 16, 1, 4, 16).sum()
        tensor(8.)
    """
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


def _linear_setup(ctx, inputs, output) -> None:
    x, packed, scales, zero_points, bias, k, n, bits, block_size = inputs
    ctx.save_for_backward(packed, scales, zero_points)
    ctx.has_bias, ctx.shape = bias is not None, (k, n, bits, block_size)


def _linear_backward(ctx, grad):
    packed, scales, zero_points = ctx.saved_tensors
    w = nbits_weight(packed, scales, zero_points, *ctx.shape).to(grad.dtype)
    return grad @ w, None, None, None, bias_grad(grad, ctx.has_bias, -1), None, None, None, None


linear_nbits.register_autograd(_linear_backward, setup_context=_linear_setup)


def matmul_nbits(accuracy_level: int) -> Callable:
    """The MatMulNBits translation at ``accuracy_level``: 4 quantizes activations to int8 per block (the fast path
    measured on ORT's CPU EP), 1 keeps them fp32 (weight-only numerics).

    Example:
        >>> matmul_nbits(1).__name__
        'matmul_nbits_level1'
    """

    def translate(x, packed, scales, zero_points=None, bias=None, k=0, n=0, bits=8, block_size=32):
        y = MSFT.MatMulNBits(
            x, packed, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )
        return op.Add(y, bias) if bias is not None else y

    translate.__name__ = f"matmul_nbits_level{accuracy_level}"
    return translate


@torch.library.custom_op("fxcompress::embedding_nbits", mutates_args=())
def embedding_nbits(
    indices: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor, bits: int, block_size: int
) -> Tensor:
    """Row lookup in a blockwise n-bit table laid out as GatherBlockQuantized reads it.

    ``packed`` [rows, cols*bits/8] uint8 codes (low nibble first), ``scales`` [rows, cols/block], ``zero_points``
    [rows, ceil(cols/block*bits/8)] packed codes; row = (code - zero_point) * scale per block. Only gathered rows
    are unpacked.

    Example:
        >>> table = torch.full((3, 8), 0x99, dtype=torch.uint8)  # 3 rows of 16 codes 9
        >>> zp = torch.full((3, 1), 0x08, dtype=torch.uint8)      # one block per row, zero point 8
        >>> torch.ops.fxcompress.embedding_nbits(torch.tensor([[2]]), table, torch.ones(3, 1), zp, 4, 16).shape
        torch.Size([1, 1, 16])
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


def _count_inputs(ctx, inputs, output) -> None:
    ctx.inputs = len(inputs)


def _lookup_backward(ctx, grad):  # indices have no gradient, and the table's codes and scales stay frozen
    return (None,) * ctx.inputs


embedding_nbits.register_autograd(_lookup_backward, setup_context=_count_inputs)


def gather_block_quantized(indices, packed, scales, zero_points, bits=4, block_size=32):
    return MSFT.GatherBlockQuantized(
        packed, indices, scales, zero_points, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits
    )


register_op(
    torch.ops.fxcompress.linear_nbits.default,
    {"per_block_activations": matmul_nbits(4), "weight_only": matmul_nbits(1)},
    default="per_block_activations",
)
register_op(torch.ops.fxcompress.embedding_nbits.default, {"gather": gather_block_quantized}, default="gather")
