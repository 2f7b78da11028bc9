"""Every ``>>>`` example in the library's docstrings runs, and prints what it says it prints.

The examples are found in the modules as installed (``fxcompress.passes.int8``, not ``passes.int8``: importing a pass
module twice would register its pass twice), and run in a scratch folder with a few names every example may use: a
small ``model`` and its input ``x``, its captured graph ``gm``, its ``sites`` and the first ``site``, ``calibration``
batches, and (for the examples that read them) ``model.onnx``, the int8 artifact of ``model``, and ``decoder.onnx``,
the float KV-cache decoder of a tiny Llama ``lm``.
"""

from __future__ import annotations

import doctest
import importlib
import json
import pkgutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
import fxcompress.models
import fxcompress.passes

PACKAGES = (fxcompress, fxcompress.passes, fxcompress.models)
SKIP = {"fxcompress.__main__"}  # running it runs the CLI


def _modules() -> list[str]:
    names = set()
    for package in PACKAGES:
        names.add(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.add(info.name)
    return sorted(names - SKIP)


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module, name, module=module) if t.examples]
    return sorted(tests, key=lambda t: t.name)


def _namespace() -> dict:
    from fxcompress.graph.sites import find_sites
    from fxcompress.models import zoo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    gm = fx.symbolic_trace(model)
    sites = find_sites(gm)[0]
    return dict(
        torch=torch,
        nn=nn,
        F=F,
        fx=fx,
        np=np,
        onnx=onnx,
        json=json,
        Path=Path,
        fxcompress=fxcompress,
        zoo=zoo,
        find_sites=find_sites,
        model=model,
        x=torch.randn(4, 64),
        gm=gm,
        sites=sites,
        site=sites[0],
        calibration=[(torch.randn(16, 64),) for _ in range(4)],
    )


EXAMPLES = _examples()


def test_the_library_has_examples():
    assert len(EXAMPLES) >= 100


@pytest.mark.parametrize("example", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example_runs(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    if any("model.onnx" in e.source for e in example.examples):
        fxcompress.optimize(namespace["model"], namespace["x"], recipe="int8").export("model.onnx", target="cpu")
    if any("decoder.onnx" in e.source or "lm," in e.source for e in example.examples):
        from fxcompress.llm.compress import optimize_decoder
        from fxcompress.models.architectures import causal_lm

        namespace["lm"] = causal_lm("llama")
        optimize_decoder(namespace["lm"], None).export("decoder.onnx")
    example.globs = {**namespace, **example.globs}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(example, out=report.append)
    assert result.failed == 0, "".join(report)
