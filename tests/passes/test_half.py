import collections

import onnxruntime as ort
import pytest
import torch
from helpers import cosine, init_dtypes
from torch import nn

import fxcompress
from fxcompress.errors import RecipeError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.norm, self.fc2 = (
            nn.Embedding(20, 32),
            nn.Linear(32, 64),
            nn.LayerNorm(64),
            nn.Linear(64, 5),
        )

    def forward(self, ids):
        h = torch.nn.functional.gelu(self.fc1(self.emb(ids)))
        return torch.softmax(self.fc2(self.norm(h)).float(), dim=-1)


def _casts(gm):
    return collections.Counter(
        str(n.kwargs["dtype"]) for n in gm.graph.nodes if n.target is torch.ops.aten._to_copy.default
    )


def _halved(recipe):
    """(model, ids, compressed, parameter dtypes by name) for a seeded Block."""
    torch.manual_seed(0)
    model = Block().eval()
    ids = torch.randint(0, 20, (3, 6))
    cm = fxcompress.optimize(model, ids, recipe=recipe)
    return model, ids, cm, {n: p.dtype for n, p in cm.module.named_parameters()}


def test_fp16_halves_weights_keeps_sensitive_ops_fp32_and_io_fp32(tmp_path):
    model, ids, cm, dtypes = _halved("fp16")
    assert dtypes["emb.weight"] == dtypes["fc1.weight"] == dtypes["fc2.weight"] == torch.float16
    assert dtypes["norm.weight"] == torch.float32
    assert cm(ids).dtype == torch.float32
    # embedding -> fc1 -> gelu run in fp16 without casts between them; casts only around LayerNorm and the output
    assert _casts(cm.module) == {"torch.float32": 1, "torch.float16": 1}
    assert cosine(cm(ids), model(ids)) > 0.9999
    assert 0.49 < cm.bytes_after / cm.bytes_before < 0.52
    path = cm.export(tmp_path / "m.onnx")
    assert "float16" in init_dtypes(path).values()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    assert out.dtype == torch.float32 and cosine(out, model(ids)) > 0.9999


def test_excluded_layer_stays_fp32():
    model = Block().eval()
    cm = fxcompress.optimize(model, torch.randint(0, 20, (2, 4)), recipe="fp16:exclude=fc2")
    assert cm.module.get_parameter("fc2.weight").dtype == torch.float32
    assert cm.module.get_parameter("fc1.weight").dtype == torch.float16


def test_bf16_runs_in_torch():
    model = Block().eval()
    ids = torch.randint(0, 20, (2, 4))
    cm = fxcompress.optimize(model, ids, recipe="fp16:dtype=bf16")
    assert cm.module.get_parameter("fc1.weight").dtype == torch.bfloat16
    assert cosine(cm(ids), model(ids)) > 0.999


def test_bad_half_dtype():
    with pytest.raises(RecipeError, match="dtype must be one of"):
        fxcompress.optimize(nn.Linear(4, 4), torch.randn(1, 4), recipe="fp16:dtype=fp8")


def test_fp16_after_int8_keeps_the_quantized_layer_float32_and_the_artifact_runs_on_ort(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    ids = torch.randint(0, 20, (3, 6))
    cm = fxcompress.optimize(model, ids, recipe="int8:include=fc1,fp16")
    assert [(r.layer, r.action) for r in cm.records if r.action in ("int8", "fp16")] == [
        ("fc1", "int8"),
        ("emb", "fp16"),
        ("fc2", "fp16"),
    ]
    path = cm.export(tmp_path / "m.onnx")
    dtypes = set(init_dtypes(path).values())
    assert "float16" in dtypes and dtypes & {"int8", "uint8"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # int8 kernels reject float16 inputs
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    assert cosine(out, model(ids)) > 0.999


def test_quantizing_after_fp16_skips_the_halved_layers_and_says_which_order_works():
    cm = fxcompress.optimize(Block().eval(), torch.randint(0, 20, (2, 4)), recipe="fp16,int8")
    skipped = {r.layer: r.reason for r in cm.records if r.pass_name == "int8"}
    assert set(skipped) == {"emb", "fc1", "fc2"}
    assert all(r.action == "skipped" for r in cm.records if r.pass_name == "int8")
    assert all("weights are float16" in why and "'int8,fp16'" in why for why in skipped.values())


def test_include_halves_only_the_named_layers_and_keeps_the_ops_between_the_others_fp32(tmp_path):
    model, ids, cm, dtypes = _halved("fp16:include=fc1")
    assert dtypes["fc1.weight"] == torch.float16
    assert dtypes["emb.weight"] == dtypes["fc2.weight"] == torch.float32
    # fc1's input is cast to half and its output back: the gelu after it, unlike with plain fp16, runs in float32
    assert _casts(cm.module) == {"torch.float16": 1, "torch.float32": 1}
    gelu = next(n for n in cm.module.graph.nodes if "gelu" in str(n.target))
    assert gelu.args[0].target is torch.ops.aten._to_copy.default and gelu.args[0].kwargs["dtype"] == torch.float32
    assert cosine(cm(ids), model(ids)) > 0.9999
    path = cm.export(tmp_path / "m.onnx")
    dtypes = init_dtypes(path)
    halved = {name for name, dtype in dtypes.items() if dtype == "float16"}
    assert len(halved) == 2 and "fc1.bias" in halved  # and fc1's weight, which the exporter names after transposing it
    assert dtypes["emb.weight"] == "float32"
