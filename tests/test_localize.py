"""Divergence localisation names the layer where parity breaks: artifacts broken on purpose at a known layer, a clean
artifact (no suspect), keyword-input models, the CLI flag and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompress
from fxcompress.checker.localize import compressed_values, localize
from fxcompress.checker.parity import check
from fxcompress.errors import InputError
from fxcompress.export.writer import export_onnx


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(*blocks, nn.Linear(64, 8)).eval(), torch.randn(32, 64)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, c_out in [(3, 16), (16, 16), (16, 32), (32, 32)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval(), torch.randn(
        4, 3, 16, 16
    )


def _corrupt(path, out, layer_prefix: str, factor: float = 8.0) -> str:
    """Scale every third channel of the layer's weight scale by ``factor``: a wrong scale at one known layer."""
    proto = onnx.load(str(path))
    hit = ""
    for t in proto.graph.initializer:
        if t.name.startswith(layer_prefix) and "scale" in t.name and "x_scale" not in t.name and t.dims:
            a = numpy_helper.to_array(t).copy()
            a.reshape(-1)[::3] *= factor
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            hit = t.name
            break
    assert hit, f"no weight scale of {layer_prefix} in {[t.name for t in proto.graph.initializer]}"
    onnx.save(proto, str(out))
    return hit


def test_a_clean_int8_artifact_has_no_suspect(tmp_path):
    model, x = _mlp()
    path = fxcompress.optimize(model, x, recipe="int8").export(tmp_path / "m.onnx")
    found = localize(model, path, x)
    assert [r.layer for r in found.layers] == ["0.0", "1.0", "2.0", "3.0", "4.0", "5.0", "6"]
    assert all(r.sqnr_db > 30 for r in found.layers)
    assert found.suspects == []


@pytest.mark.parametrize("broken", ["1.0", "3.0", "6"])
def test_a_corrupted_scale_is_named_first(broken, tmp_path):
    model, x = _mlp()
    path = fxcompress.optimize(model, x, recipe="int8").export(tmp_path / "m.onnx")
    _corrupt(path, tmp_path / "bad.onnx", broken.replace(".", "_") + "_")
    found = localize(model, tmp_path / "bad.onnx", x)
    first = next(r for r in found.layers if r.suspect)
    assert first.layer == broken and found.suspects[0].layer == broken
    assert "parity breaks first at " + broken in found.to_text()


def test_a_corrupted_static_int8_conv_is_named(tmp_path):
    model, x = _cnn()
    calibration = [(torch.randn(8, 3, 16, 16),) for _ in range(2)]
    cm = fxcompress.optimize(model, x, recipe="int8_static", calibration=calibration)
    path = cm.export(tmp_path / "m.onnx")
    assert localize(model, path, x).suspects == []
    _corrupt(path, tmp_path / "bad.onnx", "4_", factor=0.1)
    found = localize(model, tmp_path / "bad.onnx", x)
    assert found.suspects and found.suspects[0].layer == "4"


def test_keyword_inputs_and_module_paths_of_a_transformers_model(tmp_path):
    from fxcompress.models import architectures

    model, example = architectures.hf_encoder("bert", 1 / 8)
    path = fxcompress.optimize(model, example, recipe="int8").export(tmp_path / "b.onnx")
    found = localize(model, path, example)
    layers = [r.layer for r in found.layers]
    assert "encoder.layer.0.attention.self.query" in layers and "encoder.layer.0.output.dense" in layers
    assert found.suspects == []


def test_check_with_localize_reports_the_layer_and_still_fails(tmp_path):
    model, x = _mlp()
    cm = fxcompress.optimize(model, x, recipe="int8")
    path = cm.export(tmp_path / "m.onnx")
    _corrupt(path, tmp_path / "bad.onnx", "2_0_")
    report = check(model, tmp_path / "bad.onnx", x, fp32_baseline=False, latency_repeat=1, localize=True)
    assert not report.passed
    assert report.localization["suspects"][0] == "2.0"
    assert "parity breaks first at 2.0" in report.to_text()


def test_cli_check_localize(tmp_path, capsys):
    from fxcompress.cli import main

    out = tmp_path / "mlp.onnx"
    assert main(["optimize", "mlp", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["check", "mlp", str(out), "--no-baseline", "--localize"]) == 0
    text = capsys.readouterr().out
    assert "where the error comes from" in text and "no layer adds a jump in error" in text


def test_an_artifact_without_compressed_ops_is_refused(tmp_path):
    model, x = _mlp()
    path = export_onnx(model, (x,), tmp_path / "fp32.onnx")
    assert compressed_values(onnx.load(str(path))) == []
    with pytest.raises(InputError, match="nothing to localise"):
        localize(model, path, x)


def test_sqnr_of_identical_outputs_is_infinite_not_a_crash():
    from fxcompress.checker.localize import _sqnr_db

    a = np.ones((2, 3), dtype=np.float32)
    assert _sqnr_db(a, a) == float("inf")
