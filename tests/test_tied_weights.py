"""Weights read by several layers (a Linear called twice, a head tied to its embedding) are compressed once, or left
float with a record that says why, so an artifact never grows past the fp32 model."""

from __future__ import annotations

import pytest
import torch
from helpers import cosine
from torch import nn

import fxcompress
from fxcompress.checker.parity import check


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(torch.relu(self.fc(x))))


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(512, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.parametrize("recipe", ["int8:algo=gptq", "int4:algo=gptq", "int8_static"])
def test_a_linear_called_twice_is_stored_once(recipe):
    torch.manual_seed(0)
    model, x = CalledTwice().eval(), torch.randn(32, 64)
    cm = fxcompress.optimize(model, x, recipe=recipe, calibration=[(torch.randn(64, 64),)])
    fc = [r for r in cm.records if r.layer == "fc"]
    assert len(fc) == 2 and "shares the" in fc[1].reason
    assert cm.compression_ratio > 3.0
    assert cosine(cm(x), model(x)) > 0.99


def test_fp16_keeps_a_tied_weight_one_tensor(tmp_path):
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 512, (4, 16))
    cm = fxcompress.optimize(model, ids, recipe="fp16")
    assert cm.module.get_submodule("emb").weight is cm.module.get_submodule("head").weight
    assert cm.compression_ratio == pytest.approx(2.0, rel=0.01)
    report = check(model, cm.export(tmp_path / "m.onnx"), ids)
    assert report.passed, report.failures


def test_int4_on_both_readers_shares_the_packed_weight(tmp_path):
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 512, (4, 16))
    cm = fxcompress.optimize(model, ids, recipe="int4:kinds=linear+embedding")
    assert "shares the int4 weight of emb" in next(r.reason for r in cm.records if r.layer == "head")
    assert cm.compression_ratio > 3.0
    path = cm.export(tmp_path / "m.onnx")
    assert path.stat().st_size < 0.35 * sum(p.numel() * 4 for p in model.parameters())
    import onnxruntime as ort  # the shared, reshaped tensors run as the torch module computes them

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    assert cosine(torch.from_numpy(out), cm(ids)) > 0.9999


@pytest.mark.parametrize(
    ("recipe", "hint"),
    [
        ("int4", "add kinds=embedding+linear to compress it"),
        ("int8_static", "int8_static cannot rewrite embedding layers"),
        ("svd", "svd would store one copy per reader"),
    ],
)
def test_a_head_tied_to_a_float_embedding_is_skipped_with_the_way_out(recipe, hint):
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 512, (4, 16))
    cm = fxcompress.optimize(model, ids, recipe=recipe, calibration=[(torch.randint(0, 512, (4, 16)),)])
    head = next(r for r in cm.records if r.layer == "head")
    assert head.action == "skipped" and hint in head.reason
    assert cm.compression_ratio >= 1.0  # never larger than the fp32 model


@pytest.mark.parametrize("target", ["cpu-vnni", "cpu", "cpu-nbits"])
def test_int8_stores_a_tied_embedding_and_head_once(target, tmp_path):
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 512, (4, 16))
    cm = fxcompress.optimize(model, ids, recipe="int8")
    assert "shares the int8 weight of emb" in next(r.reason for r in cm.records if r.layer == "head")
    assert cm.compression_ratio > 3.5
    path = cm.export(tmp_path / "m.onnx", target=target)
    import onnx

    tables = [t for t in onnx.load(str(path)).graph.initializer if 512 * 64 in (_numel(t), _numel(t) * 2)]
    # the table is one initializer where the head can read the embedding's signed codes; the uint8 / MatMulNBits
    # encodings give the head its own re-encoded copy
    assert len(tables) == (1 if target == "cpu-vnni" else 2), [t.name for t in tables]
    report = check(model, path, ids)
    assert report.passed, report.failures


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
