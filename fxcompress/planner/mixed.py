"""One choice per layer across techniques, for a byte target: the planner's joint search.

A budgeted recipe moves layers between two grids of one technique. Here every layer has several forms: a Linear
int8 (GPTQ), int4 (GPTQ, blocks of 128) or factorized into two thin Linears whose factors are int4 (activation-aware
SVD at half the bytes, ranks a multiple of 16); an embedding table int8 or int4 (blocks of 64). Each form's cost is
measured the same way: the model's output error on the calibration batches with only that layer in that form
(round-to-nearest, plain SVD: quick, and an upper bound on what GPTQ and the activation-aware fit reach), and its
bytes. The forms are chosen together by a Lagrangian relaxation of the multiple-choice knapsack: for a price
``lam`` per byte each layer takes the form minimising ``error + lam * bytes``, and ``lam`` is bisected until the
whole model fits the size (measured by compressing the chosen recipe, not estimated). The result is a plain recipe
with one ``include=`` per form, which reproduces the choice exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, fx

from fxcompress.algorithms.quant import INT4_BITS, block_for, int4_bytes, int8_bytes, round_trip
from fxcompress.algorithms.sensitivity import layer_sensitivity
from fxcompress.graph.sites import Site, find_sites, nbytes, single_reader

SVD_SHARE = 0.5  # the factorized form's factors hold at most this share of the layer's fp32 weight bytes
SVD_MULTIPLE = 16

# each form's recipe words; {layers} is the include list. Order matters: tables, then factorizing, then int8, and
# int4 last takes every float Linear left (the factorized layers' factors among them).
FORMS = {
    "int8 table": "int8:kinds=embedding,include={layers}",
    "int4 table": "int4:kinds=embedding,block=64,clip=true,include={layers}",
    "svd+int4": f"svd:ratio={SVD_SHARE},aware=true,multiple={SVD_MULTIPLE},include={{layers}}",
    "int8": "int8:algo=gptq,include={layers}",
    "int4": "",
}
LAST = "int4:algo=gptq,act_order=true,clip=true"


@dataclass
class LayerForms:
    """A layer's forms: form -> (output error with only this layer in that form, estimated bytes)."""

    name: str
    forms: dict[str, tuple[float, int]]


def _factorized(w: Tensor) -> Optional[tuple[Callable[[], Tensor], int]]:
    """``w`` through rank-r SVD (r a multiple of 16 within :data:`SVD_SHARE` of the bytes) and int4 factors (a
    function computing it), and its bytes; None where no such rank is smaller than the layer."""
    n, k = w.shape
    rank = math.floor(SVD_SHARE * n * k / (n + k)) // SVD_MULTIPLE * SVD_MULTIPLE
    first, second = block_for(k, 128), block_for(rank, 128) if rank else None
    if rank < SVD_MULTIPLE or first is None or second is None:
        return None

    def approximate() -> Tensor:
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        a, b = (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()
        return round_trip(b, INT4_BITS, second) @ round_trip(a, INT4_BITS, first)

    return approximate, int4_bytes(rank, k, first) + int4_bytes(n, rank, second)


def _forms(site: Site) -> dict[str, tuple[Callable[[], Tensor], int]]:
    """The forms ``site`` can take: each one's weight (computed when measured, so that one layer's approximation is
    alive at a time) and its bytes."""
    w, bias = site.weight.float(), nbytes(site.bias)
    block = block_for(w.shape[1], 128 if site.kind == "linear" else 64)
    int8 = (lambda: round_trip(w, 8, 0), int8_bytes(site))
    if site.kind == "embedding":
        forms = {"int8 table": int8}
        if block is not None:
            forms["int4 table"] = (lambda: round_trip(w, INT4_BITS, block), int4_bytes(*w.shape, block))
        return forms
    forms = {"int8": int8}
    if block is not None:
        forms["int4"] = (lambda: round_trip(w, INT4_BITS, block), int4_bytes(*w.shape, block) + bias)
        factorized = _factorized(w)
        if factorized is not None:
            forms["svd+int4"] = (factorized[0], factorized[1] + bias)
    return forms


def layer_forms(gm: fx.GraphModule, batches: Sequence[tuple]) -> list[LayerForms]:
    """Every float Linear and embedding table of ``gm`` with the forms it can take, each measured.

    Example:
        >>> forms = layer_forms(gm, calibration)
        >>> [f.name for f in forms], sorted(forms[0].forms)
        (['0', '2'], ['int4', 'int8', 'svd+int4'])
    """
    sites = [s for s in find_sites(gm)[0] if s.kind in ("linear", "embedding") and s.weight.dtype == torch.float32]
    sites = single_reader(sites)  # a tied weight keeps what the recipe's passes give it
    forms = {site.name: _forms(site) for site in sites}
    errors: dict[tuple[str, str], float] = {}
    for form in FORMS:
        chosen = [s for s in sites if form in forms[s.name]]
        if chosen:
            measured = layer_sensitivity(gm, chosen, lambda s, f=form: forms[s.name][f][0](), batches)
            errors.update({(name, form): err for name, err in measured.items()})
    return [
        LayerForms(name, {form: (errors[(name, form)], size) for form, (_, size) in layer.items()})
        for name, layer in forms.items()
    ]


def choose(layers: Sequence[LayerForms], lam: float) -> dict[str, str]:
    """Each layer's form at price ``lam`` per byte: the one minimising ``error + lam * bytes``.

    Example:
        >>> choose([LayerForms("fc", {"int8": (1e-4, 1000), "int4": (1e-2, 500)})], 1e-6)
        {'fc': 'int8'}
    """
    return {layer.name: min(layer.forms, key=lambda f: layer.forms[f][0] + lam * layer.forms[f][1]) for layer in layers}


def recipe_for(choice: dict[str, str]) -> str:
    """The recipe that gives every layer its chosen form.

    Example:
        >>> recipe_for({"fc1": "int8", "fc2": "int4"})
        'int8:algo=gptq,include=fc1,int4:algo=gptq,act_order=true,clip=true'
    """
    parts = []
    for form, words in FORMS.items():
        layers = [name for name, f in choice.items() if f == form]
        if layers and words:
            parts.append(words.format(layers="+".join(layers)))
    return ",".join(parts + [LAST])


def search(
    layers: Sequence[LayerForms], fits: Callable[[str], bool], progress: Callable[[str], None], steps: int = 12
) -> Optional[str]:
    """The recipe of the least total error whose whole model ``fits`` (its bytes measured), by bisecting the price
    per byte on a log scale; None when even the smallest forms do not fit.

    Example:
        >>> layers = [LayerForms("fc", {"int8": (1e-4, 1000), "int4": (1e-2, 500)})]
        >>> search(layers, lambda recipe: "int8:" not in recipe, lambda line: None)
        'int4:algo=gptq,act_order=true,clip=true'
    """
    if not layers:
        return None
    cheapest = recipe_for({layer.name: min(layer.forms, key=lambda f: layer.forms[f][1]) for layer in layers})
    if not fits(cheapest):
        return None
    low, high = -14.0, 2.0  # log10 of the price per byte: nearly free (finest forms) .. prohibitive (cheapest)
    best = cheapest
    for _ in range(steps):
        mid = (low + high) / 2
        recipe = recipe_for(choose(layers, 10**mid))
        if fits(recipe):
            best, high = recipe, mid
        else:
            low = mid
    progress(f"joint per-layer search: price 1e{high:.1f} per byte")
    return best
