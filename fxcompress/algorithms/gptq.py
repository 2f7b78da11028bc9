"""GPTQ (Frantar et al., 2022), shared by the ``int4`` and ``int8`` passes.

GPTQ quantizes a Linear weight one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = 2/n X^T X of the layer's calibration inputs. That
minimises the output error ||XW^T - XQ^T|| rather than the weight error ||W - Q||. The grid (int4 blocks, int8
rows) is the caller's: :func:`gptq` only asks it to round one column.

:class:`LayerHessians` supplies the Hessians: from the float graph in one calibration pass, or (``sequential``)
per group of layers sharing an input, from the graph with every earlier layer already quantized, so later layers
correct for the error upstream.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, fx

from fxcompress.algorithms.statistics import input_hessians, warn_if_few_rows
from fxcompress.graph.sites import Site

# (column index in the original order, the lazy batch's updated columns from this one on) -> the rounded column
RoundColumn = Callable[[int, Tensor], Tensor]


def gptq(
    w: Tensor,
    hessian: Tensor,
    round_column: RoundColumn,
    order: Optional[Tensor] = None,
    damp: float = 0.01,
    lazy: int = 128,
) -> Tensor:
    """Round ``w`` [N, K] column by column in ``order`` (default: left to right), compensating each column's error
    in the columns after it; returns the rounded weight in float64, columns in their original order.

    ``round_column(col, pending)`` gets ``pending = w'[:, i:i_end]``, the error-updated columns of the current lazy
    batch from the one to round on (``pending[:, 0]`` is column ``col``), so a blockwise grid can be fitted to the
    updated weights at a block's first column; it returns the rounded column and keeps its codes itself.
    ``lazy`` columns are updated together (the paper's lazy batch); a blockwise caller passes a multiple of its block.

    Example:
        >>> w, x = torch.randn(8, 32), torch.randn(256, 32)
        >>> scale = w.abs().amax(1) / 127
        >>> round_column = lambda col, pending: torch.round(pending[:, 0] / scale).clamp(-127, 127) * scale
        >>> q = gptq(w, 2 * x.T @ x / 256, round_column)
        >>> q.shape, bool(((q / scale[:, None]).round() - q / scale[:, None]).abs().max() < 1e-6)  # on the grid
        (torch.Size([8, 32]), True)
    """
    w = w.to(torch.float64).clone()
    n, k = w.shape
    h = hessian.to(torch.float64).clone()
    # Inputs the calibration never activated have zero rows in H: no error moves into or out of their columns, so
    # they are rounded to nearest. (The reference GPTQ zeroes them; a deployment that activates them would then
    # lose those weights without a trace.)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    order = torch.arange(k) if order is None else order
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded = torch.zeros(n, k, dtype=torch.float64)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = round_column(int(order[i1 + i]), w1[:, i:]).to(torch.float64)
            rounded[:, i1 + i] = q
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return rounded[:, torch.argsort(order)]


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
    other layers reading the same input, from the graph with the earlier layers already rewritten.

    Example:
        >>> hessians = LayerHessians(gm, sites, calibration, sequential=True)
        >>> [tuple(hessians.pop(site).shape) for site in sites]  # (rewrite each site before asking for the next)
        [(64, 64), (64, 64)]
    """

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], calibration: Sequence[tuple], sequential: bool):
        self._gm, self._sites, self._calibration = gm, list(sites), calibration
        self._rows: dict[str, tuple[int, int]] = {}  # (rows, features) per layer: one calibration warning for all
        self._ready: dict[str, Tensor] = (
            {} if sequential else input_hessians(gm, {s.name: s.input for s in sites}, calibration, self._rows)
        )
        self._done: set[str] = set()
        if not sequential:
            warn_if_few_rows(self._rows)

    def pop(self, site: Site) -> Tensor:
        """The Hessian of ``site``'s input (released afterwards: each is asked for once)."""
        if site.name not in self._ready:
            group = {
                s.name: s.input
                for s in self._sites
                if s.input is site.input and s.name not in self._done and s.name not in self._ready
            }
            self._ready.update(input_hessians(self._gm, group, self._calibration, self._rows))
            if len(self._done) + len(group) == len(self._sites):  # the last group: every layer's rows are known
                warn_if_few_rows(self._rows)
        self._done.add(site.name)
        return self._ready.pop(site.name)
