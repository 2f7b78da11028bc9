import copy

import pytest
import torch
from helpers import init_dtypes, same_state, state_snapshot
from torch import nn

import fxcompress
from fxcompress.algorithms.distill import DistillOptions, distill_module, hidden_nodes, lr_factor
from fxcompress.errors import InputError, RecipeError
from fxcompress.graph.capture import capture
from fxcompress.models.zoo import TinyTransformer
from fxcompress.ops.packing import pack_nbits


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(32, 16),) for _ in range(8)]
    return model, data


def _err(cm, model, data):
    with torch.no_grad():
        return sum((cm.module(*b) - model(*b)).pow(2).mean().item() for b in data)


def test_distill_reduces_the_error_of_a_factorized_model_and_leaves_the_teacher_alone():
    model, data = _setup()
    snap = state_snapshot(model)
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    before = _err(cm, model, data)
    fxcompress.distill(cm, teacher=model, data=data, steps=150, lr=3e-3)
    assert _err(cm, model, data) < 0.5 * before
    assert same_state(model, snap)
    assert cm.records[-1].pass_name == "distill"
    assert all(not p.requires_grad for p in cm.module.parameters())


def test_distill_trains_only_the_tensors_named_trainable():
    model, data = _setup()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    before = {k: v.clone() for k, v in cm.module.state_dict().items()}
    before_err = _err(cm, model, data)
    fxcompress.distill(cm, model, data, steps=50, lr=3e-3, trainable=lambda name: "_svd_" in name)
    changed = {k for k, v in cm.module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("_svd_" in k for k in changed)
    assert any("_svd_" not in k and v.is_floating_point() for k, v in before.items())  # there were others to leave
    assert _err(cm, model, data) < before_err
    with pytest.raises(InputError, match="`trainable` accepted no name"):
        fxcompress.distill(cm, model, data, steps=1, trainable=lambda name: False)


def test_distill_as_a_recipe_step_before_int8():
    model, data = _setup()
    plain = fxcompress.optimize(model, data[0], recipe="svd:rank=4,int8", calibration=data)
    tuned = fxcompress.optimize(model, data[0], recipe="svd:rank=4,distill:steps=150,lr=3e-3,int8", calibration=data)
    assert _err(tuned, model, data) < _err(plain, model, data)
    assert tuned.bytes_after == plain.bytes_after


def _grads(fn, x, bias):
    x, bias = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    fn(x, bias).pow(2).sum().backward()
    return x.grad, bias.grad


def test_quantized_ops_pass_gradients_straight_through_the_dequantized_weight():
    torch.manual_seed(0)
    fx_ops = torch.ops.fxcompress
    x, bias = torch.randn(3, 5, 16), torch.randn(8)
    q = torch.randint(-127, 128, (16, 8), dtype=torch.int8)
    scale = torch.rand(8) / 50
    w = q.float() * scale  # [in, out]
    expected = _grads(lambda x, b: torch.nn.functional.linear(x, w.t(), b), x, bias)
    got = _grads(lambda x, b: fx_ops.linear_q8(x, q, scale, None, b), x, bias)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)

    codes = torch.randint(0, 16, (8, 16), dtype=torch.uint8)
    scales = torch.rand(8, 2) / 10
    w4 = ((codes.float() - 8).reshape(8, 2, 8) * scales.unsqueeze(-1)).reshape(8, 16)  # [out, in], symmetric zero point
    expected = _grads(lambda x, b: torch.nn.functional.linear(x, w4, b), x, bias)
    got = _grads(
        lambda x, b: fx_ops.linear_nbits(
            x, pack_nbits(codes, 4).reshape(8, 2, 4), scales.reshape(-1), None, b, 16, 8, 4, 8
        ),
        x,
        bias,
    )
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)

    image = torch.randn(2, 16, 7, 7)
    qc = torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8)
    wc = qc.float() * scale.reshape(8, 1, 1, 1)
    expected = _grads(lambda x, b: torch.nn.functional.conv2d(x, wc, b, 2, 1, 1, 4), image, bias)
    got = _grads(lambda x, b: fx_ops.conv_q8(x, qc, scale, None, b, [2, 2], [1, 1], [1, 1], 4), image, bias)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_distill_after_int8_trains_the_float_weights_around_the_frozen_codes():
    model, data = _setup()
    cm = fxcompress.optimize(model, data[0], recipe="int8")
    before = {k: v.clone() for k, v in cm.module.state_dict().items()}
    before_err = _err(cm, model, data)
    fxcompress.distill(cm, model, data, steps=100, lr=1e-3)
    after = cm.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not v.is_floating_point() or "scale" in k)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point())  # the biases
    assert _err(cm, model, data) < 0.9 * before_err
    tuned = fxcompress.optimize(model, data[0], recipe="int8,distill:steps=100,lr=1e-3", calibration=data)
    assert _err(tuned, model, data) < before_err and tuned.bytes_after == cm.bytes_after


