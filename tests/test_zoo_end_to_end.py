"""int8 -> ONNX -> ORT CPU on every zoo model: the foundation issue's acceptance bars, as assertions."""

import pytest
from helpers import op_types, same_state, state_snapshot

import fxcompress
from fxcompress.models import zoo
from fxcompress.recipe.tolerance import EXACT

# (factory, target, cosine floor). MiniLM's bar is 0.99 on sentence embeddings.
CASES = [
    ("mlp", "cpu", 0.999),
    ("digits_cnn", "cpu", 0.999),
    ("resnet_mini", "cpu", 0.999),
    ("tiny_transformer", "cpu", 0.999),
    ("minilm", "cpu", 0.99),
    ("minilm", "cpu-nbits", 0.998),
    ("minilm", "cuda", 0.999),
    ("minilm", "cpu-weightonly", 0.9995),  # fp32 activations: the torch module's 0.99954
]


@pytest.fixture(scope="module")
def made():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.FACTORIES[name]()
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name, target, floor", CASES)
def test_int8_on_ort_meets_the_bars(made, tmp_path, name, target, floor):
    model, example, *rest = made(name)
    ev = rest[0] if rest else None
    snap = state_snapshot(model)
    cm = fxcompress.optimize(model, example, recipe="int8")
    path = cm.export(tmp_path / f"{name}.onnx", target=target)
    rep = fxcompress.check(
        model,
        path,
        example,
        recipe=cm.recipe,
        eval_inputs=ev.inputs if ev else None,
        labels=ev.labels if ev else None,
        fp32_baseline=False,
    )
    assert rep.passed, rep.failures
    assert rep.provider == "CPUExecutionProvider"
    assert rep.metrics["cosine"] >= floor
    assert rep.weights["ratio"] <= 0.28  # whole model, embeddings included
    assert rep.weights["folded_back"] is False
    assert same_state(model, snap)  # the user's model is untouched
    if name == "digits_cnn":
        assert rep.metrics["accuracy_drop_pp"] <= 0.2
    if target == "cpu-weightonly":
        assert "fused_by_ort" not in rep.weights  # every Linear ran as written, at accuracy_level 1
    if name == "minilm":
        assert cm.capture_method == "export"  # symbolic_trace fails on transformers' BERT


@pytest.mark.slow
def test_fold_bn_then_int8_on_digits(made, tmp_path):
    model, example, ev = made("digits_cnn")
    cm = fxcompress.optimize(model, example, recipe="fold_bn,int8")
    assert sum(r.action == "folded" for r in cm.records) == 2
    rep = fxcompress.check(
        model,
        cm.export(tmp_path / "d.onnx"),
        example,
        recipe=cm.recipe,
        eval_inputs=ev.inputs,
        labels=ev.labels,
        fp32_baseline=False,
    )
    assert rep.passed and rep.metrics["accuracy_drop_pp"] <= 0.2


def _check(model, path, example, ev, recipe):
    return fxcompress.check(
        model,
        path,
        example,
        recipe=recipe,
        eval_inputs=ev.inputs,
        labels=ev.labels,
        fp32_baseline=False,
        provider="cpu",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, drop", [("fold_bn,int8_static", 0.2), ("fold_bn,int8:kinds=conv2d,int4:block=32", 1.0)]
)
def test_digits_static_int8_and_int4_accuracy(made, tmp_path, recipe, drop):
    model, example, ev = made("digits_cnn")
    cm = fxcompress.optimize(model, example, recipe=recipe, calibration=zoo.digits_calibration())
    rep = _check(model, cm.export(tmp_path / "d.onnx", target="cpu"), example, ev, recipe)
    assert rep.passed, rep.failures
    assert rep.metrics["accuracy_drop_pp"] <= drop


@pytest.mark.slow
def test_digits_pruned_distilled_int8_is_6x_smaller_within_half_a_point(made, tmp_path):
    model, example, ev = made("digits_cnn")
    x_train = zoo.digits_data()[0]
    train = [(x_train[i : i + 64],) for i in range(0, len(x_train), 64)]
    recipe = "fold_bn,prune:ratio=0.5,importance=activation,distill:steps=300,lr=1e-3,loss=kl,int8"
    cm = fxcompress.optimize(model, example, recipe=recipe, calibration=train)
    rep = _check(model, cm.export(tmp_path / "d.onnx", target="cpu"), example, ev, recipe)
    assert rep.passed, rep.failures
    assert rep.weights["ratio"] <= 1 / 6 and rep.metrics["accuracy_drop_pp"] <= 0.5


