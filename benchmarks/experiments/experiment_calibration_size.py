"""Experiment: how much calibration text does activation-aware SVD need before it stops fitting the calibration set?

Run:  pip install gensim && python benchmarks/experiments/experiment_calibration_size.py   (writes results/calibration_size.md
      and .json; about 10 minutes on 2 CPU cores)

``svd:ratio=0.5,aware=input`` on MiniLM's 12 FFN Linears, whitened by the 32 bundled calibration sentences or by
128-2,048 sentences of the offline corpus of ``experiment_svd_distill.py``. Cosine to the fp32 model (torch) on
three sets: the calibration sentences themselves (the first 256 of them), the 64 evaluation sentences, and 256
held-out corpus sentences that no calibration set contains. Rows per feature = real tokens / 1,536 (the inputs of
the widest FFN Linear): below a few rows per feature the whitening matrix is (nearly) rank-deficient, the
truncation keeps what the calibration sentences use, and the gap between the first column and the others opens;
this is what ``fxcompress.CalibrationWarning`` is raised for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import fxcompress
from fxcompress.algorithms.statistics import MIN_ROWS_PER_FEATURE
from fxcompress.graph.calibration import Calibration
from fxcompress.models import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import environment, save_results
from experiment_svd_distill import FFN, HELD_OUT, corpus

RECIPE = f"svd:ratio=0.5,aware=input,{FFN}"
SIZES = (128, 256, 512, 2048)
WIDEST = 1536


def main() -> None:
    model, example, ev = zoo.minilm()
    sentences = corpus()
    held_out = zoo.tokenize_batches(sentences[:HELD_OUT], 32)
    sets = {"32 bundled sentences": zoo.minilm_calibration()}
    for n in SIZES:  # from the corpus' tail, never the held-out head
        sets[f"{n} corpus sentences"] = Calibration(zoo.tokenize_batches(sentences[-n:], 32), token_mask=1)

    def embed(module: torch.nn.Module, batches: list) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([module(*b) for b in batches])

    def cosine(student: torch.nn.Module, batches: list, reference: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(reference, embed(student, batches)).mean().item()

    fixed = {"eval": ev.inputs, "held_out": held_out}  # the fp32 model's embeddings of these are shared by every row
    reference = {name: embed(model, batches) for name, batches in fixed.items()}

    rows = []
    for name, calibration in sets.items():
        tokens = sum(int(mask.sum()) for _, mask in calibration)
        cm = fxcompress.optimize(model, example, recipe=RECIPE, calibration=calibration)
        own = list(calibration)[:8]
        rows.append(
            dict(
                calibration=name,
                tokens=tokens,
                rows_per_feature=tokens / WIDEST,
                on_calibration=cosine(cm.module, own, embed(model, own)),
                **{key: cosine(cm.module, batches, reference[key]) for key, batches in fixed.items()},
            )
        )
        print(rows[-1])
    env = environment()
    lines = [
        f"# Experiment: calibration size for activation-aware SVD (MiniLM FFN, 50% of their bytes)\n\n{env}\n",
        f"Command: `python benchmarks/experiments/experiment_calibration_size.py` (`{RECIPE}`; cosine to fp32 in torch; "
        f"CalibrationWarning below {MIN_ROWS_PER_FEATURE} rows per feature)\n",
        "| calibration | real tokens | rows per feature (1,536 inputs) | cosine on the calibration text | "
        "on the 64 eval sentences | on 256 held-out sentences |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['calibration']} | {r['tokens']} | {r['rows_per_feature']:.1f} | {r['on_calibration']:.4f} | "
        f"{r['eval']:.4f} | {r['held_out']:.4f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("calibration_size", text, {"env": env, "recipe": RECIPE, "rows": rows})


if __name__ == "__main__":
    main()
