"""Decoder LLMs as KV-cache ONNX decoders: fp32 / int8 / int4 artifacts of causal LMs built from public configs
(random weights), each built from a saved Hugging Face folder in a fresh process (peak RSS of the build), then run
by the library's greedy loop on ONNX Runtime (decode tokens/s at batch 1) and checked against torch (teacher-forced
logits cosine, top-1 agreement, greedy token agreement).

    python benchmarks/bench_decoder.py                  # gpt2-small and llama-200m
    python benchmarks/bench_decoder.py --models gpt2-small --recipes int8
    python benchmarks/bench_decoder.py --recipes int8 --targets cpu-vnni,cpu-nbits --name decoder_int8_targets
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {
    # GPT-2 small (124M): Conv1D layers, the head tied to the token embedding, learned positions
    "gpt2-small": dict(family="gpt2", layers=12, hidden=768, heads=12, kv_heads=12, vocab=50257),
    # a Llama-style 200M: grouped-query attention (16 heads, 4 KV heads), SwiGLU, an untied 32k-token head
    "llama-200m": dict(family="llama", layers=12, hidden=1024, heads=16, kv_heads=4, vocab=32000, intermediate=2816),
}
RECIPES = {"fp32": None, "int8": "int8", "int4": "int4:kinds=linear+embedding,block=32"}


def build_and_measure(folder: str, recipe: str, out: str, target: str) -> dict:
    """In this (fresh) process: load, compress, export; then decode speed and the check."""
    import torch

    from fxcompress.llm.check import check_decoder
    from fxcompress.llm.compress import optimize_decoder
    from fxcompress.llm.folder import load_causal_lm
    from fxcompress.llm.generate import OrtDecoder

    start = time.perf_counter()
    model = load_causal_lm(folder)
    cm = optimize_decoder(model, RECIPES[recipe], progress=False)
    path = cm.export(Path(out) / "model.onnx", target=target)
    build_s = time.perf_counter() - start
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    files = sum(f.stat().st_size for f in Path(out).iterdir())
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    decoder = OrtDecoder(path, provider="cpu")
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    decoder.generate(prompt, 4)  # warm up
    t0 = time.perf_counter()
    decoder.generate(prompt, 1)
    t1 = time.perf_counter()
    decoder.generate(prompt, 65)
    t2 = time.perf_counter()
    decode_tps = 64 / max((t2 - t1) - (t1 - t0), 1e-9)
    report = check_decoder(model, path, prompt, max_new_tokens=16, provider="cpu")
    return {
        "recipe": recipe,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "fp32_bytes": fp32_bytes,
        "artifact_bytes": files,
        "ratio": fp32_bytes / files,
        "build_s": build_s,
        "build_peak_rss_gib": build_rss,
        "decode_tokens_per_s": decode_tps,
        "prefill_ms": (t1 - t0) * 1000,
        "logits_cosine": report.logits_cosine,
        "top1_agreement": report.top1_agreement,
        "token_agreement": report.token_agreement,
        "passed": report.passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--target", default="auto", help=argparse.SUPPRESS)  # the target of one --one build
    parser.add_argument("--targets", default="auto", help="export targets, each recipe built for each")
    parser.add_argument("--name", default="decoders", help="results file name under benchmarks/results/")
    parser.add_argument("--one", nargs=3, metavar=("FOLDER", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(build_and_measure(*args.one, args.target)))
        return

    from common import save_table

    from fxcompress.models.architectures import causal_lm

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            folder = Path(scratch, name)
            causal_lm(**MODELS[name]).save_pretrained(folder)
            for recipe in args.recipes.split(","):
                for target in args.targets.split(","):
                    out = Path(scratch, f"{name}-{recipe}-{target}")
                    out.mkdir()
                    print(f"{name} {recipe} {target} ...", file=sys.stderr, flush=True)
                    done = subprocess.run(
                        [sys.executable, __file__, "--one", str(folder), recipe, str(out), "--target", target],
                        capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"},
                    )  # fmt: skip
                    if done.returncode:
                        raise SystemExit(done.stderr[-3000:])
                    row = json.loads(done.stdout.strip().splitlines()[-1]) | {"model": name, "target": target}
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
    cells = [
        [
            r["model"], r["recipe"], r["target"], f"{r['params_m']:.0f}M", f"{r['artifact_bytes'] / 2**20:.0f} MiB",
            f"{r['ratio']:.2f}x", f"{r['build_s']:.0f} s", f"{r['build_peak_rss_gib']:.2f} GiB",
            f"{r['decode_tokens_per_s']:.1f}", f"{r['prefill_ms']:.0f} ms", f"{r['logits_cosine']:.5f}",
            f"{r['top1_agreement']:.1%}", f"{r['token_agreement']:.1%}", "yes" if r["passed"] else "no",
        ]
        for r in rows
    ]  # fmt: skip
    header = ["model", "recipe", "target", "params", "artifact", "vs fp32", "build", "build peak RSS",
              "decode tok/s (b1)", "prefill 32 tok", "logits cosine", "top-1 agree", "greedy tokens equal",
              "check passed"]  # fmt: skip
    save_table(args.name, "KV-cache decoders on ONNX Runtime (CPU)", header, cells, rows)


if __name__ == "__main__":
    main()
