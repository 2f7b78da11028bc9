import random

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import same_state, state_snapshot
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.models import zoo


def _ort_matches(cm, inputs, tmp_path) -> None:
    path = cm.export(tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]
    np.testing.assert_allclose(out, cm(*inputs).numpy(), rtol=1e-4, atol=1e-4)


def _channels(cm, layer):
    return cm.module.get_submodule(layer).weight.shape[0]


def test_pruning_removes_weights_and_keeps_the_kept_channels_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 8), recipe="prune:ratio=0.5")
    rec = {r.layer: r for r in cm.records}
    removed = rec["0"].extra["removed_channels"]
    assert len(removed) == 8 and rec["2"].action == "skipped" and "output" in rec["2"].reason
    kept = sorted(set(range(16)) - set(removed))
    # the pruned model equals the original with exactly those hidden units deleted
    ref = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    ref[0].weight.data, ref[0].bias.data = model[0].weight[kept], model[0].bias[kept]
    ref[2].weight.data, ref[2].bias.data = model[2].weight[:, kept], model[2].bias
    x = torch.randn(5, 8)
    torch.testing.assert_close(cm(x), ref(x))
    # L2 importance: the removed rows are the smallest
    norms = model[0].weight.norm(dim=1)
    assert norms[removed].max() <= norms[kept].min()


@pytest.mark.parametrize("seed", range(4))
def test_resnet_residual_groups_stay_consistent_under_random_ratios(tmp_path, seed):
    model, example = zoo.resnet_mini()
    snap = state_snapshot(model)
    ratio = random.Random(seed).uniform(0.1, 0.9)
    scope = ("local", "global")[seed % 2]
    cm = fxcompress.optimize(model, example, recipe=f"fold_bn,prune:ratio={ratio:.3f},scope={scope}")
    assert same_state(model, snap)
    # residual coupling: every conv feeding the same add keeps the same channel count
    assert _channels(cm, "stem") == _channels(cm, "layer1.0.conv2") == _channels(cm, "layer1.1.conv2")
    assert _channels(cm, "layer2.0.conv2") == _channels(cm, "layer2.0.shortcut.0") == _channels(cm, "layer2.1.conv2")
    assert cm.module.get_submodule("fc").weight.shape[0] == 10
    assert cm.bytes_after < cm.bytes_before
    _ort_matches(cm, example, tmp_path)


