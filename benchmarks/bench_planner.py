"""The planner on all-MiniLM-L6-v2: a size and a cosine floor, no hand-written recipe, against the hand-tuned recipes.

Run:  python benchmarks/bench_planner.py        (writes benchmarks/results/planner_minilm.md/.json and the charts)
Each row is one `fxcompress.planner.plan(model, x, size=..., min_cosine=..., calibration=...)` call on 2 cores: the
recipe it chose, its bytes and cosine on ONNX Runtime (target auto; 64 sentences of the bundled text, 32 tokens), how
many candidates it measured and its wall time. The hand-tuned reference: `int4:algo=gptq,budget=0.15` with int4
embeddings, 0.145 at cosine 0.985 (benchmarks/results/int4_minilm.md).
"""

from __future__ import annotations

import argparse
import sys
import time

from common import OUT as RESULTS
from common import save_table

from fxcompress.models import zoo
from fxcompress.planner import PlanError, plan

GOALS = ((0.25, 0.999), (0.15, 0.985), (0.12, 0.97))


def digits() -> None:
    """The digits CNN goal: 12x smaller at <= 0.5 pp accuracy drop, the planner alone (pruning and distillation
    allowed, on the 4 calibration batches of training digits; accuracy on the 899 held-out digits, on ORT)."""
    model, example, ev = zoo.digits_cnn()
    start = time.perf_counter()
    p = plan(
        model, example, size=1 / 12, min_cosine=0.9, calibration=zoo.digits_calibration(), eval_inputs=ev.inputs,
        labels=ev.labels, max_accuracy_drop=0.5, allow_training=True,
        progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
    )  # fmt: skip
    p.save(RESULTS / "planner_digits")
    cells = [
        [f"`{c.recipe}`", f"{c.ratio:.4f} ({1 / c.ratio:.1f}x)", "" if c.cosine is None else f"{c.cosine:.5f}",
         "" if c.accuracy_drop_pp is None else f"{c.accuracy_drop_pp:.2f}", "yes" if c.fits else "no",
         "chosen" if c is p.chosen else ("holds" if c.holds else ""), f"{c.seconds:.1f}"]
        for c in p.candidates
    ]  # fmt: skip
    header = ["candidate", "bytes (x fp32)", "cosine on ORT", "accuracy drop (pp)", "fits", "", "s"]
    title = f"The planner on the digits CNN: 1/12 of the bytes at <= 0.5 pp, {time.perf_counter() - start:.0f} s"
    save_table("planner_digits", title, header, cells, [p.to_dict()])


