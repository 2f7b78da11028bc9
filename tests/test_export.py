import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import init_dtypes, op_types
from torch import nn

import fxcompress
from fxcompress.checker.runtime import cpu_has_vnni
from fxcompress.errors import ExportError
from fxcompress.export.targets import TARGETS, get_target, target_names
from fxcompress.export.writer import read_metadata, translation_table
from fxcompress.models.zoo import TinyTransformer
from fxcompress.ops.registry import all_custom_ops


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)  # K=32: MatMulNBits-eligible
        self.head = nn.Linear(32, 5, bias=False)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(h)))


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 64, (2, 6))
    return model, ids, fxcompress.optimize(model, ids, recipe="int8")


EXPECTED_OPS = {  # CPU targets: int8 Conv weights Cast + Mul (expanded once when the session loads)
    "cpu": {"DynamicQuantizeMatMul", "Conv", "Cast", "Gather"},
    "cpu-vnni": {"DynamicQuantizeMatMul", "Conv", "Cast", "Gather"},
    "cpu-nbits": {"MatMulNBits", "Conv", "Cast", "Gather"},
    "cpu-weightonly": {"MatMulNBits", "Conv", "Cast", "Gather"},
    "cuda": {"MatMul", "Conv", "DequantizeLinear", "Gather"},
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_lowering_ops_dtypes_and_ort_parity(compressed, tmp_path, target):
    model, ids, cm = compressed
    path = cm.export(tmp_path / "m.onnx", target=target)
    kinds = set(op_types(path))
    assert EXPECTED_OPS[target] <= kinds
    assert "MatMul" not in kinds or target == "cuda"  # no float MatMul left on the CPU lowerings
    dtypes = init_dtypes(path)
    quantized = [d for d in dtypes.values() if d in ("int8", "uint8")]
    assert len(quantized) >= 4  # emb, conv, fc, head
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randint(0, 64, (5, 6))  # a batch size that was never traced: the axis is dynamic
    out = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
    ref = model(batch).detach().numpy()
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    saturating = target == "cpu-vnni" and cpu_has_vnni() is False  # U8S8 without VNNI: documented, noted in reports
    assert cos.mean() > (0.9 if saturating else 0.995)


@pytest.mark.parametrize("recipe", ["int8", "int4:block=16"])
def test_weightonly_target_runs_fp32_activations_and_matches_torch(tmp_path, recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8)).eval()
    x = torch.randn(4, 64) * torch.linspace(0.1, 8, 64)  # outlier channels: what activation quantization gets wrong
    cm = fxcompress.optimize(model, x, recipe=recipe)
    errors = {}
    for target in ("cpu-weightonly", "cpu-nbits"):
        proto = onnx.load(str(cm.export(tmp_path / f"{target}.onnx", target=target)))
        levels = {
            a.i
            for n in proto.graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "accuracy_level"
        }
        assert levels == ({1} if target == "cpu-weightonly" else {4})
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        errors[target] = float(np.abs(out - cm(x).detach().numpy()).max())
    assert errors["cpu-weightonly"] < 1e-4  # the torch module's numerics
    assert errors["cpu-nbits"] > 10 * errors["cpu-weightonly"]  # per-block int8 activations differ


