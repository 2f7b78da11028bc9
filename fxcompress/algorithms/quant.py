"""The quantization grids and their rounding: int8 per output channel, int4 per block; round-to-nearest and GPTQ.

``int8``: symmetric, q = round(w / s) clipped to [-127, 127] with s = max|w_c| / 127 per output channel c (rows of
Linear/Embedding weights, output channels of Conv). -128 is left unused so the grid is symmetric and q -> q + 128
re-encodes it exactly as uint8 for the CPU kernel. An all-zero channel gets s = 1 and q = 0 rather than a division by
zero.

``int4``: asymmetric per block of ``block`` consecutive input features of an output row:
s = (max(w, 0) - min(w, 0)) / 15, z = round(-min / s), code = clamp(round(w / s) + z, 0, 15), w ~= (code - z) * s.
``clip`` searches, per block, a shrink factor of the [min, max] range that minimises the block's squared error.

GPTQ (:mod:`fxcompress.algorithms.gptq`) chooses the codes of either grid against the calibration inputs' Hessian.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fxcompress.algorithms import gptq as gptq_module
from fxcompress.algorithms.gptq import activation_order, gptq
from fxcompress.graph.residency import checkpoint
from fxcompress.graph.sites import Site, nbytes

CHUNK_ROWS = 512  # output channels processed at once: temporaries stay a few MiB on 8192-wide layers
INT4_BITS = 4
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def block_for(width: int, block: int) -> Optional[int]:
    """The block size a layer of input width ``width`` gets: ``block`` when it divides the width, else the largest
    smaller block size that does; None when no block size (16 at least) divides it.

    Example:
        >>> block_for(512, 128), block_for(64, 128), block_for(10, 128)
        (128, 64, None)
    """
    return next((b for b in sorted(INT4_BLOCK_SIZES, reverse=True) if b <= block and width % b == 0), None)


CLIP_GRID = tuple(1.0 - 0.03 * i for i in range(11))  # shrink factors 1.0 .. 0.7 tried by clip=true


# --- int8 per output channel -----------------------------------------------------------------------------------
def quantize_per_channel(w: Tensor, axis: int = 0, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-channel quantization along ``axis``: returns (int8 q, fp32 scale) with w ~= q * scale.

    Example:
        >>> q, s = quantize_per_channel(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> q.tolist(), s.tolist()
        ([[64, -127], [0, 0]], [0.007874015718698502, 1.0])
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.detach()
    rows = w.movedim(axis, 0)  # a view: channels first
    amax = torch.cat([chunk.abs().reshape(chunk.shape[0], -1).amax(dim=1) for chunk in rows.split(CHUNK_ROWS)])
    amax = amax.to(torch.float32)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.empty(rows.shape, dtype=torch.int8)
    for start in range(0, rows.shape[0], CHUNK_ROWS):  # a few rows at a time: no full-size float temporaries
        checkpoint()  # a file-mapped weight: the rows already read may leave memory
        chunk = rows[start : start + CHUNK_ROWS].to(torch.float32)
        step = scale[start : start + CHUNK_ROWS].reshape(-1, *([1] * (chunk.dim() - 1)))
        q[start : start + CHUNK_ROWS] = torch.clamp(torch.round(chunk / step), -qmax, qmax).to(torch.int8)
    return q.movedim(0, axis).contiguous(), scale


def dequantize_per_channel(q: Tensor, scale: Tensor) -> Tensor:
    """The float weight that int8 ``q`` with one ``scale`` per output channel (axis 0) stands for.

    Example:
        >>> dequantize_per_channel(*quantize_per_channel(torch.tensor([[0.5, -1.0]])))
        tensor([[ 0.5039, -1.0000]])
    """
    return q.to(torch.float32) * scale.reshape(-1, *([1] * (q.dim() - 1)))


def quantize_per_channel_gptq(
    w: Tensor, hessian: Tensor, act_order: bool = False, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_per_channel`'s grid (axis 0, int8), codes chosen by GPTQ against the input Hessian ``hessian``.

    Example:
        >>> x = torch.randn(256, 16)
        >>> q, s = quantize_per_channel_gptq(torch.randn(4, 16), 2 * x.T @ x / 256)
        >>> q.dtype, s.shape
        (torch.int8, torch.Size([4]))
    """
    _, scale = quantize_per_channel(w, axis=0)
    step = scale.to(gptq_module.WORK_DTYPE)
    codes = torch.zeros(w.shape, dtype=torch.int8)

    def round_column(col: int, rows: slice, pending: Tensor) -> Tensor:
        q = torch.clamp(torch.round(pending[:, 0] / step[rows]), -127, 127)
        codes[rows, col] = q.to(torch.int8)
        return q * step[rows]

    gptq(w, hessian, round_column, activation_order(hessian) if act_order else None, damp)
    return codes, scale


