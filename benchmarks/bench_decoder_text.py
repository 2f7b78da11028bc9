"""Decoder quality on real text: a ~20M-parameter Llama-style decoder trained here, byte-level, on the Python standard
library's source (local text: nothing is downloaded), then exported fp32 / int8 / int4 RTN / int4 GPTQ as KV-cache
decoders and measured on ONNX Runtime: perplexity on held-out files against torch's, greedy tokens of the fp32
artifact against transformers' generate over 64 new tokens, teacher-forced logits cosine.

    python benchmarks/bench_decoder_text.py --minutes 10

Training is seeded and cached (``~/.cache/fxcompress/decoder_text_<steps>.pt``); a few minutes on 2 cores makes a
model that predicts code far better than chance, not a good language model.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path.home() / ".cache" / "fxcompress"
SEQ = 128


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's top-level modules: every 10th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    held = b"".join(f.read_bytes() for i, f in enumerate(files) if not i % 10)
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_ids(train), as_ids(held)


def model_config():
    from fxcompress.models.architectures import causal_lm

    return causal_lm("llama", layers=7, hidden=512, heads=8, kv_heads=4, vocab=256, intermediate=1408, seed=0)


def train(train_ids: torch.Tensor, minutes: float) -> tuple[torch.nn.Module, dict]:
    model = model_config().train()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    start, step, losses = time.monotonic(), 0, []
    budget = minutes * 60
    while time.monotonic() - start < budget:
        frac = (time.monotonic() - start) / budget
        for g in opt.param_groups:  # warm up over 20 steps, then cosine to 10% by the end of the time budget
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, train_ids.numel() - SEQ - 1, (16,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        step += 1
        if step % 25 == 0:
            print(f"step {step}: loss {sum(losses[-25:]) / 25:.3f} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    return model.eval(), {"steps": step, "train_s": time.monotonic() - start, "final_loss": sum(losses[-25:]) / 25}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from common import save_table

    from fxcompress.llm.check import check_decoder
    from fxcompress.llm.compress import optimize_decoder
    from fxcompress.models.architectures import param_count

    train_ids, held = corpus()
    cached = CACHE / f"decoder_text_{args.minutes:g}min.pt"
    if cached.exists():
        saved = torch.load(cached)
        model = model_config()
        model.load_state_dict(saved["state"])
        model.eval()
        info = saved["info"]
    else:
        model, info = train(train_ids, args.minutes)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, cached)
    print(f"model: {param_count(model) / 1e6:.1f}M parameters, {info}", file=sys.stderr)

    text = held[: args.eval_tokens].view(-1, SEQ)  # held-out rows of 128 bytes
    prompts = held[-4 * 64 :].view(4, 64)[:, :32]
    gen = torch.Generator().manual_seed(1)
    calibration = [
        torch.stack([train_ids[s : s + SEQ] for s in torch.randint(0, train_ids.numel() - SEQ, (8,), generator=gen)])
        for _ in range(4)
    ]
    recipes = {
        "fp32": None,
        "int8": "int8",
        "int4 RTN (block 32)": "int4:block=32",
        "int4 GPTQ (block 32)": "int4:block=32,algo=gptq",
        "int4 GPTQ + int4 embeddings": "int4:block=32,algo=gptq,kinds=linear+embedding",
    }
    rows, cells = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for label, recipe in recipes.items():
            t0 = time.perf_counter()
            cm = optimize_decoder(model, recipe, calibration=calibration if recipe else None, progress=False)
            path = cm.export(Path(scratch) / f"{len(rows)}.onnx")
            build = time.perf_counter() - t0
            report = check_decoder(model, path, prompts, max_new_tokens=64, text=text, provider="cpu")
            size = sum(f.stat().st_size for f in Path(scratch).glob(f"{len(rows)}.onnx*"))
            row = {
                "recipe": label,
                "bytes": size,
                "ratio": param_count(model) * 4 / size,
                "perplexity_torch": report.perplexity_torch,
                "perplexity_onnx": report.perplexity_onnx,
                "increase": report.perplexity_increase,
                "logits_cosine": report.logits_cosine,
                "token_agreement": report.token_agreement,
                "build_s": build,
            }
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            cells.append([
                label, f"{size / 2**20:.1f} MiB", f"{row['ratio']:.2f}x", f"{report.perplexity_torch:.4f}",
                f"{report.perplexity_onnx:.4f}", f"{report.perplexity_increase:+.2%}", f"{report.logits_cosine:.5f}",
                f"{report.token_agreement:.1%}", f"{build:.0f} s",
            ])  # fmt: skip
    header = ["recipe", "artifact", "vs fp32", "perplexity (torch fp32)", "perplexity (artifact, ORT)", "increase",
              "logits cosine", "greedy tokens = torch (4 x 64)", "build"]  # fmt: skip
    title = (
        f"A {param_count(model) / 1e6:.1f}M-parameter byte-level Llama trained {info['steps']} steps "
        f"({info['train_s'] / 60:.1f} min, final loss {info['final_loss']:.3f}) on the Python "
        f"{sys.version_info.major}.{sys.version_info.minor} standard library; perplexity on "
        f"{text.numel()} held-out bytes"
    )
    save_table("decoder_text", title, header, cells, [info, *rows])


if __name__ == "__main__":
    main()
