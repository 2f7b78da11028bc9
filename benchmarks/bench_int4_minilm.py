"""int4 on all-MiniLM-L6-v2: RTN vs GPTQ side by side, int8 or int4 embeddings, ORT CPU EP.

Run:  python benchmarks/bench_int4_minilm.py      (writes benchmarks/results/int4_minilm.md and .json)
Linear layers int4 (block 128 unless named), embeddings int8 or int4 (GatherBlockQuantized, block 64, clip search).
GPTQ calibrates on 32 sentences disjoint from the 64 evaluation sentences. Exported for ``cpu-nbits`` so int8
layers in the mixed recipe run as 8-bit MatMulNBits (int4 layers are MatMulNBits on every target).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import environment, save_results

import fxcompress
from fxcompress.models import zoo

INT4_EMB = "int4:kinds=embedding,block=64,clip=true"
RECIPES = [
    ("int8 (reference)", "int8"),
    ("int8 GPTQ act-order", "int8:algo=gptq,act_order=true"),
    ("int8, float where sensitive, budget=0.3", "int8:budget=0.3"),
    ("int4 RTN b128 + int8 embeddings", "int8:kinds=embedding,int4:block=128"),
    ("int4 GPTQ b128 + int8 embeddings", "int8:kinds=embedding,int4:block=128,algo=gptq"),
    ("int4 GPTQ b128 act-order + int8 embeddings", "int8:kinds=embedding,int4:block=128,algo=gptq,act_order=true"),
    ("int4 GPTQ b32 + int8 embeddings", "int8:kinds=embedding,int4:block=32,algo=gptq"),
    ("int4 RTN b128 clip + int4 embeddings", f"{INT4_EMB},int4:block=128,clip=true"),
    (
        "int4 GPTQ b128 act-order clip + int4 embeddings",
        f"{INT4_EMB},int4:block=128,algo=gptq,act_order=true,clip=true",
    ),
    (
        "same, last encoder layer int8 (mixed by hand)",
        f"{INT4_EMB},int8:include=*layer.5.*,int4:block=128,algo=gptq,act_order=true,clip=true",
    ),
    (
        "same, int8 (GPTQ) where sensitive, budget=0.15",
        f"{INT4_EMB},int4:block=128,algo=gptq,act_order=true,clip=true,budget=0.15",
    ),
    (
        "same, int8 (GPTQ) where sensitive, budget=0.17",
        f"{INT4_EMB},int4:block=128,algo=gptq,act_order=true,clip=true,budget=0.17",
    ),
]


def main() -> None:
    model, example, ev = zoo.minilm()
    calibration = zoo.minilm_calibration()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in RECIPES:
            print(f"{label} ...", file=sys.stderr)
            cm = fxcompress.optimize(model, example, recipe=recipe, calibration=calibration)
            path = cm.export(Path(tmp, "m.onnx"), target="cpu-nbits")
            rep = fxcompress.check(model, path, example, eval_inputs=ev.inputs, fp32_baseline=False, provider="cpu")
            rows.append(
                dict(
                    variant=label,
                    recipe=recipe,
                    cosine=rep.metrics.get("cosine"),
                    cosine_min=rep.metrics.get("cosine_min"),
                    bytes_ratio=rep.weights["ratio"],
                    onnx_bytes=rep.weights["onnx_bytes"],
                    passed=rep.passed,
                    p50_ms_batch16=rep.latency["p50_ms"],
                )
            )
    env = environment()
    lines = [
        f"# int4 on MiniLM: RTN vs GPTQ\n\n{env}\n\nCommand: `python benchmarks/bench_int4_minilm.py`\n",
        "| variant | whole-model bytes (x fp32) | sentence cosine mean | worst | p50 ms (16 x 32 tokens) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variant']} | {r['bytes_ratio']:.3f} | {r['cosine']:.5f} | {r['cosine_min']:.5f} | "
        f"{r['p50_ms_batch16']:.1f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("int4_minilm", text, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
