import pytest
import torch
from helpers import init_dtypes
from torch import nn

import fxcompress
from fxcompress.errors import RecipeError
from fxcompress.passes.sparsity import mask_2_4


def test_2_4_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    m = mask_2_4(w)
    assert (m.reshape(8, 4, 4).sum(-1) == 2).all()
    kept_min = (w.abs() * m).reshape(8, 4, 4).masked_fill(~m.reshape(8, 4, 4), float("inf")).amin(-1)
    dropped_max = (w.abs() * ~m).reshape(8, 4, 4).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_sparsity_is_reported_honestly_and_exports_dense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    x = torch.randn(3, 16)
    for recipe, zeros in [("sparse24", 0.5), ("sparsity:ratio=0.75", 0.75)]:
        cm = fxcompress.optimize(model, x, recipe=recipe)
        recs = [r for r in cm.records if not r.skipped]
        assert len(recs) == 2 and all(
            r.bytes_after == r.bytes_before and "no bytes or speed saved" in r.reason for r in recs
        )
        assert cm.bytes_after == cm.bytes_before
        w = cm.module.get_submodule("0").weight
        assert abs((w == 0).float().mean().item() - zeros) < 0.02
        assert set(init_dtypes(cm.export(tmp_path / "m.onnx")).values()) == {"float32"}
    assert model[0].weight.ne(0).all()  # the user's model keeps its weights


def test_2_4_skips_rows_not_divisible_by_four_and_bad_ratio():
    cm = fxcompress.optimize(nn.Sequential(nn.Linear(6, 4)), torch.randn(1, 6), recipe="sparse24")
    assert cm.records[0].skipped and "not a multiple of 4" in cm.records[0].reason
    with pytest.raises(RecipeError, match=r"ratio must be in \(0, 1\)"):
        fxcompress.optimize(nn.Linear(4, 4), torch.randn(1, 4), recipe="sparsity:ratio=1")


def test_parity_report_carries_the_dense_storage_note(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    x = torch.randn(3, 16)
    cm = fxcompress.optimize(model, x, recipe="sparse24")
    rep = fxcompress.check(model, cm.export(tmp_path / "m.onnx"), x, fp32_baseline=False, provider="cpu")
    assert rep.notes and "stored dense" in rep.notes[0] and "notes:" in rep.to_text()
