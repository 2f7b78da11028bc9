"""``fxcompress optimize | check | bench | list``: the command-line front end.

Exit codes: 0 success, 1 parity failed, 2 bad input (the message says which and what to do: an unknown option, a
model factory or calibration function that raises or does not import, a path that cannot be written), 3 an internal
error (a bug to report: the traceback follows). A CI pipeline can tell a broken script from a failed parity.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fxcompress.errors import FxCompressError, InputError, PassError
from fxcompress.export.targets import TARGETS, target_names

EXIT_OK, EXIT_PARITY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR = 0, 1, 2, 3


def load_factory(spec: str) -> Callable[[], tuple]:
    """``"package.module:function"`` (or a bundled zoo name like ``"digits_cnn"``) -> the factory function.

    Example:
        >>> model, example_inputs, *rest = load_factory("fxcompress.models.zoo:mlp")()
    """
    if ":" not in spec:
        from fxcompress.models.zoo import FACTORIES

        if spec in FACTORIES:
            return FACTORIES[spec]
        raise InputError(f"{spec!r} is neither MODULE:FACTORY nor a bundled model ({', '.join(FACTORIES)})")
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: a module in the current folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, and whatever the module raises while it loads (SyntaxError, ...)
        raise InputError(f"cannot import {module_name!r} from {spec!r}: {_user_error(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(
            f"{module_name} has no callable {attr!r}; MODULE:FACTORY must name a function returning "
            "(model, example_inputs)"
        )
    return factory


def load_calibration(spec: Optional[str], model_spec: str) -> Optional[list]:
    """Calibration batches from ``--calibration MODULE:FUNC``; for a bundled model, its ``zoo.CALIBRATION`` entry.

    Example:
        >>> batches = load_calibration(None, "digits_cnn")   # zoo.digits_calibration()
    """
    if spec is None:
        from fxcompress.models.zoo import CALIBRATION

        return CALIBRATION[model_spec]() if model_spec in CALIBRATION else None
    batches = _run_user(load_factory(spec), f"--calibration {spec}")
    import torch

    if not isinstance(batches, (list, tuple)) or not all(isinstance(b, (list, tuple, torch.Tensor)) for b in batches):
        raise InputError(f"--calibration {spec} must return a list of input tuples, got {type(batches).__name__}")
    return list(batches)


def parse_axes(text: Optional[str], model_spec: str) -> tuple[int, ...]:
    """``--dynamic-axes 0,1`` -> (0, 1); by default a bundled model's ``zoo.DYNAMIC_AXES`` entry, else the batch axis.

    Example:
        >>> parse_axes(None, "minilm"), parse_axes("0", "minilm")
        ((0, 1), (0,))
    """
    if text is None:
        from fxcompress.models.zoo import DYNAMIC_AXES

        return DYNAMIC_AXES.get(model_spec, (0,))
    try:
        return tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise InputError(f"--dynamic-axes takes comma-separated axis numbers (e.g. 0,1), got {text!r}") from None


def _user_error(exc: BaseException) -> str:
    """A user's exception as one line, with where it was raised in their code (the last frame outside fxcompress)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "fxcompress" not in Path(f.filename).parts]
    where = f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError):
        where = f" ({Path(exc.filename or '?').name}, line {exc.lineno})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _run_user(fn: Callable[[], Any], what: str) -> Any:
    """Call a user's factory or calibration function; what it raises becomes an InputError naming it (exit 2)."""
    try:
        return fn()
    except FxCompressError:
        raise
    except Exception as exc:
        raise InputError(f"{what} raised {_user_error(exc)}") from exc


