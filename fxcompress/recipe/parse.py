"""Recipes: pass names with options, as text (``"fold_bn,int8:kinds=linear+conv2d"``), dicts or configs.

Text separates passes by ``,`` at the top level and options by ``:``/``,``; a comma starts a new pass only before a
word that names one. ``include`` / ``exclude`` (every pass) take layer-name patterns joined by ``+``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Iterable, Sequence, Union

from fxcompress.errors import RecipeError
from fxcompress.recipe.registry import PassConfig, available_passes, pass_entry
from fxcompress.recipe.tolerance import EXACT, Tolerance


def _hints(cfg_cls: type[PassConfig]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    return {k: v for k, v in typing.get_type_hints(cfg_cls).items() if k in fields}


def _option_error(cfg_cls: type[PassConfig], key: str, hint: Any, raw: Any) -> RecipeError:
    return RecipeError(
        f"option {key!r} of pass {cfg_cls.name!r} expects {getattr(hint, '__name__', hint)}, got {raw!r}"
    )


def _coerce(cfg_cls: type[PassConfig], key: str, raw: str) -> Any:
    """Recipe text ``raw`` as the type of option ``key``."""
    hints = _hints(cfg_cls)
    if key not in hints:
        raise RecipeError(f"pass {cfg_cls.name!r} has no option {key!r}; options: {sorted(hints)}")
    hint = hints[key]
    try:
        if typing.get_origin(hint) is tuple:
            return tuple(p for p in raw.split("+") if p)
        if hint is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if hint in (int, float):
            return hint(raw)
        return raw
    except ValueError:
        raise _option_error(cfg_cls, key, hint, raw) from None


def _checked(cfg_cls: type[PassConfig], key: str, value: Any) -> Any:
    """A dict recipe's ``value`` for option ``key``, type-checked: a dict reaches the config without text parsing, so
    ``{"block": 64.0}`` must fail here, naming the option, rather than deep inside the pass."""
    hints = _hints(cfg_cls)
    if key not in hints:
        raise RecipeError(f"pass {cfg_cls.name!r} has no option {key!r}; options: {sorted(hints)}")
    hint = hints[key]
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            return tuple(p for p in value.split("+") if p)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _option_error(cfg_cls, key, "a list of strings", value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str) and not (
        isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    ):
        raise _option_error(cfg_cls, key, hint, value)
    return value


def _config_class(name: Any, context: str) -> type[PassConfig]:
    entry = pass_entry(name) if isinstance(name, str) else None
    if entry is None:
        names = available_passes()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"unknown pass {name!r} in {context}.{hint} Available: {', '.join(names)}")
    return entry[0]


def _config_from_text(item: str) -> PassConfig:
    name, _, opts = item.strip().partition(":")
    cls = _config_class(name.strip(), "recipe")
    kwargs = {}
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, raw = opt.partition("=")
        if not eq:
            raise RecipeError(f"option {opt!r} of pass {cls.name!r} must be written key=value")
        kwargs[key.strip()] = _coerce(cls, key.strip(), raw.strip())
    return _build(cls, kwargs)


def _build(cls: type[PassConfig], kwargs: dict[str, Any]) -> PassConfig:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid options for pass {cls.name!r}: {exc}") from exc


RecipeLike = Union[str, PassConfig, dict, Iterable[Union[str, PassConfig, dict]]]
_EMPTY = "empty recipe; name at least one pass, e.g. 'int8'"


def parse_recipe(recipe: RecipeLike) -> list[PassConfig]:
    """Turn a recipe into configs. Text separates passes by ``,`` at the top level and options by ``:``/``,``.

    ``"fold_bn,int8:kinds=linear+conv2d,exclude=fc"`` -> ``[FoldBNConfig(), Int8Config(kinds=(...), exclude=(...))]``.
    Dicts take ``{"pass": name, **options}``.

    Example:
        >>> [c.name for c in parse_recipe("fold_bn,int8")]
        ['fold_bn', 'int8']
        >>> parse_recipe({"pass": "int4", "block": 64})[0].block
        64
    """
    if isinstance(recipe, PassConfig):
        return [recipe]
    if isinstance(recipe, dict):
        opts = dict(recipe)
        cls = _config_class(opts.pop("pass", None), f"recipe entry {recipe!r} (it needs 'pass')")
        return [_build(cls, {k: _checked(cls, k, v) for k, v in opts.items()})]
    if isinstance(recipe, str):
        if not recipe.strip():
            raise RecipeError(_EMPTY)
        return [_config_from_text(item) for item in _split_text(recipe)]
    if not isinstance(recipe, (list, tuple)):
        raise RecipeError(
            f"recipe must be text such as 'fold_bn,int8', a pass config, a dict {{'pass': name, ...}} or "
            f"a list of those; got {type(recipe).__name__} {recipe!r}"
        )
    configs = [c for item in recipe for c in parse_recipe(item)]
    if not configs:
        raise RecipeError(_EMPTY)
    return configs


def _split_text(recipe: str) -> list[str]:
    """Split on commas that start a new pass (a word known as a pass name), keeping option commas."""
    names = set(available_passes())
    items: list[str] = []
    for piece in recipe.split(","):
        word = piece.strip().partition(":")[0].strip()
        if items and "=" in piece and word not in names:
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
