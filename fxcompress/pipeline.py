"""Pass infrastructure: configs, the registry, per-layer records, recipes and the pass manager.

A pass is a frozen config dataclass plus one function ``(GraphModule, config, PassContext) -> PassResult``,
registered with :func:`register_pass`. Adding a technique means adding one module under ``passes/``; nothing here
changes. A recipe is a list of configs, written as text for the CLI: ``"fold_bn,int8:kinds=linear+conv2d"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence, Union

import torch
from torch import fx

from fxcompress.errors import FxCompressError, PassError, RecipeError
from fxcompress.graph_edit import finalize
from fxcompress.sites import Site, Skipped, find_sites

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Parity floor a compressed artifact must meet against the fp32 model (checked by fxcompress.check)."""

    cosine_min: float = 0.999
    top1_agreement_min: float = 0.98
    accuracy_drop_max_pp: float = 1.0

    def loosest(self, other: "Tolerance") -> "Tolerance":
        """The looser floor of the two: a recipe is only as exact as its lossiest pass.

        Example:
            >>> Tolerance(cosine_min=0.999).loosest(Tolerance(cosine_min=0.98)).cosine_min
            0.98
        """
        return Tolerance(
            min(self.cosine_min, other.cosine_min),
            min(self.top1_agreement_min, other.top1_agreement_min),
            max(self.accuracy_drop_max_pp, other.accuracy_drop_max_pp),
        )


