"""The checker cannot be fooled: artifacts broken on purpose after export are caught, each by a named gate, and the
honest artifact passes. A 5-layer int8 MLP exported for the ``cpu`` target (DynamicQuantizeMatMul), as an adversary
would edit it: scales, biases, factors, wiring, activations, metadata."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompress


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(5):
        layers += [nn.Linear(128, 128)] + ([nn.ReLU()] if i < 4 else [])
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    model, x = _mlp(), torch.randn(64, 128)
    cm = fxcompress.optimize(model, x, recipe="int8")
    path = cm.export(tmp_path_factory.mktemp("honest") / "m.onnx", target="cpu")
    return model, x, cm, onnx.load(str(path))


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _edit(proto, name, fn):
    t = _init(proto, name)
    t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), t.name))


def _matmuls(proto):
    return [n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul"]


def _scale(proto, layer, factor):
    _edit(proto, _matmuls(proto)[layer].input[2], lambda a: (a * factor).astype(a.dtype))


def _last_times(proto, factor):
    last = _matmuls(proto)[-1]
    for i in (2, 4):  # its scale and its bias
        _edit(proto, last.input[i], lambda a: (a * factor).astype(a.dtype))


def _zero_one_scale(proto):
    def zero(a):
        a[5] = 0
        return a

    _edit(proto, _matmuls(proto)[2].input[2], zero)


def _swap(proto):
    a, b = _matmuls(proto)[1:3]
    for i in (1, 2):
        a.input[i], b.input[i] = b.input[i], a.input[i]


def _drop_relu(proto):
    relu = [n for n in proto.graph.node if n.op_type == "Relu"][1]
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name == relu.output[0]:
                n.input[i] = relu.input[0]
    proto.graph.node.remove(relu)


def _bias_value(value):
    def edit(proto):
        def put(a):
            a[3] = value
            return a

        _edit(proto, _matmuls(proto)[-1].input[4], put)

    return edit


def _lower_metadata_floor_and_zero_scales(proto):
    for p in proto.metadata_props:
        if p.key == "fxcompress.tolerance":
            p.value = json.dumps(
                {k: 0.0 for k in json.loads(p.value)}
                | {"max_rel_max": 1e9, "gain_max_dev": 1e9, "accuracy_drop_max_pp": 100.0}
            )
    _edit(proto, _matmuls(proto)[0].input[2], lambda a: (a * 0).astype(a.dtype))


# corruption -> the gates that must name it: with the compressed module (the weights gate), and from the outputs alone
CORRUPTIONS = {
    "first layer's scale x1.1": (lambda p: _scale(p, 0, 1.1), {"weights"}, None),
    "last layer's scale and bias x2": (lambda p: _last_times(p, 2.0), {"weights", "gain", "sqnr_db"}, {"gain"}),
    "last layer's scale and bias x100": (lambda p: _last_times(p, 100.0), {"weights", "gain"}, {"gain", "max_rel"}),
    "one scale element zeroed": (_zero_one_scale, {"weights"}, None),
    "two layers swapped": (_swap, {"cosine"}, {"cosine"}),
    "an activation dropped": (_drop_relu, {"cosine"}, {"cosine"}),
    "inf in a bias": (_bias_value(np.inf), {"finite", "weights"}, {"finite"}),
    "NaN in a bias": (_bias_value(np.nan), {"finite", "weights"}, {"finite"}),
    "metadata floor lowered, scales zeroed": (_lower_metadata_floor_and_zero_scales, {"weights", "cosine"}, {"cosine"}),
}


def _failed_gates(report) -> set[str]:
    return {g["name"] for g in report.gates if not g["passed"]}


def test_the_honest_artifact_passes_every_gate(honest, tmp_path):
    model, x, cm, proto = honest
    path = tmp_path / "h.onnx"
    onnx.save(proto, str(path))
    rep = fxcompress.check(model, path, x, compressed=cm, fp32_baseline=False)
    assert rep.passed, rep.failures
    assert {g["name"] for g in rep.gates} >= {
        "finite",
        "cosine",
        "cosine_worst",
        "sqnr_db",
        "max_rel",
        "gain",
        "weights",
    }
    assert "floors: recipe 'int8'" in rep.to_text()


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_caught_by_a_named_gate(honest, tmp_path, name):
    model, x, cm, proto = honest
    corrupt, with_module, alone = CORRUPTIONS[name]
    broken = copy.deepcopy(proto)
    corrupt(broken)
    path = tmp_path / "broken.onnx"
    onnx.save(broken, str(path))
    rep = fxcompress.check(model, path, x, compressed=cm, fp32_baseline=False)
    assert not rep.passed
    assert with_module <= _failed_gates(rep), (name, _failed_gates(rep), rep.failures)
    json.loads(rep.to_json())  # strict JSON even with NaN or inf in the outputs
    if alone is not None:  # the output gates on their own, with the floors of the stated recipe
        rep = fxcompress.check(model, path, x, recipe="int8", fp32_baseline=False)
        assert not rep.passed and alone <= _failed_gates(rep), (name, _failed_gates(rep))


def test_the_floor_is_never_read_from_the_file_unless_asked(honest, tmp_path):
    model, x, cm, proto = honest
    broken = copy.deepcopy(proto)
    _lower_metadata_floor_and_zero_scales(broken)
    path = tmp_path / "lying.onnx"
    onnx.save(broken, str(path))
    assert not fxcompress.check(model, path, x, fp32_baseline=False).passed  # library defaults
    trusted = fxcompress.check(model, path, x, trust_metadata=True, fp32_baseline=False)
    assert trusted.passed and "metadata (trusted on request)" in trusted.floors_from  # what trusting the file means


def test_an_svd_factor_scaled_after_export_is_caught(tmp_path):
    model, x = _mlp(), torch.randn(64, 128)
    cm = fxcompress.optimize(model, x, recipe="svd:rank=32,int8")
    proto = onnx.load(str(cm.export(tmp_path / "s.onnx", target="cpu")))
    assert any("_svd_" in n.input[2] for n in _matmuls(proto))
    _scale(proto, 2, 1.1)
    onnx.save(proto, str(tmp_path / "s2.onnx"))
    rep = fxcompress.check(model, tmp_path / "s2.onnx", x, compressed=cm, fp32_baseline=False)
    assert not rep.passed and "weights" in _failed_gates(rep)
    assert "_svd_" in next(f for f in rep.failures if f.startswith("weights"))  # the failure names the tensor
