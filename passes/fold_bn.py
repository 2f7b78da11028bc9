"""Fold an inference-mode BatchNorm into the Conv that feeds it.

BN(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta, so with s = gamma / sqrt(var + eps) per output
channel the pair equals a single conv with W' = W * s and b' = (b - mean) * s + beta. Exact up to float rounding,
hence the tight tolerance. The folded weight is written back where the conv reads it from, so layer names survive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxcompress.graph.edit import attr_owner
from fxcompress.graph.sites import Site, find_sites, nbytes, stored_tensor
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import EXACT, Tolerance

aten = torch.ops.aten


@dataclass(frozen=True)
class FoldBNConfig(PassConfig):
    """Fold BatchNorm1d/2d (eval mode) into the preceding Conv1d/Conv2d."""

    name: ClassVar[str] = "fold_bn"
    nothing_found: ClassVar[str] = "no Conv1d/Conv2d followed by an inference-mode BatchNorm"
    tolerance: ClassVar[Tolerance] = EXACT


@dataclass
class _BN:
    node: fx.Node  # the node whose uses the folded conv takes over
    mean: Tensor
    var: Tensor
    gamma: Optional[Tensor]
    beta: Optional[Tensor]
    eps: float


def _batch_norm_after(gm: fx.GraphModule, conv: fx.Node) -> Optional[_BN] | str:
    """The BN consuming ``conv``'s output, a reason string when it cannot be folded, or None when there is none."""
    users = list(conv.users)
    if len(users) != 1:
        return None
    bn = users[0]
    if bn.op == "call_module":
        mod = gm.get_submodule(str(bn.target))
        if not isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return None
        if mod.running_mean is None:
            return "BatchNorm has no running statistics (track_running_stats=False)"
        w = mod.weight.detach() if mod.weight is not None else None
        b = mod.bias.detach() if mod.bias is not None else None
        return _BN(bn, mod.running_mean, mod.running_var, w, b, mod.eps)
    if bn.op == "call_function" and bn.target in (aten.batch_norm.default, F.batch_norm):
        if bn.target is F.batch_norm:  # (input, running_mean, running_var, weight, bias, training, momentum, eps)
            a = list(bn.args) + [None] * 8
            mean, var, w, b, training, eps = (
                a[1],
                a[2],
                bn.kwargs.get("weight", a[3]),
                bn.kwargs.get("bias", a[4]),
                bn.kwargs.get("training", a[5]),
                bn.kwargs.get("eps", a[7] or 1e-5),
            )
        else:  # (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
            _, w, b, mean, var, training, _, eps = bn.args[:8]
        if training:
            return "BatchNorm runs in training mode (batch statistics)"
        mean_t, var_t = stored_tensor(gm, mean), stored_tensor(gm, var)
        if mean_t is None or var_t is None:
            return "BatchNorm statistics are not stored tensors"
        return _BN(bn, mean_t, var_t, stored_tensor(gm, w), stored_tensor(gm, b), float(eps))
    return None


def _write_back(gm: fx.GraphModule, site: Site, weight: Tensor, bias: Tensor) -> None:
    """Store the folded tensors where the conv reads them from (module attributes or get_attr targets)."""
    node = site.node
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        mod.weight = nn.Parameter(weight, requires_grad=False)
        mod.bias = nn.Parameter(bias, requires_grad=False)
        return
    w_target = str(node.args[1].target)
    owner_name = w_target.rpartition(".")[0]  # for the get_attr of a new bias beside the weight
    owner, attr = attr_owner(gm, w_target)
    setattr(owner, attr, nn.Parameter(weight, requires_grad=False))
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(b_node, fx.Node):
        setattr(*attr_owner(gm, str(b_node.target)), nn.Parameter(bias, requires_grad=False))
        return
    b_attr = (
        attr.replace("weight", "bias")
        if "weight" in attr and not hasattr(owner, attr.replace("weight", "bias"))
        else f"{attr}_folded_bias"
    )
    owner.register_parameter(b_attr, nn.Parameter(bias, requires_grad=False))
    with gm.graph.inserting_before(node):
        b_get = gm.graph.get_attr(f"{owner_name}.{b_attr}" if owner_name else b_attr)
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    args[2] = b_get
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}


def fold(weight: Tensor, bias: Optional[Tensor], bn: _BN) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias) for conv weight ``weight`` ([out, in/groups, *k]) followed by ``bn``.

    Example:
        >>> bn = _BN(None, torch.zeros(2), torch.full((2,), 4.0), torch.ones(2), torch.tensor([0.0, 1.0]), 0.0)
        >>> weight, bias = fold(torch.ones(2, 1, 1, 1), None, bn)  # y = (x - 0) / sqrt(4) * 1 + beta
        >>> weight.flatten().tolist(), bias.tolist()
        ([0.5, 0.5], [0.0, 1.0])
    """
    scale = torch.rsqrt(bn.var.double() + bn.eps)
    if bn.gamma is not None:
        scale = scale * bn.gamma.double()
    b = bias.double() if bias is not None else torch.zeros_like(bn.mean, dtype=torch.float64)
    new_b = (b - bn.mean.double()) * scale + (bn.beta.double() if bn.beta is not None else 0.0)
    new_w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


@register_pass(FoldBNConfig)
def fold_batch_norm(gm: fx.GraphModule, cfg: FoldBNConfig, ctx: PassContext) -> PassResult:
    """Fold every foldable Conv->BatchNorm pair of ``gm``.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> res = fold_batch_norm(fx.symbolic_trace(m), FoldBNConfig(), PassContext((torch.randn(1, 1, 8, 8),)))
        >>> res.modified
        True
    """
    sites, _ = select_sites(gm, cfg, ("conv1d", "conv2d"))
    tied = Counter(s.weight_key for s in find_sites(gm)[0])
    records: list[LayerRecord] = []
    for site in sites:
        bn = _batch_norm_after(gm, site.node)
        if bn is None:
            continue  # nothing to fold: not a candidate, so no record
        if isinstance(bn, str):
            records.append(LayerRecord(site.name, site.kind, cfg.name, "skipped", bn))
            continue
        if tied[site.weight_key] > 1:
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", "weight is shared with another layer")
            )
            continue
        weight, bias = fold(site.weight, site.bias, bn)
        _write_back(gm, site, weight, bias)
        bn.node.replace_all_uses_with(site.node)
        gm.graph.erase_node(bn.node)
        records.append(
            LayerRecord(
                site.name,
                site.kind,
                cfg.name,
                "folded",
                f"absorbed {bn.node.name}",
                site.weight_bytes,
                nbytes(weight, bias),
                numerics=Numerics("float32"),
            )
        )
    return PassResult(gm, any(r.action == "folded" for r in records), records)
