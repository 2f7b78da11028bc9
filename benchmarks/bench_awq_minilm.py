"""AWQ-style activation-aware scaling (the ``awq`` pass) against round-to-nearest and GPTQ on all-MiniLM-L6-v2.

Run:  python benchmarks/bench_awq_minilm.py      (~10 min on 2 cores; writes benchmarks/results/awq_minilm.md, .json)
Embeddings int8 in every row; Linear layers int4 (block 128 or 32) or int8. Calibration: the 32 bundled sentences
(``zoo.minilm_calibration``), disjoint from the 64 evaluation sentences. Exported for ``cpu-weightonly`` (MatMulNBits
with fp32 activations) so that every row runs the torch module's weight-only numerics on ORT and differences come
from the weights alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from common import environment, save_results

import fxcompress
from fxcompress.models import zoo

EMB = "int8:kinds=embedding"
RECIPES = [
    ("int8 RTN", "int8"),
    ("AWQ + int8 RTN", "awq:bits=8,int8"),
    ("int4 RTN b128", f"{EMB},int4:block=128"),
    ("AWQ + int4 RTN b128", f"{EMB},awq:block=128,int4:block=128"),
    ("int4 GPTQ b128", f"{EMB},int4:block=128,algo=gptq"),
    ("AWQ + int4 GPTQ b128", f"{EMB},awq:block=128,int4:block=128,algo=gptq"),
    ("int4 RTN b32", f"{EMB},int4:block=32"),
    ("AWQ + int4 RTN b32", f"{EMB},awq:block=32,int4:block=32"),
    ("int4 GPTQ b32", f"{EMB},int4:block=32,algo=gptq"),
]


def main() -> None:
    model, example, ev = zoo.minilm()
    calibration = zoo.minilm_calibration()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in RECIPES:
            print(f"{label} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            cm = fxcompress.optimize(model, example, recipe=recipe, calibration=calibration, dynamic_axes=(0, 1))
            seconds = time.perf_counter() - start
            path = cm.export(Path(tmp, "m.onnx"), target="cpu-weightonly")
            rep = fxcompress.check(model, path, example, eval_inputs=ev.inputs, fp32_baseline=False, provider="cpu")
            muls = sum(r.action == "scaled" and "a Mul before" in r.reason for r in cm.records)
            rows.append(
                dict(
                    variant=label,
                    recipe=recipe,
                    cosine=rep.metrics["cosine"],
                    cosine_min=rep.metrics["cosine_min"],
                    bytes_ratio=rep.weights["ratio"],
                    optimize_s=seconds,
                    awq_muls=muls,
                )
            )
    env = environment()
    lines = [
        f"# AWQ vs RTN vs GPTQ on MiniLM\n\n{env}\n\nCommand: `python benchmarks/bench_awq_minilm.py`\n",
        "| variant | recipe | whole-model bytes (x fp32) | sentence cosine mean | worst | optimize s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variant']} | `{r['recipe']}` | {r['bytes_ratio']:.3f} | {r['cosine']:.5f} | {r['cosine_min']:.5f} | "
        f"{r['optimize_s']:.0f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("awq_minilm", text, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
