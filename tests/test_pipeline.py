import pytest
import torch
from torch import fx, nn

from fxcompress.errors import PassError, RecipeError
from fxcompress.passes.int8 import Int8Config
from fxcompress.recipe.manager import PassManager
from fxcompress.recipe.parse import parse_recipe, recipe_tolerance
from fxcompress.recipe.registry import PassContext


def test_text_recipe_with_options():
    configs = parse_recipe("fold_bn,int8:kinds=linear+conv2d,exclude=fc*")
    assert [c.name for c in configs] == ["fold_bn", "int8"]
    assert configs[1] == Int8Config(kinds=("linear", "conv2d"), exclude=("fc*",))


def test_dict_and_config_recipes():
    assert parse_recipe([{"pass": "int8", "kinds": ["linear"]}, Int8Config()]) == [
        Int8Config(kinds=("linear",)),
        Int8Config(),
    ]
    assert parse_recipe([{"pass": "int8", "kinds": ["linear"]}])[0].to_dict() == {
        "pass": "int8",
        "include": [],
        "exclude": [],
        "kinds": ["linear"],
        "algo": "rtn",
        "act_order": False,
        "damp": 0.01,
        "sequential": True,
        "budget": 0.0,
    }


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("int9", "unknown pass 'int9' in recipe. Did you mean 'int8'?"),
        ("", "empty recipe"),
        ([], "empty recipe"),
        ("int8:bits=4", "pass 'int8' has no option 'bits'"),
        ("int8:kinds", "must be written key=value"),
        ("int8:kinds=linear+lstm", "kinds must be a non-empty subset"),
        ({"kinds": ["linear"]}, "needs 'pass'"),
    ],
)
def test_bad_recipes_say_what_is_wrong(recipe, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe)
    assert message in str(err.value)


def test_recipe_tolerance_is_the_loosest_pass():
    assert recipe_tolerance(parse_recipe("fold_bn")).cosine_min == 0.99999
    assert recipe_tolerance(parse_recipe("fold_bn,int8")).cosine_min == 0.999


def test_failing_pass_is_named_with_what_ran_before(monkeypatch):
    import fxcompress.recipe.registry as pl

    def boom(gm, cfg, ctx):
        raise RuntimeError("kaboom")

    cls, _ = pl._REGISTRY["int8"]
    monkeypatch.setitem(pl._REGISTRY, "int8", (cls, boom))
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(PassError, match=r"pass 'int8' failed after \[fold_bn\]: RuntimeError: kaboom"):
        PassManager(parse_recipe("fold_bn,int8")).run(gm, PassContext((torch.randn(1, 2),)))


def test_include_exclude_select_layers_and_records_say_why():
    import fxcompress

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    cm = fxcompress.optimize(model, torch.randn(2, 8), recipe="int8:exclude=2")
    by_layer = {r.layer: r for r in cm.records}
    assert by_layer["0"].action == "int8"
    assert by_layer["2"].skipped and "excluded by pattern '2'" in by_layer["2"].reason


def test_one_capture_serves_many_recipes_as_fresh_optimizes_do():
    """The planner captures once and compresses many times: each result equals optimize's, and the capture (and the
    user's model) are left as they were, BatchNorm folding and GPTQ included."""
    import fxcompress
    from fxcompress.api import compress_prepared, prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    calibration = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, x, calibration)
    captured = {k: v.clone() for k, v in prepared.captured.graph_module.state_dict().items()}
    for recipe in ("fold_bn,int8:algo=gptq", "int4:block=32", "fold_bn,int8"):
        reused = compress_prepared(model, prepared, recipe)
        fresh = fxcompress.optimize(model, x, recipe, calibration=calibration)
        mine, theirs = reused.module.state_dict(), fresh.module.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), recipe
        assert torch.equal(reused.module(x), fresh.module(x))
    assert all(torch.equal(v, captured[k]) for k, v in prepared.captured.graph_module.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
