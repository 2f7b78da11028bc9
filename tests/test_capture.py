import pytest
import torch
from helpers import same_state, state_snapshot
from torch import nn

import fxcompress
from fxcompress.errors import CaptureError, InputError
from fxcompress.graph.capture import capture
from fxcompress.models.zoo import TinyTransformer


def test_symbolic_trace_is_used_when_it_works():
    cap = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))
    assert cap.method == "fx" and cap.fx_failure is None


def test_falls_back_to_torch_export_with_the_reason():
    model = TinyTransformer(vocab=50, seq=8, dim=16, heads=2, depth=1).eval()
    ids = torch.randint(0, 50, (2, 8))
    cap = capture(model, ids)
    assert cap.method == "export"
    assert cap.fx_failure  # why fx was not used is kept for the report
    torch.testing.assert_close(cap.graph_module(ids), model(ids))
    # the batch axis stays symbolic: the captured graph runs at another batch size
    torch.testing.assert_close(cap.graph_module(ids.repeat(3, 1)), model(ids.repeat(3, 1)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on tensor values: neither capture can handle it
            return self.fc(x)
        return x


def test_untraceable_model_names_both_failures():
    with pytest.raises(CaptureError) as err:
        capture(DataDependent(), torch.ones(2, 4))
    msg = str(err.value)
    assert "symbolic_trace failed" in msg and "torch.export failed" in msg and "DataDependent" in msg


def test_inputs_that_do_not_fit_are_rejected_with_shapes():
    with pytest.raises(InputError, match=r"\(2, 5\):float32"):
        capture(nn.Linear(4, 4), torch.randn(2, 5))


def test_non_module_and_empty_inputs_are_rejected():
    with pytest.raises(InputError, match="nn.Module"):
        capture(lambda x: x, torch.randn(1))
    with pytest.raises(InputError, match="non-empty"):
        capture(nn.Linear(2, 2), ())


def test_user_model_is_not_mutated():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model.train()
    snap = state_snapshot(model)
    capture(model, torch.randn(2, 1, 5, 5))
    assert model.training and same_state(model, snap)


def _tiny_transformer():
    model = TinyTransformer(vocab=50, seq=8, dim=16, heads=2, depth=1).eval()
    return model, torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def test_dynamic_axes_keep_the_sequence_axis_symbolic():
    model, ids = _tiny_transformer()
    short = ids[:, :5]
    with pytest.raises(Exception, match="8"):  # by default only the batch axis is symbolic: the length is fixed at 8
        capture(model, ids).graph_module(short)
    cap = capture(model, ids, dynamic_axes=(0, 1))
    assert cap.method == "export"
    torch.testing.assert_close(cap.graph_module(short), model(short))
    torch.testing.assert_close(cap.graph_module(ids.repeat(3, 1)), model(ids.repeat(3, 1)))


class _TwoInputs(nn.Module):
    def forward(self, x, mask):
        return (x * mask.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize(
    "axes, message",
    [
        ("01", "axis numbers"),
        ([(0, 1)], "axes for 1 inputs but the model takes 2"),
        ([(0, 1), (0, 2)], r"input 1 \(2 dims\) names axes \[2\]"),
    ],
)
def test_malformed_dynamic_axes_are_rejected(axes, message):
    inputs = (torch.randn(2, 5, 3), torch.ones(2, 5))
    with pytest.raises(InputError, match=message):
        capture(_TwoInputs(), inputs, dynamic_axes=axes)


def test_per_input_dynamic_axes_apply_to_their_own_input():
    from fxcompress.graph.inputs import input_axes

    inputs = (torch.randn(2, 5, 3), torch.ones(2, 5))
    assert input_axes(inputs, (0, 1)) == [(0, 1), (0, 1)]
    assert input_axes(inputs, (0, 2)) == [(0, 2), (0,)]  # an axis an input lacks is skipped in the shared form
    assert input_axes(inputs, [(1, -1), ()]) == [(1, 2), ()]
    assert input_axes(inputs, ()) == [(), ()]


def test_a_dynamic_axis_of_size_one_is_refused_with_the_reason():
    model, ids = _tiny_transformer()
    with pytest.raises(InputError, match=r"size 1 on dynamic axes \[1\].*2 or more"):
        capture(model, ids[:, :1], dynamic_axes=(0, 1))


def test_capture_shares_the_weights_and_the_compressed_module_owns_its_own():
    import itertools

    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    storages = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    captured = capture(model, torch.randn(2, 16)).graph_module
    assert {p.untyped_storage().data_ptr() for p in captured.parameters()} <= storages  # no copy of the weights
    cm = fxcompress.optimize(model, torch.randn(2, 16), recipe="int8:exclude=2")  # LayerNorm and layer 2 stay float
    assert not {t.untyped_storage().data_ptr() for t in cm.module.state_dict().values()} & storages
    before = model[2].weight.clone()
    cm.module.get_submodule("2").weight.data.mul_(0)  # a user editing the compressed module in place
    assert torch.equal(model[2].weight, before)
