"""Holes an adversarial user found, each closed: a clear error (or the right behaviour), never a raw traceback, a
silent wrong graph or a half-written file."""

from __future__ import annotations

import os
import stat

import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.export.writer import export_onnx


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        self.fc(x)


class EditsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x.add_(3.0)
        return self.fc(x)


class TakesAScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, k: float):
        return self.fc(x) * k


def test_a_model_that_returns_nothing_is_refused():
    with pytest.raises(InputError, match="ReturnsNone returns no tensor"):
        fxcompress.optimize(ReturnsNone().eval(), torch.randn(2, 8))


def test_a_model_that_edits_its_input_leaves_the_callers_tensor_alone():
    x = torch.zeros(2, 8)
    fxcompress.optimize(EditsItsInput().eval(), x, recipe="int8")
    assert float(x.abs().sum()) == 0.0


def test_a_python_scalar_input_is_a_constant_of_the_artifact_and_check_runs(tmp_path):
    model, inputs = TakesAScalar().eval(), (torch.randn(2, 8), 2.0)
    cm = fxcompress.optimize(model, inputs, recipe="int8")
    rep = fxcompress.check(model, cm.export(tmp_path / "s.onnx"), inputs, compressed=cm)
    assert rep.passed, rep.failures
    assert rep.memory.get("fp32_note") is None and rep.latency["fp32_p50_ms"] > 0


@pytest.mark.parametrize(
    "recipe, message",
    [
        (5, "recipe must be text such as 'fold_bn,int8'"),
        ([], "empty recipe"),
        ({"pass": "int4", "block": 64.0}, "option 'block' of pass 'int4' expects int, got 64.0"),
        ({"pass": "int8", "kinds": 3}, "option 'kinds' of pass 'int8' expects a list of strings"),
        ({"block": 64}, "unknown pass None"),
    ],
)
def test_recipes_of_the_wrong_type_say_what_is_expected(recipe, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fxcompress.optimize(nn.Linear(64, 8), torch.randn(2, 64), recipe=recipe)


def test_no_recipe_is_the_float_baseline():
    model, x = nn.Linear(64, 8).eval(), torch.randn(2, 64)
    cm = fxcompress.optimize(model, x, recipe=None)  # capture only: what an fp32 artifact is exported from
    assert cm.records == [] and cm.bytes_after == cm.bytes_before and torch.equal(cm(x), model(x))


def test_nan_in_calibration_is_refused_before_any_pass_runs():
    batches = [(torch.randn(4, 64),), (torch.full((4, 64), float("nan")),)]
    with pytest.raises(InputError, match="calibration batch 1, input 0 has 256 NaN/inf"):
        fxcompress.optimize(nn.Linear(64, 8), torch.randn(2, 64), recipe="int8:algo=gptq", calibration=batches)


def test_exported_files_take_the_umask_and_a_symlink_is_written_through(tmp_path):
    cm = fxcompress.optimize(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 16), recipe="int8")
    old = os.umask(0o022)
    try:
        path = cm.export(tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    real = tmp_path / "real.onnx"
    link = tmp_path / "link.onnx"
    real.write_bytes(b"old")
    link.symlink_to(real)
    cm.export(link)
    assert link.is_symlink() and real.stat().st_size > 100  # the link stays; its target holds the model


def test_external_data_is_written_beside_the_model_and_runs_on_ort_and_checks(tmp_path):
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(4, 64)
    cm = fxcompress.optimize(model, x, recipe="int8")
    path = export_onnx(cm.module, (x,), tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > 4096
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), cm(x), atol=0.05)
    assert fxcompress.check(model, path, x, compressed=cm, fp32_baseline=False).passed


def test_fold_bn_on_a_model_without_convs_says_what_it_looks_for():
    with pytest.warns(UserWarning, match="fold_bn: no Conv1d/Conv2d followed by an inference-mode BatchNorm"):
        fxcompress.optimize(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8), recipe="fold_bn")


def test_weights_inside_modules_torch_fx_cannot_see_into_are_reached_through_torch_export():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2).eval()
    model = nn.Sequential(enc, nn.Linear(64, 4)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 10, 64), recipe="int8")
    assert cm.capture_method == "export" and "TransformerEncoder" in cm.capture_note
    assert sum(r.action == "int8" for r in cm.records) == 9  # packed in-projection, out_proj, 2 FFN Linears x2, head
    assert cm.compression_ratio > 3.5


def test_recurrent_weights_are_listed_as_left_float():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    cm = fxcompress.optimize(Tagger().eval(), torch.randn(2, 5, 16), recipe="int8")
    lstm = next(r for r in cm.records if r.kind == "recurrent")
    assert lstm.skipped and "LSTM weights are not compressed" in lstm.reason
