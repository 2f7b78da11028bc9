"""Mixed precision by measured sensitivity within a byte budget, shared by the ``int4`` and ``int8`` passes.

Each candidate layer's sensitivity is the model's output error on the calibration batches with only that layer
rounded to the pass's grid (relative squared error, summed over every float output). The layers that lose the most
per extra byte of the finer form (int8 instead of int4, float instead of int8) keep it, most sensitive first, while
the selected layers' bytes stay within ``budget`` x their fp32 bytes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, fx

from fxcompress.errors import InputError
from fxcompress.graph.edit import set_site_weight
from fxcompress.graph.inputs import output_tensors
from fxcompress.graph.sites import Site


def _flat_outputs(out) -> list[Tensor]:
    return [t.float() for t in output_tensors(out) if t.is_floating_point()]


def layer_sensitivity(
    gm: fx.GraphModule, sites: Sequence[Site], rounded: Callable[[Site], Tensor], batches
) -> dict[str, float]:
    """Relative squared error of the model's outputs on ``batches`` when only that layer's weight is ``rounded(site)``.

    Example:
        >>> sens = layer_sensitivity(gm, sites, lambda s: torch.zeros_like(s.weight), calibration)  # a layer zeroed
        >>> sorted(sens), all(v > 0.1 for v in sens.values())
        (['0', '2'], True)
    """
    with torch.no_grad():
        reference = [_flat_outputs(gm(*b)) for b in batches]
        power = sum(float(t.pow(2).sum()) for ref in reference for t in ref)
        result = {}
        for site in sites:
            old = set_site_weight(gm, site, rounded(site).to(site.weight.dtype))
            try:
                err = sum(
                    float((o - r).pow(2).sum())
                    for b, ref in zip(batches, reference)
                    for o, r in zip(_flat_outputs(gm(*b)), ref)
                )
            finally:
                set_site_weight(gm, site, old)
            result[site.name] = err / max(power, 1e-30)
    return result


def keep_finer(
    gm: fx.GraphModule,
    sites: Sequence[Site],
    budget: float,
    rounded: Callable[[Site], Tensor],
    coarse_bytes: Callable[[Site], int],
    fine_bytes: Callable[[Site], int],
    batches,
    pass_name: str,
) -> dict[str, float]:
    """Names (-> sensitivity) of the layers that keep the finer form within ``budget`` x their fp32 bytes.

    ``coarse_bytes(site)`` / ``fine_bytes(site)``: a layer's bytes (bias included) in the pass's form and in the finer
    one; ``rounded(site)``: its weight on the pass's grid, for the sensitivity.

    Example:
        >>> from fxcompress.algorithms.quant import dequantize_per_channel, int8_bytes, quantize_per_channel
        >>> int8 = lambda s: dequantize_per_channel(*quantize_per_channel(s.weight))
        >>> fp32_bytes = lambda s: s.weight_bytes
        >>> keep_finer(gm, sites, 0.5, int8, int8_bytes, fp32_bytes, calibration, "int8")  # doctest: +ELLIPSIS
        {'2': ...}
    """
    if batches is None:
        raise InputError(
            f"{pass_name} budget= needs calibration data to measure layer sensitivity: optimize(..., calibration=[...])"
        )
    sens = layer_sensitivity(gm, sites, rounded, batches)
    allowed = budget * sum(s.weight_bytes for s in sites) - sum(coarse_bytes(s) for s in sites)
    extra = {s.name: fine_bytes(s) - coarse_bytes(s) for s in sites}
    keep = {}
    for name in sorted(sens, key=lambda n: sens[n] / max(extra[n], 1), reverse=True):
        if extra[name] <= allowed:
            allowed -= extra[name]
            keep[name] = sens[name]
    return keep
