"""Run the captured graph over every calibration batch one node at a time, so that a layer-sequential method
(GPTQ with ``sequential=true``) sees each layer's inputs from the layers before it *as already rewritten*, at the
cost of one forward pass in all.

The reference GPTQ quantizes a transformer block by block: it keeps the calibration activations at the block boundary,
runs them through one block, quantizes it, and feeds the quantized block's outputs to the next. On a flat fx graph
the boundary is the frontier of nodes already computed: :class:`LayerwiseRun` keeps, for every batch, the values
that a node not yet computed still reads, computes up to the input of the next layer to quantize, and continues from
there after that layer was rewritten. Running each batch from the start instead costs one partial forward per layer
group (quadratic in depth: 4 groups x 32 layers of a 4B decoder).

The graph may be edited between two calls. An edit after the frontier (the next site replaced) is picked up as
the run reaches it. An edit that reaches behind it (a node already computed replaced, or a freed value read again)
makes the next call start over from the inputs: slower, never stale.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from fxcompress.algorithms.statistics import require_batches, unfit_batch
from fxcompress.graph.calibration import batch_mask, real_rows


class _Restart(Exception):
    """The graph changed behind the frontier: the values held no longer describe it."""


class LayerwiseRun:
    """The values of ``gm``'s nodes on every calibration batch, computed up to the node asked for.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> run = LayerwiseRun(gm, [(torch.randn(3, 4),), (torch.randn(5, 4),)])
        >>> relu = next(n for n in gm.graph.nodes if n.name == "_1")
        >>> [tuple(v.shape) for v in run.advance_to(relu)]  # the second Linear's input, one per batch
        [(3, 8), (5, 8)]
        >>> run.evaluated  # the last Linear was not run
        3
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple]) -> None:
        require_batches(batches)
        self._gm, self._batches = gm, batches
        self._masks = [batch_mask(batches, i, b) for i, b in enumerate(batches)]
        self._reset()
        self.evaluated = 0  # node evaluations (per batch: one forward pass = the number of nodes)

    def _reset(self) -> None:
        self._envs: list[dict[fx.Node, object]] = [{} for _ in self._batches]
        self._done: set[fx.Node] = set()

    def advance_to(self, node: fx.Node) -> list[torch.Tensor]:
        """``node``'s value on each batch (padded positions dropped when the calibration has a token mask), from
        the graph as it is now, computing what is not computed yet."""
        try:
            return self._advance(node)
        except _Restart:
            self._reset()
            return self._advance(node)

    def _advance(self, target: fx.Node) -> list[torch.Tensor]:
        if target.graph is not self._gm.graph or target.op == "output":
            raise ValueError(f"node {target.name!r} is not a computed node of this graph")
        # built per call: an edit may have added attributes or submodules since the last one
        interpreters = [fx.Interpreter(self._gm, garbage_collect_values=False) for _ in self._batches]
        for interpreter, env in zip(interpreters, self._envs):
            interpreter.env = env
        placeholders = [p for p in self._gm.graph.nodes if p.op == "placeholder"]
        for n in self._gm.graph.nodes:
            if n.op == "output":
                break
            if n not in self._done:
                if any(u in self._done for u in n.users) or any(a not in self._envs[0] for a in n.all_input_nodes):
                    raise _Restart  # a computed node reads this new one, or one of its inputs was freed / replaced
                for i, (interpreter, batch) in enumerate(zip(interpreters, self._batches)):
                    if n.op == "placeholder":
                        interpreter.args_iter = iter(batch[placeholders.index(n) :])
                    with torch.no_grad():
                        try:
                            interpreter.env[n] = interpreter.run_node(n)
                        except Exception as exc:
                            raise unfit_batch(i, batch, exc) from exc
                self._done.add(n)
                self.evaluated += 1
            if n is target:
                break
        values = [real_rows(env[target], mask) for env, mask in zip(self._envs, self._masks)]  # type: ignore[arg-type]
        self._release()
        return values

    def _release(self) -> None:
        """Free every value that no node still to compute reads. The graph's output is never computed: a value only
        it reads (a decoder's present key/values) is freed too."""
        live = set(self._gm.graph.nodes)
        self._done &= live
        for n in list(self._envs[0]):
            if n not in live or all(u in self._done or u.op == "output" for u in n.users):
                for env in self._envs:
                    env.pop(n, None)
