"""``int8`` and ``int8_dynamic``: symmetric per-output-channel int8 weights (:mod:`fxcompress.algorithms.quant`).

``algo=gptq`` (Linear layers, needs calibration data) keeps the round-to-nearest scales but chooses each code by GPTQ:
every input column's rounding error is compensated in the columns after it, which lowers the output error rather than
the weight error. Conv, Embedding and tied weights stay round-to-nearest. ``budget=`` keeps the layers whose rounding
costs the model's outputs most per byte saved in float (:mod:`fxcompress.algorithms.sensitivity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxcompress.algorithms import sensitivity
from fxcompress.algorithms.gptq import LayerHessians
from fxcompress.algorithms.int8_rewrite import int8_record, rewrite_int8
from fxcompress.algorithms.quant import (
    dequantize_per_channel,
    int8_bytes,
    quantize_per_channel,
    quantize_per_channel_gptq,
)
from fxcompress.errors import InputError
from fxcompress.graph.edit import TiedWeights
from fxcompress.graph.sites import Site, single_reader
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import PER_TENSOR_ACTIVATIONS, Tolerance

QUANTIZABLE_KINDS = ("linear", "conv1d", "conv2d", "embedding")


@dataclass(frozen=True)
class Int8Config(PassConfig):
    """Symmetric per-output-channel int8 weights for Linear, Conv1d/2d and Embedding.

    ``kinds`` limits the layer kinds (recipe text: ``int8:kinds=linear+embedding``). ``algo=gptq`` rounds Linear
    weights by GPTQ on the calibration data (``act_order``, ``damp`` and ``sequential`` as for ``int4``).
    ``budget=b`` (needs calibration) lets the selected layers take up to b of their fp32 bytes: the layers whose
    int8 rounding costs the model's outputs the most per byte saved stay float.
    """

    name: ClassVar[str] = "int8"
    shares_tied_weights: ClassVar[bool] = True
    handles_transposed_weights: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance] = Tolerance()  # weight-only int8: MiniLM 0.9995, SQNR 30 dB, max_rel 0.04
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
            raise ValueError(
                f"budget must be in (0.25, 1) (bytes of the selected layers vs fp32; int8 alone is ~0.25; "
                f"0 = all int8), got {self.budget}"
            )


@dataclass(frozen=True)
class Int8DynamicConfig(Int8Config):
    """``int8`` for Linear (and Embedding) with activations quantized at run time: exported for the ``cpu`` target
    as ``DynamicQuantizeMatMul`` with uint8 weights (the numerically safe U8U8 kernel; ORT's default S8 weights
    saturate on AVX2 CPUs without VNNI). Its floor includes the run-time activation rounding."""

    name: ClassVar[str] = "int8_dynamic"
    tolerance: ClassVar[Tolerance] = PER_TENSOR_ACTIVATIONS
    kinds: tuple[str, ...] = ("linear", "embedding")


@register_pass(Int8DynamicConfig)
@register_pass(Int8Config)
def quantize_int8(gm: fx.GraphModule, cfg: Int8Config, ctx: PassContext) -> PassResult:
    """Rewrite every selected site into an ``fxcompress::*_q8`` op holding int8 weights.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 4)))
        >>> quantize_int8(gm, Int8Config(), PassContext((torch.randn(1, 8),))).records[0].action
        'int8'
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    keep = _keep_float(gm, sites, cfg, ctx.calibration) if cfg.budget else {}
    gptq_sites = (
        [s for s in single_reader(sites) if s.kind == "linear" and s.name not in keep] if cfg.algo == "gptq" else []
    )
    if gptq_sites and ctx.calibration is None:
        raise InputError(f"{cfg.name} algo=gptq needs calibration data: optimize(..., calibration=[input_tuple, ...])")
    hessians = LayerHessians(gm, gptq_sites, ctx.calibration, cfg.sequential) if gptq_sites else None
    gptq_names = {s.name for s in gptq_sites}
    tied = TiedWeights()  # a weight read by several layers: its int8 codes and scales stored once
    for site in sites:
        ctx.progress(site.name)
        if site.name in keep:
            why = f"kept float by budget={cfg.budget} (int8 output error {keep[site.name]:.2e})"
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes)
            )
            continue
        layout = "conv" if site.kind.startswith("conv") else site.kind
        tie = tied.lookup(site, layout)
        shared = tie[1] if tie else None
        if tie is None and layout in _TRANSPOSED_TWIN:  # a head tied to its embedding, or the reverse
            tie = tied.lookup(site, _TRANSPOSED_TWIN[layout])
            shared = _transposed_codes(gm, tie[1], site.node) if tie else None
        quantized, how = None, _rtn_note(site, cfg, tie is not None)
        if site.name in gptq_names:
            quantized = quantize_per_channel_gptq(site.weight, hessians.pop(site), cfg.act_order, cfg.damp)
            how = "GPTQ" + (", act_order" if cfg.act_order else "")
        new, tensors, codes = rewrite_int8(gm, site, shared=shared, quantized=quantized)
        tied.remember(site, new, tensors, ("qweight", "scale"), layout)
        records.append(int8_record(site, cfg.name, tensors, codes, how, tied_to=tie[0] if tie else None))
    return PassResult(gm, bool(sites), records)


# an Embedding stores its int8 codes [vocab, hidden] and a Linear head [hidden, vocab] (linear_q8's layout), both with
# one scale per vocabulary row: a tied pair reads one table, the second reader through a transpose
_TRANSPOSED_TWIN = {"linear": "embedding", "embedding": "linear"}


def _transposed_codes(gm: fx.GraphModule, first: dict[str, fx.Node], before: fx.Node) -> dict[str, fx.Node]:
    """The first reader's codes transposed (left in the ONNX file as a Transpose of the int8 initializer, which ONNX
    Runtime folds when the session loads: the file holds the table once) and its scales as they are."""
    with gm.graph.inserting_before(before):
        codes = gm.graph.call_function(torch.ops.aten.t.default, (first["qweight"],))
    return {"qweight": codes, "scale": first["scale"]}


def _keep_float(gm: fx.GraphModule, sites: list[Site], cfg: Int8Config, batches) -> dict[str, float]:
    """Names (-> sensitivity) of the layers the byte budget leaves float."""
    readers = single_reader(sites)
    return sensitivity.keep_finer(
        gm,
        readers,
        cfg.budget,
        lambda s: dequantize_per_channel(*quantize_per_channel(s.weight)),
        int8_bytes,
        lambda s: s.weight_bytes,
        batches,
        cfg.name,
    )


def _rtn_note(site: Site, cfg: Int8Config, tied: bool) -> str:
    if cfg.algo != "gptq" or tied:
        return ""
    if site.kind != "linear":
        return "round-to-nearest (GPTQ rounds Linear layers only)"
    return "round-to-nearest (GPTQ skips a weight that several layers read)"
