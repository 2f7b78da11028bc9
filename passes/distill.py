"""``distill`` as a recipe step: recover accuracy lost by the passes before it (:mod:`fxcompress.algorithms.distill`),
training on the calibration batches with the user's original model as the teacher."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxcompress.algorithms.distill import DistillOptions, distill_module
from fxcompress.errors import InputError
from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import EXACT, Tolerance


@dataclass(frozen=True)
class DistillConfig(PassConfig, DistillOptions):
    """Fine-tune float weights against the original model on the calibration batches; ``hidden=norms`` (or node
    names joined by ``+``) also matches those intermediate activations, weighted by ``hidden_weight``;
    ``schedule=cosine`` warms the lr up and decays it to 0."""

    name: ClassVar[str] = "distill"
    tolerance: ClassVar[Tolerance] = EXACT  # recovers error; adds none of its own

    @property
    def options(self) -> DistillOptions:
        """The training options alone (without include/exclude).

        Example:
            >>> DistillConfig(steps=5).options.steps
            5
        """
        names = {f.name for f in dataclasses.fields(DistillOptions)}
        return DistillOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@register_pass(DistillConfig)
def distill_pass(gm: fx.GraphModule, cfg: DistillConfig, ctx: PassContext) -> PassResult:
    """Train the graph so far against ``ctx.teacher`` (the user's model) on the calibration batches.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="svd:rank=8,distill:steps=5,int8", calibration=[(x,)])
        >>> [r.action for r in cm.records if r.pass_name == "distill"]
        ['distilled']
    """
    if ctx.calibration is None or ctx.teacher is None:
        raise InputError("distill needs calibration data (the inputs it trains on): optimize(..., calibration=[...])")
    history = distill_module(gm, ctx.teacher, ctx.calibration, cfg.options)
    return PassResult(
        gm, True, [LayerRecord("(whole model)", "model", cfg.name, "distilled", cfg.options.describe(history))]
    )
