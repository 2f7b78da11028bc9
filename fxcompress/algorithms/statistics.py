"""Activation statistics from calibration batches, gathered by running the captured graph node by node."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import fx

from fxcompress.errors import CalibrationWarning, InputError
from fxcompress.graph.calibration import batch_mask, real_rows

# Below this many real rows (tokens, samples) per input feature a Hessian-fitted method fits the calibration data's
# own subspace. MiniLM's FFN SVD (1,536 inputs) whitened on 32 sentences (~400 tokens): cosine 0.98 on them, 0.75 on
# held-out text; from 4 rows per feature on, held-out text is within 0.01 of where more data takes it
# (docs/results/calibration_size.md).
MIN_ROWS_PER_FEATURE = 4


def require_batches(batches: Sequence[tuple]) -> None:
    """Raise an InputError naming what to pass when there is no calibration batch.

    Example:
        >>> require_batches([(torch.zeros(1, 4),)])
    """
    if not batches:
        raise InputError("calibration data is empty; pass calibration=[input_tuple, ...] with at least one batch")


def unfit_batch(i: int, batch: tuple, exc: Exception) -> InputError:
    """The error for calibration batch ``i`` that the model cannot run on: its index, shapes and the cause.

    Example:
        >>> str(unfit_batch(3, (torch.zeros(2, 5),), RuntimeError("shapes cannot be multiplied")))
        'calibration batch 3 (shapes [(2, 5)]) does not fit the model: RuntimeError: shapes cannot be multiplied'
    """
    shapes = [tuple(t.shape) for t in batch if isinstance(t, torch.Tensor)]
    return InputError(
        f"calibration batch {i} (shapes {shapes}) does not fit the model: "
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )


class _AllSeen(Exception):
    """Raised to stop a calibration run once every watched node has been computed."""


class _Recorder(fx.Interpreter):
    """Runs the graph, hands every watched node's output to ``on_value`` and stops once the last one has run
    (layer-sequential methods only need the graph up to the layers they quantize next)."""

    def __init__(
        self, gm: fx.GraphModule, watch: dict[fx.Node, list[str]], on_value: Callable[[str, torch.Tensor], None]
    ):
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


def observe(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    batches: Sequence[tuple],
    on_value: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``gm`` on every calibration batch and call ``on_value(name, tensor)`` with each named node's output
    (only the real tokens', as [tokens, features], when ``batches`` is a :class:`Calibration` with a token mask).

    Raises:
        InputError: no batches, or a batch the model cannot run on (its index and shapes are named).

    Example:
        >>> seen = {}
        >>> observe(gm, {"fc_in": site.input}, calibration, lambda name, t: seen.setdefault(name, []).append(t))
    """
    require_batches(batches)
    for i in range(len(batches)):
        observe_batch(gm, nodes, batches, i, on_value)


def observe_batch(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    batches: Sequence[tuple],
    i: int,
    on_value: Callable[[str, torch.Tensor], None],
) -> None:
    """:func:`observe` for batch ``i`` alone (errors name its index in ``batches``).

    Example:
        >>> observe_batch(gm, {"fc": site.input}, calibration, 0, lambda name, value: print(name, value.shape))
        fc torch.Size([16, 64])
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
            raise unfit_batch(i, batch, exc) from exc


def add_second_moment(total: Optional[torch.Tensor], value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``total`` (None to start) plus X^T X in float64, X = ``value`` as rows of its last dimension; and X's rows.

    Example:
        >>> total, n = add_second_moment(None, torch.ones(2, 3, 4))
        >>> total[0, 0].item(), n
        (6.0, 6)
    """
    x = value.reshape(-1, value.shape[-1]).to(torch.float64)
    return (x.t() @ x if total is None else total + x.t() @ x), x.shape[0]


