"""Active learning for ensam: scoring methods and next-sample strategies."""

from .scoring import NoveltyScoring, UncertaintyScoring
from .strategies import NoveltyStrategy, RandomStrategy, UncertaintyStrategy

__all__ = ["NoveltyScoring", "UncertaintyScoring", "NoveltyStrategy", "RandomStrategy", "UncertaintyStrategy"]
