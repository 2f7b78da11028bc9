"""Foundation benchmark: fp32 vs fxcompress int8 (each lowering) vs ORT quantize_dynamic, on ORT's CPU EP.

Run:  python benchmarks/bench_int8.py            (writes benchmarks/results/int8_cpu.md and .json)
Models: the 84M-parameter 5 x Linear(4096) MLP and all-MiniLM-L6-v2 (seq 32; batch = rows of that many sentences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import onnxruntime
import torch

from fxcompress.bench import format_rows, rows_to_json, run_benchmark
from fxcompress.models import zoo

OUT = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> str:
    """One line naming the date, CPU, thread count and library versions a result was measured with."""
    return (f"Measured {datetime.date.today()} on {cpu_name()} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, provider CPUExecutionProvider")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="big_mlp,minilm")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tag", default="int8_cpu")
    args = ap.parse_args()
    header = environment()
    sections, data = [f"# int8 on ONNX Runtime CPU\n\n{header}\n\nCommand: `python benchmarks/bench_int8.py`\n"], {"env": header}
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows = run_benchmark(zoo.FACTORIES[name], recipes=("int8",), targets=("cpu", "cpu-nbits", "cuda"),
                             batches=(1, 32), repeat=args.repeat, provider="cpu")
        table = format_rows(rows)
        print(f"\n## {name}\n\n{table}\n")
        sections.append(f"## {name}\n\n{table}\n")
        data[name] = rows_to_json(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.tag}.md").write_text("\n".join(sections))
    (OUT / f"{args.tag}.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