def test_vnni_target_keeps_signed_int8_weights_and_notes_which_encoding_suits_the_cpu(
    compressed, tmp_path, monkeypatch
):
    model, ids, cm = compressed
    path = cm.export(tmp_path / "v.onnx", target="cpu-vnni")
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)  # U8S8, not q + 128 as uint8
    assert all(len(n.input) < 4 or not n.input[3] for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul")
    assert read_metadata(proto)["tolerance"]["cosine_min"] == 0.99  # activations quantized per tensor, as "cpu"
    monkeypatch.setattr("fxcompress.checker.parity.cpu_has_vnni", lambda: False)
    rep = fxcompress.check(model, path, ids)
    assert any("without VNNI" in n for n in rep.notes) and "without VNNI" in rep.to_text()
    monkeypatch.setattr("fxcompress.checker.parity.cpu_has_vnni", lambda: True)
    assert not any("VNNI" in n for n in fxcompress.check(model, path, ids).notes)
    # and the converse: a uint8 (cpu) artifact checked on a VNNI CPU points to the faster encoding
    cpu_path = cm.export(tmp_path / "c.onnx", target="cpu")
    assert any("target 'cpu-vnni'" in n for n in fxcompress.check(model, cpu_path, ids).notes)
    monkeypatch.setattr("fxcompress.checker.parity.cpu_has_vnni", lambda: False)
    assert not any("VNNI" in n for n in fxcompress.check(model, cpu_path, ids).notes)


def test_metadata_carries_recipe_target_and_tolerance(compressed, tmp_path):
    _, _, cm = compressed
    meta = read_metadata(onnx.load(str(cm.export(tmp_path / "m.onnx", target="cuda"))))
    assert meta["target"] == "cuda" and meta["recipe"][0]["pass"] == "int8"
    assert meta["tolerance"]["cosine_min"] == 0.999  # weight-only lowering keeps the recipe's floor
    meta_cpu = read_metadata(onnx.load(str(cm.export(tmp_path / "c.onnx", target="cpu"))))
    assert meta_cpu["tolerance"]["cosine_min"] == 0.99  # run-time activation quantization loosens it


def test_every_custom_op_has_a_translation_for_every_target():
    custom = all_custom_ops()
    assert len(custom) >= 7
    for target in TARGETS.values():
        missing = [o for o in custom if o not in translation_table(target)]
        assert not missing, f"{target.name}: no ONNX translation for {missing}"


def test_the_cli_choices_are_the_registry_and_every_variant_a_target_names_exists():
    from fxcompress.cli import build_parser
    from fxcompress.ops.registry import compressed_ops

    optimize = build_parser()._subparsers._group_actions[0].choices["optimize"]
    choices = next(a.choices for a in optimize._actions if a.dest == "target")
    assert list(choices) == ["auto", *target_names()] and target_names() == list(TARGETS)
    ops = compressed_ops()
    for target in TARGETS.values():
        for op, variant in target.variants:
            assert variant in ops[op].translations, f"{target.name}: {op} has no translation {variant!r}"
        assert target.int8_linear in ("uint8", "int8", "nbits", "keep") and target.nbits_fallback in ("uint8", "keep")


def test_unknown_target_names_the_choices():
    with pytest.raises(ExportError, match="unknown export target 'gpu'; choose one of auto, cpu, cpu-vnni"):
        get_target("gpu")


def test_reference_nbits_op_matches_per_channel_op():
    from fxcompress.export.lowering import lower_for_target

    model = nn.Sequential(nn.Linear(64, 16)).eval()
    x = torch.randn(3, 64)
    cm = fxcompress.optimize(model, x, recipe="int8")
    lowered = lower_for_target(cm.module, get_target("cpu-nbits"))
    assert any(n.target is torch.ops.fxcompress.linear_nbits.default for n in lowered.graph.nodes)
    torch.testing.assert_close(lowered(x), cm(x), rtol=1e-5, atol=1e-5)  # exact re-encoding
    torch.testing.assert_close(lower_for_target(cm.module, get_target("cpu"))(x), cm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda d: d / "missing-dir" / "m.onnx", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt" / "m.onnx", "does not exist"),
    ],
)
def test_unwritable_output_fails_before_export_and_leaves_nothing(compressed, tmp_path, make_path, message):
    _, _, cm = compressed
    path = make_path(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ExportError, match=message):
        cm.export(path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_failed_export_leaves_no_partial_file(compressed, tmp_path, monkeypatch):
    import fxcompress.export.writer as ex

    def broken(*a, **k):
        raise ExportError("simulated failure")

    monkeypatch.setattr(ex, "_export_program", broken)
    with pytest.raises(ExportError):
        compressed[2].export(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_is_rejected(compressed, tmp_path):
    with pytest.raises(ExportError, match="unknown export target 'tpu'"):
        compressed[2].export(tmp_path / "m.onnx", target="tpu")
    assert list(tmp_path.iterdir()) == []


def _input_dims(path) -> list[list]:
    return [
        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input
    ]


def test_dynamic_axes_reach_the_onnx_inputs_and_ort_runs_other_lengths(tmp_path):
    model = TinyTransformer(vocab=50, seq=8, dim=16, heads=2, depth=1).eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    cm = fxcompress.optimize(model, ids, recipe="int8", dynamic_axes=(0, 1))
    assert cm.capture_method == "export"  # torch.export keeps the length symbolic only when asked
    path = cm.export(tmp_path / "m.onnx", target="cuda")
    assert _input_dims(path) == [["batch", "ids_dim1"]]
    weight_only = ort.SessionOptions()  # else ORT's CPU EP fuses into MatMulNBits, quantizing activations
    weight_only.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(str(path), weight_only, providers=["CPUExecutionProvider"])
    for batch, length in ((2, 8), (3, 5), (1, 2)):
        x = ids.repeat(2, 1)[:batch, :length]
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(out, cm(x).numpy(), atol=1e-4)
    assert _input_dims(cm.export(tmp_path / "fixed.onnx", dynamic_axes=())) == [[2, 8]]


class _TwoLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, y):
        return torch.cat([self.a(x), self.b(y)], dim=1)


def test_inputs_of_independent_lengths_get_distinct_axis_names(tmp_path):
    x, y = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    cm = fxcompress.optimize(_TwoLengths().eval(), (x, y), recipe="int8", dynamic_axes=(0, 1))
    path = cm.export(tmp_path / "m.onnx", target="cuda")
    assert _input_dims(path) == [["batch", "x_dim1", 8], ["batch", "y_dim1", 8]]  # one name would claim them equal
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2, y2 = torch.randn(3, 4, 8), torch.randn(3, 9, 8)
    (out,) = sess.run(None, {"x": x2.numpy(), "y": y2.numpy()})
    assert out.shape == (3, 13, 8)


class _FixedLength(nn.Module):
    """Flattens (length, features) into a Linear of fixed width: the length cannot vary."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).reshape(x.shape[0], 5 * 8)


def test_an_axis_the_model_fixes_is_exported_fixed_with_a_warning(tmp_path):
    cm = fxcompress.optimize(_FixedLength(), torch.randn(2, 5, 8), recipe="int8", dynamic_axes=(0, 1))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fxcompress.export")
    logger.addHandler(handler)
    try:
        path = cm.export(tmp_path / "m.onnx")
    finally:
        logger.removeHandler(handler)
    assert _input_dims(path) == [["batch", 5, 8]]  # the batch axis alone stays dynamic
    assert any("input 0: (0, 1)" in r.getMessage() and "batch axis alone" in r.getMessage() for r in records)


def test_cpu_targets_expand_int8_conv_weights_once_at_load_and_the_checker_says_so(tmp_path):
    from fxcompress.checker.speed import slow_reasons
    from fxcompress.checker.weights import expanded_at_load

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    x = torch.randn(2, 3, 8, 8)
    cm = fxcompress.optimize(model.eval(), x, recipe="int8")
    cpu = onnx.load(str(cm.export(tmp_path / "cpu.onnx", target="cpu")))
    cuda = onnx.load(str(cm.export(tmp_path / "cuda.onnx", target="cuda")))
    assert expanded_at_load(cpu) == 16 * 3 * 9 + 8 * 16 * 9 and expanded_at_load(cuda) == 0
    rep = fxcompress.check(model, tmp_path / "cpu.onnx", x, compressed=cm, fp32_baseline=False)
    assert rep.passed and rep.weights["folded_back"] is False  # expanded by design, not a fold-back
    assert "expanded to float32 when the session loads" in rep.to_text()
    assert any("dequantized on every call" in r for r in slow_reasons(cuda, "CPUExecutionProvider", False, 5.0))
    assert not any("dequantized on every call" in r for r in slow_reasons(cpu, "CPUExecutionProvider", False, 5.0))


def test_auto_picks_the_target_for_this_machine_and_records_why(tmp_path, monkeypatch):
    import fxcompress.export.targets as targets

    cm = fxcompress.optimize(nn.Sequential(nn.Linear(16, 4)), torch.randn(2, 16), recipe="int8")
    for vnni, expected in ((True, "cpu-vnni"), (False, "cpu")):
        monkeypatch.setattr(targets, "cpu_has_vnni", lambda vnni=vnni: vnni)
        monkeypatch.setattr(targets, "cuda_provider_listed", lambda: False)
        meta = read_metadata(onnx.load(str(cm.export(tmp_path / f"{expected}.onnx"))))
        assert meta["target"] == expected and meta["target_choice"].startswith("auto: ")
    monkeypatch.setattr(targets, "cuda_provider_listed", lambda: True)
    assert read_metadata(onnx.load(str(cm.export(tmp_path / "g.onnx"))))["target"] == "cuda"
