"""Experiment: which ONNX form of an int8 convolution ONNX Runtime's CPU EP runs fastest, on ResNet-18 and
MobileNetV3-small (random weights, 224x224).

Run:  python benchmarks/experiments/experiment_conv_lowerings.py      (~10 min; writes results/conv_lowerings.md)

Rows: fp32; int8 weights as DequantizeLinear + Conv (dequantized on every call); int8 weights as Cast + Mul, which ORT
folds into fp32 when the session loads (the file stays int8, the session holds fp32); static int8 (calibrated QDQ,
fused by ORT into QLinearConv) by fxcompress and by ORT's quantize_static; ORT's quantize_dynamic on Conv
(ConvInteger). Every row exported from the same BN-folded model, measured the same way in one run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import environment, save_results  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.checker.metrics import compare, outputs_to_numpy  # noqa: E402
from fxcompress.checker.runtime import probe  # noqa: E402
from fxcompress.export.targets import TARGETS  # noqa: E402
from fxcompress.export.writer import export_onnx  # noqa: E402
from fxcompress.models import architectures  # noqa: E402

BATCHES = (1, 16)


def _latencies(path: Path, image: int) -> dict[int, float]:
    out = {}
    for b in BATCHES:
        x = torch.randn(b, 3, image, image).numpy()
        out[b] = probe(path, [(x,)], provider="cpu", repeat=10, warmup=2).latency_ms_p50
    return out


def main() -> None:
    import dataclasses

    import onnx
    import onnxruntime.quantization as oq

    rows = []
    for name, factory in (
        ("resnet18", architectures.resnet18),
        ("mobilenet_v3_small", architectures.mobilenet_v3_small),
    ):
        model, (x,) = factory(batch=8)
        reference = outputs_to_numpy(model(x))
        calibration = [(torch.randn(8, 3, 224, 224),) for _ in range(4)]
        folded = fxcompress.optimize(model, x, recipe="fold_bn")
        int8 = fxcompress.optimize(model, x, recipe="fold_bn,int8")
        static = fxcompress.optimize(model, x, recipe="fold_bn,int8_static", calibration=calibration)
        once = dataclasses.replace(
            TARGETS["cpu"], name="cpu", variants=(("linear_q8", "dynamic"), ("conv_q8", "dequantize_once"))
        )
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(folded.module, (x,), Path(tmp, "fp32.onnx"))
            variants: list[tuple[str, Path]] = [
                ("fp32 (BN folded)", fp32),
                ("int8 DequantizeLinear + Conv", int8.export(Path(tmp, "dq.onnx"), target="cpu")),
                ("int8 Cast + Mul, folded by ORT at load", int8.export(Path(tmp, "once.onnx"), target=once)),
                ("fxcompress int8_static (QLinearConv)", static.export(Path(tmp, "static.onnx"), target="cpu")),
            ]

            input_name = onnx.load(str(fp32)).graph.input[0].name

            class Reader(oq.CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter([{input_name: b[0].numpy()} for b in calibration])

                def get_next(self):
                    return next(self.batches, None)

            qs = Path(tmp, "ort_static.onnx")
            oq.quantize_static(
                str(fp32),
                str(qs),
                Reader(),
                quant_format=oq.QuantFormat.QDQ,
                per_channel=True,
                weight_type=oq.QuantType.QInt8,
                activation_type=oq.QuantType.QUInt8,
            )
            variants.append(("ORT quantize_static (QDQ, per-channel)", qs))
            qd = Path(tmp, "ort_dynamic.onnx")
            oq.quantize_dynamic(
                str(fp32), str(qd), weight_type=oq.QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"]
            )
            variants.append(("ORT quantize_dynamic (ConvInteger)", qd))
            for label, path in variants:
                print(f"{name}: {label} ...", file=sys.stderr, flush=True)
                run = probe(path, [(x.numpy(),)], provider="cpu", repeat=1, warmup=0)
                cosine = compare(reference, run.outputs[0])["cosine"] if not run.load_error else None
                rows.append(
                    dict(
                        model=name,
                        variant=label,
                        cosine=cosine,
                        file_mb=sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20,
                        rss_load_mb=run.rss_load_mb,
                        latency=_latencies(path, 224),
                        error=run.load_error,
                    )
                )
    env = environment()
    lines = [
        f"# int8 convolutions on ONNX Runtime CPU: which ONNX form runs fastest\n\n{env}\n\n"
        "Command: `python benchmarks/experiments/experiment_conv_lowerings.py`\n",
        "| model | variant | file MiB | session RSS after load MiB | p50 b1 ms (x fp32) | p50 b16 ms (x fp32) | cosine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"])["latency"]
        lat = " | ".join(f"{r['latency'][b]:.1f} ({r['latency'][b] / base[b]:.2f})" for b in BATCHES)
        cos = f"{r['cosine']:.5f}" if r["cosine"] is not None else r["error"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['file_mb']:.1f} | {r['rss_load_mb']:.0f} | {lat} | {cos} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("conv_lowerings", text, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
