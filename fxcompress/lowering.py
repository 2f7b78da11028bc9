"""Per-target lowering: re-encode compressed sites for the kernels the chosen ONNX Runtime target runs fastest.

Passes produce target-neutral ops (symmetric int8 per output channel). Before export, :func:`lower_for_target`
rewrites a *copy* of the graph:

* ``cpu``: Linear weights become uint8 with zero point 128 (exactly q + 128) for ``DynamicQuantizeMatMul``.
* ``cpu-vnni``: Linear weights stay signed int8 (no zero point) for ``DynamicQuantizeMatMul``'s U8S8 kernel, the
  fast one on CPUs with VNNI.
* ``cpu-nbits``: Linear becomes ``linear_nbits`` (MatMulNBits, 8 bits, the per-channel scale repeated per block
  of K: an exact re-encoding); layers with K not a multiple of 16 fall back to the ``cpu`` form.
* ``cpu-weightonly``: as ``cpu-nbits``, exported at accuracy_level 1 (fp32 activations); layers with K not a
  multiple of 16 keep the ``cuda`` form, which ORT's CPU EP may still fuse into MatMulNBits at accuracy_level 4
  (the parity report counts such fusions).
* ``cuda``: unchanged (``DequantizeLinear + MatMul``).
* static int8 (``conv_qdq`` / ``linear_qdq``) on every CPU target: weights become uint8 with zero point 128 too,
  so ORT's QLinearConv / QLinearMatMul run U8U8 (U8S8 saturates on AVX2 without VNNI).

Run-time activation quantization (the ``cpu`` and ``cpu-nbits`` lowerings) adds error beyond the weights', which is why each
target carries its own parity floor, combined with the recipe's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from fxcompress.errors import ExportError
from fxcompress.graph_edit import add_constant, replace_node
from fxcompress.ops import TARGETS
from fxcompress.pipeline import Tolerance

# Activation quantization per tensor (cpu) or per block (cpu-nbits) at run time: measured cosine on MiniLM
# 0.993 (cpu) against 0.9995 for weight-only int8.
_PER_TENSOR = Tolerance(cosine_min=0.99, top1_agreement_min=0.97, accuracy_drop_max_pp=1.0)  # DynamicQuantizeMatMul


@dataclass(frozen=True)
class Lowering:
    """How one export target encodes an int8 Linear (``linear_q8``) and what it costs in accuracy.

    ``nbits``: as MatMulNBits (8 bits) where K is a multiple of 16; ``signed``: the codes stay int8 without a zero
    point (otherwise uint8, zero point 128) where MatMulNBits is not used; ``tolerance``: the parity floor its
    run-time activation quantization needs (None: weight-only numerics); ``rewrite``: False leaves the graph as the
    passes made it (DequantizeLinear + MatMul).
    """

    nbits: bool = False
    signed: bool = False
    tolerance: Optional[Tolerance] = None
    rewrite: bool = True


LOWERINGS = {
    "cpu": Lowering(tolerance=_PER_TENSOR),
    "cpu-vnni": Lowering(signed=True, tolerance=_PER_TENSOR),
    "cpu-nbits": Lowering(nbits=True, tolerance=Tolerance(cosine_min=0.995, top1_agreement_min=0.98, accuracy_drop_max_pp=1.0)),
    "cpu-weightonly": Lowering(nbits=True, signed=True),
    "cuda": Lowering(rewrite=False),
}
NBITS_BLOCK_SIZES = (128, 64, 32, 16)
_STATIC_OPS = {torch.ops.fxcompress.conv_qdq.default: 0, torch.ops.fxcompress.linear_qdq.default: 1}  # op -> channel axis


def tolerance_for(recipe_tolerance: Tolerance, target: str, quantized: bool) -> Tolerance:
    """The parity floor of an artifact: the recipe's, loosened by the target's run-time quantization if any.

    Example:
        >>> tolerance_for(Tolerance(cosine_min=0.999), "cpu", quantized=True).cosine_min
        0.99
    """
    extra = LOWERINGS[target].tolerance if target in LOWERINGS else None
    return recipe_tolerance.loosest(extra) if quantized and extra is not None else recipe_tolerance


def _block_size(k: int) -> Optional[int]:
    return next((b for b in NBITS_BLOCK_SIZES if k % b == 0), None)


def _offset_binary(q: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes as uint8 with zero point 128: exactly q + 128 (the grid never uses -128)."""
    return (q.to(torch.int16) + 128).to(torch.uint8)


def lower_for_target(gm: fx.GraphModule, target: str) -> fx.GraphModule:
    """A copy of ``gm`` with compressed sites encoded for ``target`` (one of ``ops.TARGETS``).

    Example:
        >>> lowered = lower_for_target(cm.module, "cpu")
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {TARGETS}")
    lowering = LOWERINGS[target]
    gm = copy.deepcopy(gm)
    if not lowering.rewrite:
        return gm
    uint8_cache: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.target in _STATIC_OPS and node.args[5] is None:
            qnode = node.args[3]
            _to_uint8(gm, node, qnode, getattr(gm, str(qnode.target)), uint8_cache, zero_point_at=5, axis=_STATIC_OPS[node.target])
            continue
        if node.target is not torch.ops.fxcompress.linear_q8.default or node.args[3] is not None:
            continue
        qnode, snode = node.args[1], node.args[2]
        q = getattr(gm, str(qnode.target))
        block = _block_size(q.shape[0]) if lowering.nbits else None
        if block is not None:
            _to_nbits(gm, node, q, getattr(gm, str(snode.target)), block)
        elif not lowering.signed:
            _to_uint8(gm, node, qnode, q, uint8_cache)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _to_uint8(gm: fx.GraphModule, node: fx.Node, qnode: fx.Node, q: torch.Tensor, cache: dict[str, fx.Node],
              zero_point_at: int = 3, axis: int = 1) -> None:
    """Re-encode the int8 weight read by ``qnode`` as uint8 and pass its zero point (128) at ``zero_point_at``."""
    name = str(qnode.target)
    if name not in cache:  # tied weights: convert the shared buffer once
        setattr(gm, name, _offset_binary(q))
        gm.register_buffer(f"{name}_zero_point", torch.full((q.shape[axis],), 128, dtype=torch.uint8))
        with gm.graph.inserting_after(qnode):
            cache[name] = gm.graph.get_attr(f"{name}_zero_point")
    args = list(node.args)
    args[zero_point_at] = cache[name]
    node.args = tuple(args)


def _to_nbits(gm: fx.GraphModule, node: fx.Node, q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    k, n = q.shape
    packed = _offset_binary(q.t()).reshape(n, k // block, block)
    scales = scale.reshape(n, 1).expand(n, k // block).reshape(-1).contiguous()
    base = str(node.args[1].target)
    packed_node = add_constant(gm, f"{base}_nbits", packed, node)
    scales_node = add_constant(gm, f"{base}_nbits_scales", scales, node)
    args = (node.args[0], packed_node, scales_node, None, node.args[4], k, n, 8, block)
    replace_node(gm, node, torch.ops.fxcompress.linear_nbits.default, args)
