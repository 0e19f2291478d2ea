"""The registry of sample sources: a source is a function ``draw(sampler, rng) -> Sample | None`` registered under
its name (the name used in ``ObjectSampler(weights=...)`` and ``PretrainConfig.source_weights``) with what it needs
from the volumes. :class:`~..sampler.ObjectSampler` draws a source by name from :data:`SOURCES`; a name that is not
registered is an error when the sampler is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

__all__ = ["Source", "SOURCES", "NEEDS", "register_source"]

# what a source needs from the sampler's volumes; a source whose need is unmet is left out of the draw
NEEDS = {
    "": "nothing beyond the volumes (body mask and seed voxels)",
    "structures": "labelled structures (outside the holdout)",
    "segmaps": "pseudo-label maps (data.precompute)",
}


@dataclass(frozen=True)
class Source:
    name: str
    draw: Callable  # (sampler, rng) -> Sample or None (None: this draw failed, the sampler tries again)
    needs: str = ""


SOURCES: Dict[str, Source] = {}


def register_source(name: str, needs: str = ""):
    """Decorator: register ``draw(sampler, rng)`` as the source ``name``. Registering a name twice is an error."""
    if needs not in NEEDS:
        raise ValueError(f"source {name!r}: unknown need {needs!r}; known: {sorted(NEEDS)}")

    def deco(fn: Callable) -> Callable:
        if name in SOURCES:
            raise ValueError(f"source {name!r} is registered twice ({SOURCES[name].draw.__module__} and "
                             f"{fn.__module__})")
        SOURCES[name] = Source(name, fn, needs)
        return fn

    return deco
