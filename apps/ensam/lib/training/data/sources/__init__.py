"""The sample sources, one module per family, each registered by name in :data:`SOURCES`
(:func:`register_source`): :mod:`.labelled` (``real``, ``synth``), :mod:`.pseudo` (``slic``, ``watershed``,
``window``) and :mod:`.synthetic` (``blob``, ``tube``, ``shell``, ``lesion``). A new source is a function
``draw(sampler, rng) -> Sample | None`` in one of these modules (or a new one imported here), decorated with
``@register_source("name", needs=...)``; it is then drawn wherever ``source_weights`` names it."""

from .registry import NEEDS, SOURCES, Source, register_source
from . import labelled, pseudo, synthetic  # noqa: F401  (importing them registers their sources)

__all__ = ["NEEDS", "SOURCES", "Source", "register_source"]
