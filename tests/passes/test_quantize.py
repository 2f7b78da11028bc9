import pytest
import torch
from helpers import cosine
from torch import nn

import fxcompress
from fxcompress.algorithms.quant import quantize_per_channel, sqnr_db
from fxcompress.errors import InputError, RecipeError


def test_per_channel_quantization_bounds_error_by_half_a_step():
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16).unsqueeze(1)  # channels of very different ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale.unsqueeze(1) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-7).all()


def test_all_zero_channel_does_not_divide_by_zero():
    w = torch.randn(4, 8)
    w[2] = 0
    q, scale = quantize_per_channel(w)
    assert torch.isfinite(scale).all() and scale[2] == 1 and (q[2] == 0).all()
    assert sqnr_db(w, q.float() * scale.unsqueeze(1)) > 40


class Convs(nn.Module):
    def __init__(self, bias: bool, groups: int):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1, bias=bias, groups=groups)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1, bias=bias, groups=groups)

    def forward(self, x):
        y = self.c1(x)  # [B, 8, L]
        return self.c2(y.unsqueeze(-1).expand(-1, -1, -1, y.shape[-1]))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_sites_quantize_with_high_sqnr(bias, groups):
    model = Convs(bias, groups).eval()
    x = torch.randn(2, 4, 10)
    cm = fxcompress.optimize(model, x, recipe="int8")
    assert [r.action for r in cm.records] == ["int8", "int8"]
    out, ref = cm(x), model(x)
    assert sqnr_db(ref, out) > 30
    assert [n.target for n in cm.module.graph.nodes if n.op == "call_function"].count(
        torch.ops.fxcompress.conv_q8.default
    ) == 2


@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_embedding_numerics(bias):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 8, bias=bias)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    model = M().eval()
    ids = torch.randint(0, 50, (3, 7))
    cm = fxcompress.optimize(model, ids, recipe="int8")
    assert {r.kind: r.action for r in cm.records} == {"embedding": "int8", "linear": "int8"}
    assert all(r.error > 35 for r in cm.records)  # weight SQNR in dB
    assert cosine(cm(ids), model(ids)) > 0.999
    # int8 storage really is int8 in the torch module
    dtypes = {b.dtype for b in cm.module.buffers()}
    assert torch.int8 in dtypes and cm.compression_ratio > 3.0  # 16-wide rows: a 4-byte scale per 16 weights


def test_tied_weights_are_quantized_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied().eval()
    x = torch.randn(2, 16)
    cm = fxcompress.optimize(model, x, recipe="int8")
    assert "shares the int8 weight of a" in cm.records[1].reason
    int8_buffers = [b for b in cm.module.buffers() if b.dtype == torch.int8]
    assert len(int8_buffers) == 1
    assert cosine(cm(x), model(x)) > 0.999


def test_model_without_compressible_layers_warns_and_reports_honestly():
    model = nn.Sequential(nn.ReLU(), nn.Softmax(-1))
    with pytest.warns(UserWarning, match="found nothing to compress"):
        cm = fxcompress.optimize(model, torch.randn(2, 3), recipe="int8")
    assert cm.records == [] and cm.bytes_after == cm.bytes_before == 0


def test_kinds_option_limits_what_is_quantized():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 1, 8, 8), recipe="int8:kinds=linear")
    assert {r.layer: r.action for r in cm.records} == {"0": "skipped", "2": "int8"}
    assert "conv2d is not handled" in cm.records[0].reason


def test_int8_dynamic_lowers_to_dynamic_quantize_matmul_with_uint8_weights(tmp_path):
    from helpers import init_dtypes, op_types

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 32), recipe="int8_dynamic")
    assert cm.tolerance.cosine_min == 0.99 and {r.pass_name for r in cm.records} == {"int8_dynamic"}
    path = cm.export(tmp_path / "m.onnx", target="cpu")
    assert op_types(path).count("DynamicQuantizeMatMul") == 2
    assert "int8" not in init_dtypes(path).values() and "uint8" in init_dtypes(path).values()