def test_every_parameter_distill_trains_gets_a_gradient():
    model, data = _setup()
    cm = fxcompress.optimize(model, data[0], recipe="int8:exclude=4")  # the last Linear stays float
    seen = []

    def check(step: int, loss: float) -> None:
        trained = {name: p for name, p in cm.module.named_parameters() if p.requires_grad}
        seen.append(sorted(name for name, p in trained.items() if p.grad is None))
        assert trained

    fxcompress.distill(cm, model, data, steps=2, lr=1e-3, on_step=check)
    assert seen == [[], []]  # the int8 layers' scales stay buffers: Adam would carry them as idle parameters
    assert any("scale" in name and v.is_floating_point() for name, v in cm.module.named_buffers())


def test_distill_after_int4_embeddings_adapts_the_rest_of_the_model_to_the_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.LayerNorm(64), nn.Linear(64, 8)).eval()
    data = [(torch.randint(0, 100, (16, 6)),) for _ in range(8)]
    cm = fxcompress.optimize(model, data[0], recipe="int4:kinds=embedding,block=32")
    table = {k: v.clone() for k, v in cm.module.state_dict().items() if not k.startswith(("1.", "2."))}
    assert any(v.dtype == torch.uint8 for v in table.values())  # the embedding is the packed int4 table
    before_err = _err(cm, model, data)
    fxcompress.distill(cm, model, data, steps=100, lr=1e-3)
    assert all(torch.equal(cm.module.state_dict()[k], v) for k, v in table.items())
    assert _err(cm, model, data) < 0.8 * before_err


def test_a_distilled_module_can_be_quantized_by_a_second_optimize(tmp_path):
    # the workflow when recovery needs more data than the calibration set: optimize, distill, optimize again
    model, data = _setup()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    fxcompress.distill(cm, teacher=model, data=data, steps=100, lr=3e-3)
    snap = state_snapshot(cm.module)
    quantized = fxcompress.optimize(cm.module, data[0], recipe="int8")
    assert same_state(cm.module, snap)
    assert sum(r.action == "int8" for r in quantized.records) == 5  # both factors of the two factored layers + the head
    with torch.no_grad():
        for b in data:
            torch.testing.assert_close(quantized.module(*b), cm.module(*b), rtol=0.05, atol=0.05)
    quantized.export(tmp_path / "m.onnx")
    codes = {name: dtype for name, dtype in init_dtypes(tmp_path / "m.onnx").items() if name.endswith("_qweight")}
    assert len(codes) == 5 and set(codes.values()) <= {"int8", "uint8"}, codes
    rep = fxcompress.check(
        cm.module, tmp_path / "m.onnx", data[0], eval_inputs=data, fp32_baseline=False, provider="cpu"
    )
    assert rep.passed


def _normed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4)
    ).eval()
    return model, [(torch.randn(32, 16),) for _ in range(8)]


def _norm_outputs(module: nn.Module, batch: tuple) -> list[torch.Tensor]:
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
        for m in module.modules()
        if isinstance(m, nn.LayerNorm)
    ]
    with torch.no_grad():
        module(*batch)
    for h in hooks:
        h.remove()
    return seen


def test_hidden_norms_adds_the_relative_mse_of_every_layernorm_output_to_the_loss():
    model, data = _normed()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    assert len(hidden_nodes(cm.module, capture(model, data[0]).graph_module, "norms")) == 2
    first = lambda **kw: distill_module(copy.deepcopy(cm.module), model, data[:1], DistillOptions(steps=1, **kw))[
        0
    ]  # before a step
    expected = (
        sum(
            torch.nn.functional.mse_loss(s, t).item() / t.pow(2).mean().item()
            for s, t in zip(_norm_outputs(cm.module, data[0]), _norm_outputs(model, data[0]))
        )
        / 2
    )
    assert expected > 1e-3
    assert first(hidden="norms", hidden_weight=2.0) - first() == pytest.approx(2 * expected, rel=1e-4)
    assert first(hidden="norms", hidden_weight=0.0) == pytest.approx(first(), rel=1e-6)


