"""fxcompress against onnxruntime-genai's model builder on the same local Hugging Face folder, int4 for CPU, in one
run: artifact bytes, the build's wall time and peak RSS (each build a fresh process), decode tokens/s at batch 1 and
teacher-forced logits cosine against torch (both artifacts run by the same greedy loop on the same ORT session
options; the builder's inputs are renamed to fxcompress's).

    python benchmarks/bench_decoder_genai.py               # llama-200m, random weights
    python benchmarks/bench_decoder_genai.py --genai-python /path/to/venv/bin/python

Needs ``pip install onnxruntime-genai`` (the ``[bench]`` extra) in the Python that runs the builder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoder import MODELS  # noqa: E402


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over ``t0 .. t<vocab-1>``: the builder copies a tokenizer and will not run without."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2")
    fast.save_pretrained(folder)


def timed(command: list[str]) -> tuple[float, float]:
    """Run ``command``; its wall seconds and its own peak RSS in GiB (os.wait4 reports that child's alone)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"PYTHONWARNINGS": "ignore"}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


class Session:
    """An ONNX decoder in ORT, fed by fxcompress's names whatever its own (``past_key_values.0.key`` style too)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cache_outputs = [o for o in self.outputs if o != "logits"]

    def step(self, feeds: dict[str, torch.Tensor]):
        arrays = {}
        for name, kind in self.inputs.items():
            value = feeds[name.replace(".", "_")].numpy()
            arrays[name] = value.astype(np.int32) if kind == "tensor(int32)" else value
        out = dict(zip(self.outputs, self.session.run(None, arrays)))
        present = [torch.from_numpy(out[name]) for name in sorted(self.cache_outputs, key=_cache_order)]
        return torch.from_numpy(out["logits"]), present


def _cache_order(name: str) -> tuple[int, int]:
    parts = name.replace("_", ".").split(".")
    return int(parts[-2]), 0 if parts[-1] == "key" else 1


def measure(path: Path, model: torch.nn.Module, layout) -> dict:
    from fxcompress.checker.metrics import compare
    from fxcompress.llm.compress import prompt_inputs
    from fxcompress.llm.generate import greedy

    session = Session(path)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    greedy(session.step, layout, prompt, 4)
    t0 = time.perf_counter()
    greedy(session.step, layout, prompt, 1)
    t1 = time.perf_counter()
    tokens = greedy(session.step, layout, prompt, 65)
    t2 = time.perf_counter()
    full = torch.cat([prompt, tokens[:, :16]], dim=1)
    feeds = prompt_inputs(layout, full)
    with torch.no_grad():
        want = model(input_ids=full).logits[0]
    got = session.step(feeds)[0][0]
    return {
        "decode_tokens_per_s": 64 / max((t2 - t1) - (t1 - t0), 1e-9),
        "logits_cosine": compare([want.numpy()], [got.numpy()])["cosine"],
        "ops": sorted({n.op_type for n in __import__("onnx").load(str(path), load_external_data=False).graph.node}),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-200m", choices=list(MODELS))
    parser.add_argument("--genai-python", default=sys.executable)
    parser.add_argument("--recipe", default="int4:block=32")
    args = parser.parse_args()
    from common import save_table

    from fxcompress.llm.decoder import CacheLayout
    from fxcompress.llm.folder import load_causal_lm
    from fxcompress.models.architectures import causal_lm

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch, args.model)
        causal_lm(**MODELS[args.model]).save_pretrained(folder)
        write_tokenizer(folder, MODELS[args.model]["vocab"])
        model = load_causal_lm(folder)
        layout = CacheLayout.of(model)
        builds = {
            f"fxcompress `{args.recipe}`": (
                [sys.executable, "-m", "fxcompress", "optimize", f"hf:{folder}", "--recipe", args.recipe, "-o",
                 f"{scratch}/ours/", "--no-progress"],
                Path(scratch, "ours"),
            ),
            "onnxruntime-genai builder `-p int4 -e cpu`": (
                [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o",
                 f"{scratch}/genai", "-p", "int4", "-e", "cpu", "-c", f"{scratch}/cache"],
                Path(scratch, "genai"),
            ),
        }  # fmt: skip
        for label, (command, out) in builds.items():
            print(f"building: {label}", file=sys.stderr, flush=True)
            wall, rss = timed(command)
            files = sum(f.stat().st_size for f in out.glob("model.onnx*"))
            row = {"tool": label, "bytes": files, "build_s": wall, "build_peak_rss_gib": rss}
            row |= measure(out / "model.onnx", model, layout)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    cells = [
        [r["tool"], f"{r['bytes'] / 2**20:.0f} MiB ({fp32 / r['bytes']:.2f}x)", f"{r['build_s']:.0f} s",
         f"{r['build_peak_rss_gib']:.2f} GiB", f"{r['decode_tokens_per_s']:.1f}", f"{r['logits_cosine']:.5f}",
         ", ".join(o for o in r["ops"] if o in ("MatMulNBits", "GroupQueryAttention", "MatMul", "Softmax", "Gather",
                                                 "GatherBlockQuantized", "SkipSimplifiedLayerNormalization"))]
        for r in rows
    ]  # fmt: skip
    header = ["tool", "artifact (vs fp32)", "build wall", "build peak RSS", "decode tok/s (b1)", "logits cosine",
              "key ops"]  # fmt: skip
    save_table(
        f"decoder_vs_genai_{args.model}",
        f"{args.model} int4 for CPU: fxcompress and onnxruntime-genai",
        header,
        cells,
        rows,
    )


if __name__ == "__main__":
    main()
