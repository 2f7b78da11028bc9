"""Blockwise int4 weight-only quantization of Linear (-> com.microsoft.MatMulNBits) and Embedding layers
(-> com.microsoft.GatherBlockQuantized).

Each block of ``block`` consecutive input features of an output row gets a scale and a zero point (the grid:
:mod:`fxcompress.algorithms.quant`). A layer whose input width is not a multiple of ``block`` takes the largest block
size below it that divides it (the record says so); one whose width is not a multiple of 16 stays as it is.

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
from typing import ClassVar, Optional

import torch
from torch import Tensor, fx

import fxcompress.ops.nbits  # noqa: F401  (registers linear_nbits and embedding_nbits)
from fxcompress.algorithms import sensitivity
from fxcompress.algorithms.gptq import LayerHessians
from fxcompress.algorithms.int8_rewrite import int8_record, rewrite_int8
from fxcompress.algorithms.quant import (
    INT4_BITS,
    INT4_BLOCK_SIZES,
    block_for,
    int4_bytes,
    int8_bytes,
    quantize_gptq,
    quantize_per_channel_gptq,
    quantize_rtn,
    round_trip,
    sqnr_db_blocks,
)
from fxcompress.errors import InputError
from fxcompress.graph.edit import TiedWeights, attr_owner, replace_site
from fxcompress.graph.sites import Site, nbytes, single_reader
from fxcompress.ops.packing import pack_nbits
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import Tolerance

INT4 = Numerics("int4")


@dataclass(frozen=True)
class Int4Config(PassConfig):
    """int4 weights in blocks of ``block`` input features, by round-to-nearest or GPTQ (needs calibration)."""

    name: ClassVar[str] = "int4"
    shares_tied_weights: ClassVar[bool] = True
    handles_transposed_weights: ClassVar[bool] = True
    other_kinds: ClassVar[dict[str, str]] = {
        kind: f"; int8 quantizes {kind}: put 'int8:kinds={kind}' before int4" for kind in ("conv1d", "conv2d")
    }
    # measured: MiniLM GPTQ b128 cosine 0.977, SQNR 13.3 dB, max_rel 0.25; a random MLP's outputs shrink 3% (gain 0.97)
    tolerance: ClassVar[Tolerance] = Tolerance(0.98, 0.95, 10.0, 0.35, 0.05, 0.95, 2.0)
    block: int = 128
    algo: str = "rtn"
    act_order: bool = False
    damp: float = 0.01
    clip: bool = False
    sequential: bool = True
    budget: float = 0.0
    kinds: tuple[str, ...] = ("linear",)

    def __post_init__(self) -> None:
        if self.block not in INT4_BLOCK_SIZES:
            raise ValueError(
                f"block must be one of {INT4_BLOCK_SIZES} (MatMulNBits needs a power of two >= 16), got {self.block}"
            )
        if self.algo not in ("rtn", "gptq"):
            raise ValueError(f"algo must be 'rtn' or 'gptq', got {self.algo!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.budget and not 0.1 < self.budget < 1:
            raise ValueError(
                f"budget must be in (0.1, 1) (bytes of the Linear layers vs fp32; 0 = all int4), got {self.budget}"
            )
        if not self.kinds or set(self.kinds) - {"linear", "embedding"}:
            raise ValueError(f"kinds must be a non-empty subset of ('linear', 'embedding'), got {self.kinds}")


def _pack_linear(codes: Tensor, scale: Tensor, zp: Tensor, block: int) -> dict[str, Tensor]:
    n, k = codes.shape
    blocks = k // block
    packed = pack_nbits(codes.reshape(n * blocks, block), INT4_BITS).reshape(n, blocks, block * INT4_BITS // 8)
    return {"packed": packed, "scales": scale.reshape(-1).contiguous(), "zero_points": pack_nbits(zp, INT4_BITS)}


def _pack_embedding(codes: Tensor, scale: Tensor, zp: Tensor) -> dict[str, Tensor]:
    return {
        "packed": pack_nbits(codes, INT4_BITS),
        "scales": scale.contiguous(),
        "zero_points": pack_nbits(zp, INT4_BITS),
    }


def _keep_int8(
    gm: fx.GraphModule, sites: list[Site], blocks: dict[str, int], cfg: Int4Config, batches
) -> dict[str, float]:
    """Names (-> sensitivity) of the Linear layers the byte budget keeps int8, most sensitive per extra byte first."""
    return sensitivity.keep_finer(
        gm,
        sites,
        cfg.budget,
        lambda s: round_trip(s.weight, INT4_BITS, blocks[s.name]),
        lambda s: int4_bytes(*s.weight.shape, blocks[s.name]) + nbytes(s.bias),
        int8_bytes,
        batches,
        cfg.name,
    )


def _as_int8(
    gm: fx.GraphModule, site: Site, cfg: Int4Config, sensitivity_: float, hessian: Optional[Tensor]
) -> LayerRecord:
    """``site`` as the ``int8`` pass writes it, its codes by GPTQ when ``hessian`` is given."""
    quantized = (
        quantize_per_channel_gptq(site.weight, hessian, cfg.act_order, cfg.damp) if hessian is not None else None
    )
    _, tensors, codes = rewrite_int8(gm, site, quantized=quantized)
    how = ", GPTQ" if quantized is not None else ""
    return int8_record(
        site, cfg.name, tensors, codes, f"kept int8 by budget={cfg.budget} (int4 output error {sensitivity_:.2e}){how}"
    )


def _fitting(sites: list[Site], cfg: Int4Config, records: list[LayerRecord]) -> dict[str, int]:
    """Each site's block size; a site no block size fits gets a skipped record instead."""
    blocks = {}
    for site in sites:
        width = site.weight.shape[1]
        block = block_for(width, cfg.block)
        if block is None:
            what = "in_features" if site.kind == "linear" else "embedding_dim"
            why = f"{what} {width} is not a multiple of 16, the smallest block MatMulNBits / GatherBlockQuantized take"
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes)
            )
        else:
            blocks[site.name] = block
    return blocks


