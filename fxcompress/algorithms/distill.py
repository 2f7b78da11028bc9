"""Recovery by distillation: fine-tune a compressed module's float weights to reproduce the original's outputs.

Quantized tensors (int8/int4 codes, their scales) are not trained: distill after structural compression (pruning,
factorization), e.g. ``"svd:ratio=0.5,distill:steps=200,int8"``. Distilling after a quantization pass trains the
float weights left around its frozen codes (LayerNorms, biases, layers kept float): the quantized ops pass
gradients straight through their dequantized weights, so ``"int4:kinds=embedding,distill,int8"`` adapts the model to
the int4 table the export will hold. (int8_static's ops fake-quantize activations and have no gradient: distill
before it.) Inside a recipe the ``distill`` pass uses the calibration batches as data and the user's (unmodified)
model as teacher.

Besides the outputs, ``hidden`` matches intermediate activations (relative MSE): the student is a rewritten copy of
the teacher's captured graph, so a node the passes left in place (a LayerNorm between blocks) has the same name in
both. ``hidden="norms"`` picks every LayerNorm output; deep students then get a signal per block instead of one at
the end.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxcompress.errors import InputError
from fxcompress.graph.calibration import batch_mask, real_rows
from fxcompress.graph.capture import capture
from fxcompress.graph.edit import unshare
from fxcompress.graph.inputs import normalize_inputs, output_tensors
from fxcompress.progress import progress_bar

LOSSES = ("mse", "kl", "cosine")
SCHEDULES = ("constant", "cosine")
NORMS = "norms"  # hidden= keyword: every LayerNorm output the two graphs share
_NORM_TARGETS = {torch.ops.aten.layer_norm.default, F.layer_norm}


def _loss(student: list[Tensor], teacher: list[Tensor], kind: str, temperature: float) -> Tensor:
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if kind == "kl":
            total = (
                total
                + F.kl_div(
                    F.log_softmax(s / temperature, -1),
                    F.log_softmax(t / temperature, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                * temperature**2
            )
        elif kind == "cosine":
            total = total + (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1)).mean()
        else:
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)  # relative, so lr is scale-free
    return total


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.LayerNorm)
    return node.op == "call_function" and node.target in _NORM_TARGETS


def hidden_nodes(student: fx.GraphModule, teacher: fx.GraphModule, hidden: Union[str, Sequence[str]]) -> list[str]:
    """Names of the nodes whose outputs ``hidden`` asks to match: ``"norms"`` (every LayerNorm output present in both
    graphs) or explicit node names, each of which must exist in both.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> cm = fxcompress.optimize(net, torch.randn(2, 8), recipe="svd:rank=2")
        >>> hidden_nodes(cm.module, capture(net, torch.randn(2, 8)).graph_module, "norms")
        ['_1']
    """
    in_teacher = {n.name for n in teacher.graph.nodes}
    if hidden == NORMS:
        names = [n.name for n in student.graph.nodes if _is_norm(student, n) and n.name in in_teacher]
        if not names:
            raise InputError(
                "distill hidden='norms' found no LayerNorm in both the student and the teacher graph; "
                "name the nodes to match instead (hidden=[node names], see cm.module.graph)"
            )
        return names
    names = [hidden] if isinstance(hidden, str) else list(hidden)
    in_student = {n.name for n in student.graph.nodes}
    for name in names:
        if name not in in_student or name not in in_teacher:
            where = "student" if name not in in_student else "teacher"
            shared = [n.name for n in student.graph.nodes if n.op == "call_function" and n.name in in_teacher]
            raise InputError(
                f"distill hidden node {name!r} is not in the {where} graph; nodes both have include "
                f"{shared[:8]} ... (hidden='{NORMS}' picks the LayerNorm outputs)"
            )
    return names


def _tapped(gm: nn.Module, names: Sequence[str]) -> Callable[[tuple], tuple[list[Tensor], list[Tensor]]]:
    """batch -> (outputs, the named nodes' outputs in ``names`` order). The taps come from a copy of the graph that
    returns them next to its outputs and shares ``gm``'s parameters (build it after they are final), so each step runs
    generated code instead of interpreting the graph node by node. The copy has fx's default signature: one argument
    per placeholder, whatever input structure ``gm``'s own codegen (torch.export's pytree) accepted."""
    if not names:
        return lambda batch: (output_tensors(gm(*batch)), [])
    assert isinstance(gm, fx.GraphModule)
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, copied)
    wanted = set(names)
    by_name = {node.name: copied[node] for node in gm.graph.nodes if node.name in wanted}
    graph.output((out, tuple(by_name[name] for name in names)))
    tapped = fx.GraphModule(gm, graph)

    def run(batch: tuple) -> tuple[list[Tensor], list[Tensor]]:
        outputs, taps = tapped(*batch)
        return output_tensors(outputs), list(taps)

    return run


def _hidden_loss(student: list[Tensor], teacher: list[Tensor], names: Sequence[str], mask: Optional[Tensor]) -> Tensor:
    """Mean over the (non-empty) taps of the relative MSE ||s - t||^2 / ||t||^2, over the real tokens only when
    ``mask`` marks padding: a padded position's hidden state never reaches a masked model's output, and matching it
    would spend the student's capacity on nothing."""
    losses = []
    for name, s, t in zip(names, student, teacher):
        if s.shape != t.shape:
            raise InputError(
                f"distill hidden node {name!r} has shape {tuple(s.shape)} in the student but "
                f"{tuple(t.shape)} in the teacher (a pass resized it); match nodes the passes leave intact"
            )
        s, t = real_rows(s, mask), real_rows(t, mask)
        losses.append(F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12))
    return torch.stack(losses).mean()