def input_hessians(
    gm: fx.GraphModule,
    inputs_of: dict[str, fx.Node],
    batches: Sequence[tuple],
    rows_seen: Optional[dict[str, tuple[int, int]]] = None,
) -> dict[str, torch.Tensor]:
    """H = 2/n * X^T X of the activation feeding each named layer, pooled over every row of every batch.

    Warns (:class:`~fxcompress.CalibrationWarning`) when a layer saw fewer than ``MIN_ROWS_PER_FEATURE`` real rows
    per input feature: H is then (nearly) rank-deficient and whatever is fitted to it fits the calibration data. A
    caller that computes Hessians in several calls (layer-sequential GPTQ) passes ``rows_seen`` instead, which collects
    (rows, features) per layer, and warns once for all with :func:`warn_if_few_rows`.

    Args:
        gm: the graph to run: the float capture, or a partly quantized one for layer-sequential methods.
        inputs_of: layer name -> the node whose output is that layer's input (last dim = in_features).
        batches: calibration input tuples.
        rows_seen: where to collect the row counts instead of warning.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
        >>> h = input_hessians(gm, {"0": next(iter(gm.graph.nodes))}, [(torch.randn(32, 4),)])
        >>> h["0"].shape
        torch.Size([4, 4])
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def accumulate(name: str, out: torch.Tensor) -> None:
        sums[name], n = add_second_moment(sums.get(name), out)
        rows[name] = rows.get(name, 0) + n

    observe(gm, inputs_of, batches, accumulate)
    counts = {name: (rows[name], sums[name].shape[0]) for name in sums}
    if rows_seen is None:
        warn_if_few_rows(counts)
    else:
        rows_seen.update(counts)
    return {name: 2 * sums[name] / rows[name] for name in sums}


def paired_moments(
    student: fx.GraphModule,
    teacher: fx.GraphModule,
    student_input: fx.Node,
    teacher_input: fx.Node,
    batches: Sequence[tuple],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_s^T X_s, X_t^T X_s) / rows: the second moment of a layer's input in ``student`` and its cross moment with
    the same layer's input in ``teacher``, row for row on the same batches (padded rows skipped in both).

    A layer refitted to these maps the input it really gets, after the layers before it were compressed, to the
    output the uncompressed model computes: ``W X_t^T X_s (X_s^T X_s)^-1`` minimises ||X_t W^T - X_s M^T||.

    Example:
        >>> h_ss, p_ts = paired_moments(gm, gm, site.input, site.input, calibration)
        >>> torch.allclose(h_ss, p_ts)  # one graph twice: the cross moment is the second moment
        True
    """
    require_batches(batches)
    h: Optional[torch.Tensor] = None
    p: Optional[torch.Tensor] = None
    rows = 0
    for i in range(len(batches)):  # a batch at a time: the paired rows are not all held at once
        seen: dict[str, torch.Tensor] = {}
        observe_batch(teacher, {"t": teacher_input}, batches, i, seen.__setitem__)
        observe_batch(student, {"s": student_input}, batches, i, seen.__setitem__)
        xt, xs = (seen[k].reshape(-1, seen[k].shape[-1]).to(torch.float64) for k in ("t", "s"))
        if xt.shape != xs.shape:
            raise InputError(
                f"layer input {student_input.name!r} has shape {tuple(xs.shape)} in the compressed graph "
                f"but {tuple(xt.shape)} in the float one; a refit needs the same rows and features"
            )
        h = xs.t() @ xs if h is None else h + xs.t() @ xs
        p = xt.t() @ xs if p is None else p + xt.t() @ xs
        rows += xs.shape[0]
    assert h is not None and p is not None
    return h / rows, p / rows


def warn_if_few_rows(rows_and_features: dict[str, tuple[int, int]]) -> None:
    """One :class:`~fxcompress.CalibrationWarning` naming the worst of the layers that saw fewer than
    ``MIN_ROWS_PER_FEATURE`` real rows per input feature, and how many layers did.

    Example:
        >>> warn_if_few_rows({"fc": (10_000, 64)})  # enough rows: no warning
    """
    few = {name: rk for name, rk in rows_and_features.items() if rk[0] < MIN_ROWS_PER_FEATURE * rk[1]}
    if not few:
        return
    name, (n, k) = min(few.items(), key=lambda item: item[1][0] / item[1][1])
    warnings.warn(
        f"calibration gave {n} real rows for layer {name!r} with {k} input features ({len(few)} layer(s) below "
        f"{MIN_ROWS_PER_FEATURE} rows per feature): a method fitted to these Hessians (GPTQ, activation-aware SVD) "
        f"fits the calibration data's subspace and may do worse on other inputs; pass at least "
        f"{MIN_ROWS_PER_FEATURE * k} real rows (tokens x sentences, or samples).",
        CalibrationWarning,
        stacklevel=4,
    )