def latency() -> None:
    """The latency goal: the 84M MLP and MiniLM at <= 0.5x the fp32 export's batch-1 latency on the CPU, the most
    accurate candidate the planner finds, then that recipe beside ORT quantize_dynamic in one benchmark run (fp32,
    the plan, ORT: same process, same inputs). The export target is the one `auto` picks for this CPU (`cpu-vnni`
    with VNNI: int8 weights, as ORT's quantize_dynamic writes them; `cpu` without)."""
    from fxcompress.bench import format_rows, rows_to_json, run_benchmark
    from fxcompress.export.targets import auto_target

    target = auto_target()[0].name

    sections, data = [], {}
    cases = {
        "mlp84m": (zoo.big_mlp, zoo.big_mlp_calibration(), (0,)),
        "minilm": (zoo.minilm, zoo.minilm_calibration(), (0, 1)),
    }
    for name, (factory, calibration, axes) in cases.items():
        made = factory()
        start = time.perf_counter()
        try:
            p = plan(
                made[0], made[1], max_latency=0.5, min_cosine=0.9, calibration=calibration, target=target,
                provider="cpu", dynamic_axes=axes,
                progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
            )  # fmt: skip
        except PlanError as exc:
            timed = [c for c in exc.candidates if c.latency_ratio is not None]
            fastest = min(timed, key=lambda c: c.latency_ratio).recipe.split("  #")[0] if timed else None
            text = f"## {name}\n\nnot reached in {time.perf_counter() - start:.0f} s: {exc}\n"
            rows = []
            if fastest:  # what the planner got closest with, beside ORT's quantizer all the same
                rows = run_benchmark(factory, recipes=(fastest,), targets=(target,), batches=(1,),
                                     calibration=calibration, provider="cpu")  # fmt: skip
                text += f"\nThe fastest candidate, `{fastest}`, beside ORT quantize_dynamic:\n\n{format_rows(rows)}\n"
            sections.append(text)
            data[name] = {"error": str(exc), "rows": rows_to_json(rows)}
            continue
        seconds = time.perf_counter() - start
        recipe = p.chosen.recipe.split("  #")[0]
        rows = run_benchmark(factory, recipes=(recipe,), targets=(target,), batches=(1,), calibration=calibration,
                             provider="cpu")  # fmt: skip
        tried = "; ".join(
            f"`{c.recipe}` {c.latency_ratio:.2f}x, cosine {c.cosine:.4f}" for c in p.candidates if c.latency_ratio
        )
        sections.append(
            f"## {name}\n\nplanned in {seconds:.0f} s: `{recipe}` (the planner's own timing: "
            f"{p.chosen.latency_ratio:.2f}x fp32). Candidates timed: {tried}.\n\n{format_rows(rows)}\n"
        )
        data[name] = {"plan": p.to_dict(), "rows": rows_to_json(rows)}
    from common import _command, environment, save_results

    text = f"# The planner with a latency target: <= 0.5x fp32 at batch 1, target {target}\n\n{environment()}\n\n"
    text += f"Command: `python {_command()}`\n\n" + "\n".join(sections)
    print(text)
    save_results("planner_latency", text, data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--goals", default=";".join(f"{s},{c}" for s, c in GOALS), help="size,cosine;size,cosine")
    ap.add_argument("--digits", action="store_true", help="the digits CNN goal instead of MiniLM's")
    ap.add_argument("--latency", action="store_true", help="the latency goal (84M MLP and MiniLM) instead")
    args = ap.parse_args()
    if args.digits:
        digits()
        return
    if args.latency:
        latency()
        return
    model, example, ev = zoo.minilm()
    calibration = zoo.minilm_calibration()
    rows = []
    for goal in args.goals.split(";"):
        size, floor = (float(v) for v in goal.split(","))
        start = time.perf_counter()
        print(f"planning size {size} at cosine >= {floor} ...", file=sys.stderr, flush=True)
        try:
            p = plan(
                model,
                example,
                size=size,
                min_cosine=floor,
                calibration=calibration,
                eval_inputs=ev.inputs,
                dynamic_axes=(0, 1),
                progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
            )
        except PlanError as e:
            rows.append(dict(size=size, floor=floor, error=str(e), seconds=time.perf_counter() - start))
            continue
        p.save(RESULTS / f"planner_minilm_{size}")
        rows.append(
            dict(
                size=size,
                floor=floor,
                recipe=p.recipe,
                ratio=p.chosen.ratio,
                cosine=p.chosen.cosine,
                candidates=len(p.candidates),
                seconds=p.seconds,
            )
        )
    cells = [
        [str(r["size"]), str(r["floor"]), f"not reached: {r['error']}", "", "", "", f"{r['seconds']:.0f}"]
        if "error" in r
        else [
            str(r["size"]),
            str(r["floor"]),
            f"`{r['recipe']}`",
            f"{r['ratio']:.3f}",
            f"{r['cosine']:.5f}",
            str(r["candidates"]),
            f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]
    header = ["size goal", "cosine floor", "chosen recipe", "bytes (x fp32)", "cosine on ORT", "candidates", "wall s"]
    save_table("planner_minilm", "The planner on MiniLM: size and cosine floor in, recipe out", header, cells, rows)


if __name__ == "__main__":
    main()
