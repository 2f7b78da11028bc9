"""The output side of K-FAC: how much a change at a node moves the model's outputs, estimated with random probes.

Used to weight a layer's error by its effect on the model's outputs (output-aware SVD and its block refit).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import fx

from fxcompress.algorithms.statistics import require_batches, unfit_batch
from fxcompress.errors import InputError
from fxcompress.graph.calibration import batch_mask, real_rows
from fxcompress.graph.inputs import output_tensors


class _Probe(fx.Interpreter):
    """Runs the graph adding a zero tensor that requires grad to each watched node's output, so that backward
    leaves d(output)/d(node) in that zero tensor's ``.grad`` (the weights themselves need not require grad)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, str]):
        super().__init__(gm)
        self.watch = watch
        self.taps: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.watch:
            tap = torch.zeros_like(out, dtype=torch.float32, requires_grad=True)
            self.taps[self.watch[n]] = tap
            out = out + tap.to(out.dtype)
        return out


_PROBE_CHUNK = 8


def _probe_gradients(
    outs: list[torch.Tensor], taps: list[torch.Tensor], probes: int, generator: torch.Generator
) -> Iterable[list[Optional[torch.Tensor]]]:
    """d(z . outs)/d(tap) for ``probes`` random directions z, yielded per chunk of probes as one [chunk, *tap shape]
    tensor per tap (None where the outputs do not depend on it). A chunk shares one vmapped backward instead of a
    backward per probe; a graph with an op vmap cannot batch falls back to one per probe (same numbers, slower)."""
    batched = True
    for done in range(0, probes, _PROBE_CHUNK):
        n = min(_PROBE_CHUNK, probes - done)
        directions = [torch.randn((n, *o.shape), generator=generator).to(o.dtype) for o in outs]
        if batched:
            try:
                grads = torch.autograd.grad(
                    outs, taps, grad_outputs=directions, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except RuntimeError:
                batched = False
            else:
                yield list(grads)
                continue
        per_probe = [
            torch.autograd.grad(
                outs, taps, grad_outputs=[d[k] for d in directions], retain_graph=True, allow_unused=True
            )
            for k in range(n)
        ]
        yield [None if per_probe[0][t] is None else torch.stack([g[t] for g in per_probe]) for t in range(len(taps))]


def output_gauss_newton(
    gm: fx.GraphModule, outputs_of: dict[str, fx.Node], batches: Sequence[tuple], probes: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """G = E[g g^T] with g = J^T z, J the Jacobian of the model's outputs w.r.t. each named node, z ~ N(0, I).

    E over z of g g^T is J^T J: the Gauss-Newton matrix of the squared change in the model's outputs caused by a
    change at that node (the output-side Kronecker factor of K-FAC). Weighting a layer's output error by G makes
    per-layer errors comparable across layers (all are estimates of the same model-output error). ``probes`` random
    directions per batch, from a generator seeded with ``seed`` (deterministic). Padded rows are skipped like in
    :func:`observe`.

    Example:
        >>> gs = output_gauss_newton(gm, {site.name: site.node for site in sites}, calibration, probes=4)
        >>> {name: tuple(g.shape) for name, g in gs.items()}
        {'0': (64, 64), '2': (10, 10)}
    """
    require_batches(batches)
    watch = {node: name for name, node in outputs_of.items()}
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    examples = 0
    for i, batch in enumerate(batches):
        examples += next((t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
        mask = batch_mask(batches, i, batch)
        probe = _Probe(gm, watch)
        with torch.enable_grad():
            try:
                outs = [t for t in output_tensors(probe.run(*batch)) if t.is_floating_point() and t.requires_grad]
            except Exception as exc:
                raise unfit_batch(i, batch, exc) from exc
            if not outs:
                raise InputError(
                    "the model's outputs do not depend on the layers being factorized; nothing to weight by"
                )
            for grads in _probe_gradients(outs, list(probe.taps.values()), probes, generator):
                for name, g in zip(probe.taps, grads):
                    if g is None:
                        continue
                    g = torch.cat([real_rows(one, mask).reshape(-1, g.shape[-1]) for one in g]).float()
                    # a float32 product (this is the costly step) summed in float64: the estimate's Monte Carlo
                    # error (~1/sqrt(probes)) dwarfs float32 rounding
                    gg = (g.t() @ g).double()
                    sums[name] = sums[name] + gg if name in sums else gg
    missing = sorted(set(outputs_of) - set(sums))
    if missing:
        raise InputError(
            f"the model's outputs do not depend on layer(s) {missing}: exclude them from the pass, e.g. recipe "
            f"'svd:aware=output,exclude={'+'.join(missing)}'"
        )
    # per example, summed over its rows (tokens, pixels): with the per-row input Hessian, tr(dW H dW^T G) then
    # estimates one example's output error whatever the layer's row count, so layers compare fairly
    return {name: sums[name] / (probes * examples) for name in sums}


def metric_roots(gn: torch.Tensor, damp: float = 0.0, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric G^1/2 and G^-1/2 (float64) of a PSD metric such as :func:`output_gauss_newton`'s, after adding
    ``damp`` times its mean diagonal; eigenvalues below ``floor`` times the largest are raised to it, so that the
    inverse stays finite where G is (numerically) singular.

    ``||E G^1/2||^2 = tr(E G E^T)``: multiplying an error by the root measures it in the metric.

    Example:
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 8.0]])
        >>> root, inverse = metric_roots(g)
        >>> torch.allclose(root @ root, g.double()), torch.allclose(root @ inverse, torch.eye(2, dtype=torch.float64))
        (True, True)
    """
    g = gn.double()
    if damp:
        g = g + damp * torch.diag(g).mean().clamp_min(1e-300) * torch.eye(g.shape[0], dtype=g.dtype)
    values, vectors = torch.linalg.eigh(g)
    values = values.clamp_min(values.max().clamp_min(1e-300) * floor)
    return (vectors * values.sqrt()) @ vectors.t(), (vectors * values.rsqrt()) @ vectors.t()