@pytest.mark.slow
def test_minilm_fp16_is_half_the_bytes_at_cosine_0_9999(made, tmp_path):
    model, example, ev = made("minilm")
    cm = fxcompress.optimize(model, example, recipe="fp16")
    rep = fxcompress.check(
        model,
        cm.export(tmp_path / "m.onnx"),
        example,
        recipe="fp16",
        eval_inputs=ev.inputs,
        fp32_baseline=False,
        provider="cpu",
    )
    assert rep.passed, rep.failures
    assert rep.metrics["cosine"] >= 0.9999 and rep.weights["ratio"] <= 0.51


@pytest.mark.slow
def test_minilm_int4_gptq_with_sensitivity_budget_meets_bytes_and_cosine(made, tmp_path):
    model, example, ev = made("minilm")
    recipe = "int4:kinds=embedding,block=64,clip=true,int4:block=128,algo=gptq,act_order=true,clip=true,budget=0.15"
    cm = fxcompress.optimize(model, example, recipe=recipe, calibration=zoo.minilm_calibration())
    rep = fxcompress.check(
        model,
        cm.export(tmp_path / "m.onnx", target="cpu-nbits"),
        example,
        recipe=recipe,
        eval_inputs=ev.inputs,
        fp32_baseline=False,
        provider="cpu",
    )
    assert rep.passed, rep.failures
    assert rep.weights["ratio"] <= 0.16 and rep.metrics["cosine"] >= 0.98


@pytest.mark.slow
def test_minilm_attention_heads_prune_whole_and_run_on_ort(made, tmp_path):
    model, example, ev = made("minilm")
    cm = fxcompress.optimize(model, example, recipe="prune:ratio=0.25,include=*.attention.self.*")
    pruned = [r for r in cm.records if r.action == "pruned"]
    assert len(pruned) == 18  # q, k, v of all six layers
    for r in pruned:
        removed = r.extra["removed_channels"]
        assert len(removed) == 96 and len({c // 32 for c in removed}) == 3  # three whole heads (of 12, 32 wide)
    # reference = the pruned torch module: the artifact must compute exactly what it computes
    path = cm.export(tmp_path / "m.onnx")
    # attention stays fused with 9 heads of 12: the graph's recorded shapes still say 12, the fused op must not
    assert op_types(path).count("MultiHeadAttention") == 6
    rep = fxcompress.check(
        cm.module,
        path,
        example,
        tolerance=EXACT,
        eval_inputs=ev.inputs,
        fp32_baseline=False,
        provider="cpu",
    )
    assert rep.passed, rep.failures
    assert rep.metrics["max_abs"] <= 1e-4
    layer = cm.module.get_submodule("encoder.encoder.layer.3.attention")
    assert layer.self.value.weight.shape == (288, 384) and layer.output.dense.weight.shape == (384, 288)


@pytest.mark.slow
def test_minilm_with_a_dynamic_length_runs_on_ort_at_each_sentence_length(made, tmp_path):
    model, example, ev = made("minilm")
    cm = fxcompress.optimize(model, example, recipe="int8", dynamic_axes=zoo.DYNAMIC_AXES["minilm"])
    path = cm.export(tmp_path / "m.onnx", target="cpu")
    cut = []  # the evaluation batches cut to their longest sentence: 16 tokens or fewer instead of 32
    for ids, mask in ev.inputs:
        length = int(mask.sum(1).max())
        cut.append((ids[:, :length].contiguous(), mask[:, :length].contiguous()))
    assert len({ids.shape[1] for ids, _ in cut}) > 1
    rep = fxcompress.check(model, path, example, recipe="int8", eval_inputs=cut, fp32_baseline=False, provider="cpu")
    assert rep.passed, rep.failures
    assert rep.metrics["cosine"] >= 0.99
