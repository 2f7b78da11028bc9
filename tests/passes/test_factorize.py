import onnxruntime as ort
import pytest
import torch
from helpers import op_types
from torch import nn

import fxcompress
from fxcompress.algorithms.block_refit import find_blocks, held_out_rows, refit_block
from fxcompress.algorithms.kfac import output_gauss_newton
from fxcompress.algorithms.quant import sqnr_db
from fxcompress.errors import InputError, RecipeError
from fxcompress.graph.calibration import Calibration
from fxcompress.graph.capture import capture
from fxcompress.graph.sites import find_sites
from fxcompress.passes.svd import SVDConfig, refit_target, svd_factors, tucker2


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
    torch.testing.assert_close(
        torch.einsum("rskl,or,si->oikl", core, last[:, :, 0, 0], first[:, :, 0, 0]), w, atol=1e-4, rtol=1e-4
    )
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
    for recipe, msg in [
        ("svd:ratio=1.5", r"ratio must be in \(0, 1\)"),
        ("svd:ratio=0", r"ratio must be in \(0, 1\)"),
        ("svd:energy=1", "energy must be in"),
    ]:
        with pytest.raises(RecipeError, match=msg):
            fxcompress.optimize(model, x, recipe=recipe)
    with pytest.raises(RecipeError, match=r"rank=64 is larger than layer '0' allows \(min\(out, in\) = 16\)"):
        fxcompress.optimize(model, x, recipe="svd:rank=64")
    with pytest.raises(InputError, match="aware=input needs calibration"):
        fxcompress.optimize(model, x, recipe="svd:aware=true")
    with pytest.raises(RecipeError, match="aware must be false, true"):
        fxcompress.optimize(model, x, recipe="svd:aware=both")
    with pytest.raises(RecipeError, match="allocate=global .* needs aware=output and a ratio"):
        fxcompress.optimize(model, x, recipe="svd:allocate=global,aware=true")
    with pytest.raises(RecipeError, match="allocate=global .* needs aware=output and a ratio"):
        fxcompress.optimize(model, x, recipe="svd:allocate=global,aware=output,rank=4")
    with pytest.raises(RecipeError, match="sequential=true refits layers to calibration inputs: it needs aware=true"):
        fxcompress.optimize(model, x, recipe="svd:sequential=true")


