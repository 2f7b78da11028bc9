import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import init_dtypes, op_types
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.ops.static import fake_quant


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def _setup():
    torch.manual_seed(0)
    model = ConvNet().eval()
    calib = [(torch.randn(8, 3, 8, 8),) for _ in range(3)]
    return model, calib


def test_fake_quant_matches_onnx_rounding_and_clamps():
    scale, zp = torch.tensor(0.5), torch.tensor(10, dtype=torch.uint8)
    x = torch.tensor([0.25, 0.75, -100.0, 1000.0])  # halves round to even; out of range clamps to [0, 255]
    assert fake_quant(x, scale, zp).tolist() == [0.0, 1.0, -5.0, 122.5]


def test_int8_static_fuses_to_qlinear_ops_and_ort_matches_torch(tmp_path):
    model, calib = _setup()
    cm = fxcompress.optimize(model, calib[0], recipe="fold_bn,int8_static", calibration=calib)
    assert [r.action for r in cm.records if r.pass_name == "int8_static"] == ["int8-static"] * 3
    path = cm.export(tmp_path / "m.onnx", target="cpu")
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= set(op_types(path))
    assert "int32" in init_dtypes(path).values()  # conv bias quantized for QLinearConv
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QLinearMatMul"} <= fused and "Conv" not in fused
    x = torch.randn(4, 3, 8, 8)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    # uint8 weights on the cpu target: integer kernels agree with the torch emulation to float rounding
    torch.testing.assert_close(out, cm(x), atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(cm(x), model(x)).min() > 0.99


def test_cuda_target_keeps_int8_weights(tmp_path):
    model, calib = _setup()
    cm = fxcompress.optimize(model, calib[0], recipe="int8_static", calibration=calib)
    dtypes = init_dtypes(cm.export(tmp_path / "m.onnx", target="cuda"))
    assert "int8" in dtypes.values()
    dtypes = init_dtypes(cm.export(tmp_path / "c.onnx", target="cpu"))
    assert "int8" not in dtypes.values() and "uint8" in dtypes.values()


def test_int8_static_without_calibration_names_the_pass():
    model, calib = _setup()
    with pytest.raises(InputError, match="int8_static needs calibration data"):
        fxcompress.optimize(model, calib[0], recipe="int8_static")
    with pytest.raises(InputError, match="calibration data is empty"):
        fxcompress.optimize(model, calib[0], recipe="int8_static", calibration=[])
    with pytest.raises(InputError, match=r"calibration batch 0 \(shapes \[\(2, 5, 8, 8\)\]\)"):
        fxcompress.optimize(model, calib[0], recipe="int8_static", calibration=[(torch.randn(2, 5, 8, 8),)])


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("int8_static:percentile=50", "percentile must be in"),
        ("int8_static:kinds=embedding", "kinds must be a non-empty subset"),
    ],
)
def test_bad_int8_static_options(recipe, message):
    with pytest.raises(RecipeError, match=message):
        fxcompress.optimize(nn.Linear(4, 4), torch.randn(1, 4), recipe=recipe)


def test_percentile_ranges_are_narrower_than_minmax():
    model, calib = _setup()
    calib[0][0][0, 0, 0, 0] = 80.0  # one outlier
    wide = fxcompress.optimize(model, calib[0], recipe="int8_static", calibration=calib)
    narrow = fxcompress.optimize(model, calib[0], recipe="int8_static:percentile=99.9", calibration=calib)

    def x_scale(cm):
        node = next(n for n in cm.module.graph.nodes if n.target is torch.ops.fxcompress.conv_qdq.default)
        return cm.module.get_buffer(str(node.args[1].target)).item()

    assert x_scale(narrow) < x_scale(wide) / 5


class Residual(nn.Module):
    """Two ResNet basic blocks: conv -> ReLU -> conv, plus the block's input, then ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        return torch.relu(self.b2(torch.relu(self.b1(x))) + x)


def test_relus_and_residual_sums_stay_integer_on_ort(tmp_path):
    """A conv read by a ReLU is rounded on the ReLU's range and each residual sum is rounded in and out, so ORT's
    optimized graph is QLinearConv -> QLinearAdd with no float ReLU or Add left between them (only the ReLU that
    produces the model's float output)."""
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    calib = [(torch.randn(8, 3, 8, 8),) for _ in range(3)]
    cm = fxcompress.optimize(model, x, recipe="int8_static", calibration=calib)
    path = cm.export(tmp_path / "res.onnx", target="cpu")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert optimized.count("QLinearConv") == 5 and optimized.count("QLinearAdd") == 2
    assert optimized.count("Relu") == 1 and optimized[-1] == "Relu"  # the model's own output stays float
    assert "Add" not in optimized
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), cm(x), atol=1e-4)  # ORT computes what the torch module does
    ref = model(x)
    assert torch.nn.functional.cosine_similarity(cm(x).flatten(), ref.flatten(), dim=0) > 0.999
