"""Experiment: can distillation on offline English text recover MiniLM after SVD of its FFN at 50% of their bytes?

Run:  pip install gensim && python benchmarks/experiments/experiment_svd_distill.py [--arms ...]   (writes
      results/svd_distill.md and .json; about 3 hours on 2 CPU cores, of which the hidden-state arm ~35 minutes,
      the sequential one ~40 and the Python-docs one ~65, times measured on 2026-11-23: the same 2-core machine type
      ran it in ~25 on 2026-12-01; a subset of arms writes results/svd_distill_<arms>.md instead: the committed tables
      are svd_distill_factors_all.md, svd_distill_all-hidden-norms.md (both made when every checkpoint restarted
      Adam), svd_distill_sequential-all-hidden-norms-cosine-lr.md and
      svd_distill_all-hidden-norms-on-real-tokens-cosine-lr-Python-docs.md, ~70 minutes). ``--arms --starts plain
      block`` trains nothing and measures the training-free starts alone (svd_distill_starts_plain_block.md, ~20
      minutes): ``block`` adds ``refit=block``, the joint fit of each FFN's two factorized Linears. The arm
      "block refit + ..." runs the 2,400-step recipe from that start (~25 minutes); the "6000 steps" arm the same
      recipe on a schedule 2.5 times as long (~50 minutes), the "1e-4" arm at half the lr. ``--save DIR`` keeps
      each arm's trained state_dict (for experiment_svd_quantize.py).

Data: real English that the gensim wheel ships as test data, disjoint from the 64 evaluation sentences: ~16,700
sentences of a shortened English Wikipedia dump, the ~2,500 sentences of the Lee news corpus and 200 movie-review
snippets (Pang & Lee polarity). gensim is not a dependency of fxcompress; this script is the record of an attempt,
not a supported recipe.

Student: the best compression without training, ``svd:ratio=0.5,aware=output,allocate=global`` on the 12 FFN
Linears, calibrated on 1,024 corpus sentences (the 32 bundled calibration sentences, ~400 real tokens for Linears
with 1,536 inputs, are also shown: the whitened SVD then fits their subspace and generalizes worse, which the
held-out column measures). Arms from that same start, cosine loss on the sentence embedding, Adam, batches of 32:
only the SVD factors train (lr 3e-4); every parameter does (lr 1e-4); every parameter, with the 13 LayerNorm outputs
matched as well (``hidden="norms"``); the same from the sequential refit (``sequential=true``) with lr 2e-4 on a
cosine schedule for 1,000 steps; from the one-shot start, 2,400 steps at lr 2e-4 on a cosine schedule with the
hidden match restricted to real tokens (a Calibration with a token mask) and ~8,600 prose sentences of the Python
standard library's docstrings and reference (``python_docs``) mixed into the training text. Cosine on the
evaluation sentences and on 256 held-out corpus sentences (and 256 held-out docs sentences when an arm uses them)
is measured in torch; the start and the last student of each arm are then quantized (int8 + int4 embeddings), exported
and measured on ORT CPU, which gives the issue's goal in its own terms (whole-model bytes and cosine of the artifact).
"""

from __future__ import annotations

import argparse
import bz2
import copy
import random
import re
import sys
import tempfile
from pathlib import Path

import torch

import fxcompress
from fxcompress.algorithms.distill import DistillOptions, distill_module
from fxcompress.graph.calibration import Calibration
from fxcompress.models import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import environment, save_results

