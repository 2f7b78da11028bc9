"""Structured channel pruning over a dependency graph: removed channels leave the weights, not just get zeroed.

Each Conv/Linear output starts a *group* of channels. Walking the fx graph, the pass follows every group through
the ops that keep channels aligned (BatchNorm, activations, pooling, dropout, depthwise conv, flatten into a Linear,
concatenation) and merges groups that must lose the same channels (the operands of a residual ``add``/``mul``).
Attention is followed too: a reshape that splits channels into (heads, head_dim), transposes, ``q @ k^T`` and
``att @ v`` couple q, k and v, whose group then loses whole heads, and the reshapes' literal head counts are
rewritten. A group reaching anything else (the graph output, LayerNorm, an untracked residual stream, a grouped
conv, an unknown op) is *refused* with that reason and left whole: a pruned graph is always valid.

Every prunable group keeps ``ceil((1 - ratio) * channels)`` channels (at least one) ranked by the summed,
per-layer-normalised L1 or L2 norm of its producers' output rows (``importance=l1|l2``), optionally times the mean
|activation| on calibration data (``importance=activation``). ``scope=global`` ranks all groups' channels together
(pruning redundant layers harder) while still keeping one channel per group. Records list the removed and kept
indices; ``plan=FILE`` replays a JSON ``{layer: [kept channel indices]}`` (e.g. written from those records with
:func:`pruning_plan`) instead of ranking, so one pruning decision can be applied to another copy of the model.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxcompress.algorithms.statistics import observe
from fxcompress.errors import InputError
from fxcompress.graph.edit import attr_owner, replace_tensor, site_tensor
from fxcompress.graph.sites import Site, find_sites
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import Tolerance

aten = torch.ops.aten

_UNARY = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.tanh,
    F.hardswish,
    F.leaky_relu,
    F.dropout,
    F.elu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.dropout.default,
    aten.clone.default,
    aten.hardtanh.default,
    aten.relu_.default,
    "relu",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
}
_POOL = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
}
_BINARY = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.div,
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    "add",
    "mul",
    "sub",
    "div",
}
_FLATTEN = {torch.flatten, aten.flatten.using_ints, "flatten"}
_CAT = {torch.cat, torch.concat, aten.cat.default}
_RESHAPE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, torch.reshape, "reshape", "view"}
_TRANSPOSE = {aten.transpose.int, torch.transpose, "transpose"}
_MATMUL = {aten.matmul.default, torch.matmul, operator.matmul, aten.bmm.default}
_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax, "softmax"}
_BN_FNS = {F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Identity,
    nn.ELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Remove ``ratio`` of the channels of every prunable group of coupled Conv/Linear layers."""

    name: ClassVar[str] = "prune"
    tolerance: ClassVar[Tolerance] = Tolerance(0.9, 0.75, 3.0, 1.0, 0.5, 0.85, 5.0)
    ratio: float = 0.5
    importance: str = "l2"
    scope: str = "local"
    protect: tuple[str, ...] = ()
    plan: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.importance not in ("l1", "l2", "activation"):
            raise ValueError(f"importance must be 'l1', 'l2' or 'activation', got {self.importance!r}")
        if self.scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {self.scope!r}")


@dataclass
class _Group:
    size: int
    unit: int = 1  # channels removed together: the head size once the group is split into attention heads
    producers: list[Site] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    parent: Optional["_Group"] = None

    def root(self) -> "_Group":
        g = self
        while g.parent is not None:
            g = g.parent
        return g


# A tracked tensor's channel axis is a concatenation of segments: (group, channels, features per channel).
Layout = tuple[tuple[_Group, int, int], ...]
# Where a tensor's channels are: an int axis, or, once reshaped into attention heads, ("heads", head axis, head-dim
# axis or None after q.k^T contracted it, head size).
Heads = tuple[str, int, Optional[int], int]


