"""Blockwise int4 weight-only quantization of Linear (-> com.microsoft.MatMulNBits) and Embedding layers
(-> com.microsoft.GatherBlockQuantized).

Each block of ``block`` consecutive input features of an output row gets a scale and a zero point:
s = (max(w, 0) - min(w, 0)) / 15, z = round(-min / s), code = clamp(round(w / s) + z, 0, 15), w ~= (code - z) * s.

``algo=rtn`` rounds to nearest. ``algo=gptq`` (Frantar et al., 2022) quantizes one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2/n X^T X of the layer's calibration inputs, which minimises ||XW^T - XQ^T|| rather than ||W - Q||.
``act_order`` visits columns by decreasing diag(H); block scales are then fixed up front from the float weights
("static groups") so the MatMulNBits block layout stays contiguous. Hessians come from the float model in one
calibration pass when ``sequential=false``; by default (``sequential=true``) layers are quantized in graph order
and each group of layers sharing an input gets its Hessian from the graph with every earlier layer already
quantized, so later layers correct for the error upstream (one partial calibration run per group).

``clip=true`` searches, per block, a shrink factor of the [min, max] range that minimises the block's squared
error (large outliers otherwise stretch the grid for the other values of the block). Embedding tables are quantized
by RTN (with the clip search if asked): a lookup has no input activations for GPTQ to weigh.

``budget=b`` (e.g. 0.18) lets the selected Linear layers take up to b of their fp32 bytes: each layer's
sensitivity is measured on the calibration data (model output error with only that layer int4-RTN), and the most
sensitive layers per extra byte are kept int8 (per-channel, like the ``int8`` pass; with ``algo=gptq`` their int8
codes are chosen by GPTQ too) while the budget allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from fxcompress.errors import InputError
from fxcompress.graph_edit import replace_site
from fxcompress.ops import pack_nbits
from fxcompress.passes import budget
from fxcompress.passes.gptq import LayerHessians, activation_order, gptq
from fxcompress.passes.quantize import int8_bytes, quantize_per_channel_gptq, rewrite_int8, sqnr_db
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
    clip: bool = False
    sequential: bool = True
    budget: float = 0.0
    kinds: tuple[str, ...] = ("linear",)

    def __post_init__(self) -> None:
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {BLOCK_SIZES} (MatMulNBits needs a power of two >= 16), got {self.block}")
        if self.algo not in ("rtn", "gptq"):
            raise ValueError(f"algo must be 'rtn' or 'gptq', got {self.algo!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.budget and not 0.1 < self.budget < 1:
            raise ValueError(f"budget must be in (0.1, 1) (bytes of the Linear layers vs fp32; 0 = all int4), got {self.budget}")
        if not self.kinds or set(self.kinds) - {"linear", "embedding"}:
            raise ValueError(f"kinds must be a non-empty subset of ('linear', 'embedding'), got {self.kinds}")


CLIP_GRID = tuple(1.0 - 0.03 * i for i in range(11))  # shrink factors 1.0 .. 0.7 tried by clip=true


def _grid(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    qmax = 2**BITS - 1
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
    return torch.clamp(torch.round(w / scale) + zp, 0, 2**BITS - 1)


def quantize_rtn(w: Tensor, block: int, clip: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (codes [N, K], scale [N, K/block], zero_point [N, K/block]).

    Example:
        >>> codes, s, z = quantize_rtn(torch.randn(8, 64), 32)
        >>> codes.shape, s.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    w = w.to(torch.float32)
    scale, zp = block_params(w, block, clip)
    n, k = w.shape
    codes = _codes(w.reshape(n, -1, block), scale.unsqueeze(-1), zp.unsqueeze(-1)).reshape(n, k)
    return codes, scale, zp


def quantize_gptq(w: Tensor, hessian: Tensor, block: int, act_order: bool = False, damp: float = 0.01,
                  clip: bool = False, lazy: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ with blockwise asymmetric int4; same outputs as :func:`quantize_rtn`.

    Example:
        >>> codes, s, z = quantize_gptq(w, input_hessian, 32, act_order=True)
    """
    w = w.to(torch.float64)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.float64)
    static = act_order
    if static:  # block params from the float weights, so the block layout survives the permutation
        scale, zp = (t.to(torch.float64) for t in block_params(w, block, clip))
    else:
        scale, zp = torch.ones(n, k // block, dtype=torch.float64), torch.zeros(n, k // block, dtype=torch.float64)

    def round_column(col: int, pending: Tensor) -> Tensor:
        g = col // block
        if not static and col % block == 0:  # first column of a block: fit its params on the updated weights
            s, z = block_params(pending[:, :block], block, clip)
            scale[:, g], zp[:, g] = s[:, 0].double(), z[:, 0].double()
        codes[:, col] = _codes(pending[:, 0], scale[:, g], zp[:, g])
        return (codes[:, col] - zp[:, g]) * scale[:, g]

    order = activation_order(hessian) if act_order else None
    gptq(w, hessian, round_column, order, damp, lazy=-(-max(lazy, block) // block) * block)  # whole blocks per batch
    return codes.float(), scale.float(), zp.float()


def dequantize(codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> Tensor:
    """The weight [N, K] that int4 ``codes`` with per-block ``scale`` and zero point ``zp`` stand for.

    Example:
        >>> w_hat = dequantize(*quantize_rtn(w, 32), 32)
    """
    n, k = codes.shape
    return ((codes.reshape(n, -1, block) - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)


def _as_int8(gm: fx.GraphModule, site, cfg: "Int4Config", sensitivity: float, hessian: Tensor | None) -> LayerRecord:
    """``site`` as the ``int8`` pass writes it, its codes by GPTQ when ``hessian`` is given."""
    quantized = quantize_per_channel_gptq(site.weight, hessian, cfg.act_order, cfg.damp) if hessian is not None else None
    _, tensors, dq = rewrite_int8(gm, site, quantized=quantized)
    how = ", GPTQ" if quantized is not None else ""
    return LayerRecord(site.name, site.kind, cfg.name, "int8",
                       f"kept int8 by budget={cfg.budget} (int4 output error {sensitivity:.2e}){how}",
                       site.weight_bytes, nbytes(*tensors.values()), sqnr_db(site.weight, dq), "weight SQNR dB")


def _pack_linear(codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> dict[str, Tensor]:
    n, k = codes.shape
    blocks = k // block
    packed = pack_nbits(codes.reshape(n * blocks, block), BITS).reshape(n, blocks, block * BITS // 8)
    return {"packed": packed, "scales": scale.reshape(-1).contiguous(), "zero_points": pack_nbits(zp, BITS)}


def _pack_embedding(codes: Tensor, scale: Tensor, zp: Tensor) -> dict[str, Tensor]:
    return {"packed": pack_nbits(codes, BITS), "scales": scale.contiguous(), "zero_points": pack_nbits(zp, BITS)}


def _int4_bytes(n: int, k: int, block: int) -> int:
    return n * k // 2 + n * (k // block) * 4 + n * -(-(k // block) // 2)


def layer_sensitivity(gm: fx.GraphModule, sites: list, block: int, batches) -> dict[str, float]:
    """Relative squared error of the model's outputs on ``batches`` when only that layer is int4 (RTN).

    Example:
        >>> sens = layer_sensitivity(gm, linear_sites, 128, calibration)
    """
    return budget.layer_sensitivity(gm, sites, lambda s: _rtn_round_trip(s, block), batches)


def _rtn_round_trip(site, block: int) -> Tensor:
    return dequantize(*quantize_rtn(site.weight, block), block)


def _keep_int8(gm: fx.GraphModule, sites: list, cfg: "Int4Config", batches) -> dict[str, float]:
    """Names (-> sensitivity) of the Linear layers the byte budget keeps int8, most sensitive per extra byte first."""
    return budget.keep_finer(gm, sites, cfg.budget, lambda s: _rtn_round_trip(s, cfg.block),
                             lambda s: _int4_bytes(*s.weight.shape, cfg.block) + nbytes(s.bias),
                             int8_bytes, batches, cfg.name)


@register_pass(Int4Config)
def quantize_int4(gm: fx.GraphModule, cfg: Int4Config, ctx: PassContext) -> PassResult:
    """Rewrite selected Linear sites into ``fxcompress::linear_nbits`` (4 bits) by RTN or GPTQ, and Embedding sites
    (``kinds=linear+embedding``) into ``fxcompress::embedding_nbits`` by RTN.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="int4:block=32,algo=gptq", calibration=[(x,)])
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    fit = []
    for site in sites:
        k = site.weight.shape[1]
        if k % cfg.block:
            what = "in_features" if site.kind == "linear" else "embedding_dim"
            records.append(LayerRecord(site.name, site.kind, cfg.name, "skipped",
                                       f"{what} {k} is not a multiple of block {cfg.block}", site.weight_bytes, site.weight_bytes))
        else:
            fit.append(site)
    linear = [s for s in fit if s.kind == "linear"]
    keep8 = _keep_int8(gm, linear, cfg, ctx.calibration) if cfg.budget else {}
    gptq_sites = linear if cfg.algo == "gptq" else []  # (the layers kept int8 too: GPTQ on the int8 grid)
    if gptq_sites and ctx.calibration is None:
        raise InputError("int4 algo=gptq needs calibration data: optimize(..., calibration=[input_tuple, ...])")
    hessians = LayerHessians(gm, gptq_sites, ctx.calibration, cfg.sequential) if gptq_sites else None
    gptq_names = {s.name for s in gptq_sites}
    ops = torch.ops.fxcompress
    for site in fit:
        ctx.progress(site.name)
        w = site.weight.to(torch.float32)
        if site.name in keep8:
            records.append(_as_int8(gm, site, cfg, keep8[site.name], hessians.pop(site) if site.name in gptq_names else None))
            continue
        algo = "gptq" if site.name in gptq_names else "rtn"
        if algo == "gptq":
            codes, scale, zp = quantize_gptq(w, hessians.pop(site), cfg.block, cfg.act_order, cfg.damp, cfg.clip)
        else:
            codes, scale, zp = quantize_rtn(w, cfg.block, cfg.clip)
        if site.kind == "linear":
            tensors = {**_pack_linear(codes, scale, zp, cfg.block), "bias": site.bias.to(torch.float32) if site.bias is not None else None}
            replace_site(gm, site, ops.linear_nbits.default, tensors, (w.shape[1], w.shape[0], BITS, cfg.block))
        else:
            tensors = _pack_embedding(codes, scale, zp)
            replace_site(gm, site, ops.embedding_nbits.default, tensors, (BITS, cfg.block))
        error = sqnr_db(w, dequantize(codes, scale, zp, cfg.block))
        records.append(LayerRecord(site.name, site.kind, cfg.name, f"int4-{algo}", f"block {cfg.block}" + (", clip" if cfg.clip else ""),
                                   site.weight_bytes, nbytes(*tensors.values()), error, "weight SQNR dB"))
    return PassResult(gm, bool(fit), records)