EVERY = 200
# the best recipe: every parameter, hidden norms on real tokens, lr 2e-4 on a cosine schedule, gensim + Python docs
DOCS_RECIPE = dict(steps=2400, lr=2e-4, trainable=None, hidden="norms", schedule="cosine", real_tokens=True, docs=True)
ARMS = {
    "factors": dict(steps=400, lr=3e-4, trainable=lambda name: "_svd_" in name),
    "all": dict(steps=800, lr=1e-4, trainable=None),
    "all + hidden norms": dict(steps=800, lr=1e-4, trainable=None, hidden="norms"),
    "sequential + all + hidden norms + cosine lr": dict(
        steps=1000, lr=2e-4, trainable=None, hidden="norms", schedule="cosine", start="sequential"
    ),
    "all + hidden norms on real tokens + cosine lr, + Python docs": DOCS_RECIPE,
    "block refit + all + hidden norms on real tokens + cosine lr, + Python docs": DOCS_RECIPE | dict(start="block"),
    "all + hidden norms on real tokens + cosine lr, + Python docs, 6000 steps": DOCS_RECIPE
    | dict(steps=6000, every=500),
    "all + hidden norms on real tokens + cosine lr 1e-4, + Python docs": DOCS_RECIPE | dict(lr=1e-4),
}
CALIBRATION, HELD_OUT = 1024, 256  # sentences: the corpus' tail calibrates, its head is held out, the rest trains
FFN = "include=*.intermediate.dense+*.output.dense,exclude=*.attention.*"
RECIPE = f"svd:ratio=0.5,aware=output,allocate=global,probes=8,{FFN}"
STARTS = {"plain": RECIPE, "sequential": RECIPE + ",sequential=true", "block": RECIPE + ",refit=block"}
START_NAMES = {"plain": "", "sequential": ", sequential refit", "block": ", block refit"}
HELD_OUT_COLUMNS = {"held_out": "held-out cosine", "held_out_docs": "held-out docs cosine"}
EMBEDDINGS_INT4 = "int4:kinds=embedding,block=64,clip=true"
QUANTIZE = f"{EMBEDDINGS_INT4},int8"  # the bench_compress recipe's quantization, applied after
_SENTENCE_END = re.compile(r"(?<=[.!?\"])\s+(?=[A-Z\"])")
_CODE = re.compile(r"[`_=(){}\[\]<>|#*\\/@$%^~]|\w\.\w|::|>>>|--")  # identifiers, markup, paths: not prose


def _sentences(text: str) -> set[str]:
    return {s for s in _SENTENCE_END.split(text.strip()) if 5 <= len(s.split()) <= 40 and s[-1] in '.!?"'}


