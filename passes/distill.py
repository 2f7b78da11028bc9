"""``distill`` as a recipe step: recover accuracy lost by the passes before it (see :mod:`fxcompress.distill`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxcompress.distill import LOSSES, NORMS, SCHEDULES, describe, distill_module
from fxcompress.errors import InputError
from fxcompress.pipeline import EXACT, LayerRecord, PassConfig, PassContext, PassResult, Tolerance, register_pass


@dataclass(frozen=True)
class DistillConfig(PassConfig):
    """Fine-tune float weights against the original model on the calibration batches; ``hidden=norms`` (or node
    names joined by ``+``) also matches those intermediate activations, weighted by ``hidden_weight``;
    ``schedule=cosine`` warms the lr up and decays it to 0."""

    name: ClassVar[str] = "distill"
    tolerance: ClassVar[Tolerance] = EXACT  # recovers error; adds none of its own
    steps: int = 100
    lr: float = 1e-4
    loss: str = "mse"
    temperature: float = 1.0
    hidden: tuple[str, ...] = ()
    hidden_weight: float = 1.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps must be >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")


@register_pass(DistillConfig)
def distill_pass(gm: fx.GraphModule, cfg: DistillConfig, ctx: PassContext) -> PassResult:
    """Run :func:`fxcompress.distill.distill_module` on the graph so far, teacher = the user's model.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,distill:steps=200,int8", calibration=batches)
    """
    if ctx.calibration is None or ctx.teacher is None:
        raise InputError("distill needs calibration data (the inputs it trains on): optimize(..., calibration=[...])")
    hidden = NORMS if cfg.hidden == (NORMS,) else cfg.hidden
    history = distill_module(gm, ctx.teacher, ctx.calibration, steps=cfg.steps, lr=cfg.lr, loss=cfg.loss,
                             temperature=cfg.temperature, hidden=hidden, hidden_weight=cfg.hidden_weight,
                             schedule=cfg.schedule)
    note = describe(cfg.steps, cfg.loss, hidden, cfg.schedule, history)
    return PassResult(gm, True, [LayerRecord("(whole model)", "model", cfg.name, "distilled", note)])
