"""The pseudo-label maps of the ``slic`` / ``watershed`` sources: SLIC supervoxels at two scales and compact
watershed regions per volume, computed once and cached as ``.npz`` under ``runs/cache``."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
from scipy import ndimage

from ...io.atomic import atomic_write_via
from .volumes import Volume, norm01

__all__ = ["CACHE_DIR", "precompute"]

CACHE_DIR = "runs/cache"


def _segmap_valid(seg: np.ndarray, body: np.ndarray, spacing, min_mm3=300.0, max_frac=0.5):
    """Valid region ids (mostly inside the body, not tiny, not huge) and their bounding slices."""
    n = int(seg.max())
    counts = np.bincount(seg.ravel(), minlength=n + 1)
    inside = np.bincount(seg.ravel(), weights=body.ravel().astype(np.float64), minlength=n + 1)
    vox = float(np.prod(spacing))
    total = float(body.sum())
    ok = [i for i in range(1, n + 1) if counts[i] * vox >= min_mm3 and inside[i] >= 0.9 * counts[i]
          and counts[i] <= max_frac * total]
    return np.asarray(ok, dtype=np.int64), ndimage.find_objects(seg)


def _compute_segmaps(vol: Volume) -> Dict[str, np.ndarray]:
    """SLIC supervoxels at two scales and compact watershed regions, on a soft-tissue-normalised image
    (computed at <= ~1.5 M voxels and upsampled by nearest neighbour)."""
    from skimage.segmentation import slic, watershed
    from skimage.filters import sobel

    sp = vol.spacing
    img = norm01(vol.image, vol.lo, vol.hi)
    if vol.modality.upper() == "CT":  # soft-tissue window: organs differ there
        img = np.clip((vol.image + 200.0) / 500.0, 0, 1).astype(np.float32)
    factor = max(1, int(np.ceil((img.size / 1.5e6) ** (1 / 3))))
    small = img[::factor, ::factor, ::factor]
    body_s = vol.body[::factor, ::factor, ::factor]
    sp_s = sp * factor
    body_mm3 = float(body_s.sum() * np.prod(sp_s))
    out = {}
    for name, edge_mm in (("slic_fine", 14.0), ("slic_coarse", 30.0)):
        n_seg = int(max(8, body_mm3 / edge_mm ** 3))
        seg = slic(small, n_segments=n_seg, compactness=0.08, channel_axis=None, spacing=sp_s, mask=body_s,
                   start_label=1, enforce_connectivity=True)
        out[name] = seg.astype(np.int32)
    grad = sobel(ndimage.gaussian_filter(small, 1.0))
    n_mark = int(max(8, body_mm3 / 22.0 ** 3))
    ws = watershed(grad, markers=n_mark, compactness=0.001, mask=body_s)
    out["watershed"] = ws.astype(np.int32)
    if factor > 1:
        for k, v in out.items():
            up = np.repeat(np.repeat(np.repeat(v, factor, 0), factor, 1), factor, 2)
            out[k] = np.ascontiguousarray(up[: img.shape[0], : img.shape[1], : img.shape[2]])
    return out


def cache_path(vol: Volume, cache_dir: str | os.PathLike = CACHE_DIR) -> Path:
    """Where the maps of ``vol`` are cached: named by the volume and a hash of a strided sample of its image."""
    key = hashlib.sha1(vol.image.tobytes()[:: max(1, vol.image.nbytes // 2_000_000)]).hexdigest()[:12]
    return Path(cache_dir) / f"segmaps_v1_{vol.name}_{key}.npz"


def precompute(volumes: Sequence[Volume], cache_dir: str | os.PathLike = CACHE_DIR, log=print) -> None:
    """Attach the pseudo-label maps to every volume, computing them once and caching them as ``.npz``."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for vol in volumes:
        path = cache_path(vol, cache_dir)
        if path.exists():
            maps = dict(np.load(path))
        else:
            t = time.time()
            maps = _compute_segmaps(vol)
            atomic_write_via(str(path), lambda tmp: np.savez_compressed(tmp, **maps), suffix=".npz")
            log(f"[data] supervoxels for {vol.name}: {time.time() - t:.1f} s -> {path}")
        for name, seg in maps.items():
            valid, slices = _segmap_valid(seg, vol.body, vol.spacing)
            vol.segmaps[name] = (seg, valid, slices)
