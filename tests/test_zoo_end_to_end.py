"""int8 -> ONNX -> ORT CPU on every zoo model: the foundation issue's acceptance bars, as assertions."""

import pytest

import fxcompress
from fxcompress.models import zoo

from helpers import same_state, state_snapshot

# (factory, target, cosine floor). MiniLM's bar is 0.99 on sentence embeddings.
CASES = [
    ("mlp", "cpu", 0.999),
    ("digits_cnn", "cpu", 0.999),
    ("resnet_mini", "cpu", 0.999),
    ("tiny_transformer", "cpu", 0.999),
    ("minilm", "cpu", 0.99),
    ("minilm", "cpu-nbits", 0.998),
    ("minilm", "cuda", 0.999),
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
    rep = fxcompress.check(model, path, example, eval_inputs=ev.inputs if ev else None,
                           labels=ev.labels if ev else None, fp32_baseline=False)
    assert rep.passed, rep.failures
    assert rep.provider == "CPUExecutionProvider"
    assert rep.metrics["cosine"] >= floor
    assert rep.weights["ratio"] <= 0.28  # whole model, embeddings included
    assert rep.weights["folded_back"] is False
    assert same_state(model, snap)  # the user's model is untouched
    if name == "digits_cnn":
        assert rep.metrics["accuracy_drop_pp"] <= 0.2
    if name == "minilm":
        assert cm.capture_method == "export"  # symbolic_trace fails on transformers' BERT


@pytest.mark.slow
def test_fold_bn_then_int8_on_digits(made, tmp_path):
    model, example, ev = made("digits_cnn")
    cm = fxcompress.optimize(model, example, recipe="fold_bn,int8")
    assert sum(r.action == "folded" for r in cm.records) == 2
    rep = fxcompress.check(model, cm.export(tmp_path / "d.onnx"), example, eval_inputs=ev.inputs, labels=ev.labels,
                           fp32_baseline=False)
    assert rep.passed and rep.metrics["accuracy_drop_pp"] <= 0.2
