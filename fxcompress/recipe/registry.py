"""The pass registry: a pass is a frozen config dataclass plus one function ``(GraphModule, config, PassContext) ->
PassResult``, registered with :func:`register_pass`. The config's class-level ``name`` is the recipe word; the modules
under ``passes/`` are found and imported automatically, so adding a technique is adding one file there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import fx

from fxcompress.recipe.records import LayerRecord
from fxcompress.recipe.tolerance import EXACT, Tolerance

PASSES_PACKAGE = "fxcompress.passes"


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: which layers it may touch.

    ``include`` / ``exclude`` are fnmatch patterns on layer names (``"encoder.*.attention.*"``); an empty
    ``include`` means every layer.
    """

    name: ClassVar[str] = ""
    tolerance: ClassVar[Tolerance] = EXACT
    # layer kinds the pass leaves, and what to write instead: said in their skipped records
    other_kinds: ClassVar[dict[str, str]] = {}
    # what the pass looks for, said when a model has none of it
    nothing_found: ClassVar[str] = "no Linear/Conv/Embedding layer"
    # whether the pass stores a weight that several sites read once (a Linear called twice, a head tied to its
    # embedding); a pass that cannot leaves such weights alone rather than store one copy per reader
    shares_tied_weights: ClassVar[bool] = False
    # True when the pass handles a Linear whose weight is stored transposed (GPT-2's Conv1D): it reads site.weight
    # and writes only through set_site_weight or by replacing the node. Others skip such layers with a record.
    handles_transposed_weights: ClassVar[bool] = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, layer: str) -> Optional[str]:
        """None when ``layer`` is selected, else the reason it is not.

        Example:
            >>> from fxcompress.passes.int8 import Int8Config
        >>> Int8Config(exclude=("classifier",)).selects("classifier")
            "excluded by pattern 'classifier'"
        """
        if self.include and not any(fnmatch.fnmatch(layer, p) for p in self.include):
            return f"not matched by include={list(self.include)}"
        for p in self.exclude:
            if fnmatch.fnmatch(layer, p):
                return f"excluded by pattern {p!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the pass name under ``"pass"``.

        Example:
            >>> from fxcompress.passes.int8 import Int8Config
        >>> Int8Config(kinds=("linear",)).to_dict()["kinds"]
            ['linear']
        """
        d = {"pass": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass
class PassResult:
    """What a pass returns: the (edited) graph, whether it changed, and a record per candidate layer."""

    graph_module: fx.GraphModule
    modified: bool
    records: list[LayerRecord] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may need beyond the graph: example and calibration inputs, a progress callback, and the
    user's original model as a read-only teacher (distillation)."""

    example_inputs: tuple
    calibration: Optional[Sequence[tuple]] = None
    progress: Callable[[str], None] = lambda _: None
    teacher: Any = None


PassFn = Callable[[fx.GraphModule, Any, PassContext], PassResult]
_REGISTRY: dict[str, tuple[type[PassConfig], PassFn]] = {}


def register_pass(config_cls: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` as the implementation of ``config_cls`` (whose ``name`` is the recipe word).

    Example:
        >>> @dataclass(frozen=True)
        ... class NoopConfig(PassConfig):
        ...     name: ClassVar[str] = "noop"
        >>> @register_pass(NoopConfig)
        ... def noop(gm, cfg, ctx):
        ...     return PassResult(gm, False)
    """

    def deco(fn: PassFn) -> PassFn:
        if not config_cls.name:
            raise TypeError(f"{config_cls.__name__} needs a class-level `name`")
        if config_cls.name in _REGISTRY and _REGISTRY[config_cls.name][0] is not config_cls:
            raise TypeError(f"a pass named {config_cls.name!r} is already registered")
        _REGISTRY[config_cls.name] = (config_cls, fn)
        return fn

    return deco


def available_passes() -> list[str]:
    """Names usable in a recipe.

    Example:
        >>> "int8" in available_passes()
        True
    """
    _discover()
    return sorted(_REGISTRY)


def _discover() -> None:
    """Import every module under ``passes/``: each registers its own passes. (Found by name, as plugins are: the
    registry is a stage before the passes and depends on none of them.)"""
    package = importlib.import_module(PASSES_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{PASSES_PACKAGE}.{info.name}")


def pass_entry(name: str) -> Optional[tuple[type["PassConfig"], PassFn]]:
    """The (config class, function) registered under recipe word ``name``, or None.

    Example:
        >>> pass_entry("int8")[0].__name__
        'Int8Config'
    """
    _discover()
    return _REGISTRY.get(name)


def pass_help(name: str) -> tuple[str, str]:
    """A pass's one-line description and its options with their defaults, written as recipe text (``include`` and
    ``exclude``, which every pass takes, left out).

    Example:
        >>> pass_help("fold_bn")
        ('Fold BatchNorm1d/2d (eval mode) into the preceding Conv1d/Conv2d.', '')
    """
    cls = pass_entry(name)[0]
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split()).replace("``", "")
    defaults = cls()
    options = []
    for f in dataclasses.fields(cls):
        if f.name in ("include", "exclude"):
            continue
        value = getattr(defaults, f.name)
        text = (
            "+".join(map(str, value))
            if isinstance(value, tuple)
            else str(value).lower()
            if isinstance(value, bool)
            else value
        )
        options.append(f"{f.name}={text}")
    return summary, " ".join(options)
