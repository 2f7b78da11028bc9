import torch
from torch import nn

import fxcompress
from fxcompress.models.zoo import resnet_mini


def _with_stats(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_fold_is_exact_and_removes_batchnorm():
    model = _with_stats(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    cm = fxcompress.optimize(model, x, recipe="fold_bn")
    assert [r.action for r in cm.records] == ["folded"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cm.module.modules())
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_on_a_resnet():
    model, (x,) = resnet_mini()
    cm = fxcompress.optimize(model, x, recipe="fold_bn")
    folded = [r for r in cm.records if r.action == "folded"]
    assert len(folded) == 13  # stem + 2 per block * 5 blocks + 2 projection shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cm.module.modules())
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_conv1d_fold_and_bn_without_conv_untouched():
    model = _with_stats(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.BatchNorm1d(24)))
    x = torch.randn(3, 2, 8)
    cm = fxcompress.optimize(model, x, recipe="fold_bn")
    assert [r.action for r in cm.records] == ["folded"]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in cm.module.modules()) == 1
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_in_training_mode_is_not_folded():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    cm = fxcompress.optimize(model, torch.randn(2, 1, 5, 5), recipe="fold_bn")
    assert cm.records[0].skipped and "running statistics" in cm.records[0].reason


class NeedsExport(nn.Module):
    """Slicing a stored tensor by an input's shape defeats symbolic_trace, so capture uses torch.export."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("offset", torch.randn(16))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.offset[: x.shape[-1]]


def test_fold_on_export_captured_graph():
    model = _with_stats(NeedsExport())
    x = torch.randn(2, 2, 8, 8)
    cm = fxcompress.optimize(model, x, recipe="fold_bn")
    assert cm.capture_method == "export"
    assert [r.action for r in cm.records] == ["folded"]
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in cm.module.graph.nodes)
    torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_recipe_folds_batchnorm_first_unless_told_not_to():
    model, (x,) = resnet_mini()
    model = _with_stats(model)
    default = fxcompress.optimize(model, x, recipe="int8")
    explicit = fxcompress.optimize(model, x, recipe="fold_bn,int8")
    assert [c.name for c in default.recipe] == ["fold_bn", "int8"]  # the recipe kept reproduces the run
    assert default.bytes_after == explicit.bytes_after
    assert not any(isinstance(m, nn.BatchNorm2d) for m in default.module.modules())
    folded = [r for r in default.records if r.action == "folded"]
    assert folded and all("canonicalize=False" in r.reason for r in folded)
    torch.testing.assert_close(default(x), explicit(x))

    kept = fxcompress.optimize(model, x, recipe="int8", canonicalize=False)
    assert [c.name for c in kept.recipe] == ["int8"]
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.module.modules())
    assert kept.bytes_after > default.bytes_after


def test_a_model_without_batchnorm_keeps_its_recipe_as_written():
    cm = fxcompress.optimize(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8), recipe="int8")
    assert [c.name for c in cm.recipe] == ["int8"]
    assert [r.pass_name for r in cm.records] == ["int8"]
