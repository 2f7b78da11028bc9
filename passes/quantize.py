"""Weight quantization passes.

``int8``: symmetric per-output-channel int8, q = round(w / s) clipped to [-127, 127] with s = max|w_c| / 127 per
output channel c (rows of Linear/Embedding weights, output channels of Conv). -128 is left unused so the grid is
symmetric and q -> q + 128 re-encodes it exactly as uint8 for the CPU kernel. An all-zero channel gets s = 1 and
q = 0 rather than a division by zero.

``algo=gptq`` (Linear layers, needs calibration data) keeps those scales but chooses each code by GPTQ
(:mod:`fxcompress.passes.gptq`): every input column's rounding error is compensated in the columns after it, which
lowers the output error rather than the weight error. Conv, Embedding and tied weights stay round-to-nearest.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, fx

from fxcompress.errors import InputError
from fxcompress.graph_edit import replace_site
from fxcompress.passes import budget
from fxcompress.passes.gptq import LayerHessians, activation_order, gptq
from fxcompress.pipeline import LayerRecord, PassConfig, PassContext, PassResult, Tolerance, register_pass, select_sites
from fxcompress.sites import Site, nbytes

QUANTIZABLE_KINDS = ("linear", "conv1d", "conv2d", "embedding")


@dataclass(frozen=True)
class Int8Config(PassConfig):
    """Symmetric per-output-channel int8 weights for Linear, Conv1d/2d and Embedding.

    ``kinds`` limits the layer kinds (recipe text: ``int8:kinds=linear+embedding``). ``algo=gptq`` rounds Linear
    weights by GPTQ on the calibration data (``act_order``, ``damp`` and ``sequential`` as for ``int4``).
    ``budget=b`` (needs calibration) lets the selected layers take up to b of their fp32 bytes: the layers whose
    int8 rounding costs the model's outputs the most per byte saved stay float (:mod:`fxcompress.passes.budget`).
    """

    name: ClassVar[str] = "int8"
    tolerance: ClassVar[Tolerance] = Tolerance(cosine_min=0.999, top1_agreement_min=0.98, accuracy_drop_max_pp=1.0)
    kinds: tuple[str, ...] = QUANTIZABLE_KINDS
    algo: str = "rtn"
    act_order: bool = False
    damp: float = 0.01
    sequential: bool = True
    budget: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(QUANTIZABLE_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {QUANTIZABLE_KINDS}, got {self.kinds}")
        if self.algo not in ("rtn", "gptq"):
            raise ValueError(f"algo must be 'rtn' or 'gptq', got {self.algo!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.budget and not 0.25 < self.budget < 1:
            raise ValueError(f"budget must be in (0.25, 1) (bytes of the selected layers vs fp32; int8 alone is ~0.25; "
                             f"0 = all int8), got {self.budget}")


@dataclass(frozen=True)
class Int8DynamicConfig(Int8Config):
    """``int8`` for Linear (and Embedding) with activations quantized at run time: exported for the ``cpu`` target
    as ``DynamicQuantizeMatMul`` with uint8 weights (the numerically safe U8U8 kernel; ORT's default S8 weights
    saturate on AVX2 CPUs without VNNI). Its floor includes the run-time activation rounding."""

    name: ClassVar[str] = "int8_dynamic"
    tolerance: ClassVar[Tolerance] = Tolerance(cosine_min=0.99, top1_agreement_min=0.97, accuracy_drop_max_pp=1.0)
    kinds: tuple[str, ...] = ("linear", "embedding")


def quantize_per_channel(w: Tensor, axis: int = 0, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-channel quantization along ``axis``: returns (int8 q, fp32 scale) with w ~= q * scale.

    Example:
        >>> q, s = quantize_per_channel(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> q.tolist(), s.tolist()
        ([[64, -127], [0, 0]], [0.007874015718698502, 1.0])
    """
    qmax = 2 ** (bits - 1) - 1
    w32 = w.detach().to(torch.float32)
    dims = [d for d in range(w32.dim()) if d != axis]
    amax = w32.abs().amax(dim=dims) if dims else w32.abs()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    shape = [1] * w32.dim()
    shape[axis] = -1
    q = torch.clamp(torch.round(w32 / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return q, scale


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at 200 for exact reconstructions).

    Example:
        >>> round(sqnr_db(torch.ones(4), torch.ones(4) * 1.01), 1)
        40.0
    """
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0:
        return 200.0
    return 10 * math.log10(max(signal, 1e-300) / noise)


def quantize_per_channel_gptq(w: Tensor, hessian: Tensor, act_order: bool = False, damp: float = 0.01
                              ) -> tuple[Tensor, Tensor]:
    """:func:`quantize_per_channel`'s grid (axis 0, int8), codes chosen by GPTQ against the input Hessian ``hessian``.

    Example:
        >>> x = torch.randn(256, 16)
        >>> q, s = quantize_per_channel_gptq(torch.randn(4, 16), 2 * x.T @ x / 256)
        >>> q.dtype, s.shape
        (torch.int8, torch.Size([4]))
    """
    _, scale = quantize_per_channel(w, axis=0)
    step = scale.to(torch.float64)

    def round_column(col: int, pending: Tensor) -> Tensor:
        return torch.clamp(torch.round(pending[:, 0] / step), -127, 127) * step

    rounded = gptq(w, hessian, round_column, activation_order(hessian) if act_order else None, damp)
    return torch.round(rounded / step.unsqueeze(1)).to(torch.int8), scale


def rewrite_int8(gm: fx.GraphModule, site: Site, shared: Optional[dict[str, fx.Node]] = None,
                 quantized: Optional[tuple[Tensor, Tensor]] = None) -> tuple[fx.Node, dict[str, Optional[Tensor]], Tensor]:
    """Replace ``site`` by its ``fxcompress::*_q8`` op with per-output-channel int8 weights.

    ``shared`` passes the get_attr nodes of a tied weight already quantized; ``quantized`` the (codes, scales) to
    store when not round-to-nearest. Returns the new node, the tensors it stores and the dequantized weight (for the
    error).

    Example:
        >>> node, tensors, dq = rewrite_int8(gm, site)
    """
    q, scale = quantized if quantized is not None else quantize_per_channel(site.weight, axis=0)
    bias = site.bias.to(torch.float32) if site.bias is not None else None
    ops = torch.ops.fxcompress
    extra: tuple = ()
    if site.kind == "linear":
        target, tensors = ops.linear_q8.default, {"qweight": q.t().contiguous(), "scale": scale, "zero_point": None, "bias": bias}
    elif site.kind == "embedding":
        target, tensors = ops.embedding_q8.default, {"qweight": q, "scale": scale}
    else:
        c = site.conv
        target, tensors = ops.conv_q8.default, {"qweight": q, "scale": scale, "zero_point": None, "bias": bias}
        extra = (c["stride"], c["padding"], c["dilation"], c["groups"])
    new = replace_site(gm, site, target, tensors, extra, shared=shared)
    return new, tensors, _dequantize(q, scale)


@register_pass(Int8DynamicConfig)
@register_pass(Int8Config)
def quantize_int8(gm: fx.GraphModule, cfg: Int8Config, ctx: PassContext) -> PassResult:
    """Rewrite every selected site into an ``fxcompress::*_q8`` op holding int8 weights.

    Example:
        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 4)))
        >>> quantize_int8(gm, Int8Config(), PassContext((torch.randn(1, 8),))).records[0].action
        'int8'
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    keep = _keep_float(gm, sites, cfg, ctx.calibration) if cfg.budget else {}
    gptq_sites = [s for s in _single_reader(sites) if s.kind == "linear" and s.name not in keep] if cfg.algo == "gptq" else []
    if gptq_sites and ctx.calibration is None:
        raise InputError(f"{cfg.name} algo=gptq needs calibration data: optimize(..., calibration=[input_tuple, ...])")
    hessians = LayerHessians(gm, gptq_sites, ctx.calibration, cfg.sequential) if gptq_sites else None
    gptq_names = {s.name for s in gptq_sites}
    done: dict[tuple, tuple[str, dict[str, fx.Node]]] = {}  # (weight storage, layout) -> first site, its nodes
    for site in sites:
        ctx.progress(site.name)
        if site.name in keep:
            records.append(LayerRecord(site.name, site.kind, cfg.name, "skipped", f"kept float by budget={cfg.budget} "
                                       f"(int8 output error {keep[site.name]:.2e})", site.weight_bytes, site.weight_bytes))
            continue
        layout = "conv" if site.kind.startswith("conv") else site.kind
        tie = done.get((site.weight_key, layout))
        quantized, how = None, _rtn_note(site, cfg, tie is not None)
        if site.name in gptq_names:
            quantized = quantize_per_channel_gptq(site.weight, hessians.pop(site), cfg.act_order, cfg.damp)
            how = "GPTQ" + (", act_order" if cfg.act_order else "")
        new, tensors, dq = rewrite_int8(gm, site, shared=tie[1] if tie else None, quantized=quantized)
        if tie is None:
            done[(site.weight_key, layout)] = (site.name, {"qweight": new.args[1], "scale": new.args[2]})
            before, after, note = site.weight_bytes, nbytes(*tensors.values()), how
        else:
            before, after, note = nbytes(site.bias), nbytes(tensors.get("bias")), f"shares the int8 weight of {tie[0]}"
        records.append(LayerRecord(site.name, site.kind, cfg.name, "int8", note, before, after, sqnr_db(site.weight, dq), "weight SQNR dB"))
    return PassResult(gm, bool(sites), records)


