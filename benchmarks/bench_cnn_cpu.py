"""CNNs after int8 on ONNX Runtime's CPU EP: fp32 vs fxcompress `int8` and `int8_static` on target `auto` vs ORT's
own `quantize_static` (QDQ, per-channel) on the same fp32 export, at batch 1 and 16.

Run:  python benchmarks/bench_cnn_cpu.py        (~10 min on 2 cores; writes benchmarks/results/cnn_cpu.md and .json)
Models: the trained digits CNN (accuracy on held-out digits), torchvision's ResNet-18 and MobileNetV3-small layouts
with random weights and trained-like BatchNorm statistics at 224x224. Recipes get BatchNorm folded by default.
"""

from __future__ import annotations

import argparse

import torch
from common import environment, write_tables

from fxcompress.bench import run_benchmark
from fxcompress.models import architectures, zoo

FACTORIES = {
    "digits_cnn": zoo.digits_cnn,
    "resnet18": lambda: architectures.resnet18(batch=1),
    "mobilenet_v3_small": lambda: architectures.mobilenet_v3_small(batch=1),
}


def _calibration(name: str) -> list[tuple[torch.Tensor]]:
    if name == "digits_cnn":
        return zoo.digits_calibration()
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 224, 224, generator=g),) for _ in range(4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(FACTORIES))
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    write_tables(
        "cnn_cpu",
        "CNNs after int8 on ONNX Runtime CPU",
        environment(),
        args.models.split(","),
        lambda name: run_benchmark(
            FACTORIES[name],
            recipes=("int8", "int8_static"),
            targets=("auto",),
            batches=(1, 16),
            calibration=_calibration(name),
            ort_quantize_dynamic=False,
            ort_quantize_static=True,
            repeat=args.repeat,
            provider="cpu",
        ),
    )


if __name__ == "__main__":
    main()
