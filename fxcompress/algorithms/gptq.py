"""GPTQ (Frantar et al., 2022), shared by the ``int4`` and ``int8`` passes.

GPTQ quantizes a Linear weight one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = 2/n X^T X of the layer's calibration inputs. That
minimises the output error ||XW^T - XQ^T|| rather than the weight error ||W - Q||. The grid (int4 blocks, int8
rows) is the caller's: :func:`gptq` only asks it to round one column.

:class:`LayerHessians` supplies the Hessians: from the float graph in one calibration pass, or (``sequential``)
per group of layers sharing an input, from the graph with every earlier layer already quantized, so later layers
correct for the error upstream (block by block: one forward pass over the calibration data in all).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, fx

from fxcompress.algorithms.layerwise import LayerwiseRun
from fxcompress.algorithms.statistics import add_second_moment, input_hessians, unfit_batch, warn_if_few_rows
from fxcompress.graph.residency import checkpoint
from fxcompress.graph.sites import Site

# (column index in the original order, the rows being rounded, the lazy batch's updated columns of those rows from
# this one on) -> the rounded column of those rows
RoundColumn = Callable[[int, slice, Tensor], Tensor]

# Rows are rounded this many weight elements at a time (64 MiB of float32): a row's rounding never reads another
# row, so a 128k-vocabulary head (400M weights: 1.5 GiB per float32 copy) is rounded in slices, not in full copies.
ROW_CHUNK_ELEMENTS = 1 << 24

# The precision of the column loop, as the reference GPTQ runs it; the inverse Hessian is factored in float64, once
# per weight. Against a float64 loop: the same layer output error to 4-5 digits, 18-30% less time (int4 block 64 and
# int8, 2048- and 4096-wide weights; benchmarks/experiments/gptq_precision.py).
WORK_DTYPE = torch.float32


def gptq(
    w: Tensor,
    hessian: Tensor,
    round_column: RoundColumn,
    order: Optional[Tensor] = None,
    damp: float = 0.01,
    lazy: int = 128,
    chunk_elements: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Round ``w`` [N, K] column by column in ``order`` (default: left to right), compensating each column's error
    in the columns after it; the caller keeps what ``round_column`` rounds.

    ``round_column(col, rows, pending)`` gets ``pending = w'[rows, i:i_end]``, the error-updated columns of the current
    lazy batch from the one to round on (``pending[:, 0]`` is column ``col``), so a blockwise grid can be fitted to
    the updated weights at a block's first column; it returns the rounded column of ``rows`` and keeps their codes.
    ``lazy`` columns are updated together (the paper's lazy batch); a blockwise caller passes a multiple of its block.
    Rows are independent: they go through in slices of about ``chunk_elements`` weights, each in ``dtype`` (default
    :data:`WORK_DTYPE`), with the inverse Hessian's factor computed once (default :data:`ROW_CHUNK_ELEMENTS`).

    Example:
        >>> w, x = torch.randn(8, 32), torch.randn(256, 32)
        >>> scale = w.abs().amax(1) / 127
        >>> codes = torch.zeros(8, 32)
        >>> def round_column(col, rows, pending):
        ...     codes[rows, col] = torch.round(pending[:, 0] / scale[rows]).clamp(-127, 127).float()
        ...     return codes[rows, col] * scale[rows]
        >>> gptq(w, 2 * x.T @ x / 256, round_column)
        >>> bool((codes.abs() <= 127).all()), bool((codes * scale[:, None] - w).abs().max() < 2 * scale.max())
        (True, True)
    """
    n, k = w.shape
    order = torch.arange(k) if order is None else order
    dtype = dtype or WORK_DTYPE
    hinv = _inverse_hessian_factor(hessian, order, damp).to(dtype)
    step = max(1, (chunk_elements or ROW_CHUNK_ELEMENTS) // k)
    for r0 in range(0, n, step):
        checkpoint()  # a folder-backed weight: let the slices already read go
        rows = slice(r0, min(r0 + step, n))
        _round_rows(w[rows].to(dtype)[:, order], hinv, rows, order, round_column, lazy)


def _inverse_hessian_factor(hessian: Tensor, order: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of H^-1 (columns in ``order``), H damped by ``damp`` x its mean diagonal."""
    h = hessian.to(torch.float64).clone()
    # Inputs the calibration never activated have zero rows in H: no error moves into or out of their columns, so
    # they are rounded to nearest. (The reference GPTQ zeroes them; a deployment that activates them would then
    # lose those weights without a trace.)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    if not torch.equal(order, torch.arange(len(order))):
        h = h[order][:, order]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    # one K x K float64 matrix alive next to the caller's at each step (an 8192-wide input: 0.5 GiB each)
    factor = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def _round_rows(w: Tensor, hinv: Tensor, rows: slice, order: Tensor, round_column: RoundColumn, lazy: int) -> None:
    """GPTQ's column loop on the rows ``w`` (columns permuted to ``order``), updated in place, in ``w``'s dtype."""
    n, k = w.shape
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = w[:, i1:i2], torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = round_column(int(order[i1 + i]), rows, w1[:, i:]).to(w.dtype)
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def activation_order(hessian: Tensor) -> Tensor:
    """Columns by decreasing diag(H) (``act_order``): the inputs with the most energy are rounded first, while the
    most columns are left to absorb their error.

    Example:
        >>> activation_order(torch.diag(torch.tensor([1.0, 3.0, 2.0])))
        tensor([1, 2, 0])
    """
    return torch.argsort(torch.diag(hessian), descending=True)


class LayerHessians:
    """The input Hessian of each GPTQ layer, computed when first asked for.

    With ``sequential=False`` all come from the graph as it is now (the float model), in one calibration pass. With
    ``sequential=True`` the Hessian of a layer is computed when the pass reaches it, together with those of the
    other layers reading the same input (they share one tensor), from the graph with the earlier layers already
    rewritten: block by block, as the reference GPTQ does, by a :class:`LayerwiseRun` that keeps each batch's
    activations at the frontier, so the whole pass costs one forward over the calibration data and holds one
    group's Hessian at a time.

    Example:
        >>> hessians = LayerHessians(gm, sites, calibration, sequential=True)
        >>> [tuple(hessians.pop(site).shape) for site in sites]  # (rewrite each site before asking for the next)
        [(64, 64), (64, 64)]
    """

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], calibration: Sequence[tuple], sequential: bool):
        self._sites, self._calibration = list(sites), calibration
        self._rows: dict[str, tuple[int, int]] = {}  # (rows, features) per layer: one calibration warning for all
        self._run = LayerwiseRun(gm, calibration) if sequential else None
        self._ready: dict[str, Tensor] = (
            {} if sequential else input_hessians(gm, {s.name: s.input for s in sites}, calibration, self._rows)
        )
        self._done: set[str] = set()
        if not sequential:
            warn_if_few_rows(self._rows)

    def pop(self, site: Site) -> Tensor:
        """The Hessian of ``site``'s input (released afterwards: each is asked for once)."""
        if site.name not in self._ready:
            assert self._run is not None
            group = [
                s.name
                for s in self._sites
                if s.input is site.input and s.name not in self._done and s.name not in self._ready
            ]
            values = self._run.advance_to(site.input)
            for i, value in enumerate(values):
                if value.shape[-1] != site.weight.shape[1]:
                    why = f"layer {site.name!r} takes {site.weight.shape[1]} input features, this batch gives it "
                    raise unfit_batch(i, self._calibration[i], ValueError(why + str(value.shape[-1])))
            hessian, rows = _hessian(values)
            self._ready.update(dict.fromkeys(group, hessian))
            self._rows.update(dict.fromkeys(group, (rows, hessian.shape[0])))
            if len(self._done) + len(group) == len(self._sites):  # the last group: every layer's rows are known
                warn_if_few_rows(self._rows)
        self._done.add(site.name)
        return self._ready.pop(site.name)


def _hessian(values: Sequence[Tensor]) -> tuple[Tensor, int]:
    """2/n X^T X over every row of every batch's value, and n."""
    total: Optional[Tensor] = None
    rows = 0
    for value in values:
        total, n = add_second_moment(total, value)
        rows += n
    assert total is not None
    return 2 * total / rows, rows
