"""The few graph edits every pass shares: add a constant, swap a site for a new node, and clean up after.

Edits follow torch.fx's subgraph rewriter: insert before the old node, ``replace_all_uses_with``, erase, then
:func:`finalize` (dead code, unused submodules and attributes, lint, recompile) once per pass.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, fx

from fxcompress.graph.sites import Site, nbytes


def add_constant(gm: fx.GraphModule, base: str, value: Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` under a fresh name derived from ``base``; return its get_attr node.

    Example:
        >>> codes = add_constant(gm, "fc_codes", torch.zeros(4, dtype=torch.int8), before=site.node)
        >>> codes.op, codes.target
        ('get_attr', 'fc_codes')
    """
    stem = re.sub(r"\W", "_", base).strip("_") or "const"
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def replace_node(gm: fx.GraphModule, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    """Insert ``call_function(target, args)`` before ``old``, reroute ``old``'s users to it and erase ``old``.

    Example:
        >>> new = replace_node(gm, site.node, torch.ops.aten.relu.default, (site.input,))
        >>> new.target, len(gm.graph.nodes)
        (<OpOverload(op='aten.relu', overload='default')>, 5)
    """
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    new.meta.update(
        {k: v for k, v in old.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")}
    )
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def replace_site(
    gm: fx.GraphModule,
    site: Site,
    target: Any,
    tensors: dict[str, Tensor | None],
    extra: tuple = (),
    shared: dict[str, fx.Node] | None = None,
) -> fx.Node:
    """Replace ``site`` by ``target(site.input, *tensors.values(), *extra)``.

    ``tensors`` become buffers named after the site (None stays None); ``shared`` passes get_attr nodes already
    made for a tied weight, so two sites that shared a weight share its compressed form too.

    Example:
        >>> import fxcompress.ops.linear_q8
        >>> q = torch.zeros(64, 64, dtype=torch.int8)
        >>> tensors = {"qweight": q, "scale": torch.ones(64), "zero_point": None, "bias": site.bias}
        >>> new = replace_site(gm, site, torch.ops.fxcompress.linear_q8.default, tensors)
        >>> [a.target if isinstance(a, fx.Node) else a for a in new.args]
        ['input', '0_qweight', '0_scale', None, '0_bias']
    """
    shared = shared or {}
    args: list[Any] = [site.input]
    for key, value in tensors.items():
        if key in shared:
            args.append(shared[key])
        elif value is None:
            args.append(None)
        else:
            args.append(add_constant(gm, f"{site.name}_{key}", value, site.node))
    return replace_node(gm, site.node, target, tuple(args) + tuple(extra))


class TiedWeights:
    """The stored tensors of each weight a pass has rewritten, so that every further reader of a tied weight (a
    Linear called twice, a head tied to its embedding) reuses them instead of storing another copy.

    Example:
        >>> tied = TiedWeights()
        >>> q = {"qweight": torch.zeros(64, 64, dtype=torch.int8), "scale": torch.ones(64), "zero_point": None}
        >>> tensors = {**q, "bias": site.bias}
        >>> new = replace_site(gm, site, torch.ops.fxcompress.linear_q8.default, tensors)
        >>> tied.remember(site, new, tensors, ("qweight", "scale", "zero_point"))
        >>> tied.lookup(site)[0], sorted(tied.lookup(site)[1])
        ('0', ['qweight', 'scale'])
    """

    def __init__(self) -> None:
        self._first: dict[tuple, tuple[str, dict[str, fx.Node]]] = {}

    def lookup(self, site: Any, layout: str = "") -> Optional[tuple[str, dict[str, fx.Node]]]:
        """(the first reader's name, its get_attr nodes by tensor key) for ``site``'s weight, or None."""
        return self._first.get((site.weight_key, layout))

    def remember(
        self, site: Any, new: fx.Node, tensors: dict[str, Any], weight_keys: Sequence[str], layout: str = ""
    ) -> None:
        """Record the nodes that :func:`replace_site` made for ``weight_keys`` (those of its ``tensors`` that depend on
        the weight alone) as ``site``'s weight's compressed form."""
        order = list(tensors)
        nodes = {k: new.args[1 + order.index(k)] for k in weight_keys if tensors[k] is not None}
        self._first.setdefault((site.weight_key, layout), (site.name, nodes))


def attr_owner(gm: fx.GraphModule, fqn: str) -> tuple[torch.nn.Module, str]:
    """The module holding the attribute ``fqn`` and its local name: ``"a.b.weight"`` -> ``(gm.a.b, "weight")``.

    Example:
        >>> attr_owner(gm, "0.weight")
        (Linear(in_features=64, out_features=64, bias=True), 'weight')
    """
    path, _, attr = fqn.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def site_tensor(gm: fx.GraphModule, site: Site, which: str = "weight") -> tuple[torch.nn.Module, str]:
    """Where ``site``'s ``"weight"`` or ``"bias"`` is stored: (owning module, attribute name), whether the site is a
    module call or a function reading get_attr nodes.

    Example:
        >>> owner, attr = site_tensor(gm, site)
    """
    if site.node.op == "call_module":
        return gm.get_submodule(str(site.node.target)), which
    if site.transposed:  # addmm(bias, x, W)
        return attr_owner(gm, str(site.node.args[2 if which == "weight" else 0].target))
    index = (0 if site.kind == "embedding" else 1) if which == "weight" else 2
    return attr_owner(gm, str(site.node.args[index].target))


def replace_tensor(owner: torch.nn.Module, attr: str, value: Tensor) -> Tensor:
    """Swap the parameter or buffer ``owner.attr`` for ``value``, keeping its kind and requires_grad; return the old
    one.

    Example:
        >>> old = replace_tensor(*site_tensor(gm, site), torch.zeros(64, 64))
        >>> old.shape, float(gm.get_submodule("0").weight.abs().sum())
        (torch.Size([64, 64]), 0.0)
    """
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value
    return old


def set_site_weight(gm: fx.GraphModule, site: Site, value: Tensor) -> Tensor:
    """Store ``value`` as ``site``'s weight (module parameter or graph attribute) in place; return the old tensor.

    Example:
        >>> old = set_site_weight(gm, site, torch.zeros_like(site.weight))
        >>> _ = set_site_weight(gm, site, old)   # undo
    """
    if site.transposed:  # stored [in, out]: store the transpose, hand back the old one in [out, in]
        return replace_tensor(*site_tensor(gm, site), value.t().contiguous()).t()
    return replace_tensor(*site_tensor(gm, site), value)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters/buffers nothing reads any more, so exports and byte counts stop carrying them."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}

    def live(fqn: str) -> bool:
        if fqn in read or any(fqn.startswith(r + ".") for r in read):
            return True
        parts = fqn.split(".")
        return any(".".join(parts[:i]) in called for i in range(1, len(parts)))

    for fqn in [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [
        n for n, _ in gm.named_buffers(remove_duplicate=False)
    ]:
        if not live(fqn):
            owner, attr = attr_owner(gm, fqn)
            if attr in owner._parameters:
                del owner._parameters[attr]
            elif attr in owner._buffers:
                del owner._buffers[attr]


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s structure (modules, graph, attributes) that shares its parameters and buffers instead of
    copying them: no memory for the weights. Edits that *replace* a tensor (every pass's, through
    :func:`replace_tensor` or new buffers) touch only the copy; nothing may change a shared tensor in place.

    Example:
        >>> twin = shared_copy(model)
        >>> twin is model, twin[0].weight is model[0].weight
        (False, True)
    """
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def unshare(module: torch.nn.Module, other: torch.nn.Module) -> int:
    """Give ``module`` its own copy of every tensor it still shares with ``other`` (a tensor tied between two of its
    layers stays tied: both names get the same copy); returns the bytes copied.

    Example:
        >>> twin = shared_copy(model)
        >>> unshare(twin, model), twin[0].weight is model[0].weight
        (19240, False)
    """
    theirs = {t.untyped_storage().data_ptr() for t in itertools.chain(other.parameters(), other.buffers())}
    copies: dict[int, Tensor] = {}
    for fqn, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if t.untyped_storage().data_ptr() not in theirs:
            continue
        if id(t) not in copies:
            fresh = t.detach().clone()
            copies[id(t)] = (
                torch.nn.Parameter(fresh, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else fresh
            )
        owner, attr = attr_owner(module, fqn)
        if attr in owner._parameters:
            owner._parameters[attr] = copies[id(t)]
        else:
            owner._buffers[attr] = copies[id(t)]
    return sum(nbytes(t) for t in copies.values())


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """End every pass: remove dead nodes, unused submodules and attributes, check the graph and recompile.

    Example:
        >>> finalize(gm) is gm
        True
    """
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors counted once).

    Example:
        >>> state_bytes(torch.nn.Linear(4, 2))
        40
    """
    seen: set[tuple] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total