@pytest.mark.parametrize("ratio, heads", [(0.2, 4), (0.3, 3), (0.6, 2), (0.9, 1)])
def test_transformer_prunes_whole_heads_and_mlp_and_refuses_the_residual_stream(tmp_path, ratio, heads):
    model, example = zoo.tiny_transformer()  # 4 heads of 16, captured through torch.export
    cm = fxcompress.optimize(model, example, recipe=f"prune:ratio={ratio}")
    rec = {r.layer: r for r in cm.records if r.pass_name == "prune"}
    assert rec["blocks.0.fc1"].action == "pruned"
    q, k, v = (rec[f"blocks.1.attn.{n}"] for n in "qkv")
    if heads < 4:
        assert q.action == k.action == v.action == "pruned"
        assert q.extra["kept_channels"] == k.extra["kept_channels"] == v.extra["kept_channels"]
        kept = q.extra["kept_channels"]
        assert len(kept) == 16 * heads and all(kept[i] // 16 == kept[i + 15] // 16 for i in range(0, len(kept), 16))
    assert rec["blocks.0.fc2"].action == "skipped" and "untracked" in rec["blocks.0.fc2"].reason
    proj = dict(cm.module.named_parameters())["blocks.1.attn.proj.weight"]
    assert proj.shape == (64, 16 * heads)  # proj reads only the kept heads; its output (residual) stays 64
    _ort_matches(cm, example, tmp_path)


class Odd(nn.Module):
    """Concat, depthwise conv, grouped conv, and a channel sum the dependency graph must refuse."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.mix = nn.Conv2d(16, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.side = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.mix(torch.relu(self.dw(torch.cat([self.a(x), self.b(x)], dim=1))))
        s = self.side(x).sum(dim=1, keepdim=True)  # a reduction over channels: not understood -> refused
        return self.head(self.grouped(h)) + s


def test_concat_depthwise_grouped_and_unknown_ops(tmp_path):
    torch.manual_seed(0)
    model = Odd().eval()
    x = torch.randn(2, 3, 8, 8)
    cm = fxcompress.optimize(model, x, recipe="prune:ratio=0.5")
    rec = {r.layer: r for r in cm.records}
    assert rec["a"].action == rec["b"].action == "pruned"
    assert cm.module.dw.weight.shape[0] == cm.module.dw.groups == 8  # depthwise follows the concat
    assert "grouped conv" in rec["mix"].reason and "grouped conv" in rec["grouped"].reason
    assert rec["side"].action == "skipped" and "does not understand" in rec["side"].reason
    _ort_matches(cm, (x,), tmp_path)


def test_protect_and_exclude_keep_layers_whole():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 8), recipe="prune:ratio=0.5,protect=0,exclude=2")
    assert cm.module.get_submodule("0").weight.shape[0] == 16 and cm.module.get_submodule("2").weight.shape[0] == 16


def test_activation_importance_needs_calibration_and_bad_options():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.raises(InputError, match="importance=activation needs calibration"):
        fxcompress.optimize(model, torch.randn(2, 8), recipe="prune:importance=activation")
    for recipe, msg in [
        ("prune:ratio=1", r"ratio must be in \(0, 1\)"),
        ("prune:ratio=0", r"ratio must be in \(0, 1\)"),
        ("prune:importance=taylor", "importance must be"),
        ("prune:scope=layer", "scope must be"),
    ]:
        with pytest.raises(RecipeError, match=msg):
            fxcompress.optimize(model, torch.randn(2, 8), recipe=recipe)


def test_pruning_plan_replays_the_same_channels(tmp_path):
    import json

    from fxcompress.passes.prune import pruning_plan

    model, example = zoo.resnet_mini()
    first = fxcompress.optimize(model, example, recipe="fold_bn,prune:ratio=0.4")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(pruning_plan(first.records)))
    again = fxcompress.optimize(model, example, recipe=f"fold_bn,prune:plan={plan}")
    torch.testing.assert_close(again(*example), first(*example))
    bad = json.loads(plan.read_text())
    bad["stem"] = [0]  # disagrees with the layers coupled to it by residual adds
    plan.write_text(json.dumps(bad))
    with pytest.raises(InputError, match="coupled layers need the same kept channels"):
        fxcompress.optimize(model, example, recipe=f"fold_bn,prune:plan={plan}")


class BertStyleAttention(nn.Module):
    """HF BERT's shapes: view(..., -1, head_dim) (head count inferred), fused SDPA, a same-shape reshape after it."""

    def __init__(self, dim: int = 32, head_dim: int = 8):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), scale=0.3
        )
        att = att.reshape(b, -1, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return self.norm(self.out(att) + x)


def test_bert_style_attention_loses_whole_heads_exactly(tmp_path):
    model = BertStyleAttention().eval()
    x = torch.randn(2, 5, 32)
    cm = fxcompress.optimize(model, x, recipe="prune:ratio=0.25")
    rec = {r.layer: r for r in cm.records}
    removed = rec["q"].extra["removed_channels"]
    assert rec["k"].extra["removed_channels"] == rec["v"].extra["removed_channels"] == removed
    assert len(removed) == 8 and len({c // 8 for c in removed}) == 1  # exactly one whole head of four
    assert _channels(cm, "q") == _channels(cm, "k") == _channels(cm, "v") == 24
    assert rec["out"].action == "skipped"  # its output joins the residual stream
    # heads are independent: dropping one equals zeroing its columns in the output projection
    ref = BertStyleAttention().eval()
    ref.load_state_dict(model.state_dict())
    ref.out.weight.data[:, removed] = 0
    torch.testing.assert_close(cm(x), ref(x))
    _ort_matches(cm, (x,), tmp_path)
