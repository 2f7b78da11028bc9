"""Static int8: per-channel int8 weights and uint8 activations whose scales are fixed from calibration data.

For every selected Conv/Linear the pass records the range of its input and of its output (for Linear, of the
product before the bias) over the calibration batches, run through the float graph, and rewrites the site into
``fxcompress::conv_qdq`` / ``linear_qdq``. Ranges are min/max, or the ``percentile``-th percentile of |x| per batch
averaged over batches when ``percentile < 100`` (robust to rare outliers). The range always contains 0 so zero
padding is exact. Conv bias is stored int32 at scale x_scale * w_scale, as QLinearConv wants it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from fxcompress.algorithms.quant import quantize_per_channel, sqnr_db
from fxcompress.algorithms.statistics import observe
from fxcompress.errors import InputError
from fxcompress.graph.edit import TiedWeights, replace_site
from fxcompress.graph.sites import Site, nbytes
from fxcompress.ops.static import QMAX, QMIN
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import PER_TENSOR_ACTIVATIONS, Tolerance

STATIC = Numerics("int8", activations="uint8-static")

STATIC_KINDS = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class Int8StaticConfig(PassConfig):
    """int8 weights and calibrated uint8 activations for Conv1d/2d and Linear (needs ``calibration``)."""

    name: ClassVar[str] = "int8_static"
    shares_tied_weights: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance] = PER_TENSOR_ACTIVATIONS  # activations rounded to uint8 per tensor, like run-time
    kinds: tuple[str, ...] = STATIC_KINDS
    percentile: float = 100.0

    def __post_init__(self) -> None:
        if not self.kinds or set(self.kinds) - set(STATIC_KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {STATIC_KINDS}, got {self.kinds}")
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [90, 100], got {self.percentile}")


class _Ranges:
    """Running (lo, hi) per name: min/max, or per-batch percentiles averaged."""

    def __init__(self, percentile: float):
        self.percentile = percentile
        self.lo: dict[str, list[float]] = {}
        self.hi: dict[str, list[float]] = {}

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().float().flatten()
        if self.percentile < 100.0:
            q = torch.quantile(
                t[torch.randperm(t.numel())[:1_000_000]] if t.numel() > 1_000_000 else t,
                torch.tensor([(100 - self.percentile) / 100, self.percentile / 100]),
            )
            lo, hi = q.tolist()
        else:
            lo, hi = t.min().item(), t.max().item()
        self.lo.setdefault(name, []).append(lo)
        self.hi.setdefault(name, []).append(hi)

    def qparams(self, name: str) -> tuple[Tensor, Tensor]:
        reduce_lo, reduce_hi = (min, max) if self.percentile == 100.0 else (_mean, _mean)
        lo, hi = min(reduce_lo(self.lo[name]), 0.0), max(reduce_hi(self.hi[name]), 0.0)
        scale = (hi - lo) / QMAX if hi > lo else 1.0
        zp = min(max(round(-lo / scale), 0), QMAX)
        return torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.uint8)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _calibrate(gm: fx.GraphModule, sites: list[Site], cfg: Int8StaticConfig, batches) -> _Ranges:
    ranges = _Ranges(cfg.percentile)
    watch = {f"{s.node.name}:in": s.input for s in sites} | {f"{s.node.name}:out": s.node for s in sites}
    bias = {s.node.name: s.bias.detach().float() for s in sites if s.kind == "linear" and s.bias is not None}

    def on_value(key: str, t: Tensor) -> None:
        name, _, which = key.rpartition(":")
        if which == "out" and name in bias:  # Linear's output range is its product's, before the bias
            t = t - bias[name]
        ranges.add(key, t)

    observe(gm, watch, batches, on_value)
    return ranges


@register_pass(Int8StaticConfig)
def quantize_int8_static(gm: fx.GraphModule, cfg: Int8StaticConfig, ctx: PassContext) -> PassResult:
    """Rewrite selected Conv/Linear sites into ``fxcompress::conv_qdq`` / ``linear_qdq`` with calibrated scales.

    Example:
        >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> images = torch.randn(8, 1, 6, 6)
        >>> cm = fxcompress.optimize(cnn, images, recipe="fold_bn,int8_static", calibration=[(images,)])
        >>> [r.action for r in cm.records]
        ['folded', 'int8-static']
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    if not sites:
        return PassResult(gm, False, records)
    if ctx.calibration is None:
        raise InputError(
            "int8_static needs calibration data to fix activation scales: optimize(..., calibration=[input_tuple, ...])"
        )
    ranges = _calibrate(gm, sites, cfg, ctx.calibration)
    ops = torch.ops.fxcompress
    tied = TiedWeights()  # a weight read by several layers: its int8 codes stored once, each call its own scales
    for site in sites:
        first = tied.lookup(site, site.kind)
        ctx.progress(site.name)
        x_scale, x_zp = ranges.qparams(f"{site.node.name}:in")
        y_scale, y_zp = ranges.qparams(f"{site.node.name}:out")
        q, w_scale = quantize_per_channel(site.weight, axis=0)
        bias = site.bias.detach().float() if site.bias is not None else None
        if site.kind == "linear":
            tensors = {
                "x_scale": x_scale,
                "x_zero_point": x_zp,
                "qweight": q.t().contiguous(),
                "w_scale": w_scale,
                "w_zero_point": None,
                "bias": bias,
                "y_scale": y_scale,
                "y_zero_point": y_zp,
            }
            new = replace_site(gm, site, ops.linear_qdq.default, tensors, shared=first[1] if first else None)
        else:
            qbias = torch.round(bias / (x_scale * w_scale)).to(torch.int32) if bias is not None else None
            tensors = {
                "x_scale": x_scale,
                "x_zero_point": x_zp,
                "qweight": q,
                "w_scale": w_scale,
                "w_zero_point": None,
                "qbias": qbias,
                "y_scale": y_scale,
                "y_zero_point": y_zp,
            }
            c = site.conv
            extra = (c["stride"], c["padding"], c["dilation"], c["groups"])
            new = replace_site(gm, site, ops.conv_qdq.default, tensors, extra, shared=first[1] if first else None)
        tied.remember(site, new, tensors, ("qweight", "w_scale"), site.kind)
        dq = q.float() * w_scale.reshape(-1, *([1] * (q.dim() - 1)))
        note = f"x in [{_lo(x_scale, x_zp):.3g}, {_hi(x_scale, x_zp):.3g}], y in [{_lo(y_scale, y_zp):.3g}, "
        note += f"{_hi(y_scale, y_zp):.3g}]"
        stored = tensors
        if first is not None:
            note += f"; shares the int8 weight of {first[0]}"
            stored = {k: v for k, v in tensors.items() if k not in first[1]}
        records.append(
            LayerRecord(
                site.name,
                site.kind,
                cfg.name,
                "int8-static",
                note,
                site.weight_bytes if first is None else nbytes(site.bias),
                nbytes(*stored.values()),
                sqnr_db(site.weight, dq),
                "weight SQNR dB",
                numerics=STATIC,
            )
        )
    return PassResult(gm, True, records)


def _lo(scale: Tensor, zp: Tensor) -> float:
    return float((QMIN - zp.float()) * scale)


def _hi(scale: Tensor, zp: Tensor) -> float:
    return float((QMAX - zp.float()) * scale)