EXACT = Tolerance(cosine_min=0.99999, top1_agreement_min=1.0, accuracy_drop_max_pp=0.0)


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: which layers it may touch.

    ``include`` / ``exclude`` are fnmatch patterns on layer names (``"encoder.*.attention.*"``); an empty
    ``include`` means every layer.
    """

    name: ClassVar[str] = ""
    tolerance: ClassVar[Tolerance] = EXACT
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, layer: str) -> Optional[str]:
        """None when ``layer`` is selected, else the reason it is not.

        Example:
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
            >>> Int8Config(kinds=("linear",)).to_dict()["kinds"]
            ['linear']
        """
        d = {"pass": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass
class LayerRecord:
    """What one pass did to one layer: the rows of the report."""

    layer: str
    kind: str
    pass_name: str
    action: str  # e.g. "int8", "folded", "skipped"
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    error: Optional[float] = None  # pass-specific: weight SQNR in dB for quantization
    error_metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific JSON data, e.g. pruned channel indices

    @property
    def skipped(self) -> bool:
        return self.action == "skipped"


@dataclass
class PassResult:
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
    import fxcompress.passes  # noqa: F401  (registers the built-in passes)

    return sorted(_REGISTRY)


def pass_help(name: str) -> tuple[str, str]:
    """A pass's one-line description and its options with their defaults, written as recipe text (``include`` and
    ``exclude``, which every pass takes, left out).

    Example:
        >>> pass_help("fold_bn")
        ('Fold BatchNorm1d/2d (eval mode) into the preceding Conv1d/Conv2d.', '')
    """
    available_passes()
    cls = _REGISTRY[name][0]
    summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split()).replace("``", "")
    defaults = cls()
    options = []
    for f in dataclasses.fields(cls):
        if f.name in ("include", "exclude"):
            continue
        value = getattr(defaults, f.name)
        text = "+".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else value
        options.append(f"{f.name}={text}")
    return summary, " ".join(options)


def _coerce(cfg_cls: type[PassConfig], key: str, raw: str) -> Any:
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    if key not in fields:
        raise RecipeError(f"pass {cfg_cls.name!r} has no option {key!r}; options: {sorted(fields)}")
    hint = hints[key]
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            return tuple(p for p in raw.split("+") if p)
        if hint is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if hint in (int, float):
            return hint(raw)
        return raw
    except ValueError:
        raise RecipeError(f"option {key!r} of pass {cfg_cls.name!r} expects {getattr(hint, '__name__', hint)}, got {raw!r}") from None


def _config_from_text(item: str) -> PassConfig:
    name, _, opts = item.strip().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown pass {name!r} in recipe.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name][0]
    kwargs = {}
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, raw = opt.partition("=")
        if not eq:
            raise RecipeError(f"option {opt!r} of pass {name!r} must be written key=value")
        kwargs[key.strip()] = _coerce(cls, key.strip(), raw.strip())
    return _build(cls, kwargs)


def _build(cls: type[PassConfig], kwargs: dict[str, Any]) -> PassConfig:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid options for pass {cls.name!r}: {exc}") from exc


RecipeLike = Union[str, PassConfig, dict, Iterable[Union[str, PassConfig, dict]]]


def parse_recipe(recipe: RecipeLike) -> list[PassConfig]:
    """Turn a recipe into configs. Text separates passes by ``,`` at the top level and options by ``:``/``,``.

    ``"fold_bn,int8:kinds=linear+conv2d,exclude=fc"`` -> ``[FoldBNConfig(), Int8Config(kinds=(...), exclude=(...))]``.
    Dicts take ``{"pass": name, **options}``.

    Example:
        >>> [c.name for c in parse_recipe("fold_bn,int8")]
        ['fold_bn', 'int8']
    """
    available_passes()
    if isinstance(recipe, PassConfig):
        return [recipe]
    if isinstance(recipe, dict):
        opts = dict(recipe)
        name = opts.pop("pass", None)
        if name not in _REGISTRY:
            raise RecipeError(f"recipe entry {recipe!r} needs 'pass': one of {', '.join(sorted(_REGISTRY))}")
        cls = _REGISTRY[name][0]
        return [_build(cls, {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})]
    if isinstance(recipe, str):
        if not recipe.strip():
            raise RecipeError("empty recipe; name at least one pass, e.g. 'int8'")
        return [_config_from_text(item) for item in _split_text(recipe)]
    configs = [c for item in recipe for c in parse_recipe(item)]
    if not configs:
        raise RecipeError("empty recipe; name at least one pass, e.g. 'int8'")
    return configs


def _split_text(recipe: str) -> list[str]:
    """Split on commas that start a new pass (a word known as a pass name), keeping option commas."""
    items: list[str] = []
    for piece in recipe.split(","):
        word = piece.strip().partition(":")[0].strip()
        if items and "=" in piece and word not in _REGISTRY:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def recipe_tolerance(configs: Sequence[PassConfig]) -> Tolerance:
    """The parity floor for a recipe: the loosest of its passes' floors.

    Example:
        >>> recipe_tolerance(parse_recipe("int8,int4")).cosine_min
        0.98
    """
    tol = EXACT
    for c in configs:
        tol = tol.loosest(type(c).tolerance)
    return tol


class PassManager:
    """Runs configs in order, finalizing the graph after each and naming the pass in any failure.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8)))
        >>> records = PassManager(parse_recipe("int8")).run(gm, PassContext((torch.randn(1, 8),)))
    """

    def __init__(self, configs: Sequence[PassConfig]):
        self.configs = list(configs)

    def run(self, gm: fx.GraphModule, ctx: PassContext, on_pass_done: Callable[[str], None] = lambda _: None) -> list[LayerRecord]:
        records: list[LayerRecord] = []
        done: list[str] = []
        for cfg in self.configs:
            _, fn = _REGISTRY[cfg.name]
            start = time.perf_counter()
            try:
                result = fn(gm, cfg, ctx)
                finalize(result.graph_module)
            except FxCompressError:
                raise
            except Exception as exc:
                raise PassError(f"pass {cfg.name!r} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}") from exc
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
        >>> sites, records = select_sites(gm, Int8Config(exclude=("classifier",)), ("linear",))
    """
    sites, skipped = find_sites(gm)
    records = [skipped_record(s, cfg.name) for s in skipped]
    kinds = set(kinds)
    chosen = []
    for site in sites:
        if site.kind not in kinds:
            why = f"{site.kind} is not handled by {cfg.name} (kinds={sorted(kinds)})"
        elif site.weight.dtype != torch.float32:  # e.g. halved by an earlier fp16 pass: the kernels and lowerings read float32
            why = (f"weights are {str(site.weight.dtype).removeprefix('torch.')}, {cfg.name} needs float32 weights; "
                   f"put fp16 last in the recipe (e.g. 'int8,fp16')")
        else:
            why = cfg.selects(site.name)
        if why is None:
            chosen.append(site)
        else:
            records.append(LayerRecord(site.name, site.kind, cfg.name, "skipped", why, site.weight_bytes, site.weight_bytes))
    return chosen, records
