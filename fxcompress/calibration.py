"""Activation statistics from calibration batches, gathered by running the captured graph once per batch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from fxcompress.errors import InputError


class _AllSeen(Exception):
    """Raised to stop a calibration run once every watched node has been computed."""


class _HessianRecorder(fx.Interpreter):
    """Runs the graph and adds X^T X of every watched node's output to its accumulator, stopping early once the
    last watched node has run (layer-sequential GPTQ only needs the graph up to the layers it quantizes next)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, list[str]], sums: dict[str, torch.Tensor], rows: dict[str, int]):
        super().__init__(gm)
        self.watch, self.sums, self.rows = watch, sums, rows
        self.pending = set(watch)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for name in self.watch.get(n, ()):
            x = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)
            self.sums[name] = self.sums[name] + x.t() @ x if name in self.sums else x.t() @ x
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        self.pending.discard(n)
        if not self.pending:
            raise _AllSeen
        return out


def input_hessians(gm: fx.GraphModule, inputs_of: dict[str, fx.Node], batches: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """H = 2/n * X^T X of the activation feeding each named layer, pooled over every row of every batch.

    Args:
        gm: the graph to run: the float capture, or a partly quantized one for layer-sequential methods.
        inputs_of: layer name -> the node whose output is that layer's input (last dim = in_features).
        batches: calibration input tuples.

    Raises:
        InputError: no batches, or a batch the model cannot run on (its index is named).

    Example:
        >>> hs = input_hessians(gm, {site.name: site.input for site in sites}, calibration)
    """
    if not batches:
        raise InputError("calibration data is empty; pass calibration=[input_tuple, ...] with at least one batch")
    watch: dict[fx.Node, list[str]] = {}
    for name, node in inputs_of.items():
        watch.setdefault(node, []).append(name)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    with torch.no_grad():
        for i, batch in enumerate(batches):
            try:
                _HessianRecorder(gm, watch, sums, rows).run(*batch)
            except _AllSeen:
                pass
            except Exception as exc:
                shapes = [tuple(t.shape) for t in batch if isinstance(t, torch.Tensor)]
                raise InputError(f"calibration batch {i} (shapes {shapes}) does not fit the model: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return {name: 2 * sums[name] / rows[name] for name in sums}
