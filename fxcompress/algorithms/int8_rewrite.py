"""A site rewritten to its int8 op (``linear_q8``, ``conv_q8`` or ``embedding_q8``) and its record: shared by the
``int8`` pass and by every pass that keeps some layers at int8 (``int4:budget=``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx

import fxcompress.ops.conv_q8  # noqa: F401  (registers the op)
import fxcompress.ops.embedding_q8  # noqa: F401
import fxcompress.ops.linear_q8  # noqa: F401
from fxcompress.algorithms.quant import quantize_per_channel, sqnr_db_per_channel
from fxcompress.graph.edit import replace_site
from fxcompress.graph.sites import Site, nbytes
from fxcompress.recipe.records import LayerRecord, Numerics

INT8 = Numerics("int8")


def rewrite_int8(
    gm: fx.GraphModule,
    site: Site,
    shared: Optional[dict[str, fx.Node]] = None,
    quantized: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[fx.Node, dict[str, Optional[Tensor]], Tensor]:
    """Replace ``site`` by its ``fxcompress::*_q8`` op with per-output-channel int8 weights.

    ``shared`` passes the get_attr nodes of a tied weight already quantized; ``quantized`` the (codes, scales) to
    store when not round-to-nearest. Returns the new node, the tensors it stores and the (codes, scales) (for the
    error).

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 4)))
        >>> node, tensors, (q, scale) = rewrite_int8(gm, find_sites(gm)[0][0])
        >>> node.target, tensors["qweight"].dtype
        (<OpOverload(op='fxcompress.linear_q8', overload='default')>, torch.int8)
    """
    q, scale = quantized if quantized is not None else quantize_per_channel(site.weight, axis=0)
    bias = site.bias.to(torch.float32) if site.bias is not None else None
    ops = torch.ops.fxcompress
    extra: tuple = ()
    if site.kind == "linear":
        target = ops.linear_q8.default
        tensors = {"qweight": q.t().contiguous(), "scale": scale, "zero_point": None, "bias": bias}
    elif site.kind == "embedding":
        target, tensors = ops.embedding_q8.default, {"qweight": q, "scale": scale}
    else:
        c = site.conv
        target, tensors = ops.conv_q8.default, {"qweight": q, "scale": scale, "zero_point": None, "bias": bias}
        extra = (c["stride"], c["padding"], c["dilation"], c["groups"])
    new = replace_site(gm, site, target, tensors, extra, shared=shared)
    return new, tensors, (q, scale)


def int8_record(
    site: Site,
    pass_name: str,
    tensors: dict[str, Optional[Tensor]],
    quantized: tuple[Tensor, Tensor],
    note: str,
    tied_to: Optional[str] = None,
) -> LayerRecord:
    """The record of a site :func:`rewrite_int8` rewrote; ``tied_to`` names the layer whose int8 weight it reuses
    (its bytes are then counted there, only its bias here).

    Example:
        >>> node, tensors, codes = rewrite_int8(gm, site)
        >>> int8_record(site, "int8", tensors, codes, "").bytes_after  # 4,096 codes, 64 scales, 64 biases
        4608
    """
    if tied_to is None:
        before, after = site.weight_bytes, nbytes(*tensors.values())
    else:
        before, after = nbytes(site.bias), nbytes(tensors.get("bias"))
        note = f"shares the int8 weight of {tied_to}"
    return LayerRecord(
        site.name,
        site.kind,
        pass_name,
        "int8",
        note,
        before,
        after,
        sqnr_db_per_channel(site.weight, *quantized),
        "weight SQNR dB",
        numerics=INT8,
    )
