import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.passes.factorize import SVDConfig, svd_factors, tucker2
from fxcompress.passes.quantize import sqnr_db

from helpers import op_types


def test_svd_factors_are_the_best_rank_r_approximation():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    a, b = svd_factors(w, SVDConfig(rank=8), "fc")
    u, s, vt = torch.linalg.svd(w.double())
    best = (u[:, :8] * s[:8]) @ vt[:8]
    torch.testing.assert_close((b @ a).double(), best, atol=1e-4, rtol=1e-4)
    a, b = svd_factors(w, SVDConfig(rank=32), "fc")
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=1e-4)


def test_activation_aware_svd_beats_plain_on_the_output_error():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.logspace(-2, 1, 64)  # anisotropic inputs, as real activations are
    w = torch.randn(64, 64)
    h = 2 * x.t().double() @ x.double() / x.shape[0]
    plain = svd_factors(w, SVDConfig(rank=16), "fc")
    aware = svd_factors(w, SVDConfig(rank=16), "fc", hessian=h)
    err = lambda f: sqnr_db(x @ w.t(), x @ (f[1] @ f[0]).t())
    assert err(aware) > err(plain) + 3


def test_tucker2_full_rank_is_exact_and_truncation_reduces_params():
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3)
    first, core, last = tucker2(w, SVDConfig(rank=16), "conv")
    torch.testing.assert_close(torch.einsum("rskl,or,si->oikl", core, last[:, :, 0, 0], first[:, :, 0, 0]), w, atol=1e-4, rtol=1e-4)
    first, core, last = tucker2(w, SVDConfig(ratio=0.4), "conv")
    assert first.numel() + core.numel() + last.numel() <= 0.4 * w.numel()


def test_svd_then_int8_exports_factors_as_quantized_matmuls(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(4, 64)
    cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,int8")
    assert [r.action for r in cm.records if r.pass_name == "svd"] == ["svd", "svd"]
    assert sum(r.action == "int8" for r in cm.records) == 4
    path = cm.export(tmp_path / "m.onnx")
    assert op_types(path).count("DynamicQuantizeMatMul") == 4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert torch.nn.functional.cosine_similarity(out, cm(x)).min() > 0.99


def test_tucker_conv_runs_on_ort(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1)).eval()
    x = torch.randn(2, 16, 8, 8)
    cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,kinds=conv2d")
    assert all(r.action == "tucker2" for r in cm.records)
    assert cm.bytes_after < 0.55 * cm.bytes_before
    path = cm.export(tmp_path / "m.onnx")
    assert op_types(path).count("Conv") == 6
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, cm(x), atol=1e-4, rtol=1e-4)


def test_layers_where_factors_would_not_save_bytes_are_skipped():
    cm = fxcompress.optimize(nn.Sequential(nn.Linear(64, 4)), torch.randn(1, 64), recipe="svd:rank=4")
    assert cm.records[0].skipped and "would not save bytes" in cm.records[0].reason


def test_bad_svd_inputs():
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(2, 32)
    for recipe, msg in [("svd:ratio=1.5", r"ratio must be in \(0, 1\)"), ("svd:ratio=0", r"ratio must be in \(0, 1\)"),
                        ("svd:energy=1", "energy must be in")]:
        with pytest.raises(RecipeError, match=msg):
            fxcompress.optimize(model, x, recipe=recipe)
    with pytest.raises(RecipeError, match=r"rank=64 is larger than layer '0' allows \(min\(out, in\) = 16\)"):
        fxcompress.optimize(model, x, recipe="svd:rank=64")
    with pytest.raises(InputError, match="aware=true needs calibration"):
        fxcompress.optimize(model, x, recipe="svd:aware=true")


def test_spatial_svd_full_rank_is_exact_and_runs_on_ort(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))).eval()
    x = torch.randn(2, 8, 9, 9)
    cm = fxcompress.optimize(model, x, recipe="svd:rank=24,kinds=conv2d,conv=spatial")  # full rank: min(8*3, 16*3)
    assert cm.records[0].skipped  # full rank saves nothing
    from fxcompress.passes.factorize import spatial_svd

    v, h = spatial_svd(model[0].weight.detach(), SVDConfig(rank=24), "0")
    torch.testing.assert_close(torch.einsum("rikz,orzl->oikl", v, h), model[0].weight.detach(), atol=1e-4, rtol=1e-4)
    cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,kinds=conv2d,conv=spatial")
    assert cm.records[0].action == "spatial-svd" and cm.bytes_after < 0.55 * cm.bytes_before
    sess = ort.InferenceSession(str(cm.export(tmp_path / "s.onnx")), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, cm(x), atol=1e-4, rtol=1e-4)
    assert out.shape == model(x).shape