def test_gptq_int8_keeps_the_grid_and_lowers_the_output_error():
    from fxcompress.algorithms.quant import quantize_per_channel_gptq

    torch.manual_seed(0)
    x = torch.randn(1024, 64) @ torch.randn(64, 64)  # correlated inputs: where GPTQ helps
    w = torch.randn(32, 64)
    h = 2 * x.t().double() @ x.double() / x.shape[0]
    rtn_q, rtn_scale = quantize_per_channel(w)
    for act_order in (False, True):
        q, scale = quantize_per_channel_gptq(w, h, act_order=act_order)
        assert q.dtype == torch.int8 and q.abs().max() <= 127 and torch.equal(scale, rtn_scale)
        gptq_out, rtn_out = x @ (q.float() * scale[:, None]).t(), x @ (rtn_q.float() * rtn_scale[:, None]).t()
        assert sqnr_db(x @ w.t(), gptq_out) > sqnr_db(x @ w.t(), rtn_out) + 1.0


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _correlated(seed: int, rows: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 32, generator=g) @ torch.randn(32, 32, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize(
    "recipe, target, how",
    [
        ("int8:algo=gptq,act_order=true", "cpu", "GPTQ, act_order"),
        ("int8:algo=gptq,act_order=true", "cpu-weightonly", "GPTQ, act_order"),
        ("int8:algo=gptq,sequential=false", "cpu", "GPTQ"),  # one-shot Hessians from the float model
        ("int8_dynamic:algo=gptq", "cpu", "GPTQ"),
    ],
)
def test_int8_gptq_end_to_end_beats_rtn_and_exports_the_same_int8_layout(tmp_path, recipe, target, how):
    import onnxruntime as ort
    from helpers import init_dtypes

    torch.manual_seed(0)
    model = Mlp().eval()
    calibration = [(_correlated(i),) for i in range(8)]
    x = _correlated(100)
    rtn = fxcompress.optimize(model, x, recipe="int8")
    cm = fxcompress.optimize(model, x, recipe=recipe, calibration=calibration)
    assert [r.reason for r in cm.records] == [how] * 2
    assert cm.bytes_after == rtn.bytes_after
    ref = model(x)
    assert sqnr_db(ref, cm(x)) > sqnr_db(ref, rtn(x))
    path = cm.export(tmp_path / "m.onnx", target=target)
    assert {"int8", "uint8"} & set(init_dtypes(path).values())
    (onnx_out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert cosine(torch.from_numpy(onnx_out), cm(x).detach()) > 0.999


def test_int8_gptq_needs_calibration_and_leaves_what_it_cannot_round_to_rtn():
    with pytest.raises(InputError, match="int8 algo=gptq needs calibration data"):
        fxcompress.optimize(Mlp().eval(), torch.randn(2, 32), recipe="int8:algo=gptq")
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(2, 1, 8, 8)
    cm = fxcompress.optimize(
        model, x, recipe="int8:algo=gptq", calibration=[(torch.randn(72, 1, 8, 8),) for _ in range(8)]
    )
    assert [r.reason for r in cm.records] == ["round-to-nearest (GPTQ rounds Linear layers only)", "GPTQ"]
    with pytest.raises(RecipeError, match="algo must be 'rtn' or 'gptq'"):
        fxcompress.optimize(model, x, recipe="int8:algo=awq")


@pytest.mark.parametrize(
    "recipe", ["int8:algo=gptq", "int4:block=32,algo=gptq", "int4:block=32,algo=gptq,act_order=true"]
)
def test_gptq_rounds_an_input_the_calibration_never_activated_instead_of_zeroing_it(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    calibration = [(torch.randn(64, 64) * (torch.arange(64) != 5),) for _ in range(8)]  # input 5 always 0
    cm = fxcompress.optimize(model, calibration[0], recipe=recipe, calibration=calibration)
    x = torch.zeros(1, 64)
    x[0, 5] = 1.0  # at deployment, input 5 fires: its weights must still be there
    assert cosine(cm(x), model(x)) > 0.98


def test_int8_budget_keeps_the_most_sensitive_layer_float_within_the_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        model[2].weight[:, 0] *= (
            300  # one huge column: the row scales it sets leave the rest of layer 2 on a coarse grid
        )
    calibration = [(torch.randn(64, 64),) for _ in range(4)]
    cm = fxcompress.optimize(model, calibration[0], recipe="int8:budget=0.65", calibration=calibration)
    actions = {r.layer: r.action for r in cm.records}
    assert actions == {"0": "int8", "2": "skipped", "4": "int8"}
    assert cm.records[1].reason.startswith("kept float by budget=0.65 (int8 output error")
    fp32 = sum(r.bytes_before for r in cm.records)
    assert sum(r.bytes_after for r in cm.records) <= 0.65 * fp32
    all_int8 = fxcompress.optimize(model, calibration[0], recipe="int8")
    x = torch.randn(16, 64)
    assert sqnr_db(model(x), cm(x)) > sqnr_db(model(x), all_int8(x)) + 3


def test_quantization_and_its_error_are_computed_in_row_chunks_with_the_same_numbers():
    from fxcompress.algorithms.quant import CHUNK_ROWS, sqnr_db_per_channel

    w = torch.randn(2 * CHUNK_ROWS + 37, 24)  # several chunks, the last one short
    q, scale = quantize_per_channel(w)
    amax = w.abs().amax(1)
    torch.testing.assert_close(scale, amax / 127)
    assert torch.equal(q, torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
    whole = sqnr_db(w, q.float() * scale[:, None])
    assert abs(sqnr_db_per_channel(w, q, scale) - whole) < 1e-5 and abs(sqnr_db(w, w * 1.01) - 40.0) < 1e-4
    conv = torch.randn(CHUNK_ROWS + 3, 2, 3, 3)
    q4, s4 = quantize_per_channel(conv)
    assert q4.shape == conv.shape and s4.shape == (CHUNK_ROWS + 3,)


def test_large_weights_run_a_slice_of_output_channels_at_a_time(monkeypatch):
    """The torch reference never dequantizes a large weight whole; sliced, it computes the same."""
    import fxcompress.ops.packing as packing

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 300)).eval(), torch.randn(5, 64)
    whole = fxcompress.optimize(model, x, recipe="int8")(x)
    i4 = fxcompress.optimize(model, x, recipe="int4:block=32")(x)
    monkeypatch.setattr(packing, "SLICE_ELEMENTS", 64 * 7)  # 7 output channels per slice: 43 slices
    assert len(packing.output_slices(300, 64)) == 43
    assert torch.allclose(fxcompress.optimize(model, x, recipe="int8")(x), whole, atol=1e-5)  # BLAS blocking differs
    assert torch.allclose(fxcompress.optimize(model, x, recipe="int4:block=32")(x), i4, atol=1e-6)
