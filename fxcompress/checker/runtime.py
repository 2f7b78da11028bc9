"""ONNX Runtime access: imported lazily, provider chosen explicitly, measurements taken in a clean subprocess.

``onnxruntime`` and ``onnxruntime-gpu`` install the same module, so fxcompress depends on neither; install the
``[cpu]`` or ``[gpu]`` extra. Memory is measured in a fresh process because a session's RSS growth is only
meaningful against a baseline that holds no torch and no other session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from fxcompress.errors import RuntimeMissingError
from fxcompress.platform import cpu_flags, cpu_has_vnni  # noqa: F401  (re-exported: checks note the CPU)

if TYPE_CHECKING:
    import onnx

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def import_ort():
    """Import onnxruntime or explain how to get it.

    Example:
        >>> ort = import_ort()
        >>> "CPUExecutionProvider" in ort.get_available_providers()
        True
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError(
            "onnxruntime is not installed. Install exactly one of: pip install 'fxcompress[cpu]' "
            "(onnxruntime) or pip install 'fxcompress[gpu]' (onnxruntime-gpu)."
        ) from exc
    return onnxruntime


def choose_providers(provider: str = "auto") -> list[str]:
    """Provider list for a session. ``auto`` takes CUDA when this onnxruntime build offers it, else CPU (and when the
    CUDA EP is offered but cannot start, :func:`probe` runs on the CPU and says so in its ``note``); ``cuda`` must run
    on CUDA: an error on a CPU build, and a failed probe when the GPU build cannot start it.

    Example:
        >>> choose_providers("cpu")
        ['CPUExecutionProvider']
    """
    available = import_ort().get_available_providers()
    if provider == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    name = {"cpu": CPU, "cuda": CUDA}.get(provider, provider)
    if name not in available:
        raise RuntimeMissingError(
            f"execution provider {name} is not available in this onnxruntime; available: {available}"
        )
    return [name] if name == CPU else [name, CPU]


@dataclass
class ProbeResult:
    """What one fresh-process session measured."""

    provider: str
    outputs: list[list[np.ndarray]] = field(repr=False)
    rss_base_mb: float
    rss_load_mb: float  # growth from creating the session
    rss_run_mb: float  # growth after running every input (arena included)
    rss_peak_mb: float  # high-water mark over load and runs (transient copies made while loading included)
    latency_ms_p50: Optional[float]
    latency_ms_p90: Optional[float]
    gpu_mem_mb: Optional[float] = None
    load_error: Optional[str] = None
    note: Optional[str] = None  # e.g. the CUDA EP could not start and ``auto`` fell back to the CPU

    @classmethod
    def failed(cls, provider: str, error: str) -> "ProbeResult":
        """The result of a model ONNX Runtime could not load or run: nothing measured, the reason kept."""
        return cls(provider, [], 0, 0, 0, 0, None, None, load_error=error)


def probe(
    model_path: str | os.PathLike,
    inputs: Sequence[tuple[np.ndarray, ...]],
    *,
    provider: str = "auto",
    warmup: int = 3,
    repeat: int = 20,
    timeout: float = 900,
    threads: int = 0,
) -> ProbeResult:
    """Load ``model_path`` in a fresh Python process, run ``inputs`` and time the first of them.

    A model that ONNX Runtime cannot load or run comes back with ``load_error`` set, never as an exception,
    so the parity checker can report it as a failure.

    Example:
        >>> r = probe("model.onnx", [(np.zeros((1, 16), np.float32),)])
        >>> r.provider
        'CPUExecutionProvider'
    """
    providers = choose_providers(provider)
    with tempfile.TemporaryDirectory(prefix="fxc-probe-") as tmp:
        arrays = {f"b{i}_{j}": a for i, batch in enumerate(inputs) for j, a in enumerate(batch)}
        np.savez(Path(tmp, "in.npz"), **arrays)
        spec = dict(
            model=str(model_path),
            inputs=str(Path(tmp, "in.npz")),
            n=len(inputs),
            outputs=str(Path(tmp, "out.npz")),
            providers=providers,
            warmup=warmup,
            repeat=repeat,
            threads=threads,
            strict=provider == "cuda",
        )
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "fxcompress.checker.probe_main", str(Path(tmp, "spec.json"))],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return ProbeResult.failed(providers[0], "; ".join(tail) or f"exit {proc.returncode}")
        res = json.loads(lines[-1])
        if res.get("error"):
            return ProbeResult.failed(res.get("provider", providers[0]), res["error"])
        with np.load(Path(tmp, "out.npz")) as z:
            outputs = [[z[f"b{i}_{k}"] for k in range(res["n_outputs"])] for i in range(len(inputs))]
    return ProbeResult(
        res["provider"],
        outputs,
        res["rss_base_mb"],
        res["rss_load_mb"],
        res["rss_run_mb"],
        res["rss_peak_mb"],
        res["p50_ms"],
        res["p90_ms"],
        res.get("gpu_mem_mb"),
        note=res.get("note"),
    )


def optimized_graph(model_path: str | os.PathLike, provider: str = "auto") -> onnx.ModelProto:
    """The graph ORT actually runs (after its extended graph optimizations), as an ``onnx.ModelProto``. Fold-back is
    caught on it: if ORT constant-folded ``DequantizeLinear(int8)`` into fp32, it has fp32 where the file had int8.

    Example:
        >>> "DynamicQuantizeMatMul" in {n.op_type for n in optimized_graph("model.onnx").graph.node}
        True
    """
    import onnx

    providers = choose_providers(provider)
    with tempfile.TemporaryDirectory(prefix="fxc-opt-") as tmp:
        # in a fresh process, like every session: a large model's weights never load into the caller's memory, and
        # the optimized model keeps them in external data (only the graph and tensor shapes are read back)
        spec = dict(
            mode="optimized_graph", model=str(model_path), out=str(Path(tmp, "optimized.onnx")), providers=providers
        )
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "fxcompress.checker.probe_main", str(Path(tmp, "spec.json"))],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not Path(spec["out"]).exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise RuntimeError(f"ONNX Runtime could not save its optimized graph: {tail[0]}")
        return onnx.load(spec["out"], load_external_data=False)