def _writable_file(path: Optional[str], flag: str) -> None:
    """Refuse, before any long work, a file the run could not write at the end."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{flag} {path}: directory {parent} is not writable")


def _call_factory(spec: str):
    made = _run_user(load_factory(spec), spec)
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise InputError(
            f"{spec} must return (model, example_inputs) or (model, example_inputs, EvalData), "
            f"got {type(made).__name__}"
        )
    return made[0], made[1], made[2] if len(made) == 3 else None


def read_target(path: Path) -> str:
    """The export target an artifact's metadata names.

    Example:
        >>> from fxcompress.export.writer import export_onnx
        >>> read_target(export_onnx(torch.nn.Linear(4, 2), (torch.randn(2, 4),), "l.onnx", target="cpu-nbits"))
        'cpu-nbits'
    """
    try:
        import onnx

        from fxcompress.export.writer import read_metadata

        return str(read_metadata(onnx.load(str(path), load_external_data=False)).get("target", "?"))
    except Exception:
        return "?"


def _peak_memory() -> str:
    """This process's peak resident memory (ONNX Runtime sessions run in fresh processes; the parity report gives
    their memory)."""
    import resource

    scale = 2**20 if sys.platform != "darwin" else 2**30  # ru_maxrss: KiB on Linux, bytes on macOS
    return f"peak memory of this run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale:.2f} GiB"


def _check(model, path: Path, example_inputs, eval_data, args, layers: Optional[list] = None, compressed=None) -> int:
    from fxcompress.checker.parity import check

    print(f"checking {path} on ONNX Runtime ...", file=sys.stderr)
    report = check(
        model,
        path,
        example_inputs,
        recipe=getattr(args, "recipe", None),
        compressed=compressed,
        trust_metadata=getattr(args, "trust_metadata", False),
        eval_inputs=eval_data.inputs if eval_data else None,
        labels=eval_data.labels if eval_data else None,
        classifier=eval_data.classifier if eval_data else None,
        provider=args.provider,
        fp32_baseline=not args.no_baseline,
        localize=getattr(args, "localize", False),
    )
    print(report.to_text())
    if args.json:
        data = json.loads(report.to_json())
        if layers is not None:
            data["layers"] = layers
        Path(args.json).write_text(json.dumps(data, indent=2))
    return EXIT_OK if report.passed else EXIT_PARITY_FAILED


def cmd_optimize(args: argparse.Namespace) -> int:
    """``fxcompress optimize``: compress, export, and check if asked; the exit status.

    Example:
        >>> main(["optimize", "mlp", "--recipe", "int8", "-o", "mlp.onnx", "--check", "--no-baseline"])
        ... # doctest: +ELLIPSIS
        layer  kind    pass  action  before      after      weight SQNR
        ...
        wrote mlp.onnx (target ...)
        parity PASSED: mlp.onnx
        ...
        0
    """
    from fxcompress.api import optimize
    from fxcompress.llm.folder import is_folder_spec

    if is_folder_spec(args.model):
        return _optimize_folder(args)
    _writable_file(args.output, "-o")
    _writable_file(args.json, "--json")
    model, example_inputs, eval_data = _call_factory(args.model)
    target = args.target
    if args.recipe == "auto":
        cm, target = _planned(model, example_inputs, eval_data, args)
    else:
        cm = optimize(
            model,
            example_inputs,
            recipe=args.recipe,
            progress=False if args.no_progress else None,
            calibration=load_calibration(args.calibration, args.model),
            dynamic_axes=parse_axes(args.dynamic_axes, args.model),
            canonicalize=not args.no_canonicalize,
        )
    print(cm.summary())
    path = cm.export(args.output, target=target)
    written = read_target(path)
    print(f"\nwrote {path} (target {written}{' (' + target + ')' if target != written else ''})")
    layers = [dataclasses.asdict(r) for r in cm.records]
    if not args.check:
        if args.json:
            Path(args.json).write_text(json.dumps({"layers": layers}, indent=2))
        return EXIT_OK
    return _check(model, path, example_inputs, eval_data, args, layers, compressed=cm)


def _optimize_folder(args: argparse.Namespace) -> int:
    """``fxcompress optimize hf:DIR``: a local Hugging Face causal LM compressed into a KV-cache decoder; ``-o`` may
    be a folder (``model.onnx`` is written in it). ``--check`` runs the decoder check (greedy tokens, teacher-forced
    logits, perplexity with ``--text``)."""
    import time

    from fxcompress.llm.compress import optimize_decoder
    from fxcompress.llm.folder import PREFIX, load_causal_lm

    if args.recipe == "auto":
        raise InputError("--recipe auto does not plan decoders yet; give a recipe such as int8 or int4:algo=gptq")
    output = Path(args.output)
    if args.output.endswith(("/", os.sep)) or output.is_dir():
        output.mkdir(parents=True, exist_ok=True)
        output = output / "model.onnx"
    _writable_file(str(output), "-o")
    _writable_file(args.json, "--json")
    start = time.monotonic()

    def say(line: str) -> None:
        if not args.no_progress:
            print(f"[{time.monotonic() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    folder = args.model[len(PREFIX) :]
    say(f"loading {folder}")
    model = load_causal_lm(folder)
    text = _folder_text(folder, args.text) if args.text else None
    calibration = load_calibration(args.calibration, args.model) if args.calibration else None
    if calibration is None and text is not None:
        calibration = [text[i : i + 128][None] for i in range(0, min(text.numel(), 8 * 128) - 127, 128)] or None
    say(f"compressing {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    cm = optimize_decoder(model, args.recipe, calibration=calibration, progress=False if args.no_progress else None)
    print(cm.summary())
    say("exporting")
    # weights beside the model (model.onnx.data), written a tensor at a time: the peak stays near the model's own
    path = cm.export(output, target=args.target, external_data=True)
    print(f"\nwrote {path} and {path.name}.data (target {read_target(path)})")
    say("written")
    if not args.check:
        return EXIT_OK
    say("checking on ONNX Runtime")
    return _check_folder(args.model, path, args, text)


def _check_folder(spec: str, path: Path, args: argparse.Namespace, text=None) -> int:
    """The decoder check of ``path`` against the causal LM of ``hf:DIR``; the exit status."""
    import torch

    from fxcompress.llm.check import check_decoder
    from fxcompress.llm.folder import PREFIX, load_causal_lm

    folder = spec[len(PREFIX) :]
    model = load_causal_lm(folder)
    if text is None and getattr(args, "text", None):
        text = _folder_text(folder, args.text)
    vocab = int(model.config.vocab_size)
    prompts = text[None, :16] if text is not None else torch.randint(0, vocab, (2, 16), generator=torch.manual_seed(0))
    new_tokens = getattr(args, "new_tokens", 32)
    report = check_decoder(model, path, prompts, max_new_tokens=new_tokens, text=text, provider=args.provider)
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return EXIT_OK if report.passed else EXIT_PARITY_FAILED


def _folder_text(folder: str, path: str):
    """The token ids of the text file ``path``, by the folder's tokenizer."""
    import torch

    if not Path(path).is_file():
        raise InputError(f"--text {path}: no such file")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise InputError(f"--text needs the model's tokenizer, and {folder} has none that loads ({exc})") from exc
    return torch.tensor(tokenizer(Path(path).read_text())["input_ids"], dtype=torch.long)


