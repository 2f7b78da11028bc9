"""Activation statistics from calibration batches, gathered by running the captured graph node by node."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from fxcompress.capture import output_tensors
from fxcompress.errors import CalibrationWarning, InputError

# Below this many real rows (tokens, samples) per input feature a Hessian-fitted method fits the calibration data's
# own subspace. MiniLM's FFN SVD (1,536 inputs) whitened on 32 sentences (~400 tokens): cosine 0.98 on them, 0.75 on
# held-out text; from 4 rows per feature on, held-out text is within 0.01 of where more data takes it
# (benchmarks/results/calibration_size.md).
MIN_ROWS_PER_FEATURE = 4


class Calibration(list):
    """Calibration batches (a list of input tuples) that can say which positions are padding.

    ``token_mask`` is the index of the input holding a [batch, seq] mask (1 = real token, 0 = padding, e.g. a
    tokenizer's attention_mask). Statistics then skip padded positions: with short sentences padded to a fixed
    length most rows are padding, and their activations would otherwise dominate the Hessians and ranges that
    GPTQ, activation-aware SVD, static int8 and activation pruning are fitted to.

    Example:
        >>> calib = Calibration([(ids, mask) for ids, mask in batches], token_mask=1)
        >>> cm = fxcompress.optimize(model, example, recipe="int4:algo=gptq", calibration=calib)
    """

    def __init__(self, batches: Iterable[tuple] = (), token_mask: Optional[int] = None) -> None:
        super().__init__(batches)
        self.token_mask = token_mask


def real_rows(value: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``value`` without its padded positions, as [tokens, *rest], when its leading dims are the mask's.

    Example:
        >>> real_rows(torch.zeros(2, 3, 8), torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([3, 8])
    """
    if mask is None or value.dim() <= mask.dim() or tuple(value.shape[: mask.dim()]) != tuple(mask.shape):
        return value
    return value[mask.bool()]


def _require_batches(batches: Sequence[tuple]) -> None:
    if not batches:
        raise InputError("calibration data is empty; pass calibration=[input_tuple, ...] with at least one batch")


def batch_mask(batches: Sequence[tuple], i: int, batch: tuple) -> Optional[torch.Tensor]:
    """Batch ``i``'s [batch, seq] padding mask when ``batches`` is a :class:`Calibration` with a token mask.

    Example:
        >>> batch_mask(Calibration([(ids, mask)], token_mask=1), 0, (ids, mask)) is mask
        True
    """
    token_mask = getattr(batches, "token_mask", None)
    if token_mask is None:
        return None
    if not (token_mask < len(batch) and isinstance(batch[token_mask], torch.Tensor) and batch[token_mask].dim() == 2):
        raise InputError(f"calibration token_mask={token_mask} must name a [batch, seq] tensor input; "
                         f"batch {i} has {len(batch)} inputs")
    return batch[token_mask]


def _unfit_batch(i: int, batch: tuple, exc: Exception) -> InputError:
    shapes = [tuple(t.shape) for t in batch if isinstance(t, torch.Tensor)]
    return InputError(f"calibration batch {i} (shapes {shapes}) does not fit the model: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


class _AllSeen(Exception):
    """Raised to stop a calibration run once every watched node has been computed."""


class _Recorder(fx.Interpreter):
    """Runs the graph, hands every watched node's output to ``on_value`` and stops once the last one has run
    (layer-sequential methods only need the graph up to the layers they quantize next)."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, list[str]], on_value: Callable[[str, torch.Tensor], None]):
        super().__init__(gm)
        self.watch, self.on_value = watch, on_value
        self.pending = set(watch)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for name in self.watch.get(n, ()):
            self.on_value(name, out.detach())
        self.pending.discard(n)
        if not self.pending:
            raise _AllSeen
        return out


def observe(gm: fx.GraphModule, nodes: dict[str, fx.Node], batches: Sequence[tuple],
            on_value: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``gm`` on every calibration batch and call ``on_value(name, tensor)`` with each named node's output
    (only the real tokens', as [tokens, features], when ``batches`` is a :class:`Calibration` with a token mask).

    Raises:
        InputError: no batches, or a batch the model cannot run on (its index and shapes are named).

    Example:
        >>> seen = {}
        >>> observe(gm, {"fc_in": site.input}, calibration, lambda name, t: seen.setdefault(name, []).append(t))
    """
    _require_batches(batches)
    for i in range(len(batches)):
        observe_batch(gm, nodes, batches, i, on_value)


def observe_batch(gm: fx.GraphModule, nodes: dict[str, fx.Node], batches: Sequence[tuple], i: int,
                  on_value: Callable[[str, torch.Tensor], None]) -> None:
    """:func:`observe` for batch ``i`` alone (errors name its index in ``batches``).

    Example:
        >>> observe_batch(gm, {"fc": site.input}, calibration, 0, lambda name, value: print(name, value.shape))
    """
    watch: dict[fx.Node, list[str]] = {}
    for name, node in nodes.items():
        watch.setdefault(node, []).append(name)
    batch = batches[i]
    mask = batch_mask(batches, i, batch)
    with torch.no_grad():
        try:
            _Recorder(gm, watch, lambda name, t: on_value(name, real_rows(t, mask))).run(*batch)
        except _AllSeen:
            pass
        except Exception as exc:
            raise _unfit_batch(i, batch, exc) from exc


def input_hessians(gm: fx.GraphModule, inputs_of: dict[str, fx.Node], batches: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """H = 2/n * X^T X of the activation feeding each named layer, pooled over every row of every batch.

    Warns (:class:`~fxcompress.CalibrationWarning`) when a layer saw fewer than ``MIN_ROWS_PER_FEATURE`` real rows
    per input feature: H is then (nearly) rank-deficient and whatever is fitted to it fits the calibration data.

    Args:
        gm: the graph to run: the float capture, or a partly quantized one for layer-sequential methods.
        inputs_of: layer name -> the node whose output is that layer's input (last dim = in_features).
        batches: calibration input tuples.

    Example:
        >>> hs = input_hessians(gm, {site.name: site.input for site in sites}, calibration)
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def accumulate(name: str, out: torch.Tensor) -> None:
        x = out.reshape(-1, out.shape[-1]).to(torch.float64)
        sums[name] = sums[name] + x.t() @ x if name in sums else x.t() @ x
        rows[name] = rows.get(name, 0) + x.shape[0]

    observe(gm, inputs_of, batches, accumulate)
    _warn_if_few_rows({name: (rows[name], sums[name].shape[0]) for name in sums})
    return {name: 2 * sums[name] / rows[name] for name in sums}


def paired_moments(student: fx.GraphModule, teacher: fx.GraphModule, student_input: fx.Node, teacher_input: fx.Node,
                   batches: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_s^T X_s, X_t^T X_s) / rows: the second moment of a layer's input in ``student`` and its cross moment with
    the same layer's input in ``teacher``, row for row on the same batches (padded rows skipped in both).

    A layer refitted to these maps the input it really gets, after the layers before it were compressed, to the
    output the uncompressed model computes: ``W X_t^T X_s (X_s^T X_s)^-1`` minimises ||X_t W^T - X_s M^T||.

    Example:
        >>> h_ss, p_ts = paired_moments(compressed_gm, float_gm, site.input, float_inputs[site.name], calibration)
    """
    _require_batches(batches)
    h: Optional[torch.Tensor] = None
    p: Optional[torch.Tensor] = None
    rows = 0
    for i in range(len(batches)):  # a batch at a time: the paired rows are not all held at once
        seen: dict[str, torch.Tensor] = {}
        observe_batch(teacher, {"t": teacher_input}, batches, i, seen.__setitem__)
        observe_batch(student, {"s": student_input}, batches, i, seen.__setitem__)
        xt, xs = (seen[k].reshape(-1, seen[k].shape[-1]).to(torch.float64) for k in ("t", "s"))
        if xt.shape != xs.shape:
            raise InputError(f"layer input {student_input.name!r} has shape {tuple(xs.shape)} in the compressed graph "
                             f"but {tuple(xt.shape)} in the float one; a refit needs the same rows and features")
        h = xs.t() @ xs if h is None else h + xs.t() @ xs
        p = xt.t() @ xs if p is None else p + xt.t() @ xs
        rows += xs.shape[0]
    assert h is not None and p is not None
    return h / rows, p / rows


def _warn_if_few_rows(rows_and_features: dict[str, tuple[int, int]]) -> None:
    few = {name: rk for name, rk in rows_and_features.items() if rk[0] < MIN_ROWS_PER_FEATURE * rk[1]}
    if not few:
        return
    name, (n, k) = min(few.items(), key=lambda item: item[1][0] / item[1][1])
    warnings.warn(
        f"calibration gave {n} real rows for layer {name!r} with {k} input features ({len(few)} layer(s) below "
        f"{MIN_ROWS_PER_FEATURE} rows per feature): a method fitted to these Hessians (GPTQ, activation-aware SVD) "
        f"fits the calibration data's subspace and may do worse on other inputs; pass at least "
        f"{MIN_ROWS_PER_FEATURE * k} real rows (tokens x sentences, or samples).",
        CalibrationWarning, stacklevel=3)

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


def _probe_gradients(outs: list[torch.Tensor], taps: list[torch.Tensor], probes: int,
                     generator: torch.Generator) -> Iterable[list[Optional[torch.Tensor]]]:
    """d(z . outs)/d(tap) for ``probes`` random directions z, yielded per chunk of probes as one [chunk, *tap shape]
    tensor per tap (None where the outputs do not depend on it). A chunk shares one vmapped backward instead of a
    backward per probe; a graph with an op vmap cannot batch falls back to one per probe (same numbers, slower)."""
    batched = True
    for done in range(0, probes, _PROBE_CHUNK):
        n = min(_PROBE_CHUNK, probes - done)
        directions = [torch.randn((n, *o.shape), generator=generator).to(o.dtype) for o in outs]
        if batched:
            try:
                grads = torch.autograd.grad(outs, taps, grad_outputs=directions, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            except RuntimeError:
                batched = False
            else:
                yield list(grads)
                continue
        per_probe = [torch.autograd.grad(outs, taps, grad_outputs=[d[k] for d in directions], retain_graph=True,
                                         allow_unused=True) for k in range(n)]
        yield [None if per_probe[0][t] is None else torch.stack([g[t] for g in per_probe]) for t in range(len(taps))]


def output_gauss_newton(gm: fx.GraphModule, outputs_of: dict[str, fx.Node], batches: Sequence[tuple],
                        probes: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """G = E[g g^T] with g = J^T z, J the Jacobian of the model's outputs w.r.t. each named node, z ~ N(0, I).

    E over z of g g^T is J^T J: the Gauss-Newton matrix of the squared change in the model's outputs caused by a
    change at that node (the output-side Kronecker factor of K-FAC). Weighting a layer's output error by G makes
    per-layer errors comparable across layers (all are estimates of the same model-output error). ``probes`` random
    directions per batch, from a generator seeded with ``seed`` (deterministic). Padded rows are skipped like in
    :func:`observe`.

    Example:
        >>> gs = output_gauss_newton(gm, {site.name: site.node for site in sites}, calibration, probes=16)
    """
    _require_batches(batches)
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
                raise _unfit_batch(i, batch, exc) from exc
            if not outs:
                raise InputError("the model's outputs do not depend on the layers being factorized; nothing to weight by")
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
        raise InputError(f"the model's outputs do not depend on layer(s) {missing}; exclude them from the pass")
    # per example, summed over its rows (tokens, pixels): with the per-row input Hessian, tr(dW H dW^T G) then
    # estimates one example's output error whatever the layer's row count, so layers compare fairly
    return {name: sums[name] / (probes * examples) for name in sums}


def metric_roots(gn: torch.Tensor, damp: float = 0.0, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric G^1/2 and G^-1/2 (float64) of a PSD metric such as :func:`output_gauss_newton`'s, after adding
    ``damp`` times its mean diagonal; eigenvalues below ``floor`` times the largest are raised to it, so that the
    inverse stays finite where G is (numerically) singular.

    ``||E G^1/2||^2 = tr(E G E^T)``: multiplying an error by the root measures it in the metric.

    Example:
        >>> root, inverse = metric_roots(output_gauss_newton(gm, outputs_of, calibration)["fc1"], damp=0.01)
    """
    g = gn.double()
    if damp:
        g = g + damp * torch.diag(g).mean().clamp_min(1e-300) * torch.eye(g.shape[0], dtype=g.dtype)
    values, vectors = torch.linalg.eigh(g)
    values = values.clamp_min(values.max().clamp_min(1e-300) * floor)
    return (vectors * values.sqrt()) @ vectors.t(), (vectors * values.rsqrt()) @ vectors.t()
