"""Blockwise int4 weight-only quantization of Linear layers, lowered to com.microsoft.MatMulNBits.

Each block of ``block`` consecutive input features of an output row gets a scale and a zero point:
s = (max(w, 0) - min(w, 0)) / 15, z = round(-min / s), code = clamp(round(w / s) + z, 0, 15), w ~= (code - z) * s.

``algo=rtn`` rounds to nearest. ``algo=gptq`` (Frantar et al., 2022) quantizes one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2/n X^T X of the layer's calibration inputs, which minimises ||XW^T - XQ^T|| rather than ||W - Q||.
``act_order`` visits columns by decreasing diag(H); block scales are then fixed up front from the float weights
("static groups") so the MatMulNBits block layout stays contiguous. Hessians come from the float model in one
calibration pass (not layer-sequential), which keeps the pass O(1) in model runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from fxcompress.calibration import input_hessians
from fxcompress.errors import InputError
from fxcompress.graph_edit import replace_site
from fxcompress.ops import pack_nbits
from fxcompress.passes.quantize import sqnr_db
from fxcompress.pipeline import LayerRecord, PassConfig, PassContext, PassResult, Tolerance, register_pass, select_sites
from fxcompress.sites import nbytes

BLOCK_SIZES = (16, 32, 64, 128, 256)
BITS = 4


@dataclass(frozen=True)
class Int4Config(PassConfig):
    """int4 weights in blocks of ``block`` input features, by round-to-nearest or GPTQ (needs calibration)."""

    name: ClassVar[str] = "int4"
    tolerance: ClassVar[Tolerance] = Tolerance(cosine_min=0.98, top1_agreement_min=0.95, accuracy_drop_max_pp=2.0)
    block: int = 128
    algo: str = "rtn"
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {BLOCK_SIZES} (MatMulNBits needs a power of two >= 16), got {self.block}")
        if self.algo not in ("rtn", "gptq"):
            raise ValueError(f"algo must be 'rtn' or 'gptq', got {self.algo!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


def block_params(w: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) per block: shapes [N, K/block]; the grid always contains 0 exactly."""
    qmax = 2**BITS - 1
    wb = w.reshape(w.shape[0], -1, block)
    lo, hi = wb.amin(-1).clamp(max=0), wb.amax(-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def _codes(w: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zp, 0, 2**BITS - 1)


def quantize_rtn(w: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (codes [N, K], scale [N, K/block], zero_point [N, K/block]).

    Example:
        >>> codes, s, z = quantize_rtn(torch.randn(8, 64), 32)
        >>> codes.shape, s.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    w = w.to(torch.float32)
    scale, zp = block_params(w, block)
    n, k = w.shape
    codes = _codes(w.reshape(n, -1, block), scale.unsqueeze(-1), zp.unsqueeze(-1)).reshape(n, k)
    return codes, scale, zp


def quantize_gptq(w: Tensor, hessian: Tensor, block: int, act_order: bool = False, damp: float = 0.01,
                  lazy: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ with blockwise asymmetric int4; same outputs as :func:`quantize_rtn`."""
    w = w.to(torch.float64).clone()
    n, k = w.shape
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = act_order
    if static:  # block params from the float weights, so the block layout survives the permutation
        scale, zp = (t.to(torch.float64) for t in block_params(w, block))
    else:
        scale, zp = torch.ones(n, k // block, dtype=torch.float64), torch.zeros(n, k // block, dtype=torch.float64)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64)
    lazy = -(-max(lazy, block) // block) * block  # whole blocks per lazy batch: a block's columns are all in w1
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block
            if not static and col % block == 0:  # first column of a block: fit its params on the updated weights
                s, z = block_params(w1[:, i : i + block], block)
                scale[:, g], zp[:, g] = s[:, 0].double(), z[:, 0].double()
            c = _codes(w1[:, i], scale[:, g], zp[:, g])
            codes[:, i1 + i] = c
            q = (c - zp[:, g]) * scale[:, g]
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return codes[:, inverse].float(), scale.float(), zp.float()


def dequantize(codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> Tensor:
    n, k = codes.shape
    return ((codes.reshape(n, -1, block) - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)


@register_pass(Int4Config)
def quantize_int4(gm: fx.GraphModule, cfg: Int4Config, ctx: PassContext) -> PassResult:
    """Rewrite selected Linear sites into ``fxcompress::linear_nbits`` (4 bits) by RTN or GPTQ.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int4:block=32,algo=gptq", calibration=[(x,)])
    """
    sites, records = select_sites(gm, cfg, ("linear",))
    fit = []
    for site in sites:
        k = site.weight.shape[1]
        if k % cfg.block:
            records.append(LayerRecord(site.name, site.kind, cfg.name, "skipped",
                                       f"in_features {k} is not a multiple of block {cfg.block}", site.weight_bytes, site.weight_bytes))
        else:
            fit.append(site)
    hessians: dict[str, Tensor] = {}
    if cfg.algo == "gptq" and fit:
        if not ctx.calibration:
            raise InputError("int4 algo=gptq needs calibration data: optimize(..., calibration=[input_tuple, ...])")
        hessians = input_hessians(gm, {s.name: s.input for s in fit}, ctx.calibration)
    for site in fit:
        ctx.progress(site.name)
        w = site.weight.to(torch.float32)
        n, k = w.shape
        if cfg.algo == "gptq":
            codes, scale, zp = quantize_gptq(w, hessians[site.name], cfg.block, cfg.act_order, cfg.damp)
        else:
            codes, scale, zp = quantize_rtn(w, cfg.block)
        blocks = k // cfg.block
        packed = pack_nbits(codes.reshape(n * blocks, cfg.block), BITS).reshape(n, blocks, cfg.block * BITS // 8)
        tensors = {"packed": packed, "scales": scale.reshape(-1).contiguous(), "zero_points": pack_nbits(zp, BITS),
                   "bias": site.bias.to(torch.float32) if site.bias is not None else None}
        replace_site(gm, site, torch.ops.fxcompress.linear_nbits.default, tensors, (k, n, BITS, cfg.block))
        after = nbytes(*tensors.values())
        error = sqnr_db(w, dequantize(codes, scale, zp, cfg.block))
        records.append(LayerRecord(site.name, site.kind, cfg.name, f"int4-{cfg.algo}", f"block {cfg.block}",
                                   site.weight_bytes, after, error, "weight SQNR dB"))
    return PassResult(gm, bool(fit), records)
