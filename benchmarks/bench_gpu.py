"""fp32 vs fp16 vs int8 vs int4 on ONNX Runtime's CUDA EP: parity, GPU memory, latency (issue 3's GPU rows).

Run on a machine with an NVIDIA GPU and onnxruntime-gpu (not onnxruntime) installed:
    python benchmarks/bench_gpu.py          (writes benchmarks/results/gpu.md and .json)
It refuses to run, and writes nothing, when the CUDA execution provider is not available: CPU numbers must never be
reported as GPU ones. Exports use the ``cuda`` target (standard DequantizeLinear + MatMul for int8; MatMulNBits and
GatherBlockQuantized for int4, which ORT's CUDA EP implements).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import torch

from fxcompress.bench import format_rows, rows_to_json, run_benchmark
from fxcompress.models import zoo

OUT = Path(__file__).parent / "results"
RECIPES = ("fp16", "int8", "int4:block=32,algo=gptq,kinds=linear+embedding")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU"


def main() -> None:
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        sys.exit(f"CUDAExecutionProvider is not available (providers: {onnxruntime.get_available_providers()}); "
                 "install onnxruntime-gpu on a machine with an NVIDIA GPU. Nothing was written.")
    env = (f"Measured {datetime.date.today()} on {gpu_name()}, onnxruntime {onnxruntime.__version__}, "
           f"torch {torch.__version__}, provider CUDAExecutionProvider")
    sections, data = [f"# fxcompress on ONNX Runtime CUDA EP\n\n{env}\n\nCommand: `python benchmarks/bench_gpu.py`\n"], {"env": env}
    for name, batches in (("minilm", (1, 16)), ("big_mlp", (1, 32))):
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows = run_benchmark(zoo.FACTORIES[name], recipes=RECIPES, targets=("cuda",), batches=batches, provider="cuda",
                             ort_quantize_dynamic=False, calibration=zoo.CALIBRATION[name]())
        table = format_rows(rows)
        print(f"\n## {name}\n\n{table}\n")
        sections.append(f"## {name}\n\n{table}\n")
        data[name] = rows_to_json(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu.md").write_text("\n".join(sections))
    (OUT / "gpu.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
