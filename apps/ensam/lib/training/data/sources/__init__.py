"""The sample sources, one module per family, each registered by name in :data:`SOURCES`
(:func:`register_source`): :mod:`.labelled` (``real``, ``synth``), :mod:`.pseudo` (``slic``, ``watershed``,
``window``), :mod:`.synthetic` (``blob``, ``tube``, ``shell``, ``lesion``) and :mod:`.cohorts` (``hippocampus``:
multi-subject sets committed to the repository, read apart from the sampler's volumes; not in the default
weights). A new source is a function
``draw(sampler, rng) -> Sample | None`` in one of these modules (or a new one imported here), decorated with
``@register_source("name", needs=...)``; it is then drawn wherever ``source_weights`` names it."""

from .registry import NEEDS, SOURCES, Source, register_source
from . import cohorts, labelled, pseudo, synthetic  # noqa: F401  (importing them registers their sources)

__all__ = ["NEEDS", "SOURCES", "Source", "register_source"]
