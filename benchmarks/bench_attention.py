"""Attention fused into MultiHeadAttention at export, against the exporter's own spelling, on ORT's CPU EP.

For each encoder: fp32 and int8 (`int8`, the `auto` target) exported with and without the fusion, and ORT
quantize_dynamic of the unfused fp32 export (what a user of ORT's tools starts from). Every latency is a ratio to the
unfused fp32 export at batch 1, timed side by side in one process (`relative_latency`, alternating rounds), and
each fused export is also timed directly against its unfused twin (the column that isolates the fusion's effect:
ratios to fp32 taken minutes apart drift with the machine's load). Cosine is against the torch model on 16 inputs.

Run: python benchmarks/bench_attention.py [--models minilm,bert,distilbert] [--lengths 32,128]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

import fxcompress
from fxcompress.checker.runtime import import_ort
from fxcompress.checker.timing import relative_latency
from fxcompress.export.targets import auto_target
from fxcompress.export.writer import export_onnx
from fxcompress.graph.capture import capture
from fxcompress.models import architectures as arch
from fxcompress.models import zoo

sys.path.insert(0, str(Path(__file__).parent))
from common import _command, environment, save_results  # noqa: E402


def _encoder(name: str, length: int):
    """(model returning one tensor, a batch-2 example, 16 evaluation inputs) at ``length`` tokens (batch 2: a batch
    of one would be captured as a constant)."""
    if name == "minilm":
        from fxcompress.models.sentences import SENTENCES

        model, _, _ = zoo.minilm(length)
        return model, zoo.tokenize(SENTENCES[:2], length), zoo.tokenize(SENTENCES[:16], length)

    class LastHidden(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model, example = arch.hf_encoder(name, scale=1.0, batch=16, length=length)
    ids, mask = example["input_ids"], example["attention_mask"]
    return LastHidden(model).eval(), (ids[:2], mask[:2]), (ids, mask)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def measure(name: str, length: int, tmp: Path) -> list[dict]:
    ort = import_ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, example, evaluation = _encoder(name, length)
    with torch.no_grad():
        reference = model(*evaluation).numpy()
    target = auto_target()[0]
    unfused = dataclasses.replace(target, fuse_attention=False)
    cm = fxcompress.optimize(model, example, recipe="int8", dynamic_axes=(0, 1))
    fp32_graph = capture(model, example, dynamic_axes=(0, 1)).graph_module
    paths = {
        "fp32, exporter's attention": export_onnx(fp32_graph, example, tmp / "f.onnx", target=unfused),
        "fp32, fused": export_onnx(fp32_graph, example, tmp / "ff.onnx", target=target),
        f"int8 [{target.name}], exporter's attention": cm.export(tmp / "q.onnx", target=unfused),
        f"int8 [{target.name}], fused": cm.export(tmp / "qf.onnx", target=target),
    }
    ort_path = tmp / "ort.onnx"
    quantize_dynamic(str(paths["fp32, exporter's attention"]), str(ort_path), weight_type=QuantType.QInt8,
                     per_channel=True)  # fmt: skip
    paths["ORT quantize_dynamic (QInt8, per-channel)"] = ort_path
    base = paths["fp32, exporter's attention"]
    feed = [t[:1].numpy() for t in example]
    twins = {
        "fp32, fused": paths["fp32, exporter's attention"],
        f"int8 [{target.name}], fused": paths[f"int8 [{target.name}], exporter's attention"],
    }
    rows = []
    for variant, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": evaluation[0].numpy(), "attention_mask": evaluation[1].numpy()})[0]
        timed = relative_latency(path, base, feed, "cpu", rounds=9, runs=10)
        direct = relative_latency(path, twins[variant], feed, "cpu", rounds=15, runs=20) if variant in twins else None
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        rows.append(dict(model=name, tokens=length, variant=variant, nodes=len(ops), p50_ms=timed.p50_ms,
                         ratio=timed.ratio, fused_over_unfused=direct and direct.ratio,
                         cosine=_cosine(got, reference)))  # fmt: skip
        print(f"  {name} {length} {variant}: {timed.ratio:.3f}x ({timed.p50_ms:.2f} ms)", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert,distilbert")
    ap.add_argument("--lengths", default="32,128")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for length in map(int, args.lengths.split(",")):
                rows += measure(name, length, Path(tmp))
    header = (
        "| model | tokens | variant | ONNX nodes | p50 b1 ms | x unfused fp32 (side by side) | fused / unfused twin "
        "(side by side) | cosine to torch |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['model']} | {r['tokens']} | {r['variant']} | {r['nodes']} | {r['p50_ms']:.2f} | {r['ratio']:.3f} | "
        f"{'' if r['fused_over_unfused'] is None else format(r['fused_over_unfused'], '.3f')} | {r['cosine']:.5f} |"
        for r in rows
    ]
    text = (
        f"# Attention fused into MultiHeadAttention at export (batch 1, ORT CPU)\n\n{environment()}\n\n"
        f"Command: `python {_command()}` ({time.perf_counter() - start:.0f} s)\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    save_results("attention_fusion", text, {"rows": rows})


if __name__ == "__main__":
    main()
