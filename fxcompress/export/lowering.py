"""Per-target lowering: re-encode compressed sites for the kernels the chosen ONNX Runtime target runs fastest.

Passes produce target-neutral ops (symmetric int8 per output channel). Before export, :func:`lower_for_target`
rewrites a *copy* of the graph as the :class:`~fxcompress.export.targets.Target` says:

* ``int8_linear="uint8"``: Linear weights become uint8 with zero point 128 (exactly q + 128) for
  ``DynamicQuantizeMatMul``'s U8U8 kernel, which does not saturate on AVX2 CPUs without VNNI.
* ``"int8"``: Linear weights stay signed int8 (no zero point) for the U8S8 kernel, the fast one on CPUs with VNNI.
* ``"nbits"``: Linear becomes ``linear_nbits`` (MatMulNBits, 8 bits, the per-channel scale repeated per block of K:
  an exact re-encoding); layers with K not a multiple of 16 take the target's ``nbits_fallback``.
* ``"keep"``: unchanged (``DequantizeLinear + MatMul``).
* ``fuse_attention``: an encoder's attention becomes one ``MultiHeadAttention`` (:mod:`fxcompress.export.attention`).
* ``static_uint8``: static int8 (``conv_qdq`` / ``linear_qdq``) weights become uint8 with zero point 128 too, so
  ORT's QLinearConv / QLinearMatMul run U8U8.

Ops are read and edited by their schema's argument names (:func:`fxcompress.ops.registry.op_args`), never by position.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

import fxcompress.ops.linear_q8  # noqa: F401  (registers the ops the lowering writes)
import fxcompress.ops.nbits  # noqa: F401
from fxcompress.export.attention import fuse_attention
from fxcompress.export.targets import Target
from fxcompress.graph.edit import add_constant, replace_node, shared_copy
from fxcompress.ops.registry import op_args, op_name, set_op_args

NBITS_BLOCK_SIZES = (128, 64, 32, 16)
_STATIC_WEIGHT_AXIS = {"conv_qdq": 0, "linear_qdq": 1}  # the output-channel axis of the stored weight


def lower_for_target(gm: fx.GraphModule, target: Target) -> fx.GraphModule:
    """A copy of ``gm`` with compressed sites encoded for ``target``.

    Example:
        >>> cm = fxcompress.optimize(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 16), recipe="int8")
        >>> from fxcompress.export.targets import get_target
        >>> lowered = lower_for_target(cm.module, get_target("cpu"))
        >>> [str(t.dtype) for n, t in lowered.named_buffers() if n.endswith("qweight")]
        ['torch.uint8']
    """
    gm = shared_copy(gm)  # the lowering replaces tensors, never edits one in place: no need to copy the weights
    uint8_cache: dict[str, fx.Node] = {}  # tied weights: each shared buffer converted once
    for node in list(gm.graph.nodes):
        name = op_name(node)
        if name in _STATIC_WEIGHT_AXIS and target.static_uint8:
            args = op_args(node)
            if args["w_zero_point"] is None:
                zero_point = _to_uint8(gm, args["qweight"], _STATIC_WEIGHT_AXIS[name], uint8_cache)
                set_op_args(node, w_zero_point=zero_point)
        elif name == "linear_q8" and op_args(node)["zero_point"] is None:
            _lower_linear(gm, node, target, uint8_cache)
    if target.fuse_attention:
        fuse_attention(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _lower_linear(gm: fx.GraphModule, node: fx.Node, target: Target, uint8_cache: dict[str, fx.Node]) -> None:
    encoding = target.int8_linear
    args = op_args(node)
    if encoding in ("uint8", "nbits") and args["qweight"].op != "get_attr":
        # a head reading its tied embedding's codes through a transpose: these encodings re-encode the codes (the
        # embedding's Gather reads them signed), so the head gets its own copy here
        q = _codes_of(gm, args["qweight"])
        set_op_args(node, qweight=add_constant(gm, f"{args['qweight'].name}_codes", q, node))
        args = op_args(node)
    if encoding == "nbits":
        q = _stored(gm, args["qweight"])
        block = _block_size(q.shape[0])
        if block is not None:
            _to_nbits(gm, node, q, _stored(gm, args["scale"]), block)
            return
        encoding = target.nbits_fallback
    if encoding == "uint8":
        set_op_args(node, zero_point=_to_uint8(gm, args["qweight"], 1, uint8_cache))


def _codes_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The value of a constant expression over buffers (a transpose of stored codes)."""
    if node.op == "get_attr":
        return _stored(gm, node)
    args = [_codes_of(gm, a) if isinstance(a, fx.Node) else a for a in node.args]
    return node.target(*args).contiguous()


def _stored(gm: fx.GraphModule, attr: fx.Node) -> torch.Tensor:
    return getattr(gm, str(attr.target))


def _block_size(k: int) -> Optional[int]:
    return next((b for b in NBITS_BLOCK_SIZES if k % b == 0), None)


def _offset_binary(q: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes as uint8 with zero point 128: exactly q + 128 (the grid never uses -128)."""
    return (q.to(torch.int16) + 128).to(torch.uint8)


def _to_uint8(gm: fx.GraphModule, qnode: fx.Node, axis: int, cache: dict[str, fx.Node]) -> fx.Node:
    """Re-encode the int8 weight read by ``qnode`` as uint8; return the get_attr node of its zero point (128)."""
    name = str(qnode.target)
    if name not in cache:
        q = _stored(gm, qnode)
        setattr(gm, name, _offset_binary(q))
        gm.register_buffer(f"{name}_zero_point", torch.full((q.shape[axis],), 128, dtype=torch.uint8))
        with gm.graph.inserting_after(qnode):
            cache[name] = gm.graph.get_attr(f"{name}_zero_point")
    return cache[name]


def _to_nbits(gm: fx.GraphModule, node: fx.Node, q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    k, n = q.shape
    args = op_args(node)
    packed = _offset_binary(q.t()).reshape(n, k // block, block)
    scales = scale.reshape(n, 1).expand(n, k // block).reshape(-1).contiguous()
    base = str(args["qweight"].target)
    packed_node = add_constant(gm, f"{base}_nbits", packed, node)
    scales_node = add_constant(gm, f"{base}_nbits_scales", scales, node)
    new_args = (args["x"], packed_node, scales_node, None, args["bias"], k, n, 8, block)
    replace_node(gm, node, torch.ops.fxcompress.linear_nbits.default, new_args)