def _single_reader(sites: list[Site]) -> list[Site]:
    """The sites whose weight no other selected site reads (GPTQ and the budget fit one reader's inputs)."""
    readers = Counter(s.weight_key for s in sites)
    return [s for s in sites if readers[s.weight_key] == 1]


def _dequantize(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(torch.float32) * scale.reshape(-1, *([1] * (q.dim() - 1)))


def int8_bytes(site: Site) -> int:
    """What the ``int8`` pass stores for ``site``: the codes, one fp32 scale per output channel, the bias.

    Example:
        >>> int8_bytes(site)  # Linear(384, 384): 147,456 codes + 1,536 scale bytes + 1,536 bias bytes
        150528
    """
    return site.weight.numel() + 4 * site.weight.shape[0] + nbytes(site.bias)


def _keep_float(gm: fx.GraphModule, sites: list[Site], cfg: Int8Config, batches) -> dict[str, float]:
    """Names (-> sensitivity) of the layers the byte budget leaves float."""
    return budget.keep_finer(gm, _single_reader(sites), cfg.budget, lambda s: _dequantize(*quantize_per_channel(s.weight)),
                             int8_bytes, lambda s: s.weight_bytes, batches, cfg.name)


def _rtn_note(site: Site, cfg: Int8Config, tied: bool) -> str:
    if cfg.algo != "gptq" or tied:
        return ""
    if site.kind != "linear":
        return "round-to-nearest (GPTQ rounds Linear layers only)"
    return "round-to-nearest (GPTQ skips a weight that several layers read)"
