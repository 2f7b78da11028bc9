"""Quantization suite (issue 3) side by side with ONNX Runtime's own quantizers, on ORT's CPU EP, in one run.

Run:  python benchmarks/bench_quant_suite.py        (writes benchmarks/results/quant_suite.md and .json)

* 84M MLP, batch 1 and 32: fxcompress int8_dynamic and int4 (RTN, GPTQ; block 32) vs ORT quantize_dynamic and
  MatMulNBitsQuantizer RTN / GPTQ (block 32, accuracy_level 4), same Gaussian calibration batches.
* digits CNN (899 held-out digits, real labels): weight-only int8, int8_static (QLinearConv), int4 Linear + int8 Conv.
* MiniLM: fp16 mixed precision (exported fp16; ORT's CPU EP has no fp16 MatMul on x86 and inserts casts).
"""

from __future__ import annotations

import argparse

from common import environment, write_tables

from fxcompress.bench import run_benchmark
from fxcompress.models import zoo

SUITES = {
    "big_mlp": dict(
        recipes=("int8_dynamic", "int4:block=32", "int4:block=32,algo=gptq"), ort_nbits=("rtn", "gptq"), batches=(1, 32)
    ),
    "digits_cnn": dict(
        recipes=("fold_bn,int8", "fold_bn,int8_static", "fold_bn,int8:kinds=conv2d,int4:block=32"),
        ort_nbits=(),
        batches=(1, 128),
    ),
    "minilm": dict(recipes=("fp16", "int8_dynamic"), ort_nbits=(), batches=(1, 16)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(SUITES))
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    def measure(name: str):
        s = SUITES[name]
        return run_benchmark(
            zoo.FACTORIES[name],
            recipes=s["recipes"],
            targets=("cpu",),
            batches=s["batches"],
            repeat=args.repeat,
            provider="cpu",
            ort_nbits=s["ort_nbits"],
            nbits_block=32,
            calibration=zoo.CALIBRATION[name](),
        )

    write_tables(
        "quant_suite", "Quantization suite on ONNX Runtime CPU", environment(), args.models.split(","), measure
    )


if __name__ == "__main__":
    main()