def int8_bytes(site: Site) -> int:
    """What the ``int8`` pass stores for ``site``: the codes, one fp32 scale per output channel, the bias.

    Example:
        >>> int8_bytes(site)  # Linear(64, 64): 4,096 codes + 256 scale bytes + 256 bias bytes
        4608
    """
    return site.weight.numel() + 4 * site.weight.shape[0] + nbytes(site.bias)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at 200 for exact reconstructions).

    Example:
        >>> round(sqnr_db(torch.ones(4), torch.ones(4) * 1.01), 1)
        40.0
    """
    reference, approx = reference.detach().reshape(reference.shape[0], -1), approx.detach().reshape(approx.shape[0], -1)
    noise = signal = 0.0
    for start in range(0, reference.shape[0], CHUNK_ROWS):  # float64 sums, a few rows at a time
        ref = reference[start : start + CHUNK_ROWS].double()
        noise += (ref - approx[start : start + CHUNK_ROWS].double()).pow(2).sum().item()
        signal += ref.pow(2).sum().item()
    if noise == 0:
        return 200.0
    return 10 * math.log10(max(signal, 1e-300) / noise)


def sqnr_db_per_channel(w: Tensor, q: Tensor, scale: Tensor) -> float:
    """:func:`sqnr_db` of ``w`` against its per-channel (axis 0) int8 codes ``q`` and ``scale``, dequantized a few
    rows at a time (never the whole float weight at once).

    Example:
        >>> w = torch.randn(8, 64)
        >>> q, scale = quantize_per_channel(w)
        >>> abs(sqnr_db_per_channel(w, q, scale) - sqnr_db(w, dequantize_per_channel(q, scale))) < 1e-6
        True
    """
    rows, codes = w.detach().reshape(w.shape[0], -1), q.reshape(q.shape[0], -1)
    noise = signal = 0.0
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        checkpoint()
        ref = rows[start : start + CHUNK_ROWS].double()
        approx = codes[start : start + CHUNK_ROWS].double() * scale[start : start + CHUNK_ROWS, None].double()
        noise += (ref - approx).pow(2).sum().item()
        signal += ref.pow(2).sum().item()
    return 200.0 if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


# --- int4 per block -------------------------------------------------------------------------------------------
def _grid(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    qmax = 2**INT4_BITS - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def block_params(w: Tensor, block: int, clip: bool = False) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) per block: shapes [N, K/block]; the grid always contains 0 exactly.

    With ``clip`` the range is shrunk by the factor of :data:`CLIP_GRID` with the least squared error per block.

    Example:
        >>> scale, zero_point = block_params(torch.randn(8, 64), 32)
        >>> scale.shape
        torch.Size([8, 2])
    """
    wb = w.reshape(w.shape[0], -1, block)
    lo, hi = wb.amin(-1).clamp(max=0), wb.amax(-1).clamp(min=0)
    best_scale, best_zp = _grid(lo, hi)
    if not clip:
        return best_scale, best_zp
    best_err = torch.full_like(best_scale, float("inf"))
    for f in CLIP_GRID:
        scale, zp = _grid(lo * f, hi * f)
        s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
        err = ((_codes(wb, s, z) - z) * s - wb).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zp = torch.where(better, scale, best_scale), torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _codes(w: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zp, 0, 2**INT4_BITS - 1)


