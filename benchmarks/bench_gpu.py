"""fp32 vs fp16 vs int8 vs int4 on ONNX Runtime's CUDA EP: parity, GPU memory, latency (issue 3's GPU rows).

Run on a machine with an NVIDIA GPU and onnxruntime-gpu (not onnxruntime) installed:
    python benchmarks/bench_gpu.py          (writes benchmarks/results/gpu.md and .json)
It refuses to run, and writes nothing, when the CUDA execution provider is not available: CPU numbers must never be
reported as GPU ones. Exports use the ``cuda`` target (standard DequantizeLinear + MatMul for int8; MatMulNBits and
GatherBlockQuantized for int4, which ORT's CUDA EP implements).
"""

from __future__ import annotations

import subprocess
import sys

import onnxruntime
from common import environment, write_tables

from fxcompress.bench import run_benchmark
from fxcompress.models import zoo

RECIPES = ("fp16", "int8", "int4:block=32,algo=gptq,kinds=linear+embedding")
BATCHES = {"minilm": (1, 16), "big_mlp": (1, 32)}


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU"


def main() -> None:
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        sys.exit(
            f"CUDAExecutionProvider is not available (providers: {onnxruntime.get_available_providers()}); "
            "install onnxruntime-gpu on a machine with an NVIDIA GPU. Nothing was written."
        )
    write_tables(
        "gpu",
        "fxcompress on ONNX Runtime CUDA EP",
        environment(gpu_name(), "CUDAExecutionProvider"),
        list(BATCHES),
        lambda name: run_benchmark(
            zoo.FACTORIES[name],
            recipes=RECIPES,
            targets=("cuda",),
            batches=BATCHES[name],
            provider="cuda",
            ort_quantize_dynamic=False,
            calibration=zoo.CALIBRATION[name](),
        ),
    )


if __name__ == "__main__":
    main()