def test_spatial_svd_full_rank_is_exact_and_runs_on_ort(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))).eval()
    x = torch.randn(2, 8, 9, 9)
    cm = fxcompress.optimize(model, x, recipe="svd:rank=24,kinds=conv2d,conv=spatial")  # full rank: min(8*3, 16*3)
    assert cm.records[0].skipped  # full rank saves nothing
    from fxcompress.passes.svd import spatial_svd

    v, h = spatial_svd(model[0].weight.detach(), SVDConfig(rank=24), "0")
    torch.testing.assert_close(torch.einsum("rikz,orzl->oikl", v, h), model[0].weight.detach(), atol=1e-4, rtol=1e-4)
    cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,kinds=conv2d,conv=spatial")
    assert cm.records[0].action == "spatial-svd" and cm.bytes_after < 0.55 * cm.bytes_before
    sess = ort.InferenceSession(str(cm.export(tmp_path / "s.onnx")), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(out, cm(x), atol=1e-4, rtol=1e-4)
    assert out.shape == model(x).shape


class _Masked(nn.Module):
    """fc1 then a fixed map that keeps only the first ``keep`` of fc1's outputs (scaled up): a rank budget spent
    on the other outputs is wasted, which only an output-aware truncation can know."""

    def __init__(self, keep: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 16)
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.weight[:keep, :keep] = 10 * torch.eye(keep)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _captured_outputs(model, batches) -> tuple:
    """The captured graph and each Linear's output node, by layer name: what output_gauss_newton is given."""
    gm = capture(model, batches[0]).graph_module
    return gm, {site.name: site.node for site in find_sites(gm)[0]}


def _output_error(model, cm, x):
    with torch.no_grad():
        return float((model(x) - cm(x)).pow(2).mean() / model(x).pow(2).mean())


def test_output_gauss_newton_estimates_the_jacobian_product():
    torch.manual_seed(0)
    model = _Masked().eval()
    batches = [(torch.randn(4, 32),) for _ in range(2)]
    gm, nodes = _captured_outputs(model, batches)
    g = output_gauss_newton(gm, {"fc1": nodes["fc1"]}, batches, probes=400)["fc1"]
    j = model.fc2.weight.detach().double()  # d out / d fc1-output
    torch.testing.assert_close(g, j.t() @ j, atol=0.1 * 100, rtol=0.1)  # entries are 0 or ~100: 10% Monte Carlo error


class _MaskedTokens(_Masked):
    def forward(self, x, mask):  # the mask is only an input: padded rows still reach the output
        return self.fc2(self.fc1(x))


def _token_batches():
    batches = []
    for lengths in ([5, 2, 3], [1, 4, 5]):
        mask = torch.zeros(3, 5, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
        batches.append((torch.randn(3, 5, 32), mask))
    return Calibration(batches, token_mask=1)


def test_output_gauss_newton_skips_padded_rows_in_every_probe_chunk():
    torch.manual_seed(0)
    model, batches = _MaskedTokens().eval(), _token_batches()
    gm, nodes = _captured_outputs(model, batches)
    g = output_gauss_newton(gm, {"fc1": nodes["fc1"]}, batches, probes=203)["fc1"]  # 25 full chunks and a ragged one
    j = model.fc2.weight.detach().double()
    real_rows_per_example = 20 / 6  # every real token contributes J^T J; 30 rows, 10 of them padding, 6 examples
    torch.testing.assert_close(g, real_rows_per_example * j.t() @ j, atol=0.1 * 333, rtol=0.1)


def test_output_gauss_newton_per_probe_fallback_gives_the_batched_numbers(monkeypatch):
    torch.manual_seed(0)
    model, batches = _MaskedTokens().eval(), _token_batches()
    gm, nodes = _captured_outputs(model, batches)
    batched = output_gauss_newton(gm, nodes, batches, probes=11)
    grad = torch.autograd.grad

    def no_vmap(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("vmap: no batching rule")  # what an op without a batching rule raises
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = output_gauss_newton(gm, nodes, batches, probes=11)
    for name in nodes:
        torch.testing.assert_close(looped[name], batched[name], rtol=1e-5, atol=1e-4)


def test_output_aware_svd_spends_its_rank_where_the_model_output_looks():
    torch.manual_seed(0)
    model = _Masked().eval()
    x = torch.randn(64, 32)
    calib = [(torch.randn(32, 32),) for _ in range(4)]
    errors = {}
    for aware in ("true", "output"):
        cm = fxcompress.optimize(model, x, recipe=f"svd:rank=8,aware={aware},include=fc1", calibration=calib)
        assert [r.action for r in cm.records if r.layer == "fc1"] == ["svd"]
        errors[aware] = _output_error(model, cm, x)
    assert errors["output"] < 1e-3 < errors["true"]  # rank 8 suffices exactly for the 8 outputs that matter


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.easy, self.hard = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():  # nearly rank 4
            self.easy.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8 + 1e-3 * torch.randn(64, 64))

    def forward(self, x):
        return self.easy(x) + self.hard(x)


def test_global_allocation_gives_rank_to_the_layer_that_needs_it_within_the_same_budget():
    torch.manual_seed(0)
    model = _TwoBranches().eval()
    x = torch.randn(32, 64)
    calib = [(torch.randn(64, 64),) for _ in range(4)]
    per_layer = fxcompress.optimize(model, x, recipe="svd:ratio=0.4,aware=output", calibration=calib)
    joint = fxcompress.optimize(model, x, recipe="svd:ratio=0.4,aware=output,allocate=global", calibration=calib)
    ranks = {r.layer: int(r.reason.split()[1]) for r in joint.records if r.action == "svd"}
    assert ranks["easy"] < 8 < ranks["hard"]
    assert sum(ranks.values()) * (64 + 64) <= 0.4 * 2 * 64 * 64  # the factors fit the same budget
    assert _output_error(model, joint, x) < 0.7 * _output_error(model, per_layer, x)  # measured 0.018 vs 0.030


def test_refit_target_keeps_the_weight_when_the_inputs_did_not_change_and_undoes_a_known_input_map():
    torch.manual_seed(0)
    w, x = torch.randn(8, 6), torch.randn(500, 6)
    h = x.t() @ x / 500
    assert torch.allclose(refit_target(w, h, h, damp=0.01).float(), w, atol=1e-6)
    mix = torch.eye(6) + 0.3 * torch.randn(6, 6)  # the compressed layers upstream now deliver x_s = x_t mix
    xs = x @ mix
    m = refit_target(w, xs.t() @ xs / 500, x.t() @ xs / 500, damp=1e-9).float()
    assert torch.allclose(xs @ m.t(), x @ w.t(), atol=1e-4)  # maps what the layer gets onto what it should output


def test_sequential_refit_lets_each_layer_absorb_the_error_of_the_factorized_layers_before_it():
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(64, 64), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(64, 10)).eval()
    mixing = torch.randn(64, 64) * 0.2  # correlated inputs, so the whitened fit has something to use
    calib = [(torch.randn(64, 64) @ mixing,) for _ in range(8)]
    held_out = torch.randn(256, 64) @ mixing
    cms = {
        seq: fxcompress.optimize(
            model, calib[0], recipe=f"svd:rank=12,aware=output,sequential={seq},exclude=8", calibration=calib
        )
        for seq in ("false", "true")
    }
    refitted = [r.layer for r in cms["true"].records if "refitted to the compressed inputs" in r.reason]
    assert refitted == ["2", "4", "6"]  # the first layer's inputs are the float model's: nothing to refit
    errors = {seq: _output_error(model, cm, held_out) for seq, cm in cms.items()}
    assert errors["true"] < 0.8 * errors["false"]  # measured 0.024 vs 0.037


def _mlp_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32), nn.Linear(32, 16)).eval()
    mixing = torch.randn(32, 32) * 0.3
    calib = [(torch.randn(128, 32) @ mixing,) for _ in range(32)]  # 4,096 rows: enough not to overfit 4k factors
    return model, calib, torch.randn(512, 32) @ mixing