def corpus() -> list[str]:
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        sys.exit("this experiment reads text bundled with gensim: pip install gensim")
    found: set[str] = set()
    with bz2.open(datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")) as f:
        for _, text, _ in extract_pages(f):
            if not text.lstrip().lower().startswith("#redirect"):
                for paragraph in filter_wiki(text).split("\n"):  # lists, tables and templates are not prose
                    if len(paragraph) >= 40 and not paragraph.lstrip().startswith(("*", "|", "!", "{")):
                        found |= _sentences(paragraph)
    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        for doc in f:
            found |= _sentences(doc)
    with open(datapath("pang_lee_polarity.cor"), encoding="utf-8", errors="replace") as f:
        found.update(line.split(" ", 1)[1].strip() for line in f)  # "__label__pos text"
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return sentences


def python_docs() -> list[str]:
    """Prose sentences of the Python standard library's docstrings and language reference (pydoc_data), shuffled:
    computing vocabulary (servers, bugs, memory, queries) that the gensim texts lack and 10 of the 64 evaluation
    sentences use. Sentences with code (identifiers, markup, paths) are left out."""
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    def prose(text: str) -> set[str]:
        found: set[str] = set()
        for paragraph in text.split("\n\n"):
            if not paragraph.startswith(" "):  # indented: code examples, grammar
                found |= {
                    s
                    for s in _sentences(re.sub(r"\s+", " ", paragraph))
                    if s[0].isupper() and s[-1] != '"' and not _CODE.search(s[:-1])
                }
        return found

    found: set[str] = set()
    for text in topics.values():
        found |= prose(text)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found |= prose(ast.get_docstring(node) or "")
    sentences = sorted(found)
    random.Random(0).shuffle(sentences)
    return sentences


def load_student(
    model: torch.nn.Module,
    example: tuple,
    weights: Path | None,
    sentences: list[str],
    dynamic_axes: tuple[int, ...] = (0,),
) -> torch.fx.GraphModule:
    """The one-shot start (same recipe and calibration, hence the same ranks) with the weights ``--save`` wrote (none:
    the caller loads a state); ``dynamic_axes=(0, 1)`` captures it for any sentence length."""
    calibration = Calibration(zoo.tokenize_batches(sentences[-CALIBRATION:], 32), token_mask=1)
    student = fxcompress.optimize(
        model, example, recipe=RECIPE, calibration=calibration, dynamic_axes=dynamic_axes
    ).module
    if weights is not None:
        student.load_state_dict(torch.load(weights), strict=True)  # a different structure (ranks) fails here
    return student


def artifact_report(
    model: torch.nn.Module,
    compressed: fxcompress.CompressedModel,
    example: tuple,
    ev,
    fp32_baseline: bool = False,
    target: str = "cpu",
) -> fxcompress.ParityReport:
    """Export ``compressed`` (default target, not bench_compress's cpu-nbits) and check it against ``model`` on ORT CPU
    on the evaluation sentences."""
    path = Path(tempfile.mkdtemp()) / "student.onnx"
    compressed.export(path, target=target)
    return fxcompress.check(model, path, example, eval_inputs=ev.inputs, fp32_baseline=fp32_baseline, provider="cpu")


def main(arms: list[str], measure_starts: list[str], save: Path | None = None) -> None:
    torch.manual_seed(0)
    model, example, ev = zoo.minilm()
    sentences = corpus()
    held_out = zoo.tokenize_batches(sentences[:HELD_OUT], 32)
    calibration = sentences[-CALIBRATION:]
    train = sentences[HELD_OUT:-CALIBRATION]
    docs = python_docs() if any(ARMS[arm].get("docs") for arm in arms) else []
    mixed = train + docs[HELD_OUT:]
    random.Random(1).shuffle(mixed)
    held_out_sets = {"held_out": held_out} | (
        {"held_out_docs": zoo.tokenize_batches(docs[:HELD_OUT], 32)} if docs else {}
    )
    bundled = fxcompress.optimize(model, example, recipe=RECIPE, calibration=zoo.minilm_calibration())
    calibration_batches = Calibration(zoo.tokenize_batches(calibration, 32), token_mask=1)
    starts = {
        key: fxcompress.optimize(model, example, recipe=STARTS[key], calibration=calibration_batches).module
        for key in dict.fromkeys([ARMS[arm].get("start", "plain") for arm in arms] + measure_starts)
    }

    sets = {"eval": ev.inputs} | held_out_sets
    with torch.no_grad():
        reference = {key: torch.cat([model(*b) for b in batches]) for key, batches in sets.items()}

    def cosines(student: torch.nn.Module) -> dict:
        with torch.no_grad():
            cos = {
                key: torch.nn.functional.cosine_similarity(reference[key], torch.cat([student(*b) for b in batches]))
                for key, batches in sets.items()
            }
        return dict(
            cosine=cos["eval"].mean().item(),
            cosine_min=cos["eval"].min().item(),
            **{key: cos[key].mean().item() for key in held_out_sets},
        )

    def quantized(arm: str, student: torch.nn.Module, steps: int) -> dict:
        rep = artifact_report(model, fxcompress.optimize(student, example, recipe=QUANTIZE), example, ev)
        return dict(
            arm=f"{arm}, then int8 + int4 embeddings (ORT)",
            steps=steps,
            lr=None,
            train_loss=None,
            cosine=rep.metrics["cosine"],
            cosine_min=rep.metrics["cosine_min"],
            bytes=rep.weights["ratio"],
        )

    rows = [
        dict(
            arm="start, 32 bundled calibration sentences", steps=0, lr=None, train_loss=None, **cosines(bundled.module)
        )
    ]
    for key, start in starts.items():
        name = f"start{START_NAMES[key]}, {CALIBRATION} corpus calibration sentences"
        rows += [dict(arm=name, steps=0, lr=None, train_loss=None, **cosines(start)), quantized(name, start, 0)]
    for arm in arms:
        spec = ARMS[arm]
        torch.manual_seed(0)
        student = copy.deepcopy(starts[spec.get("start", "plain")])
        losses: list[float] = []

        def checkpoint(step: int, loss: float) -> None:
            losses.append(loss)
            if step % spec.get("every", EVERY) == 0:
                rows.append(
                    dict(arm=arm, steps=step, lr=spec["lr"], train_loss=sum(losses[-20:]) / 20, **cosines(student))
                )
                print(rows[-1], file=sys.stderr)

        batches = zoo.tokenize_batches(mixed if spec.get("docs") else train, 32)
        if spec.get("real_tokens"):  # the hidden match skips padded positions
            batches = Calibration(batches, token_mask=1)
        options = DistillOptions(
            steps=spec["steps"],
            lr=spec["lr"],
            loss="cosine",
            hidden=spec.get("hidden") or (),
            schedule=spec.get("schedule", "constant"),
        )
        distill_module(student, model, batches, options, trainable=spec["trainable"], on_step=checkpoint)
        if save is not None:  # the trained weights, loadable into the same start, for quantization studies
            save.mkdir(parents=True, exist_ok=True)
            torch.save(student.state_dict(), save / (re.sub(r"\W+", "-", arm) + ".pt"))
        rows.append(quantized(arm, student, spec["steps"]))
        print(rows[-1], file=sys.stderr)
    env = environment()
    command = (
        "python benchmarks/experiments/experiment_svd_distill.py"
        + ("" if arms == list(ARMS) else " --arms" + "".join(f' "{a}"' if " " in a else f" {a}" for a in arms))
        + (" --starts " + " ".join(measure_starts) if measure_starts else "")
    )
    lines = [
        f"# Experiment: SVD 50% of MiniLM's FFN + distillation on offline English text\n\n{env}\n",
        f"Command: `{command}` (compression: `{RECIPE}`; {len(sentences)} "
        f"sentences of Wikipedia, Lee news and movie reviews shipped with gensim: {CALIBRATION} calibrate, "
        f"{HELD_OUT} are held out, {len(train)} train; cosine in torch on the 64 evaluation sentences and on the "
        f"held-out ones; one Adam run per arm, evaluated every "
        f"{' / '.join(str(n) for n in sorted({ARMS[a].get('every', EVERY) for a in arms})) or EVERY} steps"
        + (
            f"; arms marked '+ Python docs' also train on {len(docs) - HELD_OUT} sentences of the Python standard "
            f"library's docstrings and reference, {HELD_OUT} more of which are held out"
            if docs
            else ""
        )
        + ")\n",
        "| start / trains | steps | lr | train loss (last 20: 1 - cos, + hidden relative MSE where matched) | "
        "whole-model bytes (x fp32) | "
        "eval cosine mean | eval worst |" + "".join(f" {HELD_OUT_COLUMNS[key]} |" for key in held_out_sets),
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(held_out_sets),
    ]
    lines += [
        f"| {r['arm']} | {r['steps']} | {'' if r['lr'] is None else r['lr']} | "
        f"{'' if r['train_loss'] is None else format(r['train_loss'], '.4f')} | "
        f"{format(r['bytes'], '.3f') if 'bytes' in r else ''} | {r['cosine']:.4f} | "
        f"{r['cosine_min']:.4f} |" + "".join(f" {format(r[key], '.4f') if key in r else ''} |" for key in held_out_sets)
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    named = arms or ["starts"] + measure_starts
    tag = "svd_distill" if arms == list(ARMS) else "svd_distill_" + "_".join(re.sub(r"\W+", "-", a) for a in named)
    save_results(
        tag,
        text,
        {
            "env": env,
            "recipe": RECIPE,
            "corpus_sentences": len(sentences),
            "calibration_sentences": CALIBRATION,
            "held_out_sentences": HELD_OUT,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms",
        nargs="*",
        choices=list(ARMS),
        default=list(ARMS),
        help="recovery arms to run (default: all; a subset writes results/svd_distill_<arms>.md, none "
        "results/svd_distill_starts_<starts>.md)",
    )
    parser.add_argument(
        "--starts",
        nargs="*",
        choices=list(STARTS),
        default=[],
        help="training-free starts to measure besides those the arms use (e.g. --arms --starts plain block)",
    )
    parser.add_argument("--save", type=Path, help="folder for each arm's trained state_dict (<arm>.pt)")
    args = parser.parse_args()
    main(args.arms, args.starts, args.save)