def _planned(model, example_inputs, eval_data, args: argparse.Namespace):
    """``--recipe auto``: the planner's choice for ``--target-size`` and ``--min-cosine``; its candidates are printed
    and saved beside the artifact (``<output>.plan.json``, ``.svg``, ``.png`` with matplotlib, ``.html``). Returns
    the compressed model and the target its numbers were measured on."""
    from fxcompress.planner import plan

    def say(line: str) -> None:
        if not args.no_progress:
            print(line, file=sys.stderr, flush=True)

    chosen = plan(
        model,
        example_inputs,
        size=args.target_size,
        min_cosine=args.min_cosine,
        calibration=load_calibration(args.calibration, args.model),
        eval_inputs=eval_data.inputs if eval_data else None,
        target=args.target,
        dynamic_axes=parse_axes(args.dynamic_axes, args.model),
        labels=eval_data.labels if eval_data is not None and args.max_accuracy_drop is not None else None,
        max_accuracy_drop=args.max_accuracy_drop,
        max_latency=args.max_latency,
        provider=args.provider,
        allow_training=args.allow_training,
        progress=say,
    )
    for c in chosen.candidates:
        cosine = "not run (too large)" if c.cosine is None else f"cosine {c.cosine:.5f}"
        print(f"  candidate {c.recipe}: {c.ratio:.3f} of fp32, {cosine}, {c.seconds:.0f} s")
    saved = chosen.save(Path(args.output).with_suffix(".plan"))
    print(f"plan: {chosen.recipe} on target {chosen.target} ({chosen.seconds:.0f} s); trade-off chart: {saved[-1]}\n")
    return chosen.compressed, chosen.target  # export for the lowering its numbers were measured on


