"""Running a recipe: the pass manager, and how a pass picks its sites and records the ones it leaves."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from fxcompress.errors import FxCompressError, PassError
from fxcompress.graph.edit import finalize
from fxcompress.graph.sites import Site, Skipped, find_sites
from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.registry import PassConfig, PassContext, pass_entry

log = logging.getLogger(__name__)


class PassManager:
    """Runs configs in order, finalizing the graph after each and naming the pass in any failure.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8)))
        >>> from fxcompress.recipe.parse import parse_recipe
        >>> records = PassManager(parse_recipe("fold_bn,int8")).run(gm, PassContext((torch.randn(1, 8),)))
        >>> [(r.pass_name, r.layer, r.action) for r in records]
        [('int8', '0', 'int8')]
    """

    def __init__(self, configs: Sequence[PassConfig]):
        self.configs = list(configs)

    def run(
        self, gm: fx.GraphModule, ctx: PassContext, on_pass_done: Callable[[str], None] = lambda _: None
    ) -> list[LayerRecord]:
        records: list[LayerRecord] = []
        done: list[str] = []
        for cfg in self.configs:
            _, fn = pass_entry(cfg.name)
            start = time.perf_counter()
            try:
                result = fn(gm, cfg, ctx)
                finalize(result.graph_module)
            except FxCompressError:
                raise
            except Exception as exc:
                raise PassError(
                    f"pass {cfg.name!r} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}"
                ) from exc
            gm = result.graph_module
            records.extend(result.records)
            done.append(cfg.name)
            on_pass_done(cfg.name)
            log.info("pass %s: modified=%s in %.2fs", cfg.name, result.modified, time.perf_counter() - start)
        return records


def skipped_record(s: Skipped, pass_name: str) -> LayerRecord:
    """The record for a look-alike node no pass can rewrite.

    Example:
        >>> records = [skipped_record(s, cfg.name) for s in find_sites(gm)[1]]
    """
    return LayerRecord(s.name, s.kind, pass_name, "skipped", s.reason)


def select_sites(gm: fx.GraphModule, cfg: PassConfig, kinds: Iterable[str]) -> tuple[list[Site], list[LayerRecord]]:
    """Sites of ``kinds`` selected by ``cfg``; every other candidate comes back as a skipped record with its reason.

    Example:
        >>> from fxcompress.passes.int8 import Int8Config
        >>> chosen, records = select_sites(gm, Int8Config(exclude=("2",)), ("linear",))
        >>> [s.name for s in chosen], [(r.layer, r.reason) for r in records]
        (['0'], [('2', "excluded by pattern '2'")])
    """
    sites, skipped = find_sites(gm)
    records = [skipped_record(s, cfg.name) for s in skipped]
    kinds = set(kinds)
    readers: dict[tuple, list[Site]] = {}
    for site in sites:
        readers.setdefault(site.weight_key, []).append(site)
    chosen = []
    for site in sites:
        if site.kind not in kinds:
            why = f"{site.kind} is not handled by {cfg.name} (kinds={sorted(kinds)})" + type(cfg).other_kinds.get(
                site.kind, ""
            )
        elif (
            site.weight.dtype != torch.float32
        ):  # e.g. halved by an earlier fp16 pass: the kernels and lowerings read float32
            why = (
                f"weights are {str(site.weight.dtype).removeprefix('torch.')}, {cfg.name} needs float32 weights; "
                f"put fp16 last in the recipe (e.g. 'int8,fp16')"
            )
        else:
            why = cfg.selects(site.name) or _tie_reason(site, readers[site.weight_key], cfg, kinds)
            if why is None and site.transposed and not cfg.handles_transposed_weights:
                why = f"its weight is stored [in, out] (a GPT-2 style Conv1D computed by addmm), which {cfg.name} "
                why += "does not handle yet; int8, int4, int8_static, fp16 and sparsity do"
        if why is None:
            chosen.append(site)
        else:
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes)
            )
    return chosen, records


def _tie_reason(site: Site, readers: list[Site], cfg: PassConfig, kinds: set[str]) -> Optional[str]:
    """Why a site whose weight other sites read too is left alone, or None. Rewriting one reader of a tied weight
    while another keeps the float tensor stores the weight twice: the artifact grows instead of shrinking."""
    others = [s for s in readers if s is not site]
    if not others:
        return None
    if not cfg.shares_tied_weights:
        return (
            f"its weight is also read by {', '.join(s.name for s in others[:3])}: {cfg.name} would store one copy "
            "per reader, more bytes than the one float weight"
        )
    left = [s for s in others if s.kind not in kinds or cfg.selects(s.name) is not None]
    if left:
        return (
            f"its weight is tied to {left[0].name} ({left[0].kind}), which {cfg.name} leaves float: compressing only "
            f"this reader would store the weight twice; {_tie_hint(cfg, kinds, left[0].kind)}"
        )
    return None


def _tie_hint(cfg: PassConfig, kinds: set[str], other_kind: str) -> str:
    """What the user can change so that both readers of a tied weight are compressed, if anything."""
    if other_kind in kinds:
        return "select both layers to compress it"
    wider = "+".join(sorted(kinds | {other_kind}))
    try:
        dataclasses.replace(cfg, kinds=tuple(wider.split("+")))
    except (TypeError, ValueError):  # the pass has no kinds= option, or cannot rewrite that kind
        return f"{cfg.name} cannot rewrite {other_kind} layers, so the weight stays float"
    return f"add kinds={wider} to compress it"
