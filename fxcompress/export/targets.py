"""Export targets: how compressed ops are lowered for the kernels of the runtime an artifact will run on.

Passes produce target-neutral ops (symmetric int8 per output channel, int4 per block). A :class:`Target` says, in one
place, how each becomes ONNX for one runtime: the weight encoding the lowering writes
(:mod:`fxcompress.export.lowering`), which translation of each compressed op the exporter uses
(:mod:`fxcompress.ops.registry`), the parity floor its run-time activation quantization needs, and what it is for.
The CLI's choices, ``fxcompress list``, the parity notes and the README's table all read :data:`TARGETS`.

This module imports no torch: ``fxcompress --help`` lists the targets without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from fxcompress.errors import ExportError
from fxcompress.platform import cpu_has_vnni, cuda_provider_listed
from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.tolerance import PER_BLOCK_ACTIVATIONS, PER_TENSOR_ACTIVATIONS, Tolerance


@dataclass(frozen=True)
class Target:
    """One export target.

    Attributes:
        name: what users write (``--target cpu``).
        summary: one line for ``--help`` and ``fxcompress list``.
        linear: what an int8 Linear becomes in the file (the README's table).
        numerics: what ONNX Runtime computes for it.
        use: what it is for, with the measurement behind it.
        int8_linear: how the lowering encodes ``linear_q8`` weights: ``"uint8"`` (zero point 128, exactly q + 128),
            ``"int8"`` (signed, no zero point), ``"nbits"`` (``linear_nbits`` with 8 bits, the per-channel scale
            repeated per block of K: exact) or ``"keep"`` (as the passes made it).
        nbits_fallback: with ``"nbits"``, the encoding of layers whose K is not a multiple of 16.
        static_uint8: re-encode static-int8 weights as uint8, so ORT's QLinearConv / QLinearMatMul run U8U8.
        variants: (compressed op, translation variant) pairs: how the exporter writes those ops (others: their
            default translation).
        floor: the parity floor its run-time activation quantization needs (None: weight-only numerics).
        provider: the execution provider it is meant for.
        requires_vnni: its int8 kernels can saturate on a CPU without VNNI (the parity report notes it there).
        on_vnni_use: the target that runs faster on a CPU with VNNI (the parity report suggests it there).
        fuse_attention: write a captured encoder's attention as one ``MultiHeadAttention`` node
            (:mod:`fxcompress.export.attention`).
    """

    name: str
    summary: str
    linear: str
    numerics: str
    use: str
    int8_linear: str
    nbits_fallback: str = "uint8"
    static_uint8: bool = True
    variants: tuple[tuple[str, str], ...] = ()
    floor: Optional[Tolerance] = None
    provider: str = "cpu"
    requires_vnni: bool = False
    on_vnni_use: Optional[str] = None
    fuse_attention: bool = True

    def variant(self, op: str) -> Optional[str]:
        """The translation variant this target uses for compressed op ``op`` (None: the op's default).

        Example:
            >>> get_target("cpu").variant("linear_q8")
            'dynamic'
        """
        return dict(self.variants).get(op)

    def tolerance(self, recipe_tolerance: Tolerance, records: Sequence[LayerRecord]) -> Tolerance:
        """The parity floor of an artifact: the recipe's, loosened by this target's run-time activation quantization
        when any layer holds integer weights.

        Example:
            >>> from fxcompress.recipe.records import Numerics
            >>> rec = LayerRecord("fc", "linear", "int8", "int8", numerics=Numerics("int8"))
            >>> get_target("cpu").tolerance(Tolerance(cosine_min=0.999), [rec]).cosine_min
            0.99
        """
        quantized = any(r.numerics is not None and r.numerics.integer_weights for r in records)
        return recipe_tolerance.loosest(self.floor) if quantized and self.floor is not None else recipe_tolerance


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu",
            "DynamicQuantizeMatMul with uint8 weights: integer GEMMs that never saturate, on every x86 CPU",
            "`com.microsoft.DynamicQuantizeMatMul`, uint8 weights, zero point 128",
            "weights int8 + activations quantized per tensor at run time",
            "fastest at batch 1 and 32 on AVX2 CPUs without VNNI",
            int8_linear="uint8",
            variants=(("linear_q8", "dynamic"), ("conv_q8", "dequantize_once")),
            floor=PER_TENSOR_ACTIVATIONS,
            on_vnni_use="cpu-vnni",
        ),
        Target(
            "cpu-vnni",
            "DynamicQuantizeMatMul with int8 weights (U8S8): ~2x faster GEMMs on CPUs with VNNI, saturates without",
            "`com.microsoft.DynamicQuantizeMatMul`, int8 weights (U8S8)",
            "as `cpu`",
            "on CPUs with VNNI the int8 GEMM runs 2x faster than `cpu`'s (MiniLM batch 32: 0.47x vs 0.68x fp32); "
            "without VNNI U8S8 saturates (the parity report notes it)",
            int8_linear="int8",
            static_uint8=False,  # QLinearConv / QLinearMatMul on signed weights: U8S8, 2x faster with VNNI
            variants=(("linear_q8", "dynamic"), ("conv_q8", "dequantize_once")),
            floor=PER_TENSOR_ACTIVATIONS,
            requires_vnni=True,
        ),
        Target(
            "cpu-nbits",
            "MatMulNBits 8-bit, activations quantized per block: more accurate, fast at batch 1, slow at large batches",
            "`com.microsoft.MatMulNBits` bits=8, accuracy_level=4 (per-channel scale repeated per block of K: exact)",
            "activations quantized per block of K: more accurate on outliers",
            "fast at batch 1, slower than fp32 at batch 32 on AVX2",
            int8_linear="nbits",
            nbits_fallback="uint8",
            variants=(
                ("linear_q8", "dynamic"),
                ("linear_nbits", "per_block_activations"),
                ("conv_q8", "dequantize_once"),
            ),
            floor=PER_BLOCK_ACTIVATIONS,
        ),
        Target(
            "cpu-weightonly",
            "MatMulNBits with fp32 activations: ORT computes what the torch module does; slow on CPU, for checking "
            "accuracy",
            "`com.microsoft.MatMulNBits` bits=8 (int4 layers too) with accuracy_level=1; layers with K not a multiple "
            "of 16 keep `DequantizeLinear + MatMul`",
            "weight-only: fp32 activations, the torch module's numerics",
            "slow: 2.1x fp32 at batch 1 on MiniLM, 30x on the 84M MLP's 4096-wide layers; for checking accuracy",
            int8_linear="nbits",
            nbits_fallback="keep",
            variants=(("linear_q8", "qdq"), ("linear_nbits", "weight_only"), ("conv_q8", "dequantize_once")),
        ),
        Target(
            "cuda",
            "DequantizeLinear + MatMul (standard ONNX): weight-only numerics for GPU execution providers",
            "`DequantizeLinear + MatMul` (standard ONNX)",
            "weight-only where it runs as written; ORT's CPU EP fuses the pair into MatMulNBits at accuracy_level 4",
            "slower than fp32 on CPU (2-9x); meant for GPU EPs",
            int8_linear="keep",
            static_uint8=False,
            variants=(("linear_q8", "qdq"),),
            provider="cuda",
            fuse_attention=False,  # MultiHeadAttention's CUDA kernel is not yet checked on a GPU here
        ),
    )
}


def target_names() -> list[str]:
    """The names users can write, in the registry's order.

    Example:
        >>> target_names()
        ['cpu', 'cpu-vnni', 'cpu-nbits', 'cpu-weightonly', 'cuda']
    """
    return list(TARGETS)


AUTO = "auto"


def auto_target() -> tuple[Target, str]:
    """The target ``auto`` picks for this machine, and why: ``cuda`` where onnxruntime-gpu offers the CUDA execution
    provider, else ``cpu-vnni`` on a CPU with VNNI (its int8 kernels run 2x faster there), else ``cpu`` (uint8
    weights, safe on every x86 CPU). It assumes the artifact runs on the machine that exports it; name a target when
    it will not.

    Example:
        >>> auto_target()[0].name in ("cpu", "cpu-vnni", "cuda")
        True
    """
    if cuda_provider_listed():
        return TARGETS["cuda"], "auto: the installed onnxruntime offers the CUDA execution provider"
    if cpu_has_vnni():
        return TARGETS["cpu-vnni"], "auto: this CPU has VNNI, where signed int8 weights (U8S8) run fastest"
    return TARGETS["cpu"], "auto: no VNNI found on this CPU, so uint8 weights (U8U8), which never saturate"


def get_target(target: Union[str, Target]) -> Target:
    """The :class:`Target` named ``target`` (a Target passes through; ``"auto"`` picks one for this machine, see
    :func:`auto_target`); ExportError listing the names otherwise.

    Example:
        >>> get_target("cpu-vnni").int8_linear
        'int8'
    """
    if isinstance(target, Target):
        return target
    if target == AUTO:
        return auto_target()[0]
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {AUTO}, {', '.join(TARGETS)}")
    return TARGETS[target]


def markdown_table() -> str:
    """The README's targets table, generated from the registry (a test holds the README to it).

    Example:
        >>> markdown_table().splitlines()[0]
        '| target | Linear becomes | numerics | measured on ORT CPU |'
    """
    rows = ["| target | Linear becomes | numerics | measured on ORT CPU |", "| --- | --- | --- | --- |"]
    rows.append(
        f"| `{AUTO}` (default) | `cuda` where onnxruntime-gpu offers the CUDA provider, else `cpu-vnni` on a CPU with "
        "VNNI, else `cpu` | the chosen target's; the choice and why are stored in the artifact's metadata | "
        "assumes the artifact runs on the machine that exports it: name a target when it will not |"
    )
    rows += [f"| `{t.name}` | {t.linear} | {t.numerics} | {t.use} |" for t in TARGETS.values()]
    return "\n".join(rows)
