"""Experiment: can distillation on real news text recover MiniLM after SVD of its FFN at 50% of their bytes?

Run:  pip install gensim && python benchmarks/experiment_svd_distill.py   (writes results/svd_distill.md and .json)

Data: the ~2,500 sentences of the Lee news corpus (Australian Broadcasting Corporation articles) that the gensim
wheel ships as test data, plus the 32 calibration sentences: real English, disjoint from the 64 evaluation
sentences, and available offline once gensim is installed. gensim is not a dependency of fxcompress; this script is
the record of an attempt, not a supported recipe.

Student: ``svd:ratio=0.5,aware=true`` on the 12 FFN Linears. Only the SVD factors train (cosine loss on the sentence
embedding, Adam lr 3e-4, batches of 32); cosine on the evaluation sentences is measured in torch every 150 steps.
"""

from __future__ import annotations

import random
import re
import sys

import torch

import fxcompress
from fxcompress.distill import distill_module
from fxcompress.models import zoo

from common import environment, save_results

STEPS, EVERY, LR = 300, 150, 3e-4
FFN = "include=*.intermediate.dense+*.output.dense,exclude=*.attention.*"


def lee_sentences() -> list[str]:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        sys.exit("this experiment reads the Lee corpus bundled with gensim: pip install gensim")
    found = set()
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            found.update(s for s in re.split(r"(?<=[.!?\"])\s+(?=[A-Z\"])", doc.strip()) if 4 <= len(s.split()) <= 40)
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return sentences


def main() -> None:
    torch.manual_seed(0)
    model, example, ev = zoo.minilm()
    calibration = zoo.minilm_calibration()
    cm = fxcompress.optimize(model, example, recipe=f"svd:ratio=0.5,aware=true,{FFN}", calibration=calibration)
    corpus = lee_sentences()
    data = [zoo.tokenize(corpus[i : i + 32]) for i in range(0, len(corpus), 32)] + list(calibration)
    random.Random(1).shuffle(data)

    with torch.no_grad():
        reference = torch.cat([model(*b) for b in ev.inputs])

    def cosine() -> tuple[float, float]:
        with torch.no_grad():
            c = torch.nn.functional.cosine_similarity(reference, torch.cat([cm.module(*b) for b in ev.inputs]))
        return c.mean().item(), c.min().item()

    mean, worst = cosine()
    rows = [dict(steps=0, train_loss=None, cosine=mean, cosine_min=worst)]
    for done in range(EVERY, STEPS + 1, EVERY):
        start = (done - EVERY) % len(data)
        history = distill_module(cm.module, model, data[start:] + data[:start], steps=EVERY, lr=LR, loss="cosine",
                                 trainable=lambda name: "_svd_" in name)
        mean, worst = cosine()
        rows.append(dict(steps=done, train_loss=sum(history[-20:]) / 20, cosine=mean, cosine_min=worst))
        print(rows[-1], file=sys.stderr)
    env = environment()
    lines = [f"# Experiment: SVD 50% of MiniLM's FFN + distillation on the Lee news corpus\n\n{env}\n",
             f"Command: `python benchmarks/experiment_svd_distill.py` ({len(corpus)} news sentences + 32 calibration "
             "sentences; factors only; cosine on the 64 evaluation sentences, torch)\n",
             "| steps | train loss (1 - cos, last 20) | eval cosine mean | worst |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['steps']} | {'' if r['train_loss'] is None else format(r['train_loss'], '.4f')} | {r['cosine']:.4f} | "
              f"{r['cosine_min']:.4f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("svd_distill", text, {"env": env, "corpus_sentences": len(corpus), "rows": rows})


if __name__ == "__main__":
    main()
