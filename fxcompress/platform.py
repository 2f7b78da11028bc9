"""What machine this is, as far as choosing an export target goes: the CPU's int8 instruction set and whether the
installed ONNX Runtime can run the CUDA execution provider. No torch is imported here."""

from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset[str]]:
    """The CPU's instruction-set flags from /proc/cpuinfo; None where it cannot tell (not Linux x86).

    Example:
        >>> cpu_flags() is None or "fpu" in cpu_flags()  # every x86 CPU lists its floating-point unit
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_has_vnni() -> Optional[bool]:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI): ORT's U8S8 int8 GEMM, which the ``cpu-vnni`` target
    uses, saturates its int16 sums without it. None where the flags cannot be read.

    Example:
        >>> cpu_has_vnni() in (True, False, None)
        True
    """
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & flags)


def cuda_provider_listed() -> bool:
    """Whether the installed onnxruntime offers the CUDA execution provider (onnxruntime-gpu); False without
    onnxruntime. (Offered is not the same as usable: :func:`fxcompress.checker.runtime.probe` says when it could not
    start.)

    Example:
        >>> cuda_provider_listed() in (True, False)
        True
    """
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
