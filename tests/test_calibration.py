"""Calibration statistics: padding marked by a token mask never reaches the Hessians, ranges or importances; the
output metric's roots."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.algorithms.kfac import metric_roots
from fxcompress.algorithms.statistics import input_hessians, paired_moments
from fxcompress.graph.calibration import Calibration
from fxcompress.graph.capture import capture
from fxcompress.graph.sites import find_sites


class MaskedEncoder(nn.Module):
    """Token features -> Linear; the mask is an input (as in HF encoders) but padding still flows through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * mask.unsqueeze(-1)


def _batches() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches, real = [], []
    for lengths in ([5, 2, 3], [1, 4, 6]):
        x = torch.randn(3, 6, 8, generator=g)
        mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).long()
        x[mask == 0] = 100.0  # padding activations far from the real ones: any leak shows in the statistics
        batches.append((x, mask))
        real.append(x[mask.bool()])
    return batches, torch.cat(real).double()


def _site_hessian(calibration) -> torch.Tensor:
    model = MaskedEncoder()
    gm = capture(model, calibration[0]).graph_module
    site = find_sites(gm)[0][0]
    return input_hessians(gm, {"fc": site.input}, calibration)["fc"]


def test_token_mask_keeps_only_real_tokens_in_hessians():
    batches, real = _batches()
    masked = _site_hessian(Calibration(batches, token_mask=1))
    torch.testing.assert_close(masked, 2 * real.t() @ real / len(real))
    unmasked = _site_hessian(batches)
    assert unmasked.abs().max() > 100 * masked.abs().max()  # without the mask, padding dominates


def test_too_few_real_rows_per_feature_warn_with_the_layer_and_the_rows_needed():
    batches, real = _batches()  # 21 real rows (36 with padding) for a layer with 8 inputs
    with pytest.warns(
        fxcompress.CalibrationWarning, match=r"21 real rows for layer 'fc' with 8 input features.*at least 32"
    ):
        _site_hessian(Calibration(batches, token_mask=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxcompress.CalibrationWarning)
        _site_hessian(batches)  # 36 rows >= 4 per feature: quiet


def _input_range_max(calibration) -> float:
    cm = fxcompress.optimize(MaskedEncoder(), calibration[0], recipe="int8_static", calibration=calibration)
    (detail,) = [r.reason for r in cm.records if r.action == "int8-static"]
    return float(re.match(r"x in \[(\S+), (\S+)\]", detail).group(2))


def test_optimize_passes_the_token_mask_to_passes():
    batches, real = _batches()
    assert _input_range_max(batches) > 99  # the padding value
    assert _input_range_max(Calibration(batches, token_mask=1)) == pytest.approx(real.max().item(), rel=0.02)


@pytest.mark.parametrize("token_mask", [2, 0])
def test_token_mask_must_name_a_2d_input(token_mask):
    batches, _ = _batches()
    with pytest.raises(fxcompress.InputError, match=f"token_mask={token_mask} must name a \\[batch, seq\\] tensor"):
        _site_hessian(Calibration(batches, token_mask=token_mask))


def test_paired_moments_pool_real_rows_and_name_the_batch_that_does_not_fit():
    batches, real = _batches()
    gm = capture(MaskedEncoder(), batches[0]).graph_module
    node = find_sites(gm)[0][0].input
    h_ss, p_ts = paired_moments(gm, gm, node, node, Calibration(batches, token_mask=1))
    torch.testing.assert_close(h_ss, real.t() @ real / len(real))
    torch.testing.assert_close(p_ts, h_ss)  # the same graph on both sides
    torch.manual_seed(0)
    two = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = capture(two, (torch.randn(5, 8),)).graph_module
    node = find_sites(gm)[0][1].input  # the second Linear's input: the first one runs (and fails) before it
    bad = [(torch.randn(5, 8),), (torch.randn(5, 8),), (torch.randn(5, 7),)]
    with pytest.raises(fxcompress.InputError, match=r"calibration batch 2 \(shapes \[\(5, 7\)\]\) does not fit"):
        paired_moments(gm, gm, node, node, bad)


def test_metric_roots_square_to_the_damped_metric_and_invert_each_other():
    torch.manual_seed(0)
    j = torch.randn(6, 4)
    gn = j.t() @ j  # rank 4 of 4: a Gauss-Newton matrix
    root, inverse = metric_roots(gn, damp=0.1)
    damped = gn.double() + 0.1 * gn.diag().mean().double() * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(root @ root, damped)
    torch.testing.assert_close(root @ inverse, torch.eye(4, dtype=torch.float64))
    error = torch.randn(3, 4).double()
    torch.testing.assert_close((error @ root).pow(2).sum(), torch.trace(error @ damped @ error.t()))


def test_metric_roots_floor_keeps_a_singular_metric_invertible():
    v = torch.randn(5, 1)
    root, inverse = metric_roots(v @ v.t(), floor=1e-6)  # rank 1
    assert torch.isfinite(inverse).all()
    values = torch.linalg.eigvalsh(root @ root)
    assert values.min() >= values.max() * 1e-6 * 0.99