@dataclass
class _Use:
    """A consumer tensor (``owner.attr``) sliced along ``dim`` by the channels of ``layout``."""

    owner: nn.Module
    attr: str
    dim: int
    layout: Layout


class _Analysis:
    """One walk over the graph: groups of coupled channels, what refuses them, and every tensor to slice."""

    def __init__(self, gm: fx.GraphModule, selected: set[str]):
        self.gm, self.selected = gm, selected
        self.layouts: dict[fx.Node, tuple[Layout, int]] = {}  # node -> (layout, channel axis)
        self.uses: list[_Use] = []
        self.groups: list[_Group] = []
        self.shape_patches: list[
            tuple[fx.Node, int, int, _Group, bool]
        ] = []  # node, shape index, head size, group, split?

    def refuse(self, layout: Layout, reason: str) -> None:
        for g, _, _ in layout:
            g.root().refused.append(reason)

    def union(self, a: Layout, b: Layout, where: str) -> Optional[Layout]:
        if [(n, r) for _, n, r in a] != [(n, r) for _, n, r in b]:
            self.refuse(a + b, f"{where} joins tensors whose channel layouts differ")
            return None
        for (ga, _, _), (gb, _, _) in zip(a, b):
            ra, rb = ga.root(), gb.root()
            if ra is not rb:
                rb.parent = ra
                ra.producers += rb.producers
                ra.refused += rb.refused
        return a

    def run(self) -> None:
        sites = {s.node: s for s in find_sites(self.gm)[0] if not s.transposed}  # [in, out] weights: opaque
        for node in self.gm.graph.nodes:
            tracked = [a for a in node.all_input_nodes if a in self.layouts]
            if node in sites:
                self._site(node, sites[node])
            elif tracked:
                self._propagate(node, tracked)

    # -- rules ------------------------------------------------------------------------------------------------
    def _site(self, node: fx.Node, site: Site) -> None:
        conv = site.kind.startswith("conv")
        groups = site.conv.get("groups", 1)
        x = site.input
        depthwise = conv and groups > 1 and groups == site.weight.shape[0] and site.weight.shape[1] == 1
        if x in self.layouts:
            layout, axis = self.layouts[x]
            want_axis = 1 if conv else -1
            if site.kind == "embedding":
                pass
            elif axis != want_axis:
                self.refuse(layout, f"{site.name} reads channels on a different axis")
            elif depthwise:
                self.uses.append(_Use(*site_tensor(self.gm, site), 0, layout))
                if site.bias is not None:
                    self.uses.append(_Use(*site_tensor(self.gm, site, "bias"), 0, layout))
                self.layouts[node] = (layout, 1)
                return
            elif groups > 1:
                self.refuse(layout, f"{site.name} is a grouped conv (groups={groups})")
            else:
                self.uses.append(_Use(*site_tensor(self.gm, site), 1, layout))
        if site.kind == "embedding":
            return
        g = _Group(site.weight.shape[0])
        self.groups.append(g)
        if groups > 1 and not depthwise:
            g.refused.append(f"{site.name} is a grouped conv (groups={groups})")
        if site.name not in self.selected:
            g.refused.append(f"{site.name} is protected (protect/include/exclude)")
        g.producers.append(site)
        self.layouts[node] = (((g, g.size, 1),), 1 if conv else -1)

    def _propagate(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        """Apply the first rule of :data:`_RULES` that matches ``node``; refuse its groups when none does."""
        if node.op == "output":
            for t in tracked:
                self.refuse(self.layouts[t][0], "feeds the model's output")
            return
        mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        axis = self.layouts[tracked[0]][1]
        for matches, handle in _RULES:
            if matches(self, node, mod, axis, tracked):
                handle(self, node, tracked)
                return
        self._refuse_all(tracked, f"reaches {node.name} ({_op(node)}), which the dependency graph does not understand")

    # -- channel-preserving ops --------------------------------------------------------------------------------------
    def _same_layout(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        if len(tracked) == 1:
            self.layouts[node] = self.layouts[tracked[0]]
        else:
            self._refuse_all(tracked, f"{node.name} ({_op(node)}) mixes several channel tensors")

    def _flatten(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        spatial = math.prod(tracked[0].meta["tensor_meta"].shape[2:])
        self.layouts[node] = (tuple((g, n, r * spatial) for g, n, r in self.layouts[tracked[0]][0]), -1)

    def _concat(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        axis = self.layouts[tracked[0]][1]
        self.layouts[node] = (tuple(seg for a in node.args[0] for seg in self.layouts[a][0]), axis)

    # -- attention heads: reshape (split / merge), transpose, q @ k^T, att @ v ---------------------------------------
    def _reshape(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        src = tracked[0]
        layout, axis = self.layouts[src]
        shape = _shape_arg(node)
        ins, outs = tuple(src.meta["tensor_meta"].shape), tuple(node.meta["tensor_meta"].shape)
        why = f"reaches {node.name} ({_op(node)}), a reshape the dependency graph does not understand"
        if shape is None:
            return self.refuse(layout, why)
        if isinstance(axis, int) and len(layout) == 1 and layout[0][2] == 1:  # split channels into (heads, head_dim)
            ax = axis % len(ins)
            # the head count is a literal (rewritten below) or -1 next to a literal head size (inferred again)
            literal = isinstance(shape[ax], int) and shape[ax] > 0
            inferred = shape[ax] == -1 and shape[ax + 1] == outs[ax + 1]
            if (
                len(outs) == len(ins) + 1
                and outs[:ax] == ins[:ax]
                and outs[ax + 2 :] == ins[ax + 1 :]
                and outs[ax] * outs[ax + 1] == ins[ax]
                and (literal or inferred)
            ):
                root = layout[0][0].root()
                if root.unit not in (1, outs[ax + 1]):
                    return self.refuse(layout, f"{node.name} splits channels into heads of another size")
                root.unit = outs[ax + 1]
                if literal:
                    self.shape_patches.append((node, ax, outs[ax + 1], layout[0][0], True))
                self.layouts[node] = (layout, ("heads", ax, ax + 1, outs[ax + 1]))
                return None
        if isinstance(axis, tuple) and ins == outs:  # a reshape to the same shape (HF BERT after attention)
            head, dim, size = axis[1], axis[2], axis[3]
            if shape[head] in (-1, outs[head]) and (dim is None or shape[dim] in (-1, size)):
                if shape[head] != -1:
                    self.shape_patches.append((node, head, size, layout[0][0], True))
                self.layouts[node] = (layout, axis)
                return None
        if isinstance(axis, tuple) and axis[2] == axis[1] + 1:  # merge (heads, head_dim) back into channels
            ax = axis[1]
            if (
                len(outs) == len(ins) - 1
                and outs[:ax] == ins[:ax]
                and outs[ax + 1 :] == ins[ax + 2 :]
                and isinstance(shape[ax], int)
                and shape[ax] in (-1, outs[ax])
            ):
                if shape[ax] > 0:
                    self.shape_patches.append((node, ax, axis[3], layout[0][0], False))
                self.layouts[node] = (layout, -1 if ax == len(outs) - 1 else ax)
                return None
        return self.refuse(layout, why)

    def _transpose(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        src = tracked[0]
        layout, (_, head, dim, size) = self.layouts[src]
        rank = _rank(src)
        a, b = _dim(node.args[1], rank), _dim(node.args[2], rank)
        swap = {a: b, b: a}
        self.layouts[node] = (
            layout,
            ("heads", swap.get(head, head), None if dim is None else swap.get(dim, dim), size),
        )

    def _matmul(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        a, b = node.args[0], node.args[1]
        why = f"{node.name} ({_op(node)}) multiplies channels in a way the dependency graph does not understand"
        if len(tracked) != 2 or a not in self.layouts or b not in self.layouts:
            return self._refuse_all(tracked, why)
        (la, xa), (lb, xb) = self.layouts[a], self.layouts[b]
        rank = _rank(node)
        if (
            not (isinstance(xa, tuple) and isinstance(xb, tuple))
            or xa[1] != xb[1]
            or xa[1] >= rank - 2
            or _rank(a) != _rank(b)
        ):
            return self._refuse_all(tracked, why)
        if xa[2] == rank - 1 and xb[2] == rank - 2:  # q @ k^T: the head dims are contracted, heads stay
            out = ("heads", xa[1], None, xa[3])
        elif xa[2] is None and xb[2] == rank - 1:  # att @ v
            out = ("heads", xa[1], rank - 1, xb[3])
        else:
            return self._refuse_all(tracked, why)
        if self.union(la, lb, f"{node.name} ({_op(node)})") is None:
            return None
        self.layouts[node] = (la, out)
        return None

    def _attention(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        """softmax(q k^T) v in one op: q, k and v lose the same heads; the output has v's head layout."""
        qkv = list(node.args[:3])
        why = f"{node.name} ({_op(node)}) attends over channels the dependency graph cannot split into heads"
        if set(tracked) != set(qkv) or len(set(qkv)) != 3:
            return self._refuse_all(tracked, why)
        axes = [self.layouts[t][1] for t in qkv]
        rank = _rank(node)
        if not all(isinstance(x, tuple) and x[1] == rank - 3 and x[2] == rank - 1 for x in axes):
            return self._refuse_all(tracked, why)
        layout = self.layouts[qkv[0]][0]
        for t in qkv[1:]:
            if self.union(layout, self.layouts[t][0], f"{node.name} ({_op(node)})") is None:
                return None
        self.layouts[node] = (layout, axes[2])
        return None

    def _refuse_all(self, nodes: list[fx.Node], reason: str) -> None:
        for t in nodes:
            self.refuse(self.layouts[t][0], reason)

    def _binary(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        others = [a for a in node.args if isinstance(a, fx.Node) and a not in self.layouts]
        shapes = [getattr(o.meta.get("tensor_meta"), "shape", None) for o in others]
        if any(s is None or math.prod(s) > 1 for s in shapes):
            self._refuse_all(tracked, f"{node.name} ({_op(node)}) combines channels with an untracked tensor")
            return
        layout, axis = self.layouts[tracked[0]]
        for t in tracked[1:]:
            other, other_axis = self.layouts[t]
            if other_axis != axis or self.union(layout, other, f"{node.name} ({_op(node)})") is None:
                self._refuse_all(tracked, f"{node.name} ({_op(node)}) adds tensors with different channel axes")
                return
        self.layouts[node] = (layout, axis)

    def _batch_norm(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        layout, axis = self.layouts[tracked[0]]
        mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if axis != 1:
            self.refuse(layout, f"{node.name} normalizes a non-channel axis")
            return
        if mod is not None:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, attr, None) is not None:
                    self.uses.append(_Use(mod, attr, 0, layout))
        else:
            for a in node.args[1:5]:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    self.uses.append(_Use(*attr_owner(self.gm, str(a.target)), 0, layout))
        self.layouts[node] = (layout, axis)


# How each op moves a tracked tensor's channels: (does it match, what to do), the first match wins. A matcher gets
# (analysis, node, its module or None, the first tracked input's channel axis, the tracked inputs).
_RULES: tuple[tuple[Callable[..., bool], Callable[..., None]], ...] = (
    (
        lambda a, n, m, axis, t: isinstance(m, nn.modules.batchnorm._BatchNorm) or n.target in _BN_FNS,
        _Analysis._batch_norm,
    ),
    (
        lambda a, n, m, axis, t: (
            isinstance(m, _PASS_MODULES) or n.target in _UNARY or (n.target in _POOL and axis == 1)
        ),
        _Analysis._same_layout,
    ),
    (lambda a, n, m, axis, t: n.target in _BINARY, _Analysis._binary),
    (lambda a, n, m, axis, t: n.target in _FLATTEN and axis == 1 and _flatten_start(n) == 1, _Analysis._flatten),
    (lambda a, n, m, axis, t: n.target in _RESHAPE and len(t) == 1, _Analysis._reshape),
    (lambda a, n, m, axis, t: n.target in _TRANSPOSE and isinstance(axis, tuple), _Analysis._transpose),
    (lambda a, n, m, axis, t: n.target in _MATMUL, _Analysis._matmul),
    (lambda a, n, m, axis, t: n.target in _SDPA, _Analysis._attention),
    (lambda a, n, m, axis, t: n.target in _SOFTMAX and _softmax_over_keys(n, axis), _Analysis._same_layout),
    (lambda a, n, m, axis, t: n.target in _CAT and _concatenates_channels(a, n, t, axis), _Analysis._concat),
)


def _softmax_over_keys(node: fx.Node, axis: Any) -> bool:
    """A softmax over attention scores that keeps the heads axis (it normalizes over another one)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return isinstance(axis, tuple) and _dim(dim, _rank(node)) != axis[1]


def _concatenates_channels(analysis: "_Analysis", node: fx.Node, tracked: list[fx.Node], axis: Any) -> bool:
    """A concatenation along the channel axis of tensors whose channels are all tracked."""
    return (
        len(node.args) > 0
        and _cat_dim(node, tracked[0]) == axis
        and all(isinstance(a, fx.Node) and a in analysis.layouts for a in node.args[0])
    )


def _op(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _rank(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def _dim(d: Any, rank: int) -> Any:
    return d % rank if isinstance(d, int) else d


def _shape_arg(node: fx.Node) -> Optional[list]:
    """The target shape of a reshape/view, whether given as one list (aten, torch.reshape) or as varargs
    (``x.view(b, s, -1, d)`` traced by fx)."""
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if len(args) > 1 and isinstance(node.target, str):
        return list(args)
    return None


def _flatten_start(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)


def _cat_dim(node: fx.Node, like: fx.Node) -> int:
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(like.meta["tensor_meta"].shape)
    return -1 if d in (-1, rank - 1) else d


def _importance(site: Site, kind: str, act: Optional[Tensor]) -> Tensor:
    w = site.weight.float().reshape(site.weight.shape[0], -1)
    score = w.abs().sum(1) if kind == "l1" else w.pow(2).sum(1).sqrt()
    score = score / score.mean().clamp_min(1e-12)
    if act is not None:
        score = score * act / act.mean().clamp_min(1e-12)
    return score


def _indices(layout: Layout, keep: dict[int, Tensor]) -> Tensor:
    out, offset = [], 0
    for g, n, r in layout:
        kept = keep.get(id(g.root()), torch.arange(n))
        out.append((offset + kept[:, None] * r + torch.arange(r)[None, :]).reshape(-1))
        offset += n * r
    return torch.cat(out)


def _sync_module_shapes(gm: fx.GraphModule) -> None:
    for mod in gm.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.conv._ConvNd):
            mod.out_channels = mod.weight.shape[0]
            if mod.groups > 1 and mod.weight.shape[1] == 1:  # depthwise stays depthwise
                mod.groups = mod.in_channels = mod.out_channels
            else:
                mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = mod.running_mean.shape[0] if mod.running_mean is not None else mod.weight.shape[0]


@register_pass(PruneConfig)
def prune_channels(gm: fx.GraphModule, cfg: PruneConfig, ctx: PassContext) -> PassResult:
    """Remove channels from every consistent group of Conv/Linear layers; refused groups keep all channels.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="prune:ratio=0.5")  # the last layer feeds the output: refused
        >>> [(r.layer, r.action, r.reason) for r in cm.records]
        [('0', 'pruned', '64 -> 32 channels'), ('2', 'skipped', "feeds the model's output")]
    """
    ShapeProp(gm).propagate(*ctx.example_inputs)
    chosen, records = select_sites(gm, cfg, ("linear", "conv1d", "conv2d"))
    selected = {s.name for s in chosen if s.name not in cfg.protect}
    analysis = _Analysis(gm, selected)
    analysis.run()
    roots = list({id(g.root()): g.root() for g in analysis.groups}.values())
    prunable = [g for g in roots if not g.refused and g.size > 1]
    if cfg.plan:
        keep = _replay(prunable, cfg.plan)
    else:
        acts = _activations(gm, prunable, ctx) if cfg.importance == "activation" else {}
        keep = _keep(prunable, cfg, acts)
    # Producers' rows, then every consumer's columns / BN entries, each tensor sliced once per (tensor, dim).
    slices: dict[tuple[int, str, int], tuple[nn.Module, str, int, Tensor]] = {}
    for g in (g for g in prunable if id(g) in keep):
        for s in g.producers:
            owner, attr = site_tensor(gm, s)
            slices[(id(owner), attr, 0)] = (owner, attr, 0, keep[id(g)])
            if s.bias is not None:
                owner, attr = site_tensor(gm, s, "bias")
                slices[(id(owner), attr, 0)] = (owner, attr, 0, keep[id(g)])
    for use in analysis.uses:
        if any(id(g.root()) in keep for g, _, _ in use.layout):
            slices[(id(use.owner), use.attr, use.dim)] = (use.owner, use.attr, use.dim, _indices(use.layout, keep))
    before = {s.name: s.weight_bytes for s in chosen}
    for owner, attr, dim, idx in slices.values():
        replace_tensor(owner, attr, getattr(owner, attr).detach().index_select(dim, idx).contiguous())
    _sync_module_shapes(gm)
    _fix_depthwise_groups(gm)
    _patch_shapes(analysis.shape_patches, keep)
    after = {s.name: s.weight_bytes for s in find_sites(gm)[0]}
    chosen_names = {s.name for s in chosen}
    for g in roots:
        names = [s.name for s in g.producers]
        for s in g.producers:
            if s.name not in chosen_names:  # select_sites already recorded why
                continue
            if id(g) in keep:
                removed = sorted(set(range(g.size)) - set(keep[id(g)].tolist()))
                note = f"{g.size} -> {len(keep[id(g)])} channels" + (
                    f" (coupled with {', '.join(n for n in names if n != s.name)})" if len(names) > 1 else ""
                )
                records.append(
                    LayerRecord(
                        s.name,
                        s.kind,
                        cfg.name,
                        "pruned",
                        note,
                        before.get(s.name, 0),
                        after.get(s.name, 0),
                        extra={"removed_channels": removed, "kept_channels": keep[id(g)].tolist()},
                        numerics=Numerics("float32"),
                    )
                )
            else:
                reason = (
                    g.refused[0]
                    if g.refused
                    else (
                        "a single channel cannot be pruned"
                        if g.size == 1
                        else "kept whole: every channel ranked above the global threshold"
                    )
                )
                records.append(
                    LayerRecord(
                        s.name, s.kind, cfg.name, "skipped", reason, before.get(s.name, 0), after.get(s.name, 0)
                    )
                )
    return PassResult(gm, bool(keep), records)


def _keep(prunable: list[_Group], cfg: PruneConfig, acts: dict[str, Tensor]) -> dict[int, Tensor]:
    """Sorted indices of the channels each group keeps (by id of the group's root)."""
    kind = "l2" if cfg.importance == "activation" else cfg.importance
    # one score per removable unit: a channel, or a whole attention head (its channels summed)
    scores = {
        id(g): (sum(_importance(s, kind, acts.get(s.name)) for s in g.producers) / len(g.producers))
        .reshape(-1, g.unit)
        .mean(1)
        for g in prunable
    }
    counts = {id(g): max(1, math.ceil((1 - cfg.ratio) * (g.size // g.unit))) for g in prunable}
    if cfg.scope == "global" and prunable:
        pool = torch.cat([scores[id(g)] for g in prunable])
        threshold = torch.kthvalue(pool, max(1, int(cfg.ratio * pool.numel()))).values
        counts = {id(g): max(1, int((scores[id(g)] > threshold).sum())) for g in prunable}
    keep = {}
    for g in prunable:
        if counts[id(g)] * g.unit < g.size:  # a global ranking may leave a group whole
            units = torch.topk(scores[id(g)], counts[id(g)]).indices.sort().values
            keep[id(g)] = (units[:, None] * g.unit + torch.arange(g.unit)).reshape(-1)
    return keep


def pruning_plan(records: list[LayerRecord]) -> dict[str, list[int]]:
    """``{layer: kept channel indices}`` from a pruning run's records: save it as JSON and pass ``plan=FILE``.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="prune:ratio=0.5")
        >>> _ = Path("plan.json").write_text(json.dumps(pruning_plan(cm.records)))
        >>> again = fxcompress.optimize(model, x, recipe="prune:plan=plan.json")
        >>> pruning_plan(again.records) == pruning_plan(cm.records)
        True
    """
    return {r.layer: r.extra["kept_channels"] for r in records if r.pass_name == "prune" and "kept_channels" in r.extra}


def _replay(prunable: list[_Group], path: str) -> dict[int, Tensor]:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"prune plan={path!r} is not a readable JSON file: {exc}") from exc
    keep = {}
    for g in prunable:
        entries = {s.name: plan[s.name] for s in g.producers if s.name in plan}
        if not entries:
            continue
        kept = next(iter(entries.values()))
        if any(v != kept for v in entries.values()) or not kept or max(kept) >= g.size or min(kept) < 0:
            raise InputError(
                f"prune plan {path!r} disagrees with the model for {sorted(entries)}: "
                f"coupled layers need the same kept channels, each in [0, {g.size})"
            )
        keep[id(g)] = torch.tensor(sorted(set(kept)))
    return keep


def _patch_shapes(patches: list, keep: dict[int, Tensor]) -> None:
    """Rewrite the literal head count / width in the reshapes that split and merge pruned attention heads."""
    for node, index, head_size, group, split in patches:
        kept = keep.get(id(group.root()))
        if kept is None:
            continue
        shape = list(_shape_arg(node))
        shape[index] = len(kept) // head_size if split else len(kept)
        node.args = (node.args[0], shape)


def _fix_depthwise_groups(gm: fx.GraphModule) -> None:
    """Functional depthwise convs carry ``groups`` in the node: keep it equal to the (pruned) channel count."""
    for s in find_sites(gm)[0]:
        if (
            s.node.op == "call_function"
            and s.kind.startswith("conv")
            and s.conv["groups"] > 1
            and s.weight.shape[1] == 1
        ):
            args = list(s.node.args) + [1] * (7 - len(s.node.args))
            args[6] = s.weight.shape[0]
            s.node.args = tuple(args[:7])


def _activations(gm: fx.GraphModule, groups: list[_Group], ctx: PassContext) -> dict[str, Tensor]:
    if ctx.calibration is None:
        raise InputError("prune importance=activation needs calibration data: optimize(..., calibration=[...])")
    producers = [s for g in groups for s in g.producers]
    sums: dict[str, Tensor] = {}
    conv = {s.name: s.kind.startswith("conv") for s in producers}

    def add(name: str, t: Tensor) -> None:
        t = t.abs().float()
        v = t.transpose(0, 1).reshape(t.shape[1], -1).mean(1) if conv[name] else t.reshape(-1, t.shape[-1]).mean(0)
        sums[name] = sums.get(name, 0) + v

    observe(gm, {s.name: s.node for s in producers}, ctx.calibration, add)
    return sums
