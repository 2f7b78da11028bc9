"""The planner: a size under a cosine floor without a recipe, verified on ONNX Runtime; its outputs (the recipe that
reproduces it, the trade-off chart and data) and its errors (unreachable targets, bad arguments)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.planner import PlanError, plan


def _mlp() -> tuple[nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32)).eval()
    calibration = [(torch.randn(64, 128),) for _ in range(4)]
    return model, torch.randn(16, 128), calibration


def test_a_loose_size_gets_the_most_faithful_recipe_that_fits():
    model, x, calibration = _mlp()
    p = plan(model, x, size=0.6, min_cosine=0.999, calibration=calibration)
    assert p.chosen.recipe == "fp16" and p.chosen.ratio <= 0.6 and p.chosen.cosine >= 0.999


def test_a_size_between_int4_and_int8_is_met_with_a_budget(tmp_path):
    model, x, calibration = _mlp()
    p = plan(model, x, size=0.2, min_cosine=0.97, calibration=calibration)
    assert p.chosen.ratio <= 0.2 * 1.005 and p.chosen.cosine >= 0.97
    assert "budget=" in p.chosen.recipe or p.chosen.recipe.startswith("int4")
    assert [c.recipe for c in p.candidates][:2] == ["fp16", "int8"]  # too large: measured for bytes only
    assert not p.candidates[0].fits and p.candidates[0].note == "larger than the size"  # measured for the chart
    # the recipe reproduces the plan: same bytes
    again = fxcompress.optimize(model, x, recipe=p.chosen.recipe, calibration=calibration)
    assert again.bytes_after == p.compressed.bytes_after
    files = {f.suffix: f for f in p.save(tmp_path / "plan")}
    data = json.loads(files[".json"].read_text())
    assert data["chosen"]["recipe"] == p.chosen.recipe and len(data["candidates"]) == len(p.candidates)
    page = files[".html"].read_text()
    assert files[".svg"].read_text().startswith("<svg") and ("<svg" in page or "data:image/png" in page)


def test_without_a_size_the_smallest_recipe_that_holds_the_floor_wins():
    model, x, calibration = _mlp()
    p = plan(model, x, min_cosine=0.999, calibration=calibration)
    holding = [c for c in p.candidates if c.holds]
    assert p.chosen.ratio == min(c.ratio for c in holding)


def test_an_unreachable_target_says_the_best_found():
    model, x, calibration = _mlp()
    with pytest.raises(PlanError, match=r"best cosine within the size: 0\.9\d+ \(int4"):
        plan(model, x, size=0.14, min_cosine=0.99999, calibration=calibration)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 1.5}, "fraction of the fp32 bytes"),
        ({"size": 0.5, "min_cosine": 0.0}, "min_cosine"),
        ({"max_accuracy_drop": 0.5}, "needs labels"),
        ({"metric": lambda run: 1.0}, "go together"),
        ({"size": 0.1, "allow_training": True}, "needs calibration"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    model, x, _ = _mlp()
    with pytest.raises(fxcompress.errors.InputError, match=match):
        plan(model, x, **kwargs)


def test_cli_recipe_auto_writes_the_plan(tmp_path, capsys):
    from fxcompress.cli import main

    out = tmp_path / "mlp.onnx"
    assert main(["optimize", "mlp", "--recipe", "auto", "--target-size", "0.3", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "plan: int8" in text and out.is_file()
    assert (tmp_path / "mlp.plan.html").is_file() and (tmp_path / "mlp.plan.json").is_file()


def test_a_user_metric_is_a_floor_and_must_be_a_number():
    model, x, calibration = _mlp()
    want = model(x).argmax(-1)

    def agreement(run) -> float:  # top-1 agreement of the artifact with the model, computed by the user
        return float((torch.from_numpy(run((x,))[0]).argmax(-1) == want).float().mean())

    p = plan(model, x, size=0.3, min_cosine=0.9, eval_inputs=[(x,)], metric=agreement, min_metric=0.9)
    assert p.chosen.metric is not None and p.chosen.metric >= 0.9
    with pytest.raises(fxcompress.errors.InputError, match="must return a finite number"):
        plan(model, x, size=0.3, eval_inputs=[(x,)], metric=lambda run: "good", min_metric=0.5)


@pytest.mark.slow
def test_pruning_recovered_by_distillation_reaches_12x_on_the_digits_cnn(tmp_path):
    from fxcompress.models import zoo

    model, example, ev = zoo.digits_cnn()
    p = plan(
        model, example, size=1 / 12, min_cosine=0.9, calibration=zoo.digits_calibration(), eval_inputs=ev.inputs,
        labels=ev.labels, max_accuracy_drop=0.5, allow_training=True,
    )  # fmt: skip
    assert p.chosen.recipe.startswith("fold_bn,prune:ratio=") and "distill" in p.chosen.recipe
    assert p.chosen.ratio <= 1 / 12 * 1.005 and p.chosen.accuracy_drop_pp <= 0.5
    assert all(c.accuracy_drop_pp is not None for c in p.candidates if c.cosine is not None)
    with pytest.raises(PlanError, match=r"accuracy drop <= 0\.5 pp"):  # no training allowed: int8 is the floor
        plan(model, example, size=1 / 12, calibration=zoo.digits_calibration(), eval_inputs=ev.inputs,
             labels=ev.labels, max_accuracy_drop=0.5)  # fmt: skip


def test_a_latency_target_times_every_candidate_on_the_named_provider():
    model, x, calibration = _mlp()
    scratch = set(Path(tempfile.gettempdir()).glob("fxc-plan-fp32-*"))
    p = plan(model, x, max_latency=1000.0, min_cosine=0.99, calibration=calibration)
    assert p.chosen.recipe == "fp16" and p.chosen.latency_ratio is not None  # the most faithful one under it
    assert set(Path(tempfile.gettempdir()).glob("fxc-plan-fp32-*")) == scratch  # the fp32 baseline is cleaned up
    with pytest.raises(PlanError, match=r"latency <= 1e-06x fp32 on cpu.*fastest: \d+\.\d+x fp32") as missed:
        plan(model, x, max_latency=1e-6, provider="cpu", calibration=calibration)
    timed = [c for c in missed.value.candidates if c.latency_ratio is not None]  # what was tried comes with the error
    assert len(timed) >= 3 and f"{min(c.latency_ratio for c in timed):.2f}x" in str(missed.value)
    with pytest.raises(fxcompress.errors.RuntimeMissingError, match="CUDAExecutionProvider is not available"):
        plan(model, x, max_latency=0.5, provider="cuda")


def test_the_chart_is_a_png_with_a_latency_panel_that_the_html_embeds(tmp_path):
    pytest.importorskip("matplotlib")
    from fxcompress.planner import Candidate, Plan

    tried = [Candidate("fp16", 0.5, 0.99999, latency_ratio=1.4), Candidate("int8", 0.26, 0.9993, latency_ratio=0.35)]
    files = {f.suffix: f for f in Plan("int8", tried[1], tried, None, 0.99, "cpu", 1.0).save(tmp_path / "p")}
    assert set(files) == {".json", ".svg", ".png", ".html"}
    png = files[".png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert width > 1.8 * height  # two panels side by side: bytes and latency
    page = files[".html"].read_text()
    assert "data:image/png;base64," in page and "<td>0.35</td>" in page


def test_a_size_below_int4_everywhere_is_reached_by_factorizing_with_int4_factors():
    model, x, calibration = _mlp()
    p = plan(model, x, size=0.1, min_cosine=0.5, calibration=calibration)
    assert "svd:ratio=" in p.chosen.recipe and "aware=true,multiple=16" in p.chosen.recipe
    assert p.chosen.ratio <= 0.1 * 1.005 and p.chosen.cosine >= 0.5
    again = fxcompress.optimize(model, x, recipe=p.chosen.recipe, calibration=calibration)
    assert again.bytes_after == p.compressed.bytes_after  # the per-layer recipe reproduces the plan


def test_the_joint_per_layer_search_challenges_the_budget_that_held_and_the_more_accurate_wins():
    model, x, calibration = _mlp()
    p = plan(model, x, size=0.2, min_cosine=0.97, calibration=calibration)
    joint = [c for c in p.candidates if "include=" in c.recipe]
    budgeted = [c for c in p.candidates if "budget=" in c.recipe and c.holds]
    assert joint and budgeted  # both measured on ONNX Runtime
    holding = [c for c in p.candidates if c.fits and c.holds]
    assert p.chosen.cosine == max(c.cosine for c in holding)
    assert len([c for c in p.candidates if "budget=" in c.recipe]) == 1  # no other budget sized after one held


def test_a_candidate_that_misses_on_autos_lowering_is_measured_on_the_more_accurate_ones(monkeypatch):
    import fxcompress.planner as planner

    cosines = {"auto": 0.995, "cpu-nbits": 0.9985, "cpu-weightonly": 0.9995}
    measured = []

    class Floors(planner._Floors):
        def measure(self, cand, model, cm, example_inputs, batches, target):
            measured.append(target)
            cand.cosine = cosines[target]
            cand.holds = self.held_by(cand)

    monkeypatch.setattr(planner, "auto_target", lambda: (fxcompress.export.targets.TARGETS["cpu-vnni"], ""))
    floors = Floors(0.999, None, None, None, None)
    first = planner.Candidate("int8", 0.253, fits=True, target="auto")
    Floors.measure(floors, first, None, None, None, None, "auto")
    chosen = planner._on_accurate_lowering(first, floors, None, None, None, None)
    assert chosen.holds and chosen.target == "cpu-weightonly" and "auto's lowering gave cosine 0.99500" in chosen.note
    assert measured == ["auto", "cpu-nbits", "cpu-weightonly"]  # the faster lowering first
    far = planner.Candidate("int4", 0.14, fits=True, target="auto", cosine=0.95)
    assert planner._on_accurate_lowering(far, floors, None, None, None, None) is far  # too far to be worth it
