"""Pruning, factorization and distillation (issue 4), measured on ONNX Runtime's CPU EP where an artifact exists.

Run:  python benchmarks/bench_compress.py          (writes benchmarks/results/compress.md and .json)

* digits CNN (899 held-out digits, real labels): 50% channel pruning (L2 / activation importance), recovery by
  300 steps of KL distillation on the training split, then int8; Torch-Pruning (MagnitudePruner, L2, same ratio,
  same recovery budget and data) on the same trained CNN, side by side.
* ResNet-mini and the tiny transformer: structure after pruning (bytes, what was refused), ORT vs torch max |diff|.
* MiniLM: SVD of the 12 FFN Linears at 50% of their bytes, plain vs activation-aware vs output-aware (global
  ranks), then int8 (+ int4 embeddings);
  attention-head and FFN-neuron pruning (no recovery).
"""

from __future__ import annotations

import copy
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import environment, save_results

import fxcompress
from fxcompress.algorithms.distill import DistillOptions, distill_module
from fxcompress.models import zoo

RECOVERY = dict(steps=300, lr=1e-3, loss="kl")


def _ort_outputs(path: Path, batches: list[tuple]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), b)})[0] for b in batches]


def _accuracy(outputs: list, labels: torch.Tensor) -> float:
    pred = np.concatenate([np.asarray(o) for o in outputs]).argmax(-1)
    return 100.0 * float((pred == labels.numpy()).mean())


