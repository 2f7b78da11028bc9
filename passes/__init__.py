"""The rewrite passes, one file per recipe word (``int8.py`` holds ``int8`` and its ``int8_dynamic`` variant).

Nothing is listed here: :func:`fxcompress.recipe.registry.available_passes` imports every module of this package, and
each registers its passes with ``@register_pass``. A pass imports the stages before it (graph, ops, recipe,
algorithms), never another pass.
"""
