"""Mixed precision: weights and compute in float16 (or bfloat16), numerically sensitive ops kept in float32.

The pass assigns every floating-point node a compute dtype, half by default, float32 for the ops whose accuracy
depends on range or long accumulations (normalizations, softmax and attention, reductions, exp/log/pow), for layers
an earlier pass quantized (``int8,fp16``: their kernels take float32) and for layers the config excludes
(``fp16:exclude=classifier`` keeps the logits layer in float32). ``include`` narrows the pass to the layers it names:
every other op then stays float32 too (``fp16:include=*_svd_*`` halves the factor Linears and nothing between the
other layers, where residual sums would otherwise round to half). It then walks the graph once, inserting a cast only
on an edge whose producer and consumer dtypes differ, so a run of half ops stays half with no casts inside. Weights
read only by half ops are stored in half, which is where the 2x comes from; explicit dtype conversions in the model
(``x.float()``, ``.to(torch.float32)``) are respected. Graph inputs and outputs stay float32, so the compressed
module is a drop-in replacement.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fxcompress.graph.edit import attr_owner, replace_tensor
from fxcompress.graph.sites import find_sites
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import Tolerance

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Op names (aten overload packet, torch function or method name) computed in float32.
FP32_OPS = frozenset(
    {
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "scaled_dot_product_attention",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit_no_training",
        "instance_norm",
        "rms_norm",
        "normalize",
        "mean",
        "sum",
        "var",
        "std",
        "var_mean",
        "norm",
        "linalg_vector_norm",
        "cumsum",
        "prod",
        "logsumexp",
        "exp",
        "log",
        "pow",
        "sqrt",
        "rsqrt",
        "cross_entropy",
        "nll_loss",
    }
)
FP32_MODULES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.MultiheadAttention,
)
HALF_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
CONVERSIONS = frozenset({"to", "_to_copy", "type", "float", "half", "double", "bfloat16", "type_as"})
# Ops returning several tensors in their input's dtype; any other op returning several (an LSTM, a GRU, a fused
# normalization) computes in float32, since its outputs cannot be cast one by one where it is called.
SPLITTING_OPS = frozenset({"split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split"})


@dataclass(frozen=True)
class HalfConfig(PassConfig):
    """Half-precision weights and compute (``dtype=fp16`` or ``bf16``), sensitive ops in float32."""

    name: ClassVar[str] = "fp16"
    tolerance: ClassVar[Tolerance] = Tolerance(0.9999, 0.9995, 40.0, 0.01, 0.001, 0.99, 0.5)
    dtype: str = "fp16"
    shares_tied_weights: ClassVar[bool] = True  # a tied tensor read only by half ops is stored once, in half
    handles_transposed_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.dtype not in HALF_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(HALF_DTYPES)}, got {self.dtype!r}")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))
    return ""


def _out_dtype(node: Any) -> Optional[torch.dtype]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return dtype if dtype is not None and dtype.is_floating_point else None


def _returns_several(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)  # (a NamedTuple itself)


def _float_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _out_dtype(a) is not None]


def _wants(
    gm: fx.GraphModule,
    node: fx.Node,
    fp32_sites: set[fx.Node],
    half_sites: set[fx.Node],
    half: torch.dtype,
    default: torch.dtype,
) -> Optional[torch.dtype]:
    """The dtype ``node`` should compute in; None for nodes left as they are (non-float, conversions, get_attr).
    ``default`` is what an op that is neither a site nor numerically sensitive gets: half, or float32 when the config
    names the layers to halve."""
    if node.op in ("placeholder", "output", "get_attr") or node.target is operator.getitem:
        return None
    if _returns_several(node):
        return None if _op_name(node) in SPLITTING_OPS else torch.float32
    if _out_dtype(node) is None:
        return None
    if node in fp32_sites:
        return torch.float32
    if node in half_sites:
        return half
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, FP32_MODULES):
            return torch.float32
        stateless = not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())
        if isinstance(mod, HALF_MODULES) or stateless:
            return default
        return torch.float32  # an unknown module with state: its internals may not support half
    if getattr(node.target, "namespace", None) == "fxcompress":  # a layer an earlier pass compressed:
        return torch.float32  # its kernels and ONNX lowerings take float32 activations
    name = _op_name(node)
    if name in CONVERSIONS:
        return None
    if name in FP32_OPS:
        return torch.float32
    return default


@register_pass(HalfConfig)
def mixed_precision(gm: fx.GraphModule, cfg: HalfConfig, ctx: PassContext) -> PassResult:
    """Cast weights and compute to half precision, keeping sensitive ops and excluded layers in float32.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="fp16:exclude=2")  # the logits layer stays fp32
        >>> [(r.layer, r.action, r.bytes_after) for r in cm.records]
        [('2', 'skipped', 2600), ('0', 'fp16', 8320)]
    """
    half = HALF_DTYPES[cfg.dtype]
    ShapeProp(gm).propagate(*ctx.example_inputs)
    sites, records = select_sites(gm, cfg, ("linear", "conv1d", "conv2d", "embedding"))
    site_nodes = {s.node for s in sites}
    fp32_sites = {s.node for s in find_sites(gm)[0]} - site_nodes  # excluded by include/exclude
    default = torch.float32 if cfg.include else half
    wants = {n: _wants(gm, n, fp32_sites, site_nodes, half, default) for n in gm.graph.nodes}
    _apply_dtypes(gm, wants, half)
    numerics = Numerics(str(half).removeprefix("torch."))
    counted: dict[object, str] = {}  # a tied weight is stored once: its bytes go to its first reader's record
    for site in sites:  # every reader of a selected weight computes in half, so the weight is now stored in half
        first = counted.setdefault(site.weight_key, site.name)
        before = site.weight_bytes if first == site.name else 0
        note = "" if first == site.name else f"shares the {cfg.dtype} weight of {first}"
        records.append(
            LayerRecord(site.name, site.kind, cfg.name, cfg.dtype, note, before, before // 2, numerics=numerics)
        )
    return PassResult(gm, bool(sites), records)


def _apply_dtypes(gm: fx.GraphModule, wants: dict[fx.Node, Optional[torch.dtype]], half: torch.dtype) -> None:
    """One walk in graph order: each node computes in the dtype it wants, with a cast inserted only on an edge whose
    producer's actual dtype differs (one cast per producer and dtype, shared by its readers); weights read only by
    half ops are stored in half."""
    actual: dict[fx.Node, Optional[torch.dtype]] = {}
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    halved: dict[int, Tensor] = {}

    def cast(src: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        if (src, dtype) not in casts:
            with gm.graph.inserting_before(before):
                casts[(src, dtype)] = gm.graph.call_function(torch.ops.aten._to_copy.default, (src,), {"dtype": dtype})
        return casts[(src, dtype)]

    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and _out_dtype(node) is not None:
            actual[node] = _store_half_if_only_half_reads(gm, node, wants, half)
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)  # torch.export's check of a dtype this pass is changing
            continue
        want = torch.float32 if node.op == "output" else wants.get(node)
        srcs = _float_inputs(node)
        if want is not None:
            for src in srcs:
                if actual.get(src, _out_dtype(src)) != want:
                    node.replace_input_with(src, cast(src, want, node))
            if node.op == "call_module" and want == half:
                _halve(gm.get_submodule(str(node.target)), half, halved)
        # A node with float inputs now computes in `want`; one without (full, arange) or a conversion keeps its own.
        owns_weights = node.op == "call_module" and any(True for _ in gm.get_submodule(str(node.target)).parameters())
        if _returns_several(node):  # the dtype of its float outputs, which getitem nodes read
            actual[node] = want or (actual.get(srcs[0], _out_dtype(srcs[0])) if srcs else None)
        elif node.target is operator.getitem and _returns_several(node.args[0]):
            actual[node] = actual.get(node.args[0]) if _out_dtype(node) is not None else None
        else:
            actual[node] = want if want is not None and (srcs or owns_weights) else _passthrough(node, srcs, actual)


_METHOD_DTYPES = {"float": torch.float32, "half": torch.float16, "double": torch.float64, "bfloat16": torch.bfloat16}


def _passthrough(node: fx.Node, srcs: list[fx.Node], actual: dict) -> Optional[torch.dtype]:
    """Output dtype of a node the pass leaves alone: non-float outputs and explicit conversions keep their declared
    dtype; a conversion without a dtype (``.to(device)``) keeps its input's."""
    declared = _out_dtype(node)
    if declared is None or not srcs:
        return declared
    name = _op_name(node)
    explicit = _METHOD_DTYPES.get(name) if node.op == "call_method" else None
    explicit = explicit or node.kwargs.get("dtype") or next((a for a in node.args if isinstance(a, torch.dtype)), None)
    if explicit is not None or name == "type_as":
        return declared
    return actual.get(srcs[0], declared)


def _halve(module: nn.Module, half: torch.dtype, halved: dict[int, Tensor]) -> None:
    """``module.to(half)`` by replacing its tensors: ``Module.to`` rewrites each Parameter's data in place, and the
    captured graph shares its tensors with the user's model. ``halved`` maps each float tensor already replaced (by
    id) to its half replacement, so a weight tied between two modules stays one tensor."""
    for owner in module.modules():
        for slots in (owner._parameters, owner._buffers):
            for attr, t in list(slots.items()):
                if t is None or not t.is_floating_point() or t.dtype == half:
                    continue
                if id(t) in halved:
                    slots[attr] = halved[id(t)]
                else:
                    replace_tensor(owner, attr, t.detach().to(half))
                    halved[id(t)] = slots[attr]


def _store_half_if_only_half_reads(gm: fx.GraphModule, node: fx.Node, wants: dict, half: torch.dtype) -> torch.dtype:
    readers = [wants.get(u) for u in node.users]
    if not readers or any(r != half for r in readers):
        return _out_dtype(node)
    owner, attr = attr_owner(gm, str(node.target))
    replace_tensor(owner, attr, getattr(owner, attr).detach().to(half))
    return half
