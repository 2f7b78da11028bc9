"""What every benchmark script shares: the environment line and writing one table per model to results/."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Callable, Sequence

import onnxruntime
import torch

from fxcompress.bench import BenchRow, format_rows, rows_to_json
from fxcompress.checker.runtime import cpu_flags

OUT = Path(__file__).parent / "results"


def cpu_isa() -> str:
    """The int8 instruction set this CPU's GEMMs get ("AVX-512 VNNI", "AVX-VNNI", "AVX2, no VNNI"; "" when unknown):
    VNNI or not changes which int8 kernel wins."""
    flags = cpu_flags() or set()
    return (
        "AVX-512 VNNI"
        if "avx512_vnni" in flags
        else "AVX-VNNI"
        if "avx_vnni" in flags
        else "AVX2, no VNNI"
        if "avx2" in flags
        else ""
    )


def cpu_name() -> str:
    """The CPU's model name and its int8 instruction set (:func:`cpu_isa`)."""
    name = ""
    try:
        name = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
    except OSError:
        pass
    name = name or platform.processor() or "unknown CPU"
    isa = cpu_isa()
    return f"{name}, {isa}" if isa else name


def environment(device: str = "", provider: str = "CPUExecutionProvider") -> str:
    """One line naming the date, device, thread count and library versions a result was measured with."""
    device = device or f"{cpu_name()} ({torch.get_num_threads()} threads)"
    return (
        f"Measured {datetime.date.today()} on {device}, onnxruntime {onnxruntime.__version__}, "
        f"torch {torch.__version__}, provider {provider}"
    )


def save_results(tag: str, text: str, data: dict) -> None:
    """Write results/<tag>.md (the table the docs copy) and results/<tag>.json (the same, as data), beside the script
    that runs (benchmarks/results/ or benchmarks/experiments/results/)."""
    out = Path(sys.argv[0]).resolve().parent / "results" if sys.argv and sys.argv[0].endswith(".py") else OUT
    out.mkdir(exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps(data, indent=2))


def save_table(tag: str, title: str, header: Sequence[str], cells: Sequence[Sequence[str]], rows: list) -> None:
    """Print and save results/<tag>.md, one table under ``title`` with the environment line and the command that ran
    (as :func:`write_tables` names it), and results/<tag>.json with the raw ``rows``."""
    env = environment()
    table = [f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |"]
    table += [f"| {' | '.join(row)} |" for row in cells]
    text = f"# {title}\n\n{env}\n\nCommand: `python {_command()}`\n\n" + "\n".join(table) + "\n"
    print(text)
    save_results(tag, text, {"env": env, "rows": rows})


def _command() -> str:
    """This script's path from the repository root, with its flags: rerunnable as written."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    return " ".join([str(script), *sys.argv[1:]])


def write_tables(
    tag: str, title: str, env: str, models: Sequence[str], measure: Callable[[str], list[BenchRow]]
) -> None:
    """Run ``measure(model)`` for each model and write results/<tag>.md (a table per model) and .json."""
    sections, data = [f"# {title}\n\n{env}\n\nCommand: `python {_command()}`\n"], {"env": env}
    for name in models:
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows = measure(name)
        table = format_rows(rows)
        print(f"\n## {name}\n\n{table}\n")
        sections.append(f"## {name}\n\n{table}\n")
        data[name] = rows_to_json(rows)
    save_results(tag, "\n".join(sections), data)
