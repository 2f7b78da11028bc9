"""The seed's case on a 2-core, 24 GiB machine: a ~4B-parameter Llama-style decoder with random weights, saved as a
Hugging Face folder of safetensors shards (~16 GB fp32), compressed by ``fxcompress optimize hf:DIR`` into an int8
and an int4 KV-cache decoder. Each build runs in a fresh process (its own peak RSS); then ONNX Runtime loads the
artifact (RSS after load), decodes at batch 1, and one prompt's logits are compared with torch's fp32 model.

    python benchmarks/bench_decoder_4b.py --folder /data/llama-4b      # writes the folder first if it is missing

Writing the folder never holds more than one shard in memory (the model is not built in torch to save it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Llama-3.2-3B's layout (hidden 3072, GQA 24/8 heads, SwiGLU 8192, 128k vocabulary) at 32 layers with an untied head
CONFIG = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, rope_theta=500000.0,
)  # fmt: skip
RECIPES = {"int8": "int8:kinds=linear+embedding", "int4": "int4:kinds=linear+embedding,block=64"}


def write_folder(folder: Path) -> None:
    """config.json plus one safetensors shard per decoder layer (and one for the embeddings and head), seeded."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**CONFIG)
    gen = torch.Generator().manual_seed(0)
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    index: dict[str, str] = {}
    for n in range(config.num_hidden_layers + 1):  # shard 0: embeddings, head and final norm; then one per layer
        name = f"model-{n:05d}.safetensors"
        if n == 0:
            tensors = {
                "model.embed_tokens.weight": rand(config.vocab_size, h),
                "lm_head.weight": rand(config.vocab_size, h),
                "model.norm.weight": torch.ones(h),
            }
        else:
            p = f"model.layers.{n - 1}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            }  # fmt: skip
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))
        del tensors
        print(f"wrote {name}", file=sys.stderr, flush=True)
    total = sum((folder / f).stat().st_size for f in set(index.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    config.save_pretrained(folder)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def run_artifact(folder: str, out: str) -> dict:
    """In this (fresh) process: ORT loads the artifact, decodes, and one prompt's logits meet torch's."""
    from fxcompress.checker.metrics import compare
    from fxcompress.llm.compress import prompt_inputs
    from fxcompress.llm.folder import load_causal_lm
    from fxcompress.llm.generate import OrtDecoder

    before = rss_gib()
    start = time.perf_counter()
    decoder = OrtDecoder(Path(out) / "model.onnx", provider="cpu")
    load_s, loaded = time.perf_counter() - start, rss_gib()
    prompt = torch.randint(0, decoder.info["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    decoder.generate(prompt, 1)
    t1 = time.perf_counter()
    decoder.generate(prompt, 9)
    t2 = time.perf_counter()
    got = decoder.step(prompt_inputs(decoder.layout, prompt))[0][0]
    del decoder
    model = load_causal_lm(folder)
    with torch.no_grad():
        want = model(input_ids=prompt).logits[0]
    return {
        "ort_load_s": load_s,
        "ort_rss_after_load_gib": loaded - before,
        "prefill_16_s": t1 - t0,
        "decode_tokens_per_s": 8 / max((t2 - t1) - (t1 - t0), 1e-9),
        "logits_cosine": compare([want.numpy()], [got.numpy()])["cosine"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder")
    parser.add_argument("--out", default=None, help="where the artifacts go (default: <folder>-onnx)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--run", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer version of the config: checks the script")
    args = parser.parse_args()
    if args.tiny:
        CONFIG.update(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip
    if args.run:
        print(json.dumps(run_artifact(*args.run)))
        return
    from common import save_table

    if not args.folder:
        parser.error("--folder is required")
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        write_folder(folder)
    fp32 = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    params = fp32 / 4
    rows = []
    for recipe in args.recipes.split(","):
        out = Path(args.out or f"{folder}-onnx") / recipe
        command = [sys.executable, "-m", "fxcompress", "optimize", f"hf:{folder}", "--recipe", RECIPES[recipe],
                   "-o", f"{out}/", "--no-progress"]  # fmt: skip
        print(" ".join(command), file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        build_s = time.perf_counter() - start
        if status:
            raise SystemExit(proc.stderr.read().decode()[-3000:])
        artifact = sum(f.stat().st_size for f in out.glob("model.onnx*"))
        done = subprocess.run(
            [sys.executable, __file__, "--run", str(folder), str(out)], capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        row = {"recipe": RECIPES[recipe], "artifact_bytes": artifact, "build_s": build_s,
               "build_peak_rss_gib": usage.ru_maxrss / 2**20, **measured}  # fmt: skip
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    cells = [
        [f"`{r['recipe']}`", f"{r['artifact_bytes'] / 1e9:.2f} GB", f"{fp32 / r['artifact_bytes']:.2f}x",
         f"{r['build_s'] / 60:.1f} min", f"{r['build_peak_rss_gib']:.2f} GiB", f"{r['ort_rss_after_load_gib']:.2f} GiB",
         f"{r['ort_rss_after_load_gib'] * 2**30 / r['artifact_bytes']:.2f}x", f"{r['decode_tokens_per_s']:.2f}",
         f"{r['logits_cosine']:.5f}"]
        for r in rows
    ]  # fmt: skip
    header = ["recipe", "artifact", "vs fp32", "build", "build peak RSS", "ORT RSS after load", "load RSS / artifact",
              "decode tok/s (b1)", "logits cosine (16 tokens)"]  # fmt: skip
    title = f"A {params / 1e9:.2f}B-parameter Llama-style decoder ({fp32 / 1e9:.1f} GB of fp32 safetensors)"
    save_table("decoder_4b_tiny" if args.tiny else "decoder_4b", title, header, cells, rows)


if __name__ == "__main__":
    main()
