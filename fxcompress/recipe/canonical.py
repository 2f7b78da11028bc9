"""Exact rewrites run before every recipe unless turned off: what every peer's export path does before quantizing.

Folding a BatchNorm into its conv changes nothing a user can measure (float rounding) but lets the conv's weight be
quantized with the BN's scale already in it and removes a float op per layer; leaving it to the user meant ``int8``
on a BN network kept every BN in fp32 and ran one more op per conv.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.registry import PassConfig, pass_entry

# Recipe words of exact passes, in the order they run ahead of the user's recipe.
CANONICAL_PASSES = ("fold_bn",)
HOW_TO_TURN_OFF = "run by default as an exact rewrite; optimize(..., canonicalize=False) or --no-canonicalize skips it"


def with_canonical(configs: Sequence[PassConfig]) -> list[PassConfig]:
    """``configs`` preceded by the exact passes they do not already name.

    Example:
        >>> from fxcompress.recipe.parse import parse_recipe
        >>> [c.name for c in with_canonical(parse_recipe("int8"))]
        ['fold_bn', 'int8']
        >>> [c.name for c in with_canonical(parse_recipe("int8,fold_bn"))]  # the user's placement wins
        ['int8', 'fold_bn']
    """
    named = {c.name for c in configs}
    return [pass_entry(name)[0]() for name in CANONICAL_PASSES if name not in named] + list(configs)


def drop_idle_canonical(
    configs: Sequence[PassConfig], user_configs: Sequence[PassConfig], records: list[LayerRecord]
) -> tuple[list[PassConfig], list[LayerRecord]]:
    """The recipe as run, keeping an added exact pass only where it changed something (so the recipe written into
    the artifact reproduces the run without naming passes that did nothing), and its records marked as added.

    Example:
        >>> from fxcompress.recipe.parse import parse_recipe
        >>> user = parse_recipe("int8")
        >>> kept, _ = drop_idle_canonical(with_canonical(user), user, [])
        >>> [c.name for c in kept]
        ['int8']
    """
    added = {c.name for c in configs} - {c.name for c in user_configs}
    acted = {r.pass_name for r in records if not r.skipped}
    kept = [c for c in configs if c.name not in added or c.name in acted]
    marked = [
        dataclasses.replace(r, reason=f"{r.reason}; {HOW_TO_TURN_OFF}" if r.reason else HOW_TO_TURN_OFF)
        if r.pass_name in added
        else r
        for r in records
    ]
    return kept, marked
