"""The view around a lone click, sized from the image (an inference rule; the weights are not changed).

The weights answer a lone foreground click with an object of about a third of the view around it, whatever is
under the click (model card, "A lone click"), so a fixed view (the contract's ``click_extent_mm``, 64 mm) halves a
liver and swallows a small nucleus. :class:`LoneClickView` measures how far the tissue under the click extends:
on shells of growing radius around it (on a ~2 mm grid of the equalised neighbourhood), the radius where fewer
than ``frac`` of the shell's samples stay within ``tol`` of the click's intensity; the view is ``k`` times that
radius, within [``min_mm``, ``max_mm``]. A click deep in a homogeneous organ gets a large view, a click in a
small or textured structure a small one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graphcut import block_mean, equalise

__all__ = ["LoneClickView"]


@dataclass
class LoneClickView:
    """Settings of the lone-click view (see the module). ``grid_mm``: the coarse grid the image is read on;
    ``radii_mm``: the shells tried (growing); ``samples``: directions per shell (fixed, evenly spread)."""

    tol: float = 0.1
    frac: float = 0.5
    k: float = 5.0
    min_mm: float = 48.0
    max_mm: float = 256.0
    grid_mm: float = 2.0
    radii_mm: tuple = (2.0, 3.0, 4.0, 6.0, 8.0, 11.0, 16.0, 22.0, 32.0, 45.0, 64.0)
    samples: int = 256

    def __post_init__(self) -> None:
        self.radii_mm = tuple(float(r) for r in self.radii_mm)

    def directions(self) -> np.ndarray:
        """(samples, 3) unit vectors on a Fibonacci sphere (deterministic, evenly spread)."""
        i = np.arange(self.samples) + 0.5
        z = 1.0 - 2.0 * i / self.samples
        phi = np.pi * (1.0 + 5.0 ** 0.5) * i
        r = np.sqrt(1.0 - z * z)
        return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)

    def radius_mm(self, image: np.ndarray, spacing, point) -> float:
        """How far (mm) the tissue under ``point`` (voxel index of ``image``, (X, Y, Z)) extends: the first shell
        radius where fewer than ``frac`` of the samples (inside the image) are within ``tol`` of the click's
        equalised intensity; the largest radius tried when none is."""
        spacing = np.asarray(spacing, dtype=np.float64)
        shape = np.asarray(image.shape[:3])
        f = np.maximum(np.round(self.grid_mm / spacing).astype(int), 1)
        half = np.ceil(max(self.radii_mm) / spacing).astype(int) + f
        p = np.asarray(point, dtype=np.int64).reshape(3)
        lo = np.maximum(p - half, 0)
        hi = np.minimum(p + half + 1, shape)
        lo = hi - ((hi - lo) // f) * f  # whole blocks, ending at hi
        crop = np.asarray(image[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))], dtype=np.float32)
        n = np.asarray(crop.shape) // f
        eq = equalise(block_mean(crop, f))
        cs = spacing * f
        c = (p - lo) / f - 0.5 + 0.5 / f  # the click on the coarse grid (block centres at integer indices)
        ci = np.clip(np.round(c).astype(int), 0, n - 1)
        near = eq[tuple(slice(max(int(a) - 1, 0), int(a) + 2) for a in ci)]
        v0 = float(np.median(near))
        u = self.directions()
        for rad in self.radii_mm:
            q = np.round(c + u * rad / cs).astype(int)
            ok = np.all((q >= 0) & (q < n), axis=1)
            if ok.mean() < 0.5:  # the shell is mostly outside the image: the image bounds the view
                return rad
            if np.mean(np.abs(eq[tuple(q[ok].T)] - v0) < self.tol) < self.frac:
                return rad
        return self.radii_mm[-1]

    def view_mm(self, image: np.ndarray, spacing, point) -> float:
        """The edge (mm) of the view around a lone click at ``point``."""
        return float(np.clip(self.k * self.radius_mm(image, spacing, point), self.min_mm, self.max_mm))
