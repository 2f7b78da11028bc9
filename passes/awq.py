"""``awq``: activation-aware weight scaling before quantization (AWQ, Lin et al., 2023).

Weight-only quantization spends the same grid on every input column of a Linear, yet a few input channels carry most
of the activation energy, and their weights' rounding error costs the most. AWQ scales input column j of W by
s_j = a_j^alpha (a_j: the mean |x_j| of that channel on the calibration data) and divides the input by s_j, which
leaves the float layer unchanged: W x = (W diag(s)) (diag(s)^-1 x). Quantizing W diag(s) instead of W gives the
salient columns a finer grid relative to their values. alpha is searched per group of layers that read the same input
(q, k and v together), on a grid from 0 (no scaling: plain rounding, so the search never does worse than it on the
calibration data) to 1, minimising the group's output error ``||X W^T - X diag(s)^-1 Q(W diag(s))^T||``, with Q the
grid of the pass that follows (``bits=4,block=128``: the ``int4`` pass's; ``bits=8``: the ``int8`` pass's).

The division by s is folded into what produces the input when that is exact (a LayerNorm's or a Linear's
weight and bias, when the group alone reads it), else it becomes one ``Mul`` by a constant before the group. This
pass only rescales (the float model computes the same function); put the quantization after it:
``awq,int4:block=128`` or ``awq:bits=8,int8``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, fx, nn

from fxcompress.algorithms.quant import (
    INT4_BLOCK_SIZES,
    block_for,
    round_trip,
)
from fxcompress.algorithms.statistics import observe
from fxcompress.errors import InputError
from fxcompress.graph.edit import add_constant, attr_owner, replace_tensor, set_site_weight, site_tensor
from fxcompress.graph.sites import Site, find_sites, stored_tensor
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import EXACT, Tolerance

aten = torch.ops.aten
_LAYER_NORMS = {aten.layer_norm.default, torch.nn.functional.layer_norm}
# A group whose 1/s cannot be folded needs a Mul at run time: worth it only when it cuts the calibration error by 3%+
MIN_GAIN_FOR_A_MUL = 0.97


@dataclass(frozen=True)
class AWQConfig(PassConfig):
    """Scale each Linear's input columns by its activations' magnitude^alpha (searched) before int4/int8 quantization;
    the float model is unchanged. Needs calibration; put ``int4`` or ``int8`` after it with the same grid."""

    name: ClassVar[str] = "awq"
    tolerance: ClassVar[Tolerance] = EXACT  # a rescaling: the quantization after it sets the floor
    bits: int = 4
    block: int = 128
    grid: int = 20
    rows: int = 4096

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 (int4 blocks) or 8 (int8 per channel), got {self.bits}")
        if self.block not in INT4_BLOCK_SIZES:
            raise ValueError(f"block must be one of {INT4_BLOCK_SIZES}, got {self.block}")
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2 (alpha values tried from 0 to 1), got {self.grid}")
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")


def search_scales(
    x: Tensor, weights: list[Tensor], bits: int, block: int, grid: int
) -> tuple[Tensor, float, float, float]:
    """The per-input-channel scales s minimising the group's output error after quantization, over alpha in
    ``[0, 1)`` on ``grid`` points; returns (s, alpha, the error at alpha = 0, the best error), errors relative to the
    output's energy.

    Example:
        >>> x = torch.randn(256, 64) * torch.cat([torch.full((4,), 20.0), torch.ones(60)])  # 4 salient channels
        >>> s, alpha, plain, best = search_scales(x, [torch.randn(32, 64)], bits=4, block=32, grid=20)
        >>> alpha > 0 and best < plain
        True
    """
    x = x.float()
    magnitude = x.abs().mean(0).clamp_min(1e-8)
    reference = [x @ w.float().t() for w in weights]
    energy = sum(float(r.pow(2).sum()) for r in reference) or 1.0
    best = (torch.ones_like(magnitude), 0.0, float("inf"))
    plain = float("inf")
    for i in range(grid):
        alpha = i / grid
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1, as AWQ does, to keep the grid's range
        error = 0.0
        for w, ref in zip(weights, reference):
            q = round_trip(w.float() * s, bits, block)
            error += float(((x / s) @ q.t() - ref).pow(2).sum())
        error /= energy
        if i == 0:
            plain = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0].float(), best[1], plain, best[2]


def _groups(sites: list[Site], every: list[Site]) -> dict[fx.Node, list[Site]]:
    """Selected Linear sites by the node that feeds them; a site whose weight another layer also reads is left out
    (scaling it would change that layer too)."""
    readers: dict[tuple, int] = {}
    for s in every:
        readers[s.weight_key] = readers.get(s.weight_key, 0) + 1
    groups: dict[fx.Node, list[Site]] = {}
    for site in sites:
        if readers[site.weight_key] == 1:
            groups.setdefault(site.input, []).append(site)
    return groups


def _fold_into_producer(gm: fx.GraphModule, producer: fx.Node, group: list[Site], inverse: Tensor) -> Optional[str]:
    """Divide ``producer``'s output by s in its own weights when that is exact (a LayerNorm or a Linear that only
    this group reads); return what it was folded into, or None."""
    if set(producer.users) != {s.node for s in group}:
        return None
    tensors: list[tuple[nn.Module, str]] = []
    if producer.op == "call_module":
        mod = gm.get_submodule(str(producer.target))
        if isinstance(mod, (nn.LayerNorm, nn.Linear)) and getattr(mod, "weight", None) is not None:
            tensors = [(mod, "weight")] + ([(mod, "bias")] if mod.bias is not None else [])
    elif producer.op == "call_function" and producer.target in _LAYER_NORMS:
        args = list(producer.args) + [None] * 5
        weight, bias = producer.kwargs.get("weight", args[2]), producer.kwargs.get("bias", args[3])
        if stored_tensor(gm, weight) is not None and (bias is None or stored_tensor(gm, bias) is not None):
            tensors = [attr_owner(gm, str(n.target)) for n in (weight, bias) if n is not None]
    elif producer.op == "call_function":
        site = next(
            (s for s in find_sites(gm)[0] if s.node is producer and s.kind == "linear" and not s.transposed), None
        )
        if site is not None and site.node.op == "call_function":
            tensors = [attr_owner(gm, str(site.node.args[1].target))]
            if site.bias is not None:
                tensors.append(attr_owner(gm, str(site.node.args[2].target)))
    if not tensors:
        return None
    for owner, attr in tensors:  # output channel j of a LayerNorm (weight, bias) or a Linear (row j, bias j)
        value = getattr(owner, attr).detach()
        scaled = value * inverse.reshape(-1, *([1] * (value.dim() - 1))).to(value.dtype)
        replace_tensor(owner, attr, scaled.contiguous())
    return producer.name


def _divide_input(gm: fx.GraphModule, group: list[Site], inverse: Tensor) -> str:
    """Insert ``x * (1/s)`` before the group and make every site of it read that."""
    producer = group[0].input
    first = min((s.node for s in group), key=lambda n: list(gm.graph.nodes).index(n))
    constant = add_constant(gm, f"{group[0].name}_awq_inverse_scale", inverse, first)
    with gm.graph.inserting_before(first):
        scaled = gm.graph.call_function(aten.mul.Tensor, (producer, constant))
    for site in group:
        site.node.replace_input_with(producer, scaled)
    return "a Mul before the layer(s)"


def _rows(gm: fx.GraphModule, groups: dict[fx.Node, list[Site]], batches, limit: int) -> dict[str, Tensor]:
    """Up to ``limit`` real rows of each group's input, from the calibration batches in order."""
    rows: dict[str, list[Tensor]] = {}
    names = {f"group{i}": node for i, node in enumerate(groups)}

    def keep(name: str, t: Tensor) -> None:
        have = sum(r.shape[0] for r in rows.get(name, []))
        if have < limit:
            rows.setdefault(name, []).append(t.reshape(-1, t.shape[-1])[: limit - have].float())

    observe(gm, names, batches, keep)
    return {name: torch.cat(parts) for name, parts in rows.items()}


