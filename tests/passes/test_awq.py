import onnxruntime as ort
import pytest
import torch
from helpers import cosine
from torch import nn

import fxcompress
from fxcompress.algorithms.quant import round_trip
from fxcompress.errors import InputError, RecipeError
from fxcompress.passes.awq import search_scales


class Salient(nn.Module):
    """A LayerNorm feeding two Linears (foldable), and a ReLU feeding one (a Mul), with a few salient channels."""

    def __init__(self):
        super().__init__()
        self.fc0, self.ln = nn.Linear(64, 128), nn.LayerNorm(128)
        self.q, self.k, self.out = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 16)
        with torch.no_grad():
            self.ln.weight[:6] *= 25
            self.fc0.weight[:, :3] *= 0.02  # makes fc0's own input channels uneven too

    def forward(self, x):
        h = self.ln(self.fc0(x))
        return self.out(torch.relu(self.q(h) + self.k(h)) * 4)


def _data():
    torch.manual_seed(0)
    model = Salient().eval()
    return model, [(torch.randn(64, 64),) for _ in range(4)], torch.randn(256, 64)


def _error(cm, model, x):
    ref = model(x)
    return ((cm.module(x) - ref).pow(2).sum() / ref.pow(2).sum()).item()


def test_awq_alone_leaves_the_float_model_unchanged_and_folds_where_it_can():
    model, calib, x = _data()
    cm = fxcompress.optimize(model, calib[0], recipe="awq:block=32", calibration=calib)
    torch.testing.assert_close(cm.module(x), model(x), rtol=1e-4, atol=1e-4)  # a rescaling, exact in float
    by_layer = {r.layer: r for r in cm.records}
    assert by_layer["q"].action == by_layer["k"].action == "scaled"
    assert by_layer["q"].extra["awq_alpha"] == by_layer["k"].extra["awq_alpha"] > 0  # one scale for the shared input
    assert "folded into ln" in by_layer["q"].reason
    muls = [n for n in cm.module.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == sum(r.action == "scaled" and "1/s a Mul before" in r.reason for r in cm.records) >= 1
    plain, best = by_layer["q"].extra["calibration_error"]
    assert best < plain


@pytest.mark.parametrize("quantize, bits", [("int4:block=32", 4), ("int4:block=32,algo=gptq", 4), ("int8", 8)])
def test_awq_lowers_the_held_out_error_of_the_quantization_after_it(quantize, bits):
    model, calib, x = _data()
    plain = fxcompress.optimize(model, calib[0], recipe=quantize, calibration=calib)
    scaled = fxcompress.optimize(model, calib[0], recipe=f"awq:bits={bits},block=32,{quantize}", calibration=calib)
    assert _error(scaled, model, x) < 0.95 * _error(plain, model, x)  # held-out inputs, not the calibration
    assert scaled.bytes_after <= plain.bytes_after + 2 * 4 * 128  # at most a Mul's scale vector per unfoldable group


def test_awq_then_int4_exports_and_runs_on_ort(tmp_path):
    model, calib, x = _data()
    cm = fxcompress.optimize(model, calib[0], recipe="awq:block=32,int4:block=32", calibration=calib)
    path = cm.export(tmp_path / "m.onnx", target="cpu-weightonly")
    out = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    assert cosine(torch.from_numpy(out), cm.module(x)) > 0.9999


def test_search_never_does_worse_than_plain_rounding_on_its_rows():
    torch.manual_seed(1)
    x = torch.randn(512, 64)  # no salient channel: scaling has little to gain
    w = torch.randn(32, 64)
    s, alpha, plain, best = search_scales(x, [w], bits=4, block=32, grid=10)
    assert best <= plain
    if alpha == 0.0:
        assert torch.equal(s, torch.ones(64))
    assert torch.equal(round_trip(w, 8, 32), round_trip(w, 8, 128))  # int8 ignores the block


def test_awq_bad_inputs():
    model, calib, _ = _data()
    with pytest.raises(InputError, match="awq needs calibration data"):
        fxcompress.optimize(model, calib[0], recipe="awq")
    with pytest.raises(RecipeError, match="bits must be 4"):
        fxcompress.optimize(model, calib[0], recipe="awq:bits=3", calibration=calib)
    with pytest.raises(RecipeError, match="block must be one of"):
        fxcompress.optimize(model, calib[0], recipe="awq:block=48", calibration=calib)


def test_a_weight_shared_by_two_layers_is_left_alone():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Tied().eval()
    calib = [(torch.randn(64, 32),)]
    with pytest.warns(UserWarning, match="found nothing to compress"):
        cm = fxcompress.optimize(model, calib[0], recipe="awq:block=32", calibration=calib)
    assert all(r.skipped and "also read by" in r.reason for r in cm.records)