def test_hidden_matching_pulls_the_intermediate_activations_to_the_teacher():
    model, data = _normed()
    gaps = {}
    for hidden in (None, "norms"):
        cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
        fxcompress.distill(cm, model, data, steps=100, lr=3e-3, hidden=hidden)
        pairs = zip(_norm_outputs(cm.module, data[0]), _norm_outputs(model, data[0]))
        gaps[hidden] = sum((s - t).pow(2).mean().item() for s, t in pairs) / 2
    assert (
        gaps["norms"] < 0.7 * gaps[None]
    )  # output-only distillation leaves them where they were (measured 0.69 vs 1.22)
    assert "loss + hidden norms, constant lr" in cm.records[-1].reason
    tuned = fxcompress.optimize(
        model, data[0], recipe="svd:rank=4,distill:steps=5,hidden=norms,hidden_weight=0.5", calibration=data
    )
    assert tuned.records[-1].reason.startswith(
        "5 steps, mse loss + hidden norms, constant lr: "
    )  # one spelling for both


def test_hidden_matching_errors_name_the_node():
    model, data = _setup()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    with pytest.raises(InputError, match="hidden node 'nowhere' is not in the student graph"):
        fxcompress.distill(cm, model, data, steps=1, hidden=["nowhere"])
    with pytest.raises(InputError, match="found no LayerNorm"):
        fxcompress.distill(cm, model, data, steps=1, hidden="norms")
    with pytest.raises(InputError, match="must be the compressed GraphModule"):
        distill_module(copy.deepcopy(model), model, data, DistillOptions(steps=1, hidden="norms"))
    pruned = fxcompress.optimize(model, data[0], recipe="prune:ratio=0.5", calibration=data)
    relu = next(n.name for n in pruned.module.graph.nodes if n.op == "call_module" and "1" == n.target)
    with pytest.raises(
        InputError, match=f"hidden node '{relu}' has shape \\(32, 32\\) in the student but \\(32, 64\\)"
    ):
        fxcompress.distill(pruned, model, data, steps=1, hidden=[relu])


def test_cosine_schedule_warms_up_decays_to_zero_and_reports_every_step():
    model, data = _setup()
    assert [lr_factor("cosine", s, 40) for s in (0, 1)] == [0.5, 1.0]  # 2 warm-up steps
    assert lr_factor("cosine", 39, 40) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor("constant", s, 40) == 1.0 for s in range(40))
    factors = [lr_factor("cosine", s, 40) for s in range(1, 40)]
    assert factors == sorted(factors, reverse=True)
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    seen = []
    history = distill_module(
        cm.module,
        model,
        data,
        DistillOptions(steps=40, lr=3e-3, schedule="cosine"),
        on_step=lambda step, loss: seen.append((step, loss)),
    )
    assert seen == list(enumerate(history, start=1))
    assert history[-1] < history[0]
    tuned = fxcompress.optimize(model, data[0], recipe="svd:rank=4,distill:steps=3,schedule=cosine", calibration=data)
    assert ", cosine lr: " in tuned.records[-1].reason


def test_distill_errors():
    model, data = _setup()
    cm = fxcompress.optimize(
        model, data[0], recipe="int8_static", calibration=data
    )  # its ops fake-quantize x: no gradient
    with pytest.raises(InputError, match="cannot backpropagate .*linear_qdq.*distill before quantizing"):
        fxcompress.distill(cm, model, data, steps=1)
    with pytest.raises(InputError, match="distill data is empty"):
        fxcompress.distill(fxcompress.optimize(model, data[0], recipe="svd:rank=4"), model, [], steps=1)
    with pytest.raises(InputError, match="distill needs calibration data"):
        fxcompress.optimize(model, data[0], recipe="svd:rank=4,distill")
    with pytest.raises(InputError, match="schedule must be one of \\('constant', 'cosine'\\), got 'linear'"):
        fxcompress.distill(
            fxcompress.optimize(model, data[0], recipe="svd:rank=4"), model, data, steps=1, schedule="linear"
        )
    with pytest.raises(RecipeError, match="schedule must be one of"):
        fxcompress.optimize(model, data[0], recipe="svd:rank=4,distill:schedule=step", calibration=data)