def cmd_check(args: argparse.Namespace) -> int:
    """``fxcompress check``: the parity report of an artifact; 1 when parity fails.

    Example:
        >>> main(["optimize", "mlp", "-o", "mlp.onnx", "--no-progress"])  # doctest: +ELLIPSIS
        layer ...
        0
        >>> main(["check", "mlp", "mlp.onnx", "--no-baseline", "--json", "report.json"])  # doctest: +ELLIPSIS
        parity PASSED: mlp.onnx
        ...
        0
    """
    from fxcompress.llm.folder import is_folder_spec

    _writable_file(args.json, "--json")
    if not Path(args.onnx).is_file():
        raise InputError(f"no such file: {args.onnx}")
    if is_folder_spec(args.model):
        return _check_folder(args.model, Path(args.onnx), args)
    model, example_inputs, eval_data = _call_factory(args.model)
    return _check(model, Path(args.onnx), example_inputs, eval_data, args)


def cmd_bench(args: argparse.Namespace) -> int:
    """``fxcompress bench``: fp32 vs fxcompress vs ORT's quantizers, one table.

    Example:
        >>> main(["bench", "mlp", "--targets", "cpu", "--batches", "1", "--repeat", "2", "--no-ort"])
        ... # doctest: +ELLIPSIS
        | variant | provider | file | weights (x fp32) | ...
        | --- | ...
        | fp32 | CPU | ...
        | fxcompress int8 [cpu] | CPU | ...
        0
    """
    from fxcompress.bench import format_rows, rows_to_json, run_benchmark

    _writable_file(args.json, "--json")
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise InputError(f"--targets names unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise InputError(f"--batches takes comma-separated batch sizes (e.g. 1,32), got {args.batches!r}") from None
    rows = run_benchmark(
        load_factory(args.model),
        recipes=args.recipe,
        targets=targets,
        batches=batches,
        ort_quantize_dynamic=not args.no_ort,
        provider=args.provider,
        repeat=args.repeat,
        calibration=load_calibration(args.calibration, args.model),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows_to_json(rows), indent=2))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``fxcompress list``: the passes and the bundled models.

    Example:
        >>> main(["list"])  # doctest: +ELLIPSIS
        passes (recipe: name:option=value,...; ...
        ...
        export targets (--target):
          cpu             DynamicQuantizeMatMul with uint8 weights...
        ...
        0
    """
    from fxcompress.models.zoo import FACTORIES
    from fxcompress.recipe.registry import available_passes, pass_help

    print(
        "passes (recipe: name:option=value,...; every pass also takes include= and exclude=, layer-name patterns "
        "joined by +); options show their defaults:"
    )
    for name in available_passes():
        summary, options = pass_help(name)
        print(f"  {name:<13} {summary}")
        if options:
            print(f"  {'':<13} {options}")
    print("export targets (--target):")
    for target in TARGETS.values():
        print(f"  {target.name:<15} {target.summary}")
    print("bundled models:", ", ".join(FACTORIES))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``fxcompress`` argument parser (subcommands optimize, check, bench, list).

    Example:
        >>> build_parser().parse_args(["list"]).command
        'list'
    """
    p = argparse.ArgumentParser(
        prog="fxcompress", description="Compress PyTorch models, export ONNX, prove parity on ONNX Runtime."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--provider", default="auto", help="auto (CUDA EP when available, else CPU), cpu or cuda")
        sp.add_argument("--json", help="also write the report as JSON to this file")
        sp.add_argument("--no-baseline", action="store_true", help="skip exporting/measuring the fp32 baseline")

    o = sub.add_parser("optimize", help="compress MODULE:FACTORY and write ONNX")
    o.add_argument(
        "model",
        help="MODULE:FACTORY returning (model, example_inputs), a bundled model name, or hf:DIR (a local Hugging Face "
        "causal LM folder: exported as a KV-cache decoder)",
    )
    o.add_argument(
        "--recipe",
        default="int8",
        help="passes, e.g. 'fold_bn,int8' (see `fxcompress list`), or 'auto' to plan for --target-size/--min-cosine",
    )
    o.add_argument("--target-size", type=float, default=None, help="with --recipe auto: fraction of the fp32 bytes")
    o.add_argument("--min-cosine", type=float, default=0.99, help="with --recipe auto: the floor on ORT (0.99)")
    o.add_argument(
        "--max-accuracy-drop", type=float, default=None,
        help="with --recipe auto: a floor on the accuracy drop in points (the model's labelled evaluation data)",
    )  # fmt: skip
    o.add_argument(
        "--max-latency", type=float, default=None,
        help="with --recipe auto: a speed target, as a fraction of the fp32 export's latency on --provider",
    )  # fmt: skip
    o.add_argument(
        "--allow-training", action="store_true",
        help="with --recipe auto: let the planner prune and recover by distillation on the calibration batches",
    )  # fmt: skip
    o.add_argument("-o", "--output", required=True, help="ONNX file to write (for hf:DIR, a folder is fine)")
    o.add_argument(
        "--text",
        help="hf:DIR: a text file (tokenized by the folder's tokenizer) to calibrate and to "
        "measure perplexity on with --check",
    )
    o.add_argument("--new-tokens", type=int, default=32, help="hf:DIR --check: greedy tokens to compare (32)")
    o.add_argument(
        "--target",
        default="auto",
        choices=["auto", *target_names()],
        help="ONNX lowering of compressed layers (see `fxcompress list`); auto: the fastest for this machine",
    )
    o.add_argument(
        "--dynamic-axes",
        help="input axes that may change size, e.g. 0,1 for batch and sequence (default: "
        "0; a bundled model's own, e.g. 0,1 for minilm); empty: fixed shapes",
    )
    o.add_argument("--check", action="store_true", help="run the parity checker on the result (exit 1 if it fails)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument(
        "--no-canonicalize", action="store_true", help="skip the exact rewrites run by default (BatchNorm folding)"
    )
    o.add_argument(
        "--calibration",
        help="MODULE:FUNC returning a list of input tuples (bundled models have default calibration batches)",
    )
    common(o)
    o.set_defaults(func=cmd_optimize)

    c = sub.add_parser("check", help="check an ONNX artifact against MODULE:FACTORY's model (or hf:DIR's decoder)")
    c.add_argument("model")
    c.add_argument("--text", help="hf:DIR: a text file to measure perplexity on (tokenized by the folder's tokenizer)")
    c.add_argument("--new-tokens", type=int, default=32, help="hf:DIR: greedy tokens to compare (32)")
    c.add_argument("onnx")
    c.add_argument(
        "--recipe", help="the recipe that made the artifact: its floors apply (default: the library's, those of 'int8')"
    )
    c.add_argument(
        "--trust-metadata",
        action="store_true",
        help="hold the artifact to the floors its own metadata states (not done unless asked)",
    )
    c.add_argument(
        "--localize",
        action="store_true",
        help="compare every compressed layer's output with the model's and name the layers where the error jumps",
    )
    common(c)
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="fp32 vs fxcompress vs ORT quantize_dynamic, one table")
    b.add_argument("model")
    b.add_argument("--recipe", action="append", default=None, help="repeatable; default int8")
    b.add_argument("--targets", default=",".join(target_names()), help="comma-separated export targets")
    b.add_argument("--batches", default="1,32")
    b.add_argument("--repeat", type=int, default=20)
    b.add_argument("--no-ort", action="store_true", help="leave out ORT's quantize_dynamic")
    b.add_argument("--provider", default="auto")
    b.add_argument("--calibration", help="MODULE:FUNC returning a list of input tuples")
    b.add_argument("--json")
    b.set_defaults(func=cmd_bench)

    sub.add_parser("list", help="available passes and bundled models").set_defaults(func=cmd_list)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fxcompress`` command line on ``argv``; 0 on success, 1 when parity fails, 2 on bad input, 3 on an
    internal error.

    Example:
        >>> main(["optimize", "mlp", "-o", "mlp.onnx", "--no-progress"])  # doctest: +ELLIPSIS
        layer ...
        module bytes 332.04 KiB -> 86.58 KiB (3.84x smaller)
        <BLANKLINE>
        wrote mlp.onnx (target ...)
        0
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "recipe", None) is None and args.command == "bench":
        args.recipe = ["int8"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        if args.command in ("optimize", "check"):
            print(_peak_memory(), file=sys.stderr)
        return code
    except FxCompressError as exc:
        hint = ""
        if "calibration=[" in str(exc) and args.command in ("optimize", "bench"):  # the API's wording, said for the CLI
            hint = "; on the command line: --calibration MODULE:FUNC, a function returning a list of input tuples"
        if isinstance(exc, PassError):  # a pass failed on a model it accepted: ours to fix
            print(f"fxcompress {args.command}: internal error: {exc}", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
            return EXIT_INTERNAL_ERROR
        print(f"fxcompress {args.command}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fxcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"fxcompress {args.command}: internal error ({type(exc).__name__}: {exc}); please report it with the "
            "traceback below",
            file=sys.stderr,
        )
        traceback.print_exc()
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
