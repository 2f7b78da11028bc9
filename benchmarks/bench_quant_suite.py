"""Quantization suite (issue 3) side by side with ONNX Runtime's own quantizers, on ORT's CPU EP, in one run.

Run:  python benchmarks/bench_quant_suite.py        (writes benchmarks/results/quant_suite.md and .json)

* 84M MLP, batch 1 and 32: fxcompress int8_dynamic and int4 (RTN, GPTQ; block 32) vs ORT quantize_dynamic and
  MatMulNBitsQuantizer RTN / GPTQ (block 32, accuracy_level 4), same Gaussian calibration batches.
* digits CNN (899 held-out digits, real labels): weight-only int8, int8_static (QLinearConv), int4 Linear + int8 Conv.
* MiniLM: fp16 mixed precision (exported fp16; ORT's CPU EP has no fp16 MatMul on x86 and inserts casts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fxcompress.bench import format_rows, rows_to_json, run_benchmark
from fxcompress.models import zoo

sys.path.insert(0, str(Path(__file__).parent))
from bench_int8 import environment  # noqa: E402

OUT = Path(__file__).parent / "results"

SUITES = {
    "big_mlp": dict(factory=zoo.big_mlp, recipes=("int8_dynamic", "int4:block=32", "int4:block=32,algo=gptq"),
                    calibration=zoo.big_mlp_calibration, ort_nbits=("rtn", "gptq"), batches=(1, 32)),
    "digits_cnn": dict(factory=zoo.digits_cnn, recipes=("fold_bn,int8", "fold_bn,int8_static", "fold_bn,int8:kinds=conv2d,int4:block=32"),
                       calibration=zoo.digits_calibration, ort_nbits=(), batches=(1, 128)),
    "minilm": dict(factory=zoo.minilm, recipes=("fp16", "int8_dynamic"), calibration=None, ort_nbits=(), batches=(1, 16)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(SUITES))
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    header = environment()
    sections, data = [f"# Quantization suite on ONNX Runtime CPU\n\n{header}\n\nCommand: `python benchmarks/bench_quant_suite.py`\n"], {"env": header}
    for name in args.models.split(","):
        s = SUITES[name]
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows = run_benchmark(s["factory"], recipes=s["recipes"], targets=("cpu",), batches=s["batches"], repeat=args.repeat,
                             provider="cpu", ort_nbits=s["ort_nbits"], nbits_block=32,
                             calibration=s["calibration"]() if s["calibration"] else None)
        table = format_rows(rows)
        print(f"\n## {name}\n\n{table}\n")
        sections.append(f"## {name}\n\n{table}\n")
        data[name] = rows_to_json(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "quant_suite.md").write_text("\n".join(sections))
    (OUT / "quant_suite.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
