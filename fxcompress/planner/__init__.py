"""A plan instead of a recipe: reach a size under an accuracy floor, measured on the runtime the artifact runs on.

``plan(model, example_inputs, size=0.15, min_cosine=0.985, calibration=...)`` tries the project's techniques as a
ladder of recipes, from the most faithful to the smallest: fp16, int8 (RTN, then GPTQ), int8 with a byte budget that
leaves the most sensitive layers float, int4 Linears (GPTQ) with a budget that keeps the most sensitive ones int8 and
the embedding tables int8, the same with int4 tables, a joint per-layer search across techniques
(:mod:`fxcompress.planner.mixed`), int4 everywhere, then activation-aware SVD with int4 factors. The per-layer choices
inside a budgeted recipe or the joint search come from measured sensitivity (each layer's output error in a form,
per byte saved). Bytes are measured by compressing with round-to-nearest first (cheap; GPTQ stores the same bytes),
budgets are bisected until the whole model lands on the requested size, and only the candidates that fit are
compressed for real, exported for the target and run on ONNX Runtime against the original model. The most accurate
one that fits and holds the floor wins (a budgeted recipe that holds is still challenged by the joint search);
without a size, the smallest that holds the floor. A candidate that misses the floor by a little on the CPU lowering
``auto`` picked is measured again on lowerings that quantize fewer activations, and the plan says which target its
numbers belong to. Every candidate is kept (bytes, cosine, latency, wall time) for the trade-off chart
(:mod:`fxcompress.planner.chart`).

The floor is the output cosine on ONNX Runtime, plus, when given, an accuracy drop against labels
(``labels=``, ``max_accuracy_drop=`` in points) and a user metric over the artifact (``metric=``, ``min_metric=``).
With ``allow_training=True`` and calibration batches the ladder ends with structured pruning recovered by
distillation and then int8 (``fold_bn,prune:ratio=R,...,distill,int8``), the ratio bisected onto the size: the
technique that reaches 12x and more on CNNs, where int8 stops at 4x.

The plan is written out as the recipe that reproduces it, with the layers a budget moved listed by name (the joint
search's recipe names them in its ``include=`` lists).

A latency target (``max_latency``, a fraction of the fp32 export's latency) times every candidate against the fp32
export side by side (:func:`fxcompress.checker.timing.relative_latency`) on the provider it names, and keeps the most
accurate one under it.

Not yet: pruning and distillation as per-layer forms of the joint search (they are one rung of the ladder).
"""

from __future__ import annotations

import html
import json
import math
import re
import tempfile
import time
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from fxcompress.api import CompressedModel, compress_prepared, prepare
from fxcompress.checker.parity import check, export_float, onnx_feed
from fxcompress.checker.timing import relative_latency
from fxcompress.errors import InputError
from fxcompress.export.targets import auto_target
from fxcompress.graph.calibration import Calibration
from fxcompress.graph.edit import shared_copy
from fxcompress.planner.chart import pareto_png, pareto_svg
from fxcompress.planner.mixed import layer_forms, search

_BISECT_STEPS = 7
# Embedding tables (often most of a text model's bytes) at int8, or int4 in blocks of 64 with a searched range.
INT8_TABLES = "int8:kinds=embedding"
INT4_TABLES = "int4:kinds=embedding,block=64,clip=true"
# Budgeted rungs, from the least to the most aggressive: {b} is bisected onto the requested size.
BUDGETED = (
    "int8:budget={b}",
    INT8_TABLES + ",int4:algo=gptq,act_order=true,budget={b}",
    INT4_TABLES + ",int4:algo=gptq,act_order=true,clip=true,budget={b}",
)
# With allow_training: channel pruning at a bisected ratio {r}, recovered against the original model, then int8.
# Below int4 everywhere: the Linears factorized (activation-aware SVD, each layer's factors at most {b} of its bytes,
# ranks a multiple of 16 so that both factors take int4), then the factors int4 by GPTQ; {b} is bisected onto the size.
FACTORIZED = INT4_TABLES + ",svd:ratio={b},aware=true,multiple=16,int4:algo=gptq,act_order=true,clip=true"
PRUNED = "fold_bn,prune:ratio={r},importance=activation,distill:steps=300,lr=1e-3,loss=kl,int8"
# CPU lowerings with fewer activations quantized, in order of speed: tried when the target auto picked misses the floor
ACCURATE_CPU_LOWERINGS = ("cpu-nbits", "cpu-weightonly")
# A user metric: called with a function that runs the candidate artifact on a batch (a tuple of inputs) and returns
# its outputs as numpy arrays; returns a number, higher is better (return -perplexity for perplexity)
Metric = Callable[[Callable[[tuple], list]], float]


