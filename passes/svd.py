"""Low-rank factorization: Linear -> two thin Linears (SVD), Conv2d -> 1x1 -> kxk core -> 1x1 (Tucker-2).

``svd`` replaces W [N, K] by B [N, r] @ A [r, K] with A = S^1/2 V^T, B = U S^1/2 from the truncated SVD, so both
factors carry half the spectrum and quantize equally well afterwards (``"svd:ratio=0.5,int8"``). The rank comes
from ``rank``, from ``ratio`` (factors hold at most that fraction of the layer's weight bytes) or from ``energy``
(smallest rank keeping that fraction of sum(sigma^2)). A layer is only rewritten when the factors are smaller.

``aware=true`` (activation-aware, as in ASVD / SVD-LLM) truncates W C instead of W, where C C^T = X^T X is the
Cholesky factor of the calibration inputs' second moment: the truncation then minimises ||X W^T - X W_r^T||
(the layer's output error) rather than ||W - W_r||, and A = S^1/2 V^T C^-1.

``aware=output`` also weights that output error by G = J^T J, J the Jacobian of the model's outputs w.r.t. the
layer's output (estimated with random probes on the calibration data; the output-side Kronecker factor of K-FAC):
it truncates G^1/2 W C, so each layer minimises an estimate of the change in the *model's* outputs, and directions
the rest of the network ignores (e.g. ones a LayerNorm scales away) are dropped first. Because every layer's
spectrum is then in the same unit, ``allocate=global`` can hand the byte budget to the layers that need it.

``sequential=true`` (with ``aware``) refits the layers one after another, in graph order, to the inputs they really
get once the layers before them are factorized: layer i minimises ||X_t W^T - X_s (B A)^T|| (X_t its input in the
float model, X_s in the compressed one) by truncating W X_t^T X_s (X_s^T X_s)^-1, whitened by X_s, so each layer
also absorbs part of the error upstream instead of passing it on (the layer-sequential scheme of GPTQ, applied to
the low-rank fit). Ranks are chosen first, as without it; only the factors change.

``refit=block`` (with ``aware=output``) then trains the two factorized Linears of each MLP block (Linear ->
GELU/ReLU/SiLU -> Linear) together, to the float block's outputs on the calibration tokens, in the second layer's
output-aware metric (:mod:`fxcompress.algorithms.block_refit`): the truncation fits each layer alone, the pair can
trade error across the activation.

Conv2d (groups=1) gets Tucker-2 by higher-order SVD: input and output channel bases U_in [I, r_in], U_out [O, r_out]
and a core W x U_out^T x U_in^T [r_out, r_in, kh, kw]; ranks keep the ratio of I to O. ``conv=spatial`` instead
splits a kh x kw conv into kh x 1 (r channels) then 1 x kw, from the SVD of W arranged as [(I, kh), (O, kw)]
(Jaderberg et al., 2014).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor, fx

from fxcompress.algorithms.block_refit import Block, activation, block_rows, find_blocks, refit_block
from fxcompress.algorithms.kfac import metric_roots, output_gauss_newton
from fxcompress.algorithms.quant import sqnr_db
from fxcompress.algorithms.statistics import input_hessians, paired_moments
from fxcompress.errors import InputError, RecipeError
from fxcompress.graph.edit import add_constant, replace_node
from fxcompress.graph.sites import Site, find_sites, nbytes
from fxcompress.recipe.manager import select_sites
from fxcompress.recipe.records import LayerRecord, Numerics
from fxcompress.recipe.registry import PassConfig, PassContext, PassResult, register_pass
from fxcompress.recipe.tolerance import Tolerance

aten = torch.ops.aten


AWARE = {
    "false": "none",
    "none": "none",
    "0": "none",
    "no": "none",
    "true": "input",
    "input": "input",
    "1": "input",
    "yes": "input",
    "output": "output",
}


@dataclass(frozen=True)
class SVDConfig(PassConfig):
    """Truncated SVD of Linear layers (and Tucker-2 of Conv2d with ``kinds=linear+conv2d``).

    ``aware``: ``false`` (plain SVD of W), ``true`` / ``input`` (whiten by the calibration inputs), ``output``
    (also weight the layer's output error by its effect on the model's outputs, so that every layer minimises an
    estimate of the same model-output error). ``allocate=global`` (needs ``aware=output``) spends the byte budget of
    all selected layers together instead of ``ratio`` per layer. ``sequential=true`` (needs ``aware``) refits each
    layer to the inputs the compressed layers before it produce. ``refit=block`` (needs ``aware=output``) then
    trains the factors of each Linear -> activation -> Linear pair together for ``refit_steps`` Adam steps
    (:mod:`fxcompress.algorithms.block_refit`). ``multiple=16`` rounds each rank from ``ratio`` (down) or
    ``energy`` (up) to a multiple of 16, so that an int4 pass after it can quantize the second factor too
    (MatMulNBits blocks need an input width that is a multiple of 16).
    """

    name: ClassVar[str] = "svd"
    tolerance: ClassVar[Tolerance] = Tolerance(0.95, 0.85, 8.0, 0.6, 0.2, 0.9, 3.0)
    ratio: float = 0.5
    energy: float = 0.0
    rank: int = 0
    aware: Union[bool, str] = False
    allocate: str = "layer"
    probes: int = 32
    damp: float = 0.01
    kinds: tuple[str, ...] = ("linear",)
    conv: str = "tucker"
    sequential: bool = False
    refit: str = "none"
    refit_steps: int = 500
    multiple: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if not 0 <= self.energy < 1:
            raise ValueError(f"energy must be in (0, 1) (0 = use ratio), got {self.energy}")
        if self.rank < 0:
            raise ValueError(f"rank must be positive (0 = use ratio or energy), got {self.rank}")
        if self.conv not in ("tucker", "spatial"):
            raise ValueError(f"conv must be 'tucker' or 'spatial', got {self.conv!r}")
        if not self.kinds or set(self.kinds) - {"linear", "conv2d"}:
            raise ValueError(f"kinds must be a non-empty subset of ('linear', 'conv2d'), got {self.kinds}")
        aware = AWARE.get(str(self.aware).lower())
        if aware is None:
            raise ValueError(f"aware must be false, true (= input) or output, got {self.aware!r}")
        object.__setattr__(self, "aware", aware)
        if self.allocate not in ("layer", "global"):
            raise ValueError(f"allocate must be 'layer' or 'global', got {self.allocate!r}")
        if self.allocate == "global" and (aware != "output" or self.rank or self.energy):
            raise ValueError(
                "allocate=global compares layers by their estimated effect on the model's output: it needs "
                "aware=output and a ratio (not rank= or energy=)"
            )
        if self.sequential and aware == "none":
            raise ValueError("sequential=true refits layers to calibration inputs: it needs aware=true or aware=output")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")
        if self.refit not in ("none", "block"):
            raise ValueError(f"refit must be 'none' or 'block', got {self.refit!r}")
        if self.refit == "block" and aware != "output":
            raise ValueError(
                "refit=block trains each Linear -> activation -> Linear pair in the output-aware metric: "
                "it needs aware=output"
            )
        if self.refit_steps < 1:
            raise ValueError(f"refit_steps must be >= 1, got {self.refit_steps}")


def _choose_rank(cfg: SVDConfig, sigma: Tensor, n: int, k: int, layer: str) -> int:
    full = min(n, k)
    if cfg.rank:
        if cfg.rank > full:
            raise RecipeError(f"svd rank={cfg.rank} is larger than layer {layer!r} allows (min(out, in) = {full})")
        return cfg.rank
    m = cfg.multiple
    if cfg.energy:
        cum = torch.cumsum(sigma.double() ** 2, 0) / (sigma.double() ** 2).sum().clamp_min(1e-300)
        rank = int(torch.searchsorted(cum, torch.tensor(cfg.energy, dtype=torch.float64)).item()) + 1
        return min(full, -(-rank // m) * m)  # up: at least that energy
    return min(full, max(m, math.floor(cfg.ratio * n * k / (n + k)) // m * m))  # down: within the bytes


def whitening(hessian: Tensor, damp: float) -> Tensor:
    """Lower-triangular C with C C^T = X^T X + damp * mean(diag) * I.

    Example:
        >>> c = whitening(2 * x.t() @ x / len(x), damp=0.01)
    """
    h = hessian.double()
    h = h + damp * torch.diag(h).mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(h)


@dataclass
class Spectrum:
    """SVD of L W C, where C whitens the inputs and L weights the outputs (both optional): its singular values
    squared are the error, in that metric, of dropping each rank."""

    u: Tensor
    s: Tensor
    vt: Tensor
    c: Optional[Tensor] = None
    l_inv: Optional[Tensor] = None


def spectrum(w: Tensor, damp: float, hessian: Optional[Tensor] = None, output_gn: Optional[Tensor] = None) -> Spectrum:
    """Weighted SVD of ``w`` [N, K]: inputs whitened by ``hessian`` [K, K], outputs by ``output_gn`` [N, N].

    Example:
        >>> sp = spectrum(torch.randn(64, 32), damp=0.01)
        >>> sp.s.shape
        torch.Size([32])
    """
    m = w.double()
    c = whitening(hessian, damp) if hessian is not None else None
    l_root, l_inv = metric_roots(output_gn, damp) if output_gn is not None else (None, None)
    if c is not None:
        m = m @ c
    if l_root is not None:
        m = l_root @ m
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    return Spectrum(u, s, vt, c, l_inv)


def factors_at_rank(sp: Spectrum, r: int) -> tuple[Tensor, Tensor]:
    """(A [r, K], B [N, r]) from the top ``r`` singular triplets, each factor carrying S^1/2, weights undone.

    Example:
        >>> a, b = factors_at_rank(spectrum(torch.randn(64, 32), damp=0.01), 8)
    """
    root = sp.s[:r].sqrt()
    a, b = root[:, None] * sp.vt[:r], sp.u[:, :r] * root
    if sp.c is not None:  # A C = S^1/2 V^T  =>  A = S^1/2 V^T C^-1
        a = torch.linalg.solve_triangular(sp.c, a, upper=False, left=False)
    if sp.l_inv is not None:  # L B = U S^1/2  =>  B = L^-1 U S^1/2
        b = sp.l_inv @ b
    return a.float(), b.float()


def svd_factors(
    w: Tensor, cfg: SVDConfig, layer: str, hessian: Optional[Tensor] = None, output_gn: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """(A [r, K], B [N, r]) with B @ A ~= W, plain or whitened by ``hessian`` (activation-aware) and weighted by
    ``output_gn`` (output-aware); the rank from ``cfg`` (rank, energy or ratio).

    Example:
        >>> a, b = svd_factors(torch.randn(64, 32), SVDConfig(rank=8), "fc")
        >>> a.shape, b.shape
        (torch.Size([8, 32]), torch.Size([64, 8]))
    """
    sp = spectrum(w, cfg.damp, hessian, output_gn)
    return factors_at_rank(sp, _choose_rank(cfg, sp.s, *w.shape, layer))


def global_ranks(spectra: dict[str, Spectrum], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Ranks for all layers together: keep the singular values worth most error per stored element until the
    factors fill ``ratio`` of the layers' elements. Comparable only when every spectrum is in the same metric
    (``aware=output``). A layer keeps at least rank 1 and never more than its break-even rank.

    Example:
        >>> sp_a = spectrum(torch.randn(96, 24), damp=0.01)
        >>> sp_b = spectrum(torch.randn(24, 96) * torch.logspace(0, -3, 96), damp=0.01)  # falling spectrum: little rank
        >>> global_ranks({"a": sp_a, "b": sp_b}, {"a": (96, 24), "b": (24, 96)}, ratio=0.5)
        {'a': 18, 'b': 1}
    """
    budget = ratio * sum(n * k for n, k in shapes.values())
    ranks = {name: 1 for name in spectra}
    budget -= sum(sum(shapes[name]) for name in spectra)
    cap = {name: max(1, (n * k) // (n + k) - 1) for name, (n, k) in shapes.items()}
    order = sorted(
        ((float(v) ** 2 / sum(shapes[name]), name) for name, sp in spectra.items() for v in sp.s[1:]), reverse=True
    )
    for _, name in order:  # within a layer values are sorted, so each layer's ranks are taken in order
        cost = sum(shapes[name])
        if ranks[name] < cap[name] and cost <= budget:
            ranks[name] += 1
            budget -= cost
    return ranks


def tucker2(w: Tensor, cfg: SVDConfig, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    """(U_in^T as [r_in, I, 1, 1], core [r_out, r_in, kh, kw], U_out as [O, r_out, 1, 1]) for a conv weight.

    Example:
        >>> first, core, last = tucker2(torch.randn(32, 16, 3, 3), SVDConfig(ratio=0.5), "conv")
    """
    o, i, kh, kw = w.shape
    w64 = w.double()
    u_out = torch.linalg.svd(w64.reshape(o, -1), full_matrices=False)[0]
    u_in = torch.linalg.svd(w64.transpose(0, 1).reshape(i, -1), full_matrices=False)[0]
    if cfg.rank:
        if cfg.rank > min(o, i):
            raise RecipeError(f"svd rank={cfg.rank} is larger than conv {layer!r} allows (min(out, in) = {min(o, i)})")
        r_out = r_in = cfg.rank
    else:  # largest ranks in proportion to (O, I) whose three factors fit in ratio * |W|
        budget, t = cfg.ratio * o * i * kh * kw, 1.0
        lo, hi = 0.0, 1.0
        for _ in range(40):
            t = (lo + hi) / 2
            ro, ri = max(1, round(t * o)), max(1, round(t * i))
            lo, hi = (t, hi) if ri * i + ro * ri * kh * kw + o * ro <= budget else (lo, t)
        r_out, r_in = max(1, round(lo * o)), max(1, round(lo * i))
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("oikl,or,is->rskl", w64, u_out, u_in)
    return u_in.t().reshape(r_in, i, 1, 1).float(), core.float(), u_out.reshape(o, r_out, 1, 1).float()


def spatial_svd(w: Tensor, cfg: SVDConfig, layer: str) -> tuple[Tensor, Tensor]:
    """(vertical [r, I, kh, 1], horizontal [O, r, 1, kw]) whose composition approximates the conv weight ``w``.

    Example:
        >>> v, h = spatial_svd(torch.randn(32, 16, 3, 3), SVDConfig(rank=8), "conv")
        >>> v.shape, h.shape
        (torch.Size([8, 16, 3, 1]), torch.Size([32, 8, 1, 3]))
    """
    o, i, kh, kw = w.shape
    m = w.double().permute(1, 2, 0, 3).reshape(i * kh, o * kw)
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    r = _choose_rank(cfg, s, i * kh, o * kw, layer)
    root = s[:r].sqrt()
    vertical = (u[:, :r] * root).reshape(i, kh, r).permute(2, 0, 1).unsqueeze(-1)
    horizontal = (root[:, None] * vt[:r]).reshape(r, o, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.float().contiguous(), horizontal.float().contiguous()


def _rewrite_spatial(gm: fx.GraphModule, site: Site, vertical: Tensor, horizontal: Tensor) -> None:
    c = site.conv
    (sh, sw), (ph, pw), (dh, dw) = c["stride"], c["padding"], c["dilation"]
    v = add_constant(gm, f"{site.name}_spatial_v", vertical, site.node)
    h = add_constant(gm, f"{site.name}_spatial_h", horizontal, site.node)
    bias = (
        add_constant(gm, f"{site.name}_spatial_bias", site.bias.float(), site.node) if site.bias is not None else None
    )
    with gm.graph.inserting_before(site.node):
        mid = gm.graph.call_function(aten.conv2d.default, (site.input, v, None, [sh, 1], [ph, 0], [dh, 1]))
    replace_node(gm, site.node, aten.conv2d.default, (mid, h, bias, [1, sw], [0, pw], [1, dw]))


def _rewrite_linear(gm: fx.GraphModule, site: Site, a: Tensor, b: Tensor) -> tuple[str, str, Optional[str]]:
    """Rewrite the site as two Linears; return the names of the buffers holding A, B and the bias."""
    a_node = add_constant(gm, f"{site.name}_svd_in", a, site.node)
    b_node = add_constant(gm, f"{site.name}_svd_out", b, site.node)
    bias = add_constant(gm, f"{site.name}_svd_bias", site.bias.float(), site.node) if site.bias is not None else None
    with gm.graph.inserting_before(site.node):
        hidden = gm.graph.call_function(aten.linear.default, (site.input, a_node))
    replace_node(gm, site.node, aten.linear.default, (hidden, b_node, bias))
    return str(a_node.target), str(b_node.target), None if bias is None else str(bias.target)


def _rewrite_conv(gm: fx.GraphModule, site: Site, first: Tensor, core: Tensor, last: Tensor) -> None:
    c = site.conv
    nodes = [
        add_constant(gm, f"{site.name}_tucker_{part}", t, site.node)
        for part, t in (("in", first), ("core", core), ("out", last))
    ]
    bias = add_constant(gm, f"{site.name}_tucker_bias", site.bias.float(), site.node) if site.bias is not None else None
    with gm.graph.inserting_before(site.node):
        h = gm.graph.call_function(aten.conv2d.default, (site.input, nodes[0]))
        h = gm.graph.call_function(aten.conv2d.default, (h, nodes[1], None, c["stride"], c["padding"], c["dilation"]))
    replace_node(gm, site.node, aten.conv2d.default, (h, nodes[2], bias))


@dataclass
class _Plan:
    """How one site is factorized: its factors, what they approximate, and the edit that writes them."""

    action: str
    what: str
    factors: tuple[Tensor, ...]
    approx: Tensor
    write: Callable[[], Optional[tuple[str, str, Optional[str]]]]  # returns a Linear's factor buffer names


def _plan_linear(gm: fx.GraphModule, site: Site, sp: Spectrum, rank: int, note: str) -> _Plan:
    a, b = factors_at_rank(sp, rank)
    return _Plan("svd", f"rank {a.shape[0]}{note}", (a, b), b @ a, lambda: _rewrite_linear(gm, site, a, b))


def _plan_conv(gm: fx.GraphModule, site: Site, cfg: SVDConfig) -> _Plan:
    w = site.weight.float()
    if cfg.conv == "spatial":
        vertical, horizontal = spatial_svd(w, cfg, site.name)
        approx = torch.einsum("rikz,orzl->oikl", vertical, horizontal)
        return _Plan(
            "spatial-svd",
            f"spatial rank {vertical.shape[0]}",
            (vertical, horizontal),
            approx,
            lambda: _rewrite_spatial(gm, site, vertical, horizontal),
        )
    first, core, last = tucker2(w, cfg, site.name)
    approx = torch.einsum("rskl,or,si->oikl", core, last[:, :, 0, 0], first[:, :, 0, 0])
    return _Plan(
        "tucker2",
        f"ranks {core.shape[1]}->{core.shape[0]}",
        (first, core, last),
        approx,
        lambda: _rewrite_conv(gm, site, first, core, last),
    )


@register_pass(SVDConfig)
def factorize(gm: fx.GraphModule, cfg: SVDConfig, ctx: PassContext) -> PassResult:
    """Replace selected Linear (and Conv2d) sites by low-rank factors when that saves bytes.

    Example:
        >>> cm = fxcompress.optimize(model, x, recipe="svd:ratio=0.5,aware=true,include=0", calibration=calibration)
        >>> [(r.layer, r.action, r.reason) for r in cm.records]
        [('2', 'skipped', "not matched by include=['0']"), ('0', 'svd', 'rank 16 (activation-aware)')]
    """
    sites, records = select_sites(gm, cfg, cfg.kinds)
    float_graph = copy.deepcopy(gm) if cfg.sequential else None  # before any edit: the inputs the layers should see
    float_inputs = {s.name: s.input for s in find_sites(float_graph)[0]} if float_graph is not None else {}
    ranks, spectra, output_gns = _linear_spectra(gm, cfg, ctx, [s for s in sites if s.kind == "linear"])
    blocks = _blocks_to_refit(gm, cfg, sites)
    block_data = block_rows(gm, blocks, ctx.calibration) if blocks else {}  # the float model's, before any edit
    written: dict[str, tuple[tuple[str, str, Optional[str]], int]] = {}  # site -> (factor buffers, record index)
    changed = False
    for site in sites:
        ctx.progress(site.name)
        if site.kind == "conv2d" and site.conv["groups"] != 1:
            records.append(_skip(cfg, site, f"grouped conv (groups={site.conv['groups']}) is not factorized"))
            continue
        if site.kind == "linear":
            refit = float_graph is not None and changed  # until a layer changes, its inputs are the float model's
            sp = spectra[site.name]
            if refit:
                sp = _refit(gm, float_graph, float_inputs[site.name], site, cfg, ctx, output_gns.get(site.name))
            note = _AWARE_NOTE[cfg.aware] + (", refitted to the compressed inputs" if refit else "")
            plan = _plan_linear(gm, site, sp, ranks[site.name], note)
        else:
            plan = _plan_conv(gm, site, cfg)
        after = nbytes(*plan.factors, site.bias)
        if after >= site.weight_bytes:
            records.append(_skip(cfg, site, f"{plan.what} would not save bytes ({after} >= {site.weight_bytes})"))
            continue
        names = plan.write()
        if names is not None:
            written[site.name] = (names, len(records))
        changed = True
        error = sqnr_db(site.weight.float(), plan.approx)
        records.append(
            LayerRecord(
                site.name,
                site.kind,
                cfg.name,
                plan.action,
                plan.what,
                site.weight_bytes,
                after,
                error,
                "weight SQNR dB",
                numerics=Numerics("float32"),
            )
        )
    for block in blocks:
        if block.first.name in written and block.second.name in written:
            ctx.progress(f"refit {block.name}")
            _refit_block(gm, cfg, block, block_data[block.name], written, output_gns[block.second.name], records)
    return PassResult(gm, changed, records)


def _blocks_to_refit(gm: fx.GraphModule, cfg: SVDConfig, sites: list[Site]) -> list[Block]:
    if cfg.refit != "block":
        return []
    blocks = find_blocks(gm, sites)
    if not blocks:
        raise InputError(
            "svd refit=block found no Linear -> activation (GELU/ReLU/SiLU) -> Linear pair with both "
            f"layers selected among {[s.name for s in sites if s.kind == 'linear'][:6]}; select both "
            "Linears of each MLP (include=...) or drop refit=block"
        )
    return blocks


def _refit_block(
    gm: fx.GraphModule,
    cfg: SVDConfig,
    block: Block,
    rows: tuple[Tensor, Tensor, Tensor],
    written: dict[str, tuple[tuple[str, str, Optional[str]], int]],
    output_gn: Tensor,
    records: list[LayerRecord],
) -> None:
    """Train the block's factors jointly (:func:`refit_block`), store them in its buffers (when they beat the
    truncation on held-out tokens) and say so in both layers' records."""
    (first_names, first_index), (second_names, second_index) = written[block.first.name], written[block.second.name]

    def factors(names: tuple[str, str, Optional[str]]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return getattr(gm, names[0]), getattr(gm, names[1]), None if names[2] is None else getattr(gm, names[2])

    first, second, before, after = refit_block(
        *rows, factors(first_names), factors(second_names), activation(gm, block.act), output_gn, cfg.refit_steps
    )
    kept = after < before
    for site, names, values, index in (
        (block.first, first_names, first, first_index),
        (block.second, second_names, second, second_index),
    ):
        if kept:
            for name, value in zip(names, values):
                if name is not None:
                    getattr(gm, name).copy_(value)
            records[index].error = sqnr_db(site.weight.float(), values[1].float() @ values[0].float())
        records[index].reason += (
            f"; {'refitted' if kept else 'refit not kept'} as one block {block.name} "
            f"(held-out output-aware error {before:.3g} -> {after:.3g})"
        )


_AWARE_NOTE = {"none": "", "input": " (activation-aware)", "output": " (activation- and output-aware)"}


def _linear_spectra(
    gm: fx.GraphModule, cfg: SVDConfig, ctx: PassContext, linear: list[Site]
) -> tuple[dict[str, int], dict[str, Spectrum], dict[str, Tensor]]:
    """Each Linear site's chosen rank and weighted spectrum (with the statistics ``cfg.aware`` asks for), and the
    output-side weights (``aware=output``) that a sequential refit reuses."""
    if not linear:
        return {}, {}, {}
    hessians: dict[str, Tensor] = {}
    output_gns: dict[str, Tensor] = {}
    if cfg.aware != "none":
        if ctx.calibration is None:
            raise InputError(
                f"svd aware={cfg.aware} needs calibration data: optimize(..., calibration=[input_tuple, ...])"
            )
        hessians = input_hessians(gm, {s.name: s.input for s in linear}, ctx.calibration)
    if cfg.aware == "output":
        output_gns = output_gauss_newton(gm, {s.name: s.node for s in linear}, ctx.calibration, probes=cfg.probes)
    spectra = {
        s.name: spectrum(s.weight.float(), cfg.damp, hessians.get(s.name), output_gns.get(s.name)) for s in linear
    }
    if cfg.allocate == "global":
        ranks = global_ranks(spectra, {s.name: tuple(s.weight.shape) for s in linear}, cfg.ratio)
    else:
        ranks = {s.name: _choose_rank(cfg, spectra[s.name].s, *s.weight.shape, s.name) for s in linear}
    return ranks, spectra, output_gns


def refit_target(w: Tensor, h_ss: Tensor, p_ts: Tensor, damp: float) -> Tensor:
    """The full-rank M that best maps the compressed inputs onto the float layer's outputs, shrunk towards W:
    M = W (P + d I)(H + d I)^-1 with H = X_s^T X_s, P = X_t^T X_s, d = damp * mean(diag H). M = W when X_s = X_t,
    so a layer whose inputs did not change keeps its weight.

    Example:
        >>> w, x = torch.randn(4, 8).double(), torch.randn(64, 8).double()
        >>> h = x.T @ x / 64
        >>> torch.allclose(refit_target(w, h, h, damp=0.01), w)  # inputs unchanged: the weight stays
        True
    """
    d = damp * torch.diag(h_ss).mean().clamp_min(1e-12) * torch.eye(h_ss.shape[0], dtype=torch.float64)
    # M^T = (H + dI)^-1 (P + dI)^T W^T, H + dI symmetric
    return torch.linalg.solve(h_ss.double() + d, (p_ts.double() + d).t() @ w.double().t()).t()


def _refit(
    gm: fx.GraphModule,
    float_graph: fx.GraphModule,
    float_input: fx.Node,
    site: Site,
    cfg: SVDConfig,
    ctx: PassContext,
    output_gn: Optional[Tensor],
) -> Spectrum:
    """Spectrum of the layer refitted to the inputs it gets in the partly factorized ``gm`` (``float_input``: the
    node feeding the same layer in ``float_graph``)."""
    h_ss, p_ts = paired_moments(gm, float_graph, site.input, float_input, ctx.calibration)
    return spectrum(refit_target(site.weight, h_ss, p_ts, cfg.damp), cfg.damp, h_ss, output_gn)


def _skip(cfg: SVDConfig, site: Site, reason: str) -> LayerRecord:
    return LayerRecord(site.name, site.kind, cfg.name, "skipped", reason, site.weight_bytes, site.weight_bytes)
