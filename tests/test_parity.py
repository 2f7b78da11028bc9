import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxcompress
from fxcompress.checker.metrics import compare
from fxcompress.checker.parity import check
from fxcompress.errors import RuntimeMissingError
from fxcompress.recipe.tolerance import Tolerance


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(8, 32)
    path = fxcompress.optimize(model, x, recipe="int8").export(tmp_path_factory.mktemp("a") / "mlp.onnx", target="cuda")
    return model, x, path


def test_good_artifact_passes_with_full_report(mlp_artifact):
    model, x, path = mlp_artifact
    rep = check(model, path, x, classifier=True)
    assert rep.passed, rep.failures
    assert rep.provider == "CPUExecutionProvider" and rep.target == "cuda"
    assert rep.metrics["cosine"] > 0.999 and rep.metrics["top1_agreement"] >= 0.98
    assert rep.weights["onnx_bytes_by_dtype"]["int8"] > 0 and rep.weights["folded_back"] is False
    assert rep.weights["ratio"] < 0.3
    assert rep.memory["rss_load_mb"] >= 0 and rep.memory["fp32_rss_load_mb"] >= 0
    assert rep.latency["p50_ms"] > 0 and rep.latency["fp32_p50_ms"] > 0
    assert '"passed": true' in rep.to_json() and "parity PASSED" in rep.to_text()


def test_the_report_says_when_ort_quantizes_activations_of_the_weight_only_lowering(mlp_artifact, tmp_path):
    model, x, path = mlp_artifact  # target cuda: DequantizeLinear + MatMul, which ORT's CPU EP fuses into MatMulNBits
    rep = check(model, path, x)
    assert rep.weights["fused_by_ort"] >= 1 and "did not run weight-only" in rep.to_text()
    dynamic = fxcompress.optimize(model, x, recipe="int8").export(tmp_path / "cpu.onnx", target="cpu")
    rep = check(model, dynamic, x)  # DynamicQuantizeMatMul: nothing for ORT to fuse
    assert "fused_by_ort" not in rep.weights and "weight-only" not in rep.to_text()
    exact = fxcompress.optimize(model, x, recipe="int8").export(tmp_path / "w.onnx", target="cpu-weightonly")
    rep = check(model, exact, x)  # MatMulNBits written at accuracy_level 1: fp32 activations, nothing fused
    assert "fused_by_ort" not in rep.weights and rep.metrics["cosine"] > 0.999 and rep.passed


def test_corrupted_file_fails_with_a_clear_message(mlp_artifact, tmp_path):
    model, x, path = mlp_artifact
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    rep = check(model, broken, x, fp32_baseline=False)
    assert not rep.passed
    assert "not a readable ONNX model" in rep.failures[0] or "could not load" in rep.failures[0]
    assert "parity FAILED" in rep.to_text()


def test_perturbed_weights_fail_the_cosine_floor(mlp_artifact, tmp_path):
    model, x, path = mlp_artifact
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.INT8:
            arr = numpy_helper.to_array(init).copy()
            arr[: arr.shape[0] // 2] = -arr[: arr.shape[0] // 2]  # flip half the rows of each weight
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(bad))
    rep = check(model, bad, x, fp32_baseline=False)
    assert not rep.passed and any("output 0: cosine" in f for f in rep.failures)


def test_artifact_of_another_model_fails_on_shape(mlp_artifact):
    _, x, path = mlp_artifact
    other = nn.Sequential(nn.Linear(32, 7)).eval()
    rep = check(other, path, x, fp32_baseline=False)
    assert not rep.passed and "shape (8, 10) differs from the model's (8, 7)" in rep.failures[0]


def test_fold_back_to_float_is_detected(tmp_path):
    # Cast(int8)*scale on a constant is exactly what ORT's constant folding turns into an fp32 initializer.
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (64, 16), dtype=np.int8)
    scale = np.full((16,), 0.01, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["qf", "s"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")],
    )
    path = tmp_path / "folds.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))

    class Same(nn.Module):
        def forward(self, x):
            return x @ (torch.from_numpy(q).float() * torch.from_numpy(scale))

    rep = check(Same(), path, torch.randn(4, 64), fp32_baseline=False)
    assert rep.weights["folded_back"] is True
    assert not rep.passed and any("folded quantized weights back to float" in f for f in rep.failures)


def test_labels_give_accuracy_and_drop_limit(mlp_artifact):
    model, x, path = mlp_artifact
    labels = model(x).argmax(-1)
    rep = check(model, path, x, labels=labels, fp32_baseline=False)
    assert rep.metrics["accuracy_fp32_pct"] == 100.0 and "accuracy_drop_pp" in rep.metrics
    wrong = (labels + 1) % 10
    rep = check(model, path, x, labels=wrong, tolerance=Tolerance(accuracy_drop_max_pp=-1.0), fp32_baseline=False)
    assert not rep.passed and any("accuracy drop" in f for f in rep.failures)
    rep = check(model, path, x, labels=labels[:3], fp32_baseline=False)
    assert not rep.passed and "3 labels for 8 evaluated samples" in rep.failures[0]


def test_compare_metrics():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    m = compare([a], [a * 2])
    assert m["cosine"] == pytest.approx(1.0) and m["max_abs"] == 2.0 and m["max_rel"] == 1.0
    m = compare([a], [-a])
    assert m["cosine"] == pytest.approx(-1.0)


def test_missing_onnxruntime_says_which_extra(monkeypatch):
    from fxcompress.checker.runtime import import_ort

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeMissingError, match=r"fxcompress\[cpu\].*fxcompress\[gpu\]"):
        import_ort()


def test_a_cuda_provider_that_cannot_start_is_said_once_and_cuda_asked_for_is_not_run_on_the_cpu(
    mlp_artifact, monkeypatch
):
    """Simulates onnxruntime-gpu without its CUDA libraries: the session is asked for CUDA and gets the CPU."""
    import fxcompress.checker.runtime as runtime

    model, x, path = mlp_artifact
    monkeypatch.setattr(runtime, "choose_providers", lambda provider: [runtime.CUDA, runtime.CPU])
    rep = check(model, path, x, fp32_baseline=False)
    assert rep.passed and rep.provider == "CPUExecutionProvider"
    assert (
        [n for n in rep.notes if "could not start" in n]
        == [n for n in rep.notes if "CUDA 13 and cuDNN 9" in n and "ran on the CPU instead" in n]
        != []
    )
    strict = check(model, path, x, fp32_baseline=False, provider="cuda")
    assert not strict.passed and "--provider cuda asked for it: not run" in strict.failures[0]
