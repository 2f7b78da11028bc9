"""Static int8: per-channel int8 weights and uint8 activations whose scales are fixed from calibration data.

For every selected Conv/Linear the pass records the range of its input and of its output (for Linear, of the
product before the bias) over the calibration batches, run through the float graph, and rewrites the site into
``fxcompress::conv_qdq`` / ``linear_qdq``. Ranges are min/max, or the ``percentile``-th percentile of |x| per batch
averaged over batches when ``percentile < 100`` (robust to rare outliers). The range always contains 0 so zero
padding is exact. Conv bias is stored int32 at scale x_scale * w_scale, as QLinearConv wants it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from fxcompress.algorithms.quant import quantize_per_channel, sqnr_db
from fxcompress.algorithms.statistics import observe
from fxcompress.errors import InputError
from fxcompress.graph.edit import TiedWeights, add_constant, replace_site
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
    handles_transposed_weights: ClassVar[bool] = True
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


_RELU_TARGETS = {torch.relu, torch.nn.functional.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


def _relu_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU that is ``node``'s only reader, if any."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_function" and user.target in _RELU_TARGETS:
        return user
    if user.op == "call_method" and user.target in ("relu", "relu_"):
        return user
    if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), torch.nn.ReLU):
        return user
    return None


_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}


def _residual_adds(gm: fx.GraphModule, sites: list[Site]) -> list[tuple[fx.Node, list[int]]]:
    """The additions of two tensors of which at least one is a selected convolution's output (a residual block's
    sum), each with the positions of its other, not yet quantized, inputs."""
    convs = {s.node for s in sites if s.kind.startswith("conv")}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _ADD_TARGETS or len(node.args) != 2 or node.kwargs:
            continue
        if all(isinstance(a, fx.Node) for a in node.args) and any(a in convs for a in node.args):
            found.append((node, [i for i, a in enumerate(node.args) if a not in convs]))
    return found


def _quantize_residual_adds(gm: fx.GraphModule, adds, ranges: _Ranges) -> int:
    """Round the inputs and the output of each residual sum to uint8 at their calibrated scales (the output at the
    ReLU's range when a ReLU follows, which is then exact), so that ORT fuses ``DQ, DQ -> Add -> Q`` into
    ``QLinearAdd`` and the block stays in integers from one convolution to the next."""
    op = torch.ops.fxcompress.activation_qdq.default
    for add, others in adds:
        for i in others:
            src = add.args[i]
            scale, zp = ranges.qparams(f"{add.name}:in{i}")
            with gm.graph.inserting_before(add):
                args = (src, add_constant(gm, f"{add.name}_in{i}_scale", scale, add))
                args += (add_constant(gm, f"{add.name}_in{i}_zero_point", zp, add),)
                add.update_arg(i, gm.graph.call_function(op, args))
        scale, zp = ranges.qparams(f"{add.name}:out")
        after = add.next
        s_node = add_constant(gm, f"{add.name}_out_scale", scale, after)
        z_node = add_constant(gm, f"{add.name}_out_zero_point", zp, after)
        with gm.graph.inserting_before(after):
            rounded = gm.graph.call_function(op, (add, s_node, z_node))
        add.replace_all_uses_with(rounded, delete_user_cb=lambda user, keep=rounded: user is not keep)
    return len(adds)


def _calibrate(gm: fx.GraphModule, sites: list[Site], cfg: Int8StaticConfig, batches) -> _Ranges:
    ranges = _Ranges(cfg.percentile)
    # A convolution read only by a ReLU gets the ReLU's output range: quantizing to [0, hi] with zero point 0 is the
    # ReLU, exactly, and the next layer's input range is then the same tensor's, so ORT drops the ReLU and the
    # dequantize/quantize pair between two QLinearConvs instead of requantizing there.
    outputs = {s.node.name: (_relu_after(gm, s.node) if s.kind.startswith("conv") else None) or s.node for s in sites}
    watch = {f"{s.node.name}:in": s.input for s in sites} | {f"{n}:out": v for n, v in outputs.items()}
    for add, others in _residual_adds(gm, sites):
        watch[f"{add.name}:out"] = _relu_after(gm, add) or add
        watch |= {f"{add.name}:in{i}": add.args[i] for i in others}
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
    adds = _residual_adds(gm, sites)
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
    _quantize_residual_adds(gm, adds, ranges)
    return PassResult(gm, True, records)


def _lo(scale: Tensor, zp: Tensor) -> float:
    return float((QMIN - zp.float()) * scale)


def _hi(scale: Tensor, zp: Tensor) -> float:
    return float((QMAX - zp.float()) * scale)