def test_block_refit_trains_each_mlp_pair_jointly_and_lowers_the_held_out_output_error():
    model, calib, held_out = _mlp_and_data()
    recipe = "svd:rank=8,aware=output,probes=8,exclude=3"
    cms = {
        refit: fxcompress.optimize(
            model, calib[0], recipe=recipe + f",refit={refit},refit_steps=300", calibration=calib
        )
        for refit in ("none", "block")
    }
    notes = [r.reason for r in cms["block"].records if not r.skipped]
    assert len(notes) == 2 and all("refitted as one block 0 -> 2" in note for note in notes)
    assert [r.bytes_after for r in cms["block"].records] == [r.bytes_after for r in cms["none"].records]
    errors = {refit: _output_error(model, cm, held_out) for refit, cm in cms.items()}
    assert errors["block"] < 0.9 * errors["none"]  # measured 0.158 vs 0.182


def test_block_refit_keeps_the_truncation_when_training_does_not_beat_it_on_held_out_tokens():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    first = (torch.randn(4, 16), torch.randn(32, 4), torch.randn(32))
    second = (torch.randn(4, 32), torch.randn(16, 4), None)
    y = torch.randn(256, 16)
    kept_first, kept_second, before, after = refit_block(
        x, y, torch.arange(256) // 8, first, second, torch.relu, torch.eye(16), steps=20, lr=1e3
    )
    assert after >= before  # an absurd lr diverges ...
    assert kept_first is first and kept_second is second  # ... and the factors are left as they were


def test_find_blocks_sees_mlp_pairs_in_fx_and_torch_export_graphs():
    model, calib, _ = _mlp_and_data()
    fx_graph = capture(model, calib[0]).graph_module
    exported = torch.export.export(model, calib[0]).module()
    for gm in (fx_graph, exported):
        sites = find_sites(gm)[0]
        assert [(b.first.name, b.second.name) for b in find_blocks(gm, sites)] == [(sites[0].name, sites[1].name)]


def test_bad_block_refit_inputs():
    model, calib, _ = _mlp_and_data()
    with pytest.raises(RecipeError, match="refit=block .* needs aware=output"):
        fxcompress.optimize(model, calib[0], recipe="svd:aware=true,refit=block", calibration=calib)
    with pytest.raises(RecipeError, match="refit must be 'none' or 'block'"):
        fxcompress.optimize(model, calib[0], recipe="svd:aware=output,refit=blocks", calibration=calib)
    with pytest.raises(InputError, match=r"found no Linear -> activation .* pair with both layers selected"):
        fxcompress.optimize(model, calib[0], recipe="svd:rank=4,aware=output,refit=block,include=0", calibration=calib)


def test_block_refit_holds_out_whole_calibration_batches():
    groups = torch.arange(30).repeat_interleave(7)  # 30 batches of 7 tokens
    val, fit = held_out_rows(groups, torch.Generator().manual_seed(0))
    held = set(groups[val].tolist())
    assert len(held) == 3 and held.isdisjoint(groups[fit].tolist()) and val.numel() + fit.numel() == groups.numel()
    val, fit = held_out_rows(torch.zeros(50, dtype=torch.long), torch.Generator().manual_seed(0))  # one batch: rows
    assert val.numel() == 5 and fit.numel() == 45


def test_ranks_a_multiple_of_16_let_int4_quantize_both_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160)).eval()
    x = torch.randn(8, 96)
    plain = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,int4:block=32")
    aligned = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,multiple=16,int4:block=32")
    rank = lambda cm: [r for r in cm.records if r.pass_name == "svd"][0]  # noqa: E731
    assert "rank 30" in rank(plain).reason and "rank 16" in rank(aligned).reason  # floor(0.5*96*160/256) = 30
    int4_layers = lambda cm: [r for r in cm.records if r.pass_name == "int4" and r.action.startswith("int4")]  # noqa
    assert len(int4_layers(plain)) == 1 and len(int4_layers(aligned)) == 2  # rank 30: the second factor stays float
    with pytest.raises(fxcompress.errors.RecipeError, match="multiple must be >= 1"):
        fxcompress.optimize(model, x, recipe="svd:multiple=0")
