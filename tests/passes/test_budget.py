import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError


@pytest.mark.parametrize("recipe, lowest", [("int8:budget={}", "0.25"), ("int4:block=32,budget={}", "0.1")])
def test_budget_needs_calibration_and_a_sane_value(recipe, lowest):
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    pass_name = recipe.split(":")[0]
    with pytest.raises(InputError, match=f"{pass_name} budget= needs calibration data"):
        fxcompress.optimize(model, torch.randn(2, 64), recipe=recipe.format(0.5))
    with pytest.raises(RecipeError, match=rf"budget must be in \({lowest}, 1\)"):
        fxcompress.optimize(model, torch.randn(2, 64), recipe=recipe.format(2))
