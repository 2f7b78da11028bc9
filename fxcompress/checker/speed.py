"""Why an artifact runs slower than its fp32 export: the parity report flags it, with the reasons its graph shows.

Compressing to deploy, a user must not find out in production that the smaller model is slower. The reasons are
patterns measured on ONNX Runtime's CPU execution provider (docs/targets.md, benchmarks/experiments).
"""

from __future__ import annotations

from typing import Optional

import onnx

# slower than this many times the fp32 export's p50 latency: flagged
SLOWER = 1.1


def _consumers(proto: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def slow_reasons(proto: onnx.ModelProto, provider: Optional[str], vnni: Optional[bool], fp32_ms: float) -> list[str]:
    """The patterns of ``proto`` known to run slowly on ``provider``.

    Example:
        >>> slow_reasons(onnx.load("model.onnx"), "CPUExecutionProvider", vnni=False, fp32_ms=0.05)[-1][:40]
        'the fp32 model runs in 0.05 ms: quantizi'
    """
    users, reasons = _consumers(proto), []
    inits = {t.name for t in proto.graph.initializer}
    per_call = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and any(u.op_type in ("Conv", "MatMul", "Gemm") for u in users.get(n.output[0], []))
    ]
    on_cpu = provider == "CPUExecutionProvider"
    if per_call and on_cpu:
        reasons.append(
            f"{len(per_call)} int8 weight(s) are dequantized on every call (DequantizeLinear + Conv/MatMul: "
            "the 'cuda' target's form, meant for GPU execution providers); export for a CPU target"
        )
    weight_only = [
        n
        for n in proto.graph.node
        if n.op_type == "MatMulNBits" and next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) == 1
    ]
    if weight_only and on_cpu:
        reasons.append(
            f"{len(weight_only)} MatMulNBits run with fp32 activations (accuracy_level 1, the "
            "'cpu-weightonly' target), slow on CPU: it exists to check accuracy; deploy 'cpu' or 'cpu-vnni'"
        )
    static_u8 = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and any(t.name == n.input[0] and t.data_type == onnx.TensorProto.UINT8 for t in proto.graph.initializer)
        and any(u.op_type == "Conv" for u in users.get(n.output[0], []))
    ]
    if static_u8 and on_cpu and vnni:
        reasons.append(
            "static int8 convolution weights are stored uint8 (U8U8, the 'cpu' target, safe without VNNI); "
            "on this VNNI CPU export 'cpu-vnni' (signed weights, U8S8: measured 2x faster on ResNet-18)"
        )
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    if halves and on_cpu:
        reasons.append(
            "fp16 weights on ONNX Runtime's CPU EP run through casts (it has few fp16 kernels on x86): fp16 "
            "is for GPUs; on CPU use int8"
        )
    if fp32_ms < 1.0:
        reasons.append(
            f"the fp32 model runs in {fp32_ms:.2g} ms: quantizing and dequantizing activations costs more "
            "than the smaller weights save at this size"
        )
    return reasons or ["no known slow pattern in its graph: compare targets with `fxcompress bench`"]


def speed_note(
    p50_ms: Optional[float],
    fp32_ms: Optional[float],
    proto: onnx.ModelProto,
    provider: Optional[str],
    vnni: Optional[bool],
) -> Optional[str]:
    """The report's note when the artifact is slower than its fp32 export, else None.

    Example:
        >>> speed_note(2.0, 1.0, onnx.load("model.onnx"), "CPUExecutionProvider", vnni=False)[:60]
        'slower than its fp32 export: p50 2 ms vs 1 ms (2.00x); no kn'
    """
    if not p50_ms or not fp32_ms or p50_ms <= SLOWER * fp32_ms:
        return None
    reasons = slow_reasons(proto, provider, vnni, fp32_ms)
    return (
        f"slower than its fp32 export: p50 {p50_ms:.3g} ms vs {fp32_ms:.3g} ms ({p50_ms / fp32_ms:.2f}x); "
        + "; ".join(reasons)
    )