def _params(module: torch.nn.Module) -> int:
    """Stored weight elements (float or quantized codes), each tensor counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.numel() > 1 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def digits(tmp: Path) -> list[dict]:
    model, example, ev = zoo.digits_cnn()
    x_train = zoo.digits_data()[0]
    train = [(x_train[i : i + 64],) for i in range(0, len(x_train), 64)]
    base_params = _params(model)
    rows = []
    with torch.no_grad():
        rows.append(
            dict(variant="fp32", params=1.0, bytes=1.0, accuracy=_accuracy([model(*b) for b in ev.inputs], ev.labels))
        )
    distill = ",".join(f"{k}={v}" for k, v in RECOVERY.items())
    for label, recipe in [
        ("fxcompress prune 50% (L2), no recovery", "fold_bn,prune:ratio=0.5"),
        ("fxcompress prune 50% (L2) + distill", f"fold_bn,prune:ratio=0.5,distill:{distill}"),
        (
            "fxcompress prune 50% (activation) + distill",
            f"fold_bn,prune:ratio=0.5,importance=activation,distill:{distill}",
        ),
        (
            "fxcompress prune 50% (activation) + distill + int8",
            f"fold_bn,prune:ratio=0.5,importance=activation,distill:{distill},int8",
        ),
        (
            "fxcompress prune 50% (activation) + distill + int8_static",
            f"fold_bn,prune:ratio=0.5,importance=activation,distill:{distill},int8_static",
        ),
    ]:
        print(label, file=sys.stderr)
        cm = fxcompress.optimize(model, example, recipe=recipe, calibration=train)
        path = cm.export(tmp / "d.onnx", target="cpu")
        rows.append(
            dict(
                variant=label,
                recipe=recipe,
                params=_params(cm.module) / base_params,
                bytes=cm.bytes_after / cm.bytes_before,
                onnx_bytes=path.stat().st_size,
                accuracy=_accuracy(_ort_outputs(path, ev.inputs), ev.labels),
            )
        )
    rows.append(_torch_pruning(model, example, ev, train, base_params))
    return rows


def _torch_pruning(model, example, ev, train, base_params) -> dict:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[pruned.fc2],
    )
    pruner.step()
    distill_module(pruned, model, train, DistillOptions(**RECOVERY))
    with torch.no_grad():
        acc = _accuracy([pruned(*b) for b in ev.inputs], ev.labels)
    return dict(
        variant=f"Torch-Pruning {tp.__version__} MagnitudePruner 50% (L2) + same distill",
        params=_params(pruned) / base_params,
        bytes=_params(pruned) / base_params,
        accuracy=acc,
        note="accuracy in torch",
    )


def structure(tmp: Path) -> list[dict]:
    rows = []
    for name in ("resnet_mini", "tiny_transformer"):
        model, example = zoo.FACTORIES[name]()[:2]
        for ratio in (0.3, 0.5):
            cm = fxcompress.optimize(model, example, recipe=f"fold_bn,prune:ratio={ratio}")
            path = cm.export(tmp / "s.onnx")
            diff = float(np.abs(_ort_outputs(path, [example])[0] - cm(*example).numpy()).max())
            pruned = [r.layer for r in cm.records if r.action == "pruned"]
            # one line per kind of refusal: node names like add_3 (add.Tensor) collapse to add (add.Tensor)
            refused = sorted(
                {
                    re.sub(r"\b([a-z]+)_\d+ \(", r"\1 (", r.reason)
                    for r in cm.records
                    if r.pass_name == "prune" and r.skipped
                }
            )
            rows.append(
                dict(
                    model=name,
                    ratio=ratio,
                    bytes=cm.bytes_after / cm.bytes_before,
                    pruned_layers=len(pruned),
                    refused=refused,
                    ort_vs_torch_max_abs=diff,
                )
            )
    return rows


def minilm(tmp: Path) -> list[dict]:
    model, example, ev = zoo.minilm()
    calibration = zoo.minilm_calibration()
    ffn = "include=*.intermediate.dense+*.output.dense,exclude=*.attention.*"
    emb4 = "int4:kinds=embedding,block=64,clip=true"
    rows = []
    for label, recipe in [
        ("SVD 50% FFN, plain", f"svd:ratio=0.5,{ffn}"),
        ("SVD 50% FFN, activation-aware", f"svd:ratio=0.5,aware=true,{ffn}"),
        ("SVD 50% FFN, aware + int8", f"svd:ratio=0.5,aware=true,{ffn},int8"),
        ("SVD 50% FFN, aware + int8 + int4 embeddings", f"svd:ratio=0.5,aware=true,{ffn},{emb4},int8"),
        ("SVD 50% FFN, output-aware", f"svd:ratio=0.5,aware=output,{ffn}"),
        ("SVD 50% FFN, output-aware, global ranks", f"svd:ratio=0.5,aware=output,allocate=global,{ffn}"),
        (
            "SVD 50% FFN, output-aware, global ranks + int8 + int4 embeddings",
            f"svd:ratio=0.5,aware=output,allocate=global,{ffn},{emb4},int8",
        ),
        ("SVD 75% FFN, plain", f"svd:ratio=0.75,{ffn}"),
        ("SVD 75% FFN, activation-aware", f"svd:ratio=0.75,aware=true,{ffn}"),
        ("SVD 75% FFN, aware + int8 + int4 embeddings", f"svd:ratio=0.75,aware=true,{ffn},{emb4},int8"),
        (
            "prune 25% of the heads (3 of 12 per layer), activation importance",
            "prune:ratio=0.25,importance=activation,include=*.attention.self.*",
        ),
        ("prune 25% of the heads and 25% of the FFN neurons", "prune:ratio=0.25,importance=activation"),
    ]:
        print(label, file=sys.stderr)
        cm = fxcompress.optimize(model, example, recipe=recipe, calibration=calibration)
        path = cm.export(tmp / "m.onnx", target="cpu-nbits")
        rep = fxcompress.check(model, path, example, eval_inputs=ev.inputs, fp32_baseline=False, provider="cpu")
        rows.append(
            dict(
                variant=label,
                recipe=recipe,
                bytes=rep.weights["ratio"],
                cosine=rep.metrics["cosine"],
                cosine_min=rep.metrics["cosine_min"],
            )
        )
    return rows


def main() -> None:
    env = environment()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = {"env": env, "digits": digits(tmp), "structure": structure(tmp), "minilm": minilm(tmp)}
    lines = [
        f"# Pruning, factorization, distillation\n\n{env}\n\nCommand: `python benchmarks/bench_compress.py`\n",
        "## digits CNN: 50% channel pruning, recovery, int8; Torch-Pruning on the same model and budget\n",
        f"Recovery = {RECOVERY['steps']} Adam steps (lr {RECOVERY['lr']}, {RECOVERY['loss']} on logits) "
        "on the 898 training digits. "
        "Accuracy on the 899 held-out digits, on ORT CPU for fxcompress artifacts.\n",
        "| variant | weight elements (x fp32) | bytes (x fp32) | accuracy % | drop pp |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = data["digits"][0]["accuracy"]
    lines += [
        f"| {r['variant']} | {r['params']:.3f} | {r['bytes']:.3f} | {r['accuracy']:.2f} | {base - r['accuracy']:.2f} |"
        for r in data["digits"]
    ]
    lines += [
        "\n## Pruning structure (fold_bn,prune) on ResNet-mini and the tiny transformer\n",
        "| model | ratio | bytes (x fp32) | pruned layers | refused because | ORT vs torch max abs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['model']} | {r['ratio']} | {r['bytes']:.3f} | {r['pruned_layers']} | {'; '.join(r['refused'])} | "
        f"{r['ort_vs_torch_max_abs']:.2e} |"
        for r in data["structure"]
    ]
    lines += [
        "\n## MiniLM: SVD of the FFN Linears, head pruning (64 real sentences, ORT CPU, cpu-nbits export)\n",
        "| variant | whole-model bytes (x fp32) | cosine mean | worst |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['variant']} | {r['bytes']:.3f} | {r['cosine']:.4f} | {r['cosine_min']:.4f} |" for r in data["minilm"]
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("compress", text, data)


if __name__ == "__main__":
    main()