def _rewrite_int4(
    gm: fx.GraphModule, site: Site, codes: Tensor, scale: Tensor, zp: Tensor, block: int, tied: TiedWeights
) -> dict[str, Tensor]:
    """Replace ``site`` by its 4-bit op; a further reader of a tied weight reuses the first reader's packed tensors."""
    ops = torch.ops.fxcompress
    w = site.weight
    first = tied.lookup(site, "nbits")
    if site.kind == "linear":
        bias = site.bias.to(torch.float32) if site.bias is not None else None
        tensors = {**_pack_linear(codes, scale, zp, block), "bias": bias}
        target, extra = ops.linear_nbits.default, (w.shape[1], w.shape[0], INT4_BITS, block)
    else:
        tensors = _pack_embedding(codes, scale, zp)
        target, extra = ops.embedding_nbits.default, (INT4_BITS, block)
    shared = _viewed_as(gm, first[1], tensors, site.node) if first else None
    new = replace_site(gm, site, target, tensors, extra, shared=shared)
    tied.remember(site, new, tensors, ("packed", "scales", "zero_points"), "nbits")
    return tensors if first is None else {"bias": tensors.get("bias")}


def _viewed_as(gm: fx.GraphModule, shared: dict[str, fx.Node], tensors: dict[str, Tensor], before: fx.Node):
    """The first reader's packed tensors, reshaped where this reader's op lays the same bytes out differently (a
    Linear head tied to an Embedding: [n, blocks, bytes] vs [n, bytes]); ONNX Runtime folds the reshape at load."""
    viewed = {}
    for key, node in shared.items():
        want = list(tensors[key].shape)
        if list(getattr(*attr_owner(gm, str(node.target))).shape) == want:
            viewed[key] = node
        else:
            with gm.graph.inserting_before(before):
                viewed[key] = gm.graph.call_function(torch.ops.aten.reshape.default, (node, want))
    return viewed


@register_pass(Int4Config)
def quantize_int4(gm: fx.GraphModule, cfg: Int4Config, ctx: PassContext) -> PassResult:
    """Rewrite selected Linear sites into ``fxcompress::linear_nbits`` (4 bits) by RTN or GPTQ, and Embedding sites
    (``kinds=linear+embedding``) into ``fxcompress::embedding_nbits`` by RTN.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(64, 8)))
        >>> quantize_int4(gm, Int4Config(), PassContext((torch.randn(1, 64),))).records[0].reason
        'block 64 (block 128 does not divide in_features 64)'
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    blocks = _fitting(sites, cfg, records)
    fit = [s for s in sites if s.name in blocks]
    linear = [s for s in fit if s.kind == "linear"]
    keep8 = _keep_int8(gm, single_reader(linear), blocks, cfg, ctx.calibration) if cfg.budget else {}
    # GPTQ fits one reader's inputs: a weight read by several layers is rounded to nearest (the layers kept int8 too
    # get GPTQ, on the int8 grid)
    gptq_sites = single_reader(linear) if cfg.algo == "gptq" else []
    if gptq_sites and ctx.calibration is None:
        raise InputError("int4 algo=gptq needs calibration data: optimize(..., calibration=[input_tuple, ...])")
    hessians = LayerHessians(gm, gptq_sites, ctx.calibration, cfg.sequential) if gptq_sites else None
    gptq_names = {s.name for s in gptq_sites}
    tied = TiedWeights()
    for site in fit:
        ctx.progress(site.name)
        hessian = hessians.pop(site) if site.name in gptq_names else None
        if site.name in keep8:
            records.append(_as_int8(gm, site, cfg, keep8[site.name], hessian))
            continue
        block, w = blocks[site.name], site.weight.to(torch.float32)
        if hessian is not None:
            codes, scale, zp = quantize_gptq(w, hessian, block, cfg.act_order, cfg.damp, cfg.clip)
        else:
            codes, scale, zp = quantize_rtn(w, block, cfg.clip)
        first = tied.lookup(site, "nbits")
        tensors = _rewrite_int4(gm, site, codes, scale, zp, block, tied)
        note = f"block {block}" + (", clip" if cfg.clip else "")
        if first is not None:
            note = f"shares the int4 weight of {first[0]}"
        elif cfg.algo == "gptq" and hessian is None and site.kind == "linear":
            note += ", round-to-nearest (GPTQ skips a weight that several layers read)"
        if block != cfg.block:
            what = "in_features" if site.kind == "linear" else "embedding_dim"
            note += f" (block {cfg.block} does not divide {what} {w.shape[1]})"
        records.append(
            LayerRecord(
                site.name,
                site.kind,
                cfg.name,
                f"int4-{'gptq' if hessian is not None else 'rtn'}",
                note,
                site.weight_bytes if first is None else nbytes(site.bias),
                nbytes(*tensors.values()),
                sqnr_db_blocks(w, codes, scale, zp, block),
                "weight SQNR dB",
                numerics=INT4,
            )
        )
    return PassResult(gm, bool(fit), records)
