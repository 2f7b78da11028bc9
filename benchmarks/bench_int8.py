"""Foundation benchmark: fp32 vs fxcompress int8 (each lowering) vs ORT quantize_dynamic, on ORT's CPU EP.

Run:  python benchmarks/bench_int8.py            (writes benchmarks/results/int8_cpu.md and .json)
      python benchmarks/bench_int8.py --models minilm --targets auto,cpu --tag int8_auto_minilm
Models: the 84M-parameter 5 x Linear(4096) MLP and all-MiniLM-L6-v2 (seq 32; batch = rows of that many sentences).
"""

from __future__ import annotations

import argparse

from common import environment, write_tables

from fxcompress.bench import run_benchmark
from fxcompress.models import zoo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="big_mlp,minilm")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tag", default="int8_cpu")
    ap.add_argument("--targets", default="", help="comma-separated, e.g. auto,cpu (default: every target)")
    args = ap.parse_args()
    write_tables(
        args.tag,
        "int8 on ONNX Runtime CPU",
        environment(),
        args.models.split(","),
        lambda name: run_benchmark(
            zoo.FACTORIES[name],
            recipes=("int8",),
            targets=args.targets.split(",") if args.targets else None,
            batches=(1, 32),
            repeat=args.repeat,
            provider="cpu",
        ),
    )


if __name__ == "__main__":
    main()
