"""Block-by-block calibration: LayerwiseRun computes each layer's inputs once per batch, from the graph as the pass
has rewritten it so far, and gives what a fresh run of that graph gives."""

import torch
from torch import fx, nn

import fxcompress
from fxcompress.algorithms.gptq import LayerHessians
from fxcompress.algorithms.int8_rewrite import rewrite_int8
from fxcompress.algorithms.layerwise import LayerwiseRun
from fxcompress.algorithms.statistics import input_hessians
from fxcompress.graph.calibration import Calibration
from fxcompress.graph.sites import find_sites


class Residual(nn.Module):
    """Six blocks on a residual stream; q/k/v-like triples share an input."""

    def __init__(self, width: int = 32, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"a": nn.Linear(width, width), "b": nn.Linear(width, width), "out": nn.Linear(width, width)})
            for _ in range(depth)
        )
        for block in self.blocks:
            for layer in block.values():
                layer.weight.data *= 0.3  # a stream that stays in range over six gated blocks

    def forward(self, x):
        for block in self.blocks:
            x = x + block["out"](torch.relu(block["a"](x)) * block["b"](x))
        return x


def _graph(seed: int = 0):
    torch.manual_seed(seed)
    gm = fx.symbolic_trace(Residual().eval())
    calibration = [(torch.randn(n, 32),) for n in (48, 64, 24)]
    return gm, calibration


def test_sequential_hessians_equal_a_fresh_run_of_the_partly_rewritten_graph_in_one_forward():
    gm, calibration = _graph()
    sites, _ = find_sites(gm)
    hessians = LayerHessians(gm, sites, calibration, sequential=True)
    for site in sites:
        got = hessians.pop(site)
        fresh = input_hessians(gm, {site.name: site.input}, calibration)[site.name]  # the old way: run from the start
        torch.testing.assert_close(got, fresh, rtol=1e-9, atol=1e-9)
        rewrite_int8(gm, site)
    # one forward over the calibration data in all: no node computed twice (a run from the inputs per group of
    # layers computes the early blocks again for every later group)
    assert hessians._run is not None and hessians._run.evaluated <= len(gm.graph.nodes)


def test_groups_reading_one_input_share_one_hessian_tensor():
    gm, calibration = _graph()
    sites, _ = find_sites(gm)
    hessians = LayerHessians(gm, sites, calibration, sequential=True)
    a, b = sites[0], sites[1]
    assert a.input is b.input
    assert hessians.pop(a) is hessians.pop(b)


def test_an_edit_behind_the_frontier_restarts_from_the_inputs_instead_of_reading_stale_values():
    gm, calibration = _graph()
    sites, _ = find_sites(gm)
    run = LayerwiseRun(gm, calibration)
    run.advance_to(sites[-1].input)  # the whole graph up to the last layer, in float
    rewrite_int8(gm, sites[0])  # then the first layer changes
    got = run.advance_to(sites[-1].input)
    fresh = LayerwiseRun(gm, calibration).advance_to(sites[-1].input)
    for g, f in zip(got, fresh):
        torch.testing.assert_close(g, f, rtol=0, atol=0)


def test_padded_positions_are_dropped_and_values_no_one_reads_are_freed():
    gm, _ = _graph()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    run = LayerwiseRun(gm, Calibration([(x, mask)], token_mask=1))
    sites, _ = find_sites(gm)
    (value,) = run.advance_to(sites[3].input)
    assert value.shape == (8, 32)  # 3 + 5 real tokens
    held = set(run._envs[0])
    assert sites[0].input not in held  # the first block's input is read by nothing left to compute
    assert sites[3].input in held


def test_sequential_gptq_through_optimize_still_beats_rtn_on_a_deep_model():
    torch.manual_seed(0)
    model = Residual(64, 6).eval()
    calibration = [(torch.randn(64, 64) @ torch.randn(64, 64),) for _ in range(4)]
    x = calibration[0][0]
    with torch.no_grad():
        ref = model(x)

    def error(recipe: str) -> float:
        with torch.no_grad():
            out = fxcompress.optimize(model, x, recipe=recipe, calibration=calibration)(x)
        return float((out - ref).pow(2).mean() / ref.pow(2).mean())

    # on the data it was fitted to: GPTQ minimises the output error there, layer after layer
    assert error("int4:block=32,algo=gptq") < 0.9 * error("int4:block=32")


def test_gptq_rounds_rows_in_slices_exactly_as_all_at_once(monkeypatch):
    import fxcompress.algorithms.gptq as gptq_module
    from fxcompress.algorithms.quant import quantize_gptq, quantize_per_channel_gptq

    torch.manual_seed(0)
    w, x = torch.randn(40, 64), torch.randn(512, 64) @ torch.randn(64, 64)
    h = 2 * x.t().double() @ x.double() / 512

    def all_three():
        return [quantize_gptq(w, h, 32, act_order=a) for a in (False, True)] + [quantize_per_channel_gptq(w, h)]

    whole = all_three()
    monkeypatch.setattr(gptq_module, "ROW_CHUNK_ELEMENTS", 7 * 64)  # slices of 7 rows: 6 slices, the last short
    for a, b in zip(whole, all_three()):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
