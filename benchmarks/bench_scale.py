"""A model past protobuf's 2 GB limit, end to end in one process: int8 and fp16 compression, export (external data),
the parity check with its fp32 baseline; peak memory per phase against the fp32 weights.

Run:  python benchmarks/bench_scale.py                 (9 x Linear(8192): 604M parameters, 2.42 GB fp32; ~15 min)
      python benchmarks/bench_scale.py --layers 2      (a quicker look)
Writes benchmarks/results/scale.md and .json. The main process's resident memory is sampled every 20 ms (its peak per
phase); ONNX Runtime sessions run in child processes, whose largest peak growth is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, save_results
from torch import nn

import fxcompress
from fxcompress.export.writer import export_onnx
from fxcompress.graph.capture import capture


class RssSampler:
    """The process's peak resident set size since the last :meth:`reset`, from the kernel's high-water mark (VmHWM,
    reset through /proc/self/clear_refs): exact, where a sampling thread misses peaks while C code holds the GIL."""

    @staticmethod
    def _status_gb(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20

    def now_gb(self) -> float:
        return self._status_gb("VmRSS")

    @property
    def peak(self) -> float:
        return self._status_gb("VmHWM")

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def big_mlp(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for i in range(layers):
        linear = nn.Linear(width, width)
        with torch.no_grad():  # a fast init: the numbers do not matter, only their size
            linear.weight.normal_(0, width**-0.5)
            linear.bias.zero_()
        blocks += [linear] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*blocks).eval()


def files_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--width", type=int, default=8192)
    args = parser.parse_args()
    sampler = RssSampler()
    model = big_mlp(args.layers, args.width)
    x = torch.randn(4, args.width)
    params = sum(p.numel() for p in model.parameters())
    weights_gb = params * 4 / 2**30
    rows = []

    @contextlib.contextmanager
    def phase(name: str):
        sampler.reset()
        start = time.perf_counter()
        print(f"{name} ...", file=sys.stderr, flush=True)
        row: dict = dict(phase=name)
        yield row
        row.update(seconds=time.perf_counter() - start, peak_gb=sampler.peak, after_gb=sampler.now_gb())
        rows.append(row)
        print(row, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        fp32 = Path(tmp, "fp32.onnx")
        with phase("fp32 export"):
            export_onnx(capture(model, x).graph_module, (x,), fp32)
        sizes = {"fp32": files_gb(fp32)}
        for recipe in ("int8", "fp16"):
            with phase(f"optimize {recipe}"):
                compressed = fxcompress.optimize(model, x, recipe=recipe)
            path = Path(tmp, f"{recipe}.onnx")
            with phase(f"export {recipe}"):
                compressed.export(path)
            sizes[recipe] = files_gb(path)
            with phase(f"check {recipe} (with its fp32 baseline)") as row:
                report = fxcompress.check(model, path, x, compressed=compressed, latency_repeat=3)
                row.update(
                    passed=report.passed,
                    failures=report.failures[:3],
                    cosine=report.metrics.get("cosine"),
                    session_peak_mb=report.memory.get("rss_peak_mb"),
                    fp32_session_peak_mb=report.memory.get("fp32_rss_peak_mb"),
                )
            compressed = report = None  # let them go before the next recipe (fx graphs hold reference cycles)
            gc.collect()
    # each ONNX Runtime session reports its own peak growth over its fresh process (RUSAGE_CHILDREN would count the
    # parent's pages that a forked child shares until it execs)
    sessions = [r.get(k) for r in rows for k in ("session_peak_mb", "fp32_session_peak_mb") if r.get(k) is not None]
    children_gb = max(sessions, default=0.0) / 1024
    whole = max(r["peak_gb"] for r in rows)
    env = environment()
    lines = [
        f"# A model past 2 GB, end to end\n\n{env}\n\n"
        f"Command: `python benchmarks/bench_scale.py --layers {args.layers} --width {args.width}`\n",
        f"{args.layers} x Linear({args.width}): {params / 1e6:.0f}M parameters, {weights_gb:.2f} GiB of fp32 weights. "
        f"Files: fp32 {sizes['fp32']:.2f} GiB, int8 {sizes['int8']:.2f} GiB, fp16 {sizes['fp16']:.2f} GiB "
        "(ONNX external data past 512 MiB).\n",
        f"**Peak resident memory of the whole run (main process): {whole:.2f} GiB = {whole / weights_gb:.2f}x the fp32 "
        f"weights**; the largest ONNX Runtime session grew its fresh process by {children_gb:.2f} GiB.\n",
        "| phase | seconds | peak RSS GiB (x fp32 weights) | RSS after GiB | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        result = ""
        if "passed" in r:
            result = f"{'PASSED' if r['passed'] else 'FAILED ' + '; '.join(r['failures'])}, cosine {r['cosine']:.5f}"
        lines.append(
            f"| {r['phase']} | {r['seconds']:.0f} | {r['peak_gb']:.2f} ({r['peak_gb'] / weights_gb:.2f}) | "
            f"{r['after_gb']:.2f} | {result} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(
        "scale" if args.layers == 9 and args.width == 8192 else f"scale_{args.layers}x{args.width}",
        text,
        {
            "env": env,
            "params": params,
            "weights_gb": weights_gb,
            "sizes_gb": sizes,
            "rows": rows,
            "children_peak_gb": children_gb,
            "whole_peak_gb": whole,
        },
    )


if __name__ == "__main__":
    main()
