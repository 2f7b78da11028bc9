"""The export's attention fusion: an encoder's split-heads / scaled_dot_product_attention / merge-heads becomes one
``MultiHeadAttention`` that ONNX Runtime computes as torch does, padding and fully masked rows included; what the op
cannot express (a causal flag, a per-head or float mask) is left as it was."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.export.attention import fuse_attention
from fxcompress.export.targets import get_target
from fxcompress.export.writer import export_onnx
from fxcompress.models import architectures as arch
from tests.helpers import op_types


def _run(path, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


class MaskedSelfAttention(nn.Module):
    """Q/K/V projections, heads split and merged by view/transpose, a boolean mask given as (B, 1, S, T)."""

    def __init__(self, dim: int = 32, heads: int = 4, causal: bool = False, per_head: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.heads, self.causal, self.per_head = heads, causal, per_head

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = keep[:, None, None, :].bool().expand(b, self.heads if self.per_head else 1, s, s)
        if self.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)


def _exported(model: nn.Module, inputs: tuple, path, **kwargs):
    """``model`` captured by torch.export (as transformers models are; symbolic_trace graphs carry no shapes to match)
    and written by fxcompress's exporter."""
    gm = torch.export.export(model, inputs).module()
    return gm, export_onnx(gm, inputs, path, target=kwargs.pop("target", "cpu"), **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    keep = torch.ones(3, 6, dtype=torch.long)
    keep[1, 4:] = 0  # padding
    keep[2] = 0  # every key masked: torch's export gives zeros there
    return torch.randn(3, 6, 32, generator=g), keep


def test_fused_attention_runs_on_ort_as_torch_computes_with_padding_and_fully_masked_rows(tmp_path):
    torch.manual_seed(0)
    model, (x, keep) = MaskedSelfAttention().eval(), _inputs()
    _, path = _exported(model, (x, keep), tmp_path / "attn.onnx")
    assert op_types(path).count("MultiHeadAttention") == 1
    assert "Softmax" not in op_types(path)
    with torch.no_grad():
        expected = model(x, keep).numpy()
    got = _run(path, {"x": x.numpy(), "keep": keep.numpy()})
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert np.all(got[2] == 0)


@pytest.mark.parametrize("variant", ["causal", "per_head"])
def test_attention_the_op_cannot_express_is_left_unfused_and_still_exact(tmp_path, variant):
    torch.manual_seed(0)
    model, (x, keep) = MaskedSelfAttention(**{variant: True}).eval(), _inputs()
    keep[2, 0] = 1  # no fully masked row: torch's eager attention gives NaN there, its export zeros
    gm, path = _exported(model, (x, keep), tmp_path / "attn.onnx")
    assert fuse_attention(gm) == 0
    assert "MultiHeadAttention" not in op_types(path)
    with torch.no_grad():
        expected = model(x, keep).numpy()
    np.testing.assert_allclose(_run(path, {"x": x.numpy(), "keep": keep.numpy()}), expected, atol=2e-6)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_transformers_encoders_fuse_every_layer_and_keep_parity_at_other_sequence_lengths(tmp_path, kind):
    model, example = arch.hf_encoder(kind, scale=0.1, length=16)
    cm = fxcompress.optimize(model, example, recipe="int8", dynamic_axes=(0, 1))
    path = cm.export(tmp_path / "enc.onnx", target="cpu-vnni")
    layers = model.config.num_hidden_layers if kind == "bert" else model.config.n_layers
    assert op_types(path).count("MultiHeadAttention") == layers
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        expected = cm.module(ids, mask)
    expected = (expected[0] if isinstance(expected, (tuple, list)) else expected.last_hidden_state).numpy()
    got = _run(path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() > 0.99  # int8 activations on ORT against float ones in torch


def test_a_target_can_leave_attention_as_the_exporter_writes_it(tmp_path):
    torch.manual_seed(0)
    model, (x, keep) = MaskedSelfAttention().eval(), _inputs()
    plain = dataclasses.replace(get_target("cpu"), fuse_attention=False)
    _, path = _exported(model, (x, keep), tmp_path / "plain.onnx", target=plain)
    assert "MultiHeadAttention" not in op_types(path) and "Softmax" in op_types(path)