class PlanError(InputError):
    """No candidate reaches the size under the floor; the message says the best found either way, and
    ``candidates`` holds every one measured (as a :class:`Plan` would)."""

    def __init__(self, message: str, candidates: Sequence["Candidate"] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


@dataclass
class Candidate:
    """One recipe the planner measured: bytes of the artifact vs fp32, cosine on ONNX Runtime, and its cost."""

    recipe: str
    ratio: float  # compressed bytes / fp32 bytes of the whole model
    cosine: Optional[float] = None  # pooled over the evaluation batches, artifact on ORT vs the original in torch
    accuracy_drop_pp: Optional[float] = None  # with labels: fp32 accuracy minus the artifact's, in points
    metric: Optional[float] = None  # the user metric on the artifact
    latency_ratio: Optional[float] = None  # p50 on the example inputs over the fp32 export's, same provider
    seconds: float = 0.0
    fits: bool = True
    holds: bool = False
    note: str = ""
    target: str = ""  # the export target it was measured on (a more accurate lowering when ``auto``'s missed)


@dataclass
class Plan:
    """What :func:`plan` chose and everything it measured on the way."""

    recipe: str  # reproduces the choice: optimize(model, x, recipe=plan.recipe, calibration=...)
    # and the target it was measured on: plan.compressed.export(path, target=plan.target)
    chosen: Candidate
    candidates: list[Candidate]
    size: Optional[float]
    min_cosine: float
    target: str
    seconds: float
    compressed: Optional[CompressedModel] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the plan and every candidate (what :meth:`save` writes as ``.json``)."""
        return {
            "recipe": self.recipe,
            "chosen": asdict(self.chosen),
            "candidates": [asdict(c) for c in self.candidates],
            "size": self.size,
            "min_cosine": self.min_cosine,
            "target": self.target,
            "seconds": self.seconds,
        }

    def save(self, prefix: str | Path) -> list[Path]:
        """Write ``<prefix>.json`` (the data), ``<prefix>.svg`` (bytes vs cosine, the chosen point marked), with
        matplotlib ``<prefix>.png`` (the same, plus latency vs cosine when timed), and ``<prefix>.html`` (the chart
        beside the candidates' table).

        Example:
            >>> c = Candidate("int8", 0.26, 0.9995)
            >>> p = Plan("int8", c, [c], 0.3, 0.99, "cpu", 1.0)
            >>> sorted(f.name for f in p.save("plan"))[:3]
            ['plan.html', 'plan.json', 'plan.png']
        """
        prefix = Path(prefix)
        written = [prefix.parent / f"{prefix.name}.json", prefix.parent / f"{prefix.name}.svg"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2))
        svg = pareto_svg(self.candidates, self.chosen, self.size, self.min_cosine)
        written[1].write_text(svg)
        png = pareto_png(self.candidates, self.chosen, self.size, self.min_cosine)
        if png is not None:
            written.append(prefix.parent / f"{prefix.name}.png")
            written[-1].write_bytes(png)
            chart = f'<img alt="the trade-off" src="data:image/png;base64,{b64encode(png).decode()}">'
        else:
            chart = svg + "<p>(pip install 'fxcompress[report]' for the PNG chart)</p>"
        rows = "".join(
            f"<tr><td>{html.escape(c.recipe)}</td><td>{c.ratio:.3f}</td>"
            f"<td>{'' if c.cosine is None else f'{c.cosine:.5f}'}</td>"
            f"<td>{'' if c.latency_ratio is None else f'{c.latency_ratio:.2f}'}</td>"
            f"<td>{'' if c.accuracy_drop_pp is None else f'{c.accuracy_drop_pp:.2f}'}</td>"
            f"<td>{'' if c.metric is None else f'{c.metric:.5g}'}</td><td>{c.seconds:.1f}</td>"
            f"<td>{html.escape(c.note)}</td></tr>"
            for c in self.candidates
        )
        written.append(prefix.parent / f"{prefix.name}.html")
        written[-1].write_text(
            f"<html><body><h1>fxcompress plan</h1><p>chosen: <code>{html.escape(self.recipe)}</code> "
            f"({self.chosen.ratio:.3f} of the fp32 bytes, cosine {self.chosen.cosine:.5f} on ONNX Runtime, target "
            f"{self.target})</p>{chart}<table border=1><tr><th>recipe</th><th>bytes (x fp32)</th><th>cosine</th>"
            "<th>latency (x fp32)</th><th>accuracy drop (pp)</th><th>metric</th><th>s</th><th>note</th></tr>"
            f"{rows}</table></body></html>"
        )
        return written


def plan(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    size: Optional[float] = None,
    min_cosine: float = 0.99,
    calibration: Optional[Iterable[Any]] = None,
    eval_inputs: Optional[Sequence[Any]] = None,
    target: str = "auto",
    dynamic_axes: Any = (0,),
    labels: Optional[torch.Tensor] = None,
    max_accuracy_drop: Optional[float] = None,
    metric: Optional[Metric] = None,
    min_metric: Optional[float] = None,
    max_latency: Optional[float] = None,
    provider: str = "auto",
    allow_training: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Plan:
    """Choose a recipe that reaches ``size`` (fraction of the fp32 bytes) with the artifact's output cosine on ONNX
    Runtime at least ``min_cosine``; without ``size``, the smallest recipe that holds ``min_cosine``.

    ``calibration`` feeds GPTQ and the sensitivity budgets (needed for the int4 rungs); ``eval_inputs`` are the
    batches the floors are measured on (default: the calibration batches, else the example). ``labels`` (for the
    pooled ``eval_inputs``) with ``max_accuracy_drop`` (points) adds an accuracy floor; ``metric(run)`` with
    ``min_metric`` a floor on any number the user computes from the artifact's outputs (``run(batch)`` runs it on
    ONNX Runtime). ``max_latency`` (a fraction of the fp32 export's p50 latency on ``example_inputs``, on
    ``provider``) is a speed target: every candidate is timed, and the most accurate one under it wins.
    ``allow_training`` adds pruning recovered by distillation (on the calibration batches). Raises
    :class:`PlanError` naming the best reached when nothing qualifies.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
        >>> p = plan(mlp, torch.randn(8, 64), size=0.3, min_cosine=0.99)
        >>> p.recipe, p.chosen.ratio < 0.3
        ('int8', True)
    """
    start = time.perf_counter()
    if size is not None and not 0 < size < 1:
        raise InputError(f"size is a fraction of the fp32 bytes in (0, 1), e.g. 0.25; got {size}")
    if not 0 < min_cosine <= 1:
        raise InputError(f"min_cosine must be in (0, 1], got {min_cosine}")
    if max_accuracy_drop is not None and labels is None:
        raise InputError("max_accuracy_drop needs labels= (the classes of the pooled eval_inputs)")
    if (metric is None) != (min_metric is None):
        raise InputError("metric= and min_metric= go together: the metric and the floor it must reach")
    calib = calibration if isinstance(calibration, Calibration) or calibration is None else list(calibration)
    batches = list(eval_inputs) if eval_inputs is not None else (list(calib) if calib else [example_inputs])
    if allow_training and calib is None:
        raise InputError("allow_training needs calibration= batches: distillation trains on them")
    if max_latency is not None:
        if max_latency <= 0:
            raise InputError(f"max_latency is a fraction of the fp32 latency, e.g. 0.5; got {max_latency}")
        from fxcompress.checker.runtime import choose_providers

        choose_providers(provider)  # a provider that is not installed fails here, before any candidate is built
    prepared = prepare(model, example_inputs, calib, dynamic_axes)  # captured once for every recipe tried
    floors = _Floors(min_cosine, labels, max_accuracy_drop, metric, min_metric, max_latency, provider)

    def compress(recipe: str) -> CompressedModel:
        return compress_prepared(model, prepared, recipe, progress=False)

    ratios: dict[str, float] = {}

    def ratio_of(recipe: str) -> float:  # compressed / fp32 bytes, each recipe compressed once for its bytes
        if recipe not in ratios:
            ratios[recipe] = 1 / compress(recipe).compression_ratio
        return ratios[recipe]

    def joint() -> Optional[str]:  # the joint per-layer search's recipe for the size, or None
        assert size is not None and calib is not None
        progress("joint search: each layer's error in every form it can take")
        layers = layer_forms(shared_copy(prepared.captured.graph_module), list(prepared.calibration))
        return search(layers, lambda r: ratio_of(_rounded_to_nearest(r)) <= size, progress)

    candidates: list[Candidate] = []
    best: Optional[tuple[Candidate, CompressedModel]] = None  # kept, so the choice is not compressed again
    try:
        # a budgeted recipe held: the joint search still gets its say, then the plan stops (the ladder reads the
        # flag through the closure, which sees each rebinding)
        budget_held = False
        ladder = _ladder(ratio_of, size, calib is not None, allow_training, progress, joint, lambda: budget_held)
        for kind, recipe in ladder:
            if budget_held and kind != "joint":
                continue
            t0 = time.perf_counter()
            twin = _rounded_to_nearest(recipe)
            if size is not None and twin != recipe:
                ratio = ratio_of(twin)  # GPTQ stores the same bytes: run it only if they fit
                if ratio > size * 1.005:
                    candidates.append(Candidate(recipe, ratio, fits=False, seconds=time.perf_counter() - t0))
                    continue
            progress(f"trying {recipe}")
            cm = compress(recipe)
            ratio = 1 / cm.compression_ratio
            cand = Candidate(recipe, ratio, fits=size is None or ratio <= size * 1.005)
            # with only a latency target, every candidate is "in size": the floors (speed included) decide
            if cand.fits or twin == recipe:  # a cheap recipe too large for the size still gives the chart a point
                floors.measure(cand, model, cm, example_inputs, batches, target)
                cand.target, cand.note = target, "" if cand.fits else "larger than the size"
                if cand.fits and not cand.holds and target == "auto" and max_latency is None:
                    cand = _on_accurate_lowering(cand, floors, model, cm, example_inputs, batches)
            cand.seconds = time.perf_counter() - t0
            candidates.append(cand)
            if (
                cand.fits
                and cand.holds
                and (best is None or _better(cand, best[0], size is not None or max_latency is not None))
            ):
                best = (cand, cm)
            done = cand.fits and cand.holds and (size is not None or max_latency is not None)
            if budget_held or (done and kind != "budget"):
                break  # the ladder goes from faithful to small: the first that fits and holds is the most accurate
            budget_held = done
    finally:
        floors.close()
    if best is None:
        raise PlanError(_unreachable(candidates, size, floors), candidates)
    chosen, cm = best
    return Plan(
        _explicit(chosen.recipe, cm),
        chosen,
        candidates,
        size,
        min_cosine,
        chosen.target or target,
        time.perf_counter() - start,
        cm,
    )


@dataclass
class _Floors:
    """What a candidate must hold, measured on ONNX Runtime."""

    min_cosine: float
    labels: Optional[torch.Tensor]
    max_accuracy_drop: Optional[float]
    metric: Optional[Metric]
    min_metric: Optional[float]
    max_latency: Optional[float] = None
    provider: str = "auto"
    fp32_ms: Optional[float] = None  # the fp32 export's p50 on the example inputs, beside the last candidate's
    _fp32: Optional[Path] = None
    _fp32_dir: Optional[tempfile.TemporaryDirectory] = None

    def measure(self, cand: Candidate, model, cm: CompressedModel, example_inputs, batches, target: str) -> None:
        with tempfile.TemporaryDirectory(prefix="fxc-plan-") as tmp:
            path = cm.export(Path(tmp, "candidate.onnx"), target=target)
            report = check(
                model, path, example_inputs, compressed=cm, eval_inputs=batches, labels=self.labels,
                fp32_baseline=False, latency_repeat=1, provider=self.provider,
            )  # fmt: skip
            cand.cosine = float(report.metrics.get("cosine", float("nan")))
            cand.accuracy_drop_pp = report.metrics.get("accuracy_drop_pp")
            if self.metric is not None:
                cand.metric = _user_metric(self.metric, path)
            if self.max_latency is not None:
                cand.latency_ratio = self._latency(model, path, example_inputs, target)
        cand.holds = self.held_by(cand)

    def _latency(self, model, path: Path, example_inputs, target: str) -> float:
        """The artifact's latency on the example inputs over the fp32 export's (exported once), timed side by side."""
        if self._fp32 is None:
            self._fp32_dir = tempfile.TemporaryDirectory(prefix="fxc-plan-fp32-")
            self._fp32 = export_float(model, example_inputs, Path(self._fp32_dir.name, "fp32.onnx"), target)
        timed = relative_latency(path, self._fp32, onnx_feed(example_inputs), self.provider)
        self.fp32_ms = timed.reference_p50_ms
        return timed.ratio

    def close(self) -> None:
        """Remove the fp32 export the latencies were timed against."""
        if self._fp32_dir is not None:
            self._fp32_dir.cleanup()
            self._fp32_dir, self._fp32 = None, None

    def held_by(self, cand: Candidate) -> bool:
        ok = cand.cosine is not None and cand.cosine >= self.min_cosine
        if self.max_accuracy_drop is not None:
            ok = ok and cand.accuracy_drop_pp is not None and cand.accuracy_drop_pp <= self.max_accuracy_drop
        if self.min_metric is not None:
            ok = ok and cand.metric is not None and cand.metric >= self.min_metric
        if self.max_latency is not None:
            ok = ok and cand.latency_ratio is not None and cand.latency_ratio <= self.max_latency
        return ok

    def describe(self) -> str:
        parts = [f"cosine >= {self.min_cosine}"]
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop} pp")
        if self.min_metric is not None:
            parts.append(f"metric >= {self.min_metric}")
        if self.max_latency is not None:
            parts.append(f"latency <= {self.max_latency}x fp32 on {self.provider}")
        return " and ".join(parts)


def _user_metric(metric: Metric, path: Path) -> float:
    from fxcompress.checker.runtime import import_ort

    session = import_ort().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(batch: Any) -> list:
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        feeds = {n: (t.numpy() if isinstance(t, torch.Tensor) else t) for n, t in zip(names, batch)}
        return session.run(None, feeds)

    value = metric(run)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(
            f"metric returned {value!r} ({type(value).__name__}); it must return a finite number, higher is better "
            "(e.g. accuracy, or -perplexity)"
        )
    return float(value)


def _on_accurate_lowering(cand: Candidate, floors: _Floors, model, cm, example_inputs, batches) -> Candidate:
    """``cand`` (missed the floor on the target ``auto`` picked) measured again on the CPU lowerings that quantize
    fewer activations, when it came close: the first that holds, else the original. A size goal says nothing of
    speed, and e.g. MiniLM int8 gains 0.006 of cosine from weight-only numerics (its dynamic int8 activations cost
    that); the plan's target says which lowering the numbers belong to."""

    if (
        auto_target()[0].name not in ("cpu", "cpu-vnni")
        or cand.cosine is None
        or cand.cosine < floors.min_cosine - 0.01
    ):
        return cand
    for lowering in ACCURATE_CPU_LOWERINGS:
        again = Candidate(cand.recipe, cand.ratio, fits=cand.fits, target=lowering)
        floors.measure(again, model, cm, example_inputs, batches, lowering)
        if again.holds:
            again.note = f"on {lowering}: auto's lowering gave cosine {cand.cosine:.5f}"
            return again
    return cand


def _better(candidate: Candidate, than: Candidate, sized: bool) -> bool:
    """With a size, the more accurate of two candidates that fit and hold the floor; without, the smaller."""
    return candidate.cosine > than.cosine if sized else candidate.ratio < than.ratio


def _ladder(
    ratio_of: Callable[[str], float],
    size: Optional[float],
    calibrated: bool,
    training: bool,
    progress,
    joint: Callable[[], Optional[str]],
    challenged: Callable[[], bool],
) -> Iterable[tuple[str, str]]:
    """(kind, recipe) from the most faithful to the smallest; with a size, the budgeted ones bisected onto it and the
    joint per-layer search's choice after them (kind ``joint``; it is also tried when a budgeted one held, and the
    more accurate of the two wins)."""
    yield from (("rung", "fp16"), ("rung", "int8"))
    if not calibrated:  # GPTQ and the sensitivity budgets need calibration batches
        yield from (("rung", f"{INT8_TABLES},int4"), ("rung", f"{INT4_TABLES},int4:clip=true"))
        return
    yield "rung", "int8:algo=gptq"
    if size is not None:
        for shape in BUDGETED:
            if challenged():  # one budgeted recipe held: on to the joint search, without sizing the others
                break
            budget = _bisect_budget(ratio_of, shape, size, progress)
            if budget is not None:
                yield "budget", shape.format(b=budget)
        chosen = joint()
        if chosen is not None:
            yield "joint", chosen
    yield from (
        ("rung", f"{INT8_TABLES},int4:algo=gptq,act_order=true"),
        ("rung", f"{INT4_TABLES},int4:algo=gptq,act_order=true,clip=true"),
    )
    if size is not None:
        rank_share = _bisect_budget(ratio_of, FACTORIZED, size, progress)
        if rank_share is not None:
            yield "rung", FACTORIZED.format(b=rank_share)
    if training and size is not None:
        ratio = _bisect_pruning(ratio_of, size, progress)
        if ratio is not None:
            yield "rung", PRUNED.format(r=ratio)


def _rounded_to_nearest(recipe: str) -> str:
    """``recipe`` with GPTQ replaced by round-to-nearest and without distillation: the same grid and structure, so
    the same bytes, in seconds."""
    recipe = re.sub(r",distill:[^,]*(,(steps|lr|loss|temperature|hidden|schedule)=[^,]*)*", "", recipe)
    return re.sub(r"(?<=[:,])(algo=gptq|act_order=true|aware=true),?", "", recipe).replace(":,", ":").rstrip(":,")


def _bisect_pruning(ratio_of: Callable[[str], float], size: float, progress) -> Optional[float]:
    """The smallest pruning ratio whose pruned-then-int8 bytes fit ``size`` (the least pruning that fits), or None."""
    twin = _rounded_to_nearest(PRUNED)
    fits = lambda r: ratio_of(twin.format(r=r)) <= size  # noqa: E731
    progress(f"sizing {twin.format(r='?')} for {size:.3f} of the fp32 bytes")
    if not fits(0.95):
        return None
    _, high = _bisect(lambda r: not fits(r), 0.05, 0.95)  # more pruning fits: the boundary from the other side
    return math.ceil(high * 1000) / 1000


def _bisect(holds: Callable[[float], bool], low: float, high: float) -> tuple[float, float]:
    """:data:`_BISECT_STEPS` halvings of [low, high] keeping ``holds(low)`` true and ``holds(high)`` false."""
    for _ in range(_BISECT_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if holds(mid) else (low, mid)
    return low, high


def _bisect_budget(ratio_of: Callable[[str], float], shape: str, size: float, progress) -> Optional[float]:
    """The largest budget (within the pass's range) whose round-to-nearest bytes stay under ``size``, or None."""
    rtn = _rounded_to_nearest(shape)  # the same bytes as GPTQ, at a fraction of the cost
    low, high = (0.26, 0.99) if shape.startswith("int8") else (0.11, 0.99)
    if "svd:" in shape:
        low, high = 0.1, 0.9  # the factors' share of a layer's bytes: above ~0.9 SVD leaves layers as they are
    fits = lambda b: ratio_of(rtn.format(b=b)) <= size  # noqa: E731
    progress(f"sizing {rtn.format(b='?')} for {size:.3f} of the fp32 bytes")
    if not fits(low):
        return None
    low, _ = _bisect(fits, low, high)
    return math.floor(low * 1000) / 1000


def _unreachable(candidates: list[Candidate], size: Optional[float], floors: _Floors) -> str:
    fitting = [c for c in candidates if c.fits and c.cosine is not None]
    holding = [c for c in candidates if c.holds]
    parts = [f"no recipe reaches {'' if size is None else f'{size:.3f} of the fp32 bytes with '}{floors.describe()}"]
    if fitting:
        best = max(fitting, key=lambda c: c.cosine)
        parts.append(f"best cosine within the size: {best.cosine:.5f} ({best.recipe}, {best.ratio:.3f})")
    if holding:
        small = min(holding, key=lambda c: c.ratio)
        parts.append(f"smallest holding the floor: {small.ratio:.3f} ({small.recipe}, cosine {small.cosine:.5f})")
    elif candidates:
        parts.append(f"smallest tried: {min(c.ratio for c in candidates):.3f}")
    timed = [c for c in candidates if c.latency_ratio is not None]
    if timed:
        fast = min(timed, key=lambda c: c.latency_ratio)
        parts.append(f"fastest: {fast.latency_ratio:.2f}x fp32 ({fast.recipe}, cosine {fast.cosine:.5f})")
        parts.append("raise max_latency, or time a larger batch (example_inputs): compressed GEMMs weigh more there")
    else:
        parts.append("loosen min_cosine, raise size, or give calibration= so that GPTQ and the budgets can run")
    return "; ".join(parts)


def _explicit(recipe: str, cm: CompressedModel) -> str:
    """``recipe`` with the layers a budget moved to another grid named (a record per layer says which), so that a
    reader sees the per-layer plan; the budgeted recipe itself reproduces it exactly from the same calibration."""
    moved = [r.layer for r in cm.records if "kept" in r.reason and "budget" in r.reason]
    if not moved:
        return recipe
    named = "+".join(moved) if len(moved) <= 6 else f"{len(moved)} layers (see the records)"
    return f"{recipe}  # budget keeps finer: {named}"
