"""Magnitude sparsity: 2:4 semi-structured (``sparse24``) and unstructured (``sparsity:ratio=``).

Both zero weights in place and keep every tensor dense. That is the honest state of the art for export: ONNX has no
sparse weight format ONNX Runtime executes faster or stores smaller, so the artifact is **exactly as large and as
fast as before**; the records say so (bytes after = bytes before). What it is good for: GPUs with sparse tensor
cores (2:4, e.g. torch's ``to_sparse_semi_structured``), and as a study of how much of a model is redundant before
choosing structured pruning, which does shrink it.

2:4 keeps, in every group of 4 consecutive input weights of an output row, the 2 of largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from fxcompress.algorithms.quant import sqnr_db
from fxcompress.graph.edit import set_site_weight
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import Tolerance

DENSE_NOTE = "weights zeroed, tensor stays dense: no bytes or speed saved in ONNX / ORT"


@dataclass(frozen=True)
class Sparse24Config(PassConfig):
    """2:4 semi-structured magnitude sparsity on Linear / Conv weights (dense storage)."""

    name: ClassVar[str] = "sparse24"
    tolerance: ClassVar[Tolerance] = Tolerance(0.9, 0.75, 3.0, 1.0, 0.5, 0.85, 5.0)
    handles_transposed_weights: ClassVar[bool] = True


@dataclass(frozen=True)
class SparsityConfig(PassConfig):
    """Unstructured magnitude sparsity: zero the ``ratio`` smallest weights of each layer (dense storage)."""

    name: ClassVar[str] = "sparsity"
    tolerance: ClassVar[Tolerance] = Tolerance(0.9, 0.75, 3.0, 1.0, 0.5, 0.85, 5.0)
    handles_transposed_weights: ClassVar[bool] = True
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")


def mask_2_4(w: Tensor) -> Tensor:
    """Boolean mask keeping the 2 largest |w| of every 4 consecutive input weights (last dim of [out, in, ...]).

    Example:
        >>> mask_2_4(torch.tensor([[1.0, -4.0, 3.0, 0.5]])).tolist()
        [[False, True, True, False]]
    """
    rows = w.reshape(w.shape[0], -1)
    groups = rows.abs().reshape(rows.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(w.shape)


def mask_magnitude(w: Tensor, ratio: float) -> Tensor:
    """Boolean mask keeping the ``1 - ratio`` largest |w| of the tensor.

    Example:
        >>> mask_magnitude(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5).tolist()
        [False, True, True, False]
    """
    k = int(ratio * w.numel())
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = w.abs().flatten().kthvalue(k).values
    return w.abs() > threshold


def _sparsify(gm: fx.GraphModule, cfg: PassConfig, ctx: PassContext, make_mask) -> PassResult:
    sites, records = select_sites(gm, cfg, ("linear", "conv1d", "conv2d"))
    changed = False
    for site in sites:
        w = site.weight
        why = make_mask(w)
        if isinstance(why, str):
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes)
            )
            continue
        sparse = w * why
        set_site_weight(gm, site, sparse.contiguous())
        changed = True
        zeros = 1 - why.float().mean().item()
        records.append(
            LayerRecord(
                site.name,
                site.kind,
                cfg.name,
                "sparse",
                f"{zeros:.0%} zeros; {DENSE_NOTE}",
                site.weight_bytes,
                site.weight_bytes,
                sqnr_db(w, sparse),
                "weight SQNR dB",
                extra={"zero_fraction": zeros, "dense_storage": True},
                numerics=Numerics("float32"),
            )
        )
    return PassResult(gm, changed, records)


@register_pass(Sparse24Config)
def sparsify_2_4(gm: fx.GraphModule, cfg: Sparse24Config, ctx: PassContext) -> PassResult:
    """Apply 2:4 magnitude masks to Linear/Conv weights (in-features must be a multiple of 4).

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="sparse24")   # same bytes; see the records' note
    """

    def mask(w: Tensor):
        per_row = w[0].numel()
        return f"{per_row} inputs per output is not a multiple of 4" if per_row % 4 else mask_2_4(w)

    return _sparsify(gm, cfg, ctx, mask)


@register_pass(SparsityConfig)
def sparsify_magnitude(gm: fx.GraphModule, cfg: SparsityConfig, ctx: PassContext) -> PassResult:
    """Zero the ``ratio`` smallest-magnitude weights of every selected Linear/Conv.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="sparsity:ratio=0.7")
    """
    return _sparsify(gm, cfg, ctx, lambda w: mask_magnitude(w, cfg.ratio))
