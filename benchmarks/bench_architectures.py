"""Models outside the zoo at their published sizes: bytes and parity of `int8` (and BatchNorm handling) on ONNX Runtime.

Run:  python benchmarks/bench_architectures.py        (~6 min on 2 cores; writes benchmarks/results/architectures.md)
Rows: torchvision's ViT-B/16 (nn.MultiheadAttention's packed in-projection), a stock nn.TransformerEncoder (6 layers,
d=512, as in "Attention is all you need"), an LSTM tagger, ResNet-18 with `int8` alone vs `fold_bn,int8` vs `int8`
with canonicalisation off, BERT-base from its transformers config given keyword inputs. Random weights; the artifact
is checked on ORT against the original model (the weights ratio is the file's initializers vs the fp32 model's).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import save_table
from torch import nn

import fxcompress
from fxcompress.checker.parity import check
from fxcompress.models import architectures


def _transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)
    return nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval(), (torch.randn(2, 64, 512),)


CASES = [
    ("ViT-B/16", lambda: architectures.vit(batch=1), "int8", {}),
    ("nn.TransformerEncoder 6x512", _transformer_encoder, "int8", {"dynamic_axes": (0, 1)}),
    ("LSTM tagger", lambda: architectures.tagger("lstm"), "int8", {}),
    ("ResNet-18", lambda: architectures.resnet18(batch=1), "int8", {}),
    ("ResNet-18", lambda: architectures.resnet18(batch=1), "fold_bn,int8", {}),
    ("ResNet-18", lambda: architectures.resnet18(batch=1), "int8", {"canonicalize": False}),
    ("BERT-base (keyword inputs)", lambda: architectures.hf_encoder("bert", 1.0, batch=2, length=64), "int8", {}),
]


def main() -> None:
    rows = []
    warnings.simplefilter("ignore")
    for label, factory, recipe, options in CASES:
        print(f"{label} {recipe} {options} ...", file=sys.stderr, flush=True)
        model, example = factory()
        start = time.perf_counter()
        cm = fxcompress.optimize(model, example, recipe=recipe, **options)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = cm.export(Path(tmp, "m.onnx"))
            report = check(model, path, example, compressed=cm, fp32_baseline=False, latency_repeat=1)
        skipped = [r.layer for r in cm.records if r.skipped]
        rows.append(
            dict(
                model=label,
                recipe=recipe + (" (canonicalize=False)" if options.get("canonicalize") is False else ""),
                params_m=architectures.param_count(model) / 1e6,
                ratio=cm.compression_ratio,
                file_ratio=report.weights.get("ratio"),
                cosine=report.metrics.get("cosine"),
                passed=report.passed,
                optimize_s=seconds,
                skipped=skipped,
            )
        )
    cells = [
        [
            r["model"],
            f"`{r['recipe']}`",
            f"{r['params_m']:.1f}M",
            f"{r['ratio']:.2f}",
            f"{r['file_ratio']:.3f}",
            f"{r['cosine']:.5f}",
            "passed" if r["passed"] else "FAILED",
            f"{r['optimize_s']:.0f}",
            ", ".join(r["skipped"][:4]) + (" ..." if len(r["skipped"]) > 4 else ""),
        ]
        for r in rows
    ]
    header = ["model", "recipe", "parameters", "compression (x)", "file weights (x fp32)", "cosine", "parity"]
    header += ["optimize s", "left float"]
    save_table(
        "architectures", "Architectures outside the zoo: `int8` bytes and parity on ONNX Runtime", header, cells, rows
    )


if __name__ == "__main__":
    main()