@register_pass(AWQConfig)
def scale_awq(gm: fx.GraphModule, cfg: AWQConfig, ctx: PassContext) -> PassResult:
    """Search and apply the AWQ scales of every group of selected Linear layers that share an input.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="awq:block=32,int4:block=32", calibration=[(x,)])
        >>> cm.records[0].pass_name, cm.records[0].action
        ('awq', 'scaled')
    """
    if ctx.calibration is None:
        raise InputError(
            "awq needs calibration data to measure activation magnitudes: optimize(..., calibration=[input_tuple, ...])"
        )
    sites, records = select_sites(gm, cfg, ("linear",))
    if cfg.bits == 4:  # int4 leaves these float, so there is no grid to fit scales to
        unfit = [s for s in sites if block_for(s.weight.shape[1], cfg.block) is None]
        records += [
            LayerRecord(s.name, s.kind, cfg.name, "skipped", f"in_features {s.weight.shape[1]} fits no int4 block")
            for s in unfit
        ]
        sites = [s for s in sites if s not in unfit]
    every = find_sites(gm)[0]
    groups = _groups(sites, every)
    grouped = {s.name for members in groups.values() for s in members}
    for site in sites:
        if site.name not in grouped:
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", "its weight is shared with another layer")
            )
    rows = _rows(gm, groups, ctx.calibration, cfg.rows)
    changed = False
    for i, (producer, group) in enumerate(groups.items()):
        ctx.progress(group[0].name)
        # the weights as they are now: a layer may already have had its rows scaled as an earlier group's producer
        weights = [getattr(*site_tensor(gm, g)).detach() for g in group]
        s, alpha, plain, best = search_scales(
            rows[f"group{i}"], [w.float() for w in weights], cfg.bits, cfg.block, cfg.grid
        )
        grid = f"int{cfg.bits}" + (f" block {cfg.block}" if cfg.bits == 4 else "")
        if alpha == 0.0:
            for site in group:
                records.append(
                    LayerRecord(
                        site.name,
                        site.kind,
                        cfg.name,
                        "skipped",
                        f"no scaling beats plain rounding on the {grid} grid (error {plain:.3g})",
                    )
                )
            continue
        inverse = 1.0 / s
        where = _fold_into_producer(gm, producer, group, inverse)
        if where is None and best > MIN_GAIN_FOR_A_MUL * plain:  # an extra op for a gain below the noise: skip
            for site in group:
                records.append(
                    LayerRecord(
                        site.name,
                        site.kind,
                        cfg.name,
                        "skipped",
                        f"scaling gains too little for a Mul before the layer ({plain:.3g} -> {best:.3g})",
                    )
                )
            continue
        for site, w in zip(group, weights):
            set_site_weight(gm, site, (w * s.to(w.dtype)).contiguous())
        where = f"folded into {where}" if where else _divide_input(gm, group, inverse)
        changed = True
        for site in group:
            note = (
                f"alpha {alpha:.2f} for the {grid} grid: output error {plain:.3g} -> {best:.3g} on calibration rows "
                f"({len(group)} layer(s) share the input); 1/s {where}"
            )
            records.append(
                LayerRecord(
                    site.name,
                    site.kind,
                    cfg.name,
                    "scaled",
                    note,
                    site.weight_bytes,
                    site.weight_bytes,
                    numerics=Numerics("float32"),
                    extra={"awq_alpha": alpha, "calibration_error": [plain, best]},
                )
            )
    return PassResult(gm, changed, records)