_TRAINED_OP_INPUTS = ("x", "indices", "bias")  # what a compressed op passes gradients to (see fxcompress.ops)


def _frozen_op_inputs(module: nn.Module) -> set[str]:
    """Qualified names of the attributes that compressed ops read as codes, scales or zero points: they get no
    gradient (the export writes them as they are), so they stay buffers instead of becoming idle parameters."""
    if not isinstance(module, fx.GraphModule):
        return set()
    frozen = set()
    for node in module.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "fxcompress":
            continue
        for arg, spec in zip(node.args, node.target._schema.arguments):
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and spec.name not in _TRAINED_OP_INPUTS:
                frozen.add(str(arg.target))
    return frozen


def _make_trainable(
    module: nn.Module, trainable: Optional[Callable[[str], bool]] = None
) -> list[tuple[nn.Module, str]]:
    """Turn floating-point buffers into parameters (factor weights are stored as buffers) and train those whose
    qualified name ``trainable`` accepts (all by default); return the moved buffers to undo. A compressed op's
    scales stay buffers."""
    frozen = _frozen_op_inputs(module)
    moved = []
    for prefix, mod in module.named_modules():
        for name, buf in list(mod._buffers.items()):
            qualified = f"{prefix}.{name}" if prefix else name
            if buf is not None and buf.is_floating_point() and "running_" not in name and qualified not in frozen:
                del mod._buffers[name]
                mod._parameters[name] = nn.Parameter(buf.detach().clone())
                moved.append((mod, name))
    for name, p in module.named_parameters():
        p.requires_grad_(p.is_floating_point() and (trainable is None or trainable(name)))
    return moved


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``steps``: 1 for ``constant``; for ``cosine`` a linear
    warm-up over the first 5% of the steps (Adam's early steps are the noisiest: its moment estimates are young),
    then a half cosine to 0, so the last steps settle instead of jittering at full lr.

    Example:
        >>> [round(lr_factor("cosine", s, 100), 2) for s in (0, 4, 50, 99)]
        [0.2, 1.0, 0.52, 0.0]
    """
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm + 1) / max(1, steps - warm)))


@dataclass(frozen=True)
class DistillOptions:
    """What distillation trains towards and how fast.

    ``loss``: ``mse`` (relative), ``kl`` (logits, at ``temperature``) or ``cosine``; ``hidden``: ``("norms",)`` also
    matches every LayerNorm output the two graphs share, or names graph nodes to match, weighted by
    ``hidden_weight``; ``schedule``: ``constant`` or ``cosine`` (:func:`lr_factor`).

    Example:
        >>> DistillOptions(steps=200, loss="cosine", hidden="norms").hidden
        ('norms',)
    """

    steps: int = 100
    lr: float = 1e-4
    loss: str = "mse"
    temperature: float = 1.0
    hidden: tuple[str, ...] = ()
    hidden_weight: float = 1.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if isinstance(self.hidden, str):
            object.__setattr__(self, "hidden", (self.hidden,))
        elif not isinstance(self.hidden, tuple):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"distill needs steps >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"distill loss must be one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"distill schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.hidden_weight < 0:
            raise ValueError(f"distill hidden_weight must be >= 0, got {self.hidden_weight}")

    @property
    def hidden_spec(self) -> Union[None, str, list[str]]:
        """``"norms"``, a list of node names, or None."""
        if not self.hidden:
            return None
        return NORMS if self.hidden == (NORMS,) else list(self.hidden)

    def describe(self, history: Sequence[float]) -> str:
        """The distill record's note, one spelling for the API and the recipe step.

        Example:
            >>> DistillOptions(steps=200, loss="cosine", hidden="norms", schedule="cosine").describe([0.1, 0.02])
            '200 steps, cosine loss + hidden norms, cosine lr: 0.1 -> 0.02'
        """
        taps = " + hidden " + "+".join(self.hidden) if self.hidden else ""
        return f"{self.steps} steps, {self.loss} loss{taps}, {self.schedule} lr: {history[0]:.4g} -> {history[-1]:.4g}"


def varying_axes(batches: Sequence[tuple]) -> list[tuple[int, ...]]:
    """Per input, the axes whose size differs between ``batches``, plus the batch axis: the axes a captured graph
    must keep symbolic to run on all of them.

    Example:
        >>> varying_axes([(torch.zeros(4, 12),), (torch.zeros(4, 30),)])
        [(0, 1)]
    """
    first = batches[0]
    out = []
    for i, t in enumerate(first):
        if not isinstance(t, Tensor) or not t.dim():
            out.append(())
            continue
        sizes = {tuple(b[i].shape) for b in batches}
        out.append(tuple(a for a in range(t.dim()) if a == 0 or len({shape[a] for shape in sizes}) > 1))
    return out


def _largest(batches: Sequence[tuple]) -> tuple:
    """The batch with the most elements: torch.export treats sizes 0 and 1 as constants, so trace a large one."""
    return max(batches, key=lambda b: sum(t.numel() for t in b if isinstance(t, Tensor)))


def _frozen_copy(teacher: nn.Module) -> nn.Module:
    """A private copy of the teacher (``.to(device)`` must not move the user's model) in eval mode. A
    ``torch.export(...).module()`` with dynamic shapes refuses ``eval()``; its dropout and norm behaviour was fixed
    when it was traced, so its copy is used as it is."""
    frozen = copy.deepcopy(teacher)
    try:
        return frozen.eval()
    except NotImplementedError:
        return frozen


def _teacher_and_taps(
    student: nn.Module, teacher: nn.Module, batches: list[tuple], hidden
) -> tuple[nn.Module, list[str]]:
    """The teacher to run (a private copy) and the names of the hidden nodes to match in both graphs."""
    if not hidden:
        return _frozen_copy(teacher), []
    if not isinstance(student, fx.GraphModule):
        raise InputError(
            f"distill hidden={hidden!r} matches graph nodes by name: the student must be the compressed "
            f"GraphModule (cm.module), got {type(student).__name__}"
        )
    # capture deep-copies the model and traces it in eval mode (torch.export's graphs refuse a later eval()),
    # symbolic on every axis the data varies in (e.g. batches cut to their longest sentence)
    captured = capture(teacher, _largest(batches), dynamic_axes=varying_axes(batches)).graph_module
    return captured, hidden_nodes(student, captured, hidden)


@contextlib.contextmanager
def _training(student: nn.Module, trainable: Optional[Callable[[str], bool]]) -> Iterator[list[nn.Parameter]]:
    """The student's trainable weights, float buffers made parameters for the duration; afterwards everything is
    frozen again, the buffers restored and the student back on the CPU."""
    moved = _make_trainable(student, trainable)
    try:
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise InputError(
                "distill found no floating-point weights to train (the model is fully quantized, or "
                "`trainable` accepted no name?); distill before quantizing: recipe 'svd,distill,int8'"
            )
        yield params
    finally:
        student.cpu()
        for p in student.parameters():
            p.requires_grad_(False)
        for mod, name in moved:
            mod._buffers[name] = mod._parameters.pop(name).detach()


def _backward(value: Tensor) -> None:
    try:
        value.backward()
    except RuntimeError as exc:
        if "autograd" in str(exc).lower() or "does not require grad" in str(exc):
            raise InputError(
                f"distill cannot backpropagate through this graph ({str(exc).splitlines()[0]}); "
                "distill before quantizing: recipe 'svd,distill,int8_static'"
            ) from exc
        raise


def distill_module(
    student: nn.Module,
    teacher: nn.Module,
    data: Sequence[Any],
    options: DistillOptions = DistillOptions(),
    *,
    trainable: Optional[Callable[[str], bool]] = None,
    device: str = "auto",
    amp: Optional[bool] = None,
    progress: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Fine-tune ``student`` in place against ``teacher`` (unchanged) for ``options.steps`` Adam steps over ``data``
    (cycled); returns the loss per step.

    Args:
        student: the module to train (the compressed GraphModule when ``options.hidden`` names nodes).
        teacher: the reference; a private copy runs, the caller's module is never touched.
        data: input tuples; a :class:`~fxcompress.Calibration` with a ``token_mask`` leaves padded positions out of
            the hidden match.
        options: loss, steps, lr, schedule and hidden taps.
        trainable: picks the tensors to train by qualified name (default: every floating-point weight); with little
            data, training only the new factors overfits less than training the whole model.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: torch.autocast in bf16 (default: on when CUDA runs it).
        progress: a progress bar over the steps.
        on_step: called with (step, loss) after every step (1-based), e.g. to evaluate checkpoints of one run.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="svd:rank=8")
        >>> losses = distill_module(cm.module, model, [(x,)], DistillOptions(steps=3, lr=1e-3))
        >>> len(losses)
        3
    """
    batches = [normalize_inputs(b) for b in data]
    if not batches:
        raise InputError("distill data is empty; pass at least one input tuple")
    unshare(student, teacher)  # training edits weights in place: never the teacher's, which a capture may share
    masks = [batch_mask(data, i, b) for i, b in enumerate(batches)]
    teacher, names = _teacher_and_taps(student, teacher, batches, options.hidden_spec)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    amp = dev.type == "cuda" if amp is None else amp
    teacher = teacher.to(dev)
    student.to(dev)  # left in eval mode: no dropout noise, and torch.export graphs cannot switch to train()
    history: list[float] = []
    with _training(student, trainable) as params:
        opt = torch.optim.Adam(params, lr=options.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(options.schedule, step, options.steps)
        )
        run_teacher, run_student = _tapped(teacher, names), _tapped(student, names)
        with progress_bar(progress, desc="distill", total=options.steps, unit="step") as bar:
            for step, (batch, mask) in zip(range(options.steps), itertools.cycle(zip(batches, masks))):
                batch = tuple(t.to(dev) if isinstance(t, Tensor) else t for t in batch)
                mask = None if mask is None else mask.to(dev)
                with torch.no_grad():
                    target, target_hidden = run_teacher(batch)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    out, out_hidden = run_student(batch)
                value = _loss(out, target, options.loss, options.temperature)
                if names:
                    value = value + options.hidden_weight * _hidden_loss(out_hidden, target_hidden, names, mask)
                opt.zero_grad(set_to_none=True)
                _backward(value)
                opt.step()
                scheduler.step()
                history.append(value.item())
                bar.advance(f"loss {history[-1]:.4g}")
                if on_step is not None:
                    on_step(step + 1, history[-1])
    return history
