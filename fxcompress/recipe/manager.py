"""Running a recipe: the pass manager, and how a pass picks its sites and records the ones it leaves."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Sequence

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
            why = cfg.selects(site.name)
        if why is None:
            chosen.append(site)
        else:
            records.append(
                LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes)
            )
    return chosen, records
