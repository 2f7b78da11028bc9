"""Experiment: which part of the quantization after SVD + distillation costs MiniLM its cosine, and what the bytes
left under the goal (0.2 of fp32; int8 + int4 embeddings use 0.155) buy back.

Run:  python benchmarks/experiments/experiment_svd_distill.py --arms "<arm>" --save students/
      python benchmarks/experiments/experiment_svd_quantize.py students/<arm>.pt      (~12 minutes on 2 CPU cores; writes
      results/svd_quantize.md and .json; ``--tag svd_quantize_long`` on experiment_svd_recover.py's long.pt wrote
      results/svd_quantize_long.md)

The saved weights are loaded into the structure of the distillation experiment's one-shot start (same recipe and
calibration, hence the same ranks; every arm but the sequential one keeps them), then each quantization recipe below
is applied by a second ``optimize``, exported and measured on ORT CPU against the fp32 model on the 64 evaluation
sentences. Rows marked "diagnostic" exceed the byte goal and only locate the loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fxcompress
from fxcompress.models import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import environment, save_results
from experiment_svd_distill import EMBEDDINGS_INT4, QUANTIZE, RECIPE, artifact_report, corpus, load_student

RECIPES = {
    "int8 + int4 embeddings (the distillation experiment's)": QUANTIZE,
    "int4 embeddings only, Linears float (diagnostic)": EMBEDDINGS_INT4,
    "int8 everywhere, embeddings int8 too (diagnostic)": "int8",
    "int8 + int4 embeddings, SVD factors float (diagnostic)": f"{EMBEDDINGS_INT4},int8:exclude=*_svd_*",
    "int8 + int4 embeddings, SVD factors fp16": f"{EMBEDDINGS_INT4},int8:exclude=*_svd_*,fp16:include=*_svd_*",
    "int8 + int4 embeddings in blocks of 32": "int4:kinds=embedding,block=32,clip=true,int8",
}


def main(weights: Path, tag: str = "svd_quantize") -> None:
    torch.manual_seed(0)
    model, example, ev = zoo.minilm()
    student = load_student(model, example, weights, corpus())
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in ev.inputs])
        torch_cosine = torch.nn.functional.cosine_similarity(reference, torch.cat([student(*b) for b in ev.inputs]))
    rows = [
        dict(
            name="distilled student, float (torch)",
            recipe="",
            bytes=None,
            cosine=torch_cosine.mean().item(),
            cosine_min=torch_cosine.min().item(),
            latency=None,
            run_mb=None,
        )
    ]
    for name, recipe in RECIPES.items():
        rep = artifact_report(
            model, fxcompress.optimize(student, example, recipe=recipe), example, ev, fp32_baseline=True
        )
        rows.append(
            dict(
                name=name,
                recipe=recipe,
                bytes=rep.weights["ratio"],
                cosine=rep.metrics["cosine"],
                cosine_min=rep.metrics["cosine_min"],
                latency=rep.latency["p50_ms"] / rep.latency["fp32_p50_ms"],
                run_mb=rep.memory["rss_run_mb"] / rep.memory["fp32_rss_run_mb"],
            )
        )
        print(rows[-1], flush=True)
    env = environment()
    lines = [
        f"# Experiment: quantizing the distilled SVD student of MiniLM\n\n{env}\n",
        f"Command: `python benchmarks/experiments/experiment_svd_quantize.py {weights.name}"
        f"{'' if tag == 'svd_quantize' else ' --tag ' + tag}` (weights saved by "
        f"`experiment_svd_distill.py --save` or `experiment_svd_recover.py --save`; structure: `{RECIPE}`; cosine vs the fp32 model on the 64 "
        f"evaluation sentences, on ORT CPU except the first row; latency p50 and the session's RSS after runs "
        f"on one batch of {example[0].shape[0]} sentences, each as a fraction of the fp32 model's measured in the "
        f"same check)\n",
        "| quantization | recipe | whole-model bytes (x fp32) | eval cosine mean | eval worst | latency (x fp32) | "
        "session RSS after runs (x fp32) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['name']} | {'`' + r['recipe'] + '`' if r['recipe'] else ''} | "
        f"{'' if r['bytes'] is None else format(r['bytes'], '.3f')} | {r['cosine']:.4f} | {r['cosine_min']:.4f} | "
        f"{'' if r['latency'] is None else format(r['latency'], '.2f')} | "
        f"{'' if r['run_mb'] is None else format(r['run_mb'], '.2f')} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(tag, text, {"env": env, "weights": weights.name, "structure": RECIPE, "rows": rows})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="a student state_dict saved by experiment_svd_distill.py --save")
    parser.add_argument("--tag", default="svd_quantize", help="results/<tag>.md and .json (default: %(default)s)")
    args = parser.parse_args()
    main(args.weights, args.tag)