class _ShapeBranch(nn.Module):
    """symbolic_trace cannot branch on a Proxy's shape; torch.export specializes it, so this captures by export."""

    def __init__(self):
        super().__init__()
        self.body = _normed()[0]

    def forward(self, x):
        if x.shape[-1] == 16:
            x = x * 2
        return self.body(x)


def test_hidden_matching_works_on_a_model_captured_by_torch_export():
    torch.manual_seed(0)
    model, data = _ShapeBranch().eval(), _normed()[1]
    assert capture(model, data[0]).method == "export"
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    before = _err(cm, model, data)
    history = fxcompress.distill(cm, model, data, steps=30, lr=3e-3, hidden="norms").records[-1].reason
    assert "hidden norms" in history and _err(cm, model, data) < before


def test_a_torch_export_teacher_distills_without_hidden_matching():
    torch.manual_seed(0)
    model, data = _ShapeBranch().eval(), _normed()[1]
    exported = capture(model, data[0]).graph_module  # torch.export(...).module(): refuses eval()
    with pytest.raises(NotImplementedError):
        exported.eval()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    before = _err(cm, model, data)
    fxcompress.distill(cm, exported, data, steps=30, lr=3e-3)
    assert _err(cm, model, data) < before


class _MaskedPool(nn.Module):
    """Token features -> Linear -> LayerNorm -> Linear, mean-pooled over the real tokens: padding never reaches the
    output, but it does reach the LayerNorm that hidden='norms' matches."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x, mask):
        h = self.fc2(self.norm(self.fc1(x))) * mask.unsqueeze(-1)
        return h.sum(1) / mask.sum(1, keepdim=True)


def test_hidden_matching_skips_padded_tokens_when_data_carries_a_token_mask():
    torch.manual_seed(0)
    model = _MaskedPool().eval()
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 3, 1])[:, None]).long()
    x = torch.randn(4, 6, 8)
    x[mask == 0] = 0  # both models map a zero token to the same hidden state (the bias): no error there
    padded_elsewhere = x.clone()
    padded_elsewhere[mask == 0] = torch.randn(int((mask == 0).sum()), 8)
    cm = fxcompress.optimize(model, (x, mask), recipe="svd:rank=2")

    def first_loss(inputs, token_mask):
        data = [(inputs, mask)]
        student = copy.deepcopy(cm.module)
        return distill_module(
            student,
            model,
            fxcompress.Calibration(data, token_mask=token_mask) if token_mask is not None else data,
            DistillOptions(steps=1, lr=1e-9, loss="mse", hidden="norms"),
        )[0]

    assert first_loss(x, 1) == pytest.approx(first_loss(padded_elsewhere, 1), rel=1e-5)
    assert first_loss(x, None) < 0.8 * first_loss(padded_elsewhere, None)  # unmasked, padding counts


def _variable_length_data():
    """A torch.export-captured transformer and batches cut to different lengths (as batches of like-length
    sentences are)."""
    torch.manual_seed(0)
    model = TinyTransformer(vocab=50, seq=8, dim=16, heads=2, depth=1).eval()
    return model, [(torch.randint(0, 50, (4, length)),) for length in (8, 5, 6, 3)]


def test_distill_on_batches_of_different_lengths_needs_the_length_axis_dynamic():
    model, data = _variable_length_data()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4")
    assert cm.capture_method == "export"
    with pytest.raises(InputError, match=r"input 0: axes \[1\].*dynamic_axes"):
        fxcompress.distill(cm, model, data, steps=2)


def test_distill_trains_a_module_captured_with_a_dynamic_length_on_cut_batches():
    model, data = _variable_length_data()
    cm = fxcompress.optimize(model, data[0], recipe="svd:rank=4", dynamic_axes=(0, 1))
    before = _err(cm, model, data)
    # hidden matching captures the teacher too, symbolic on the axes the data varies in
    fxcompress.distill(cm, model, data, steps=40, lr=3e-3, hidden="norms")
    assert _err(cm, model, data) < 0.7 * before
