"""How compressed weights are laid out in memory: dequantization and the packing of n-bit codes into bytes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The torch reference of a quantized Linear dequantizes its weight to float32 to multiply: a [128k, 3k] head is
# 1.5 GiB of floats, twice over during the conversion. Above this many weight elements it runs over slices of output
# channels instead, so the module runs (and calibrates) in memory proportional to a slice.
SLICE_ELEMENTS = 1 << 24


def output_slices(n: int, k: int) -> list[slice]:
    """Slices of ``n`` output channels of a ``k``-input weight, each at most :data:`SLICE_ELEMENTS` elements.

    Example:
        >>> output_slices(4, 8), len(output_slices(1 << 20, 64))
        ([slice(0, 4, None)], 4)
    """
    step = max(1, SLICE_ELEMENTS // max(k, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def dequantize(qweight: Tensor, scale: Tensor, zero_point: Optional[Tensor], axis: int) -> Tensor:
    """(q - zero_point) * scale with one scale (and zero point) per slice along ``axis``, in float32.

    Example:
        >>> dequantize(torch.tensor([[2, -4]], dtype=torch.int8), torch.tensor([0.5, 0.25]), None, axis=1)
        tensor([[ 1., -1.]])
    """
    shape = [1] * qweight.dim()
    shape[axis] = -1
    w = qweight.to(torch.float32)
    if zero_point is not None:
        w = w - zero_point.to(torch.float32).reshape(shape)
    return w * scale.reshape(shape)


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


def bias_grad(grad: Tensor, has_bias: bool, channel: int) -> Optional[Tensor]:
    """The gradient of a bias added along ``channel``: ``grad`` summed over every other axis (None without a bias).

    Example:
        >>> bias_grad(torch.ones(2, 3, 4), True, -1)
        tensor([6., 6., 6., 6.])
    """
    if not has_bias:
        return None
    return grad.sum(dim=[d for d in range(grad.dim()) if d != channel % grad.dim()])