def quantize_rtn(w: Tensor, block: int, clip: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (uint8 codes [N, K], scale [N, K/block], zero_point [N, K/block]).

    Example:
        >>> codes, s, z = quantize_rtn(torch.randn(8, 64), 32)
        >>> codes.shape, s.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    parts = []
    for start in range(0, w.shape[0], CHUNK_ROWS):  # rows are independent: a few at a time, no full-size temporaries
        checkpoint()
        rows = w[start : start + CHUNK_ROWS].to(torch.float32)
        scale, zp = block_params(rows, block, clip)
        codes = _codes(rows.reshape(rows.shape[0], -1, block), scale.unsqueeze(-1), zp.unsqueeze(-1))
        parts.append((codes.reshape(rows.shape).to(torch.uint8), scale, zp))  # 0..15: a byte, not a float
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def quantize_gptq(
    w: Tensor,
    hessian: Tensor,
    block: int,
    act_order: bool = False,
    damp: float = 0.01,
    clip: bool = False,
    lazy: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ with blockwise asymmetric int4; same outputs as :func:`quantize_rtn`.

    Example:
        >>> w, x = torch.randn(8, 64), torch.randn(512, 64)
        >>> codes, s, z = quantize_gptq(w, 2 * x.T @ x / 512, 32, act_order=True)
        >>> codes.shape, s.shape, int(codes.max()) <= 15
        (torch.Size([8, 64]), torch.Size([8, 2]), True)
    """
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.uint8)  # 0..15
    static = act_order
    work = gptq_module.WORK_DTYPE
    if static:  # block params from the float weights, so the block layout survives the permutation
        params = [block_params(w[r : r + CHUNK_ROWS].to(torch.float32), block, clip) for r in range(0, n, CHUNK_ROWS)]
        scale, zp = (torch.cat(p).to(work) for p in zip(*params))
    else:
        scale, zp = torch.ones(n, k // block, dtype=work), torch.zeros(n, k // block, dtype=work)

    def round_column(col: int, rows: slice, pending: Tensor) -> Tensor:
        g = col // block
        if not static and col % block == 0:  # first column of a block: fit its params on the updated weights
            s, z = block_params(pending[:, :block], block, clip)
            scale[rows, g], zp[rows, g] = s[:, 0], z[:, 0]
        q = _codes(pending[:, 0], scale[rows, g], zp[rows, g])
        codes[rows, col] = q.to(torch.uint8)
        return (q - zp[rows, g]) * scale[rows, g]

    order = activation_order(hessian) if act_order else None
    gptq(w, hessian, round_column, order, damp, lazy=-(-max(lazy, block) // block) * block)  # whole blocks per batch
    return codes, scale.float(), zp.float()


def dequantize_blocks(codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> Tensor:
    """The weight [N, K] that int4 ``codes`` with per-block ``scale`` and zero point ``zp`` stand for.

    Example:
        >>> w = torch.randn(8, 64)
        >>> w_hat = dequantize_blocks(*quantize_rtn(w, 32), 32)
        >>> float((w_hat - w).abs().max()) < 0.5
        True
    """
    n, k = codes.shape
    return ((codes.reshape(n, -1, block) - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)


def sqnr_db_blocks(w: Tensor, codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> float:
    """:func:`sqnr_db` of ``w`` against its blockwise codes, dequantized a few rows at a time.

    Example:
        >>> w = torch.randn(8, 64)
        >>> codes, scale, zp = quantize_rtn(w, 32)
        >>> abs(sqnr_db_blocks(w, codes, scale, zp, 32) - sqnr_db(w, dequantize_blocks(codes, scale, zp, 32))) < 1e-4
        True
    """
    noise = signal = 0.0
    for start in range(0, w.shape[0], CHUNK_ROWS):
        checkpoint()
        rows = slice(start, start + CHUNK_ROWS)
        ref = w[rows].double()
        approx = dequantize_blocks(codes[rows], scale[rows], zp[rows], block).double()
        noise += (ref - approx).pow(2).sum().item()
        signal += ref.pow(2).sum().item()
    return 200.0 if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def round_trip(w: Tensor, bits: int, block: int) -> Tensor:
    """``w`` on a quantization grid: int4 round-to-nearest in blocks (the largest block size up to
    ``block`` that divides the width, as ``int4`` chooses) or int8 per output channel.

    Example:
        >>> w = torch.randn(8, 64)
        >>> (round_trip(w, 4, 32) - w).abs().max() < 0.5
        tensor(True)
    """
    if bits == 8:
        return dequantize_per_channel(*quantize_per_channel(w))
    fitting = block_for(w.shape[1], block)
    return dequantize_blocks(*quantize_rtn(w, fitting), fitting)


def int4_bytes(n: int, k: int, block: int) -> int:
    """Bytes of an [n, k] int4 weight in blocks of ``block``: packed codes, fp32 scales, packed zero points.

    Example:
        >>> int4_bytes(384, 384, 128)  # 73,728 code bytes + 4,608 scale bytes + 768 zero-point bytes
        79104
    """
    return n * k // 2 + n * (k // block) * 4 + n * -(-(k // block) // 2)
