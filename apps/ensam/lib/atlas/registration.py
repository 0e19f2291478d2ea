"""Registration of an atlas (a labelled image) onto a new image with SimpleITK, on a coarse grid.

Steps (``register``): both images are resampled to an isotropic working grid (``grid_mm``, default 5 mm; finer
for a small image such as a 40 mm MR crop, ``working_grid``, which then also gets the B-spline stage, after a
Gaussian pre-smoothing) and clipped to robust intensity bounds; the atlas is placed by a translation search (the
new image may be a thin slab of a larger body region: the atlas is slid along each world axis and the position
with the best Mattes mutual information wins), then an affine transform is fitted (multi-resolution, Mattes MI:
it works within and across modalities), then a B-spline transform with a coarse control grid (``bspline_mm``)
corrects local shape. The result is a composite transform mapping points of the NEW image to the atlas
(SimpleITK's convention), so that ``propagate`` can pull the atlas labels onto the new image's own voxel grid.

Images are NumPy arrays ``[i, j, k]`` with a RAS affine (``lib.io.volumes``); SimpleITK works in LPS, the
conversion is ``to_sitk``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> sitk.Image:
    """A SimpleITK image of ``array[i, j, k]`` placed in the world by its RAS ``affine``."""
    lps = _RAS_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / np.maximum(spacing[None, :], 1e-12)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(d) for d in direction.ravel()])
    img.SetOrigin([float(o) for o in lps[:3, 3]])
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    """Array ``[i, j, k]`` of a SimpleITK image."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def guess_modality(array: np.ndarray) -> str:
    """"CT" when the intensities look like Hounsfield units (air near -1000 present, a wide range), else "MR"."""
    a = np.asarray(array)
    sample = a.ravel()[:: max(1, a.size // 200_000)].astype(np.float32)
    lo, hi = np.percentile(sample, [1, 99])
    return "CT" if lo < -500 and hi > 0 and np.mean(sample < -900) > 0.02 else "MR"


def robust_bounds(array: np.ndarray, modality: str) -> tuple:
    """(lo, hi) intensities registration sees: CT soft tissue and bone window (air stays -1000), other images
    their 0.5-99.5 percentiles."""
    if modality == "CT":
        return -1000.0, 1200.0
    a = np.asarray(array)
    sample = a.ravel()[:: max(1, a.size // 200_000)]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return lo, max(hi, lo + 1e-3)


def robust_intensities(img: sitk.Image, modality: str, bounds: Optional[tuple] = None) -> sitk.Image:
    """Intensities clipped to ``bounds`` (default :func:`robust_bounds` of the image), rescaled to 0..1."""
    lo, hi = bounds or robust_bounds(sitk.GetArrayViewFromImage(img), modality)
    img = sitk.Clamp(sitk.Cast(img, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi)
    return sitk.ShiftScale(img, -lo, 1.0 / (hi - lo))


def coarse(img: sitk.Image, grid_mm: float, interpolator=sitk.sitkLinear, smooth: bool = True) -> sitk.Image:
    """``img`` on an isotropic grid of ``grid_mm`` (same origin and directions). A fine image is first reduced by
    block averaging (``BinShrink``, whole factors up to half the way), then smoothed to the grid's resolution."""
    spacing = np.asarray(img.GetSpacing())
    size = np.asarray(img.GetSize())
    new_size = [max(2, int(round(n * s / grid_mm))) for n, s in zip(size, spacing)]
    origin, direction = img.GetOrigin(), img.GetDirection()
    factors = [max(1, int(grid_mm / s / 2)) for s in spacing]
    if smooth and max(factors) > 1:
        img = sitk.BinShrink(img, factors)
    if smooth:
        cur = np.asarray(img.GetSpacing())
        sigma = [max(0.0, (grid_mm ** 2 - s ** 2)) ** 0.5 / 2.355 for s in cur]
        if max(sigma) > 0:
            img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) for s in sigma])
    return sitk.Resample(img, new_size, sitk.Transform(), interpolator, origin, [grid_mm] * 3, direction, 0.0,
                         img.GetPixelID())


@dataclass
class RegistrationConfig:
    grid_mm: float = 5.0  # working grid of the similarity metric
    search_mm: float = 15.0  # step of the translation search along each world axis
    search_top: int = 2  # best start positions refined by the affine stage
    affine_iterations: int = 60
    bspline_mm: float = 0.0  # control-point spacing of the deformable stage (0: affine only; see EVALUATION.md)
    bspline_iterations: int = 30
    sampling: float = 0.25  # fraction of the working-grid voxels the metric samples
    bins: int = 32
    seed: int = 1  # the metric sampling's seed; SimpleITK reads 0 as "from the wall clock" (not reproducible)
    # a small image (a crop around one structure: hippocampus MR, a loop instance) gets a finer working grid, so
    # that it still spans about ``min_cells`` cells (geometric mean of its extents); never finer than its own
    # voxels. Whole-body CT and MR (extents of 100+ mm) keep ``grid_mm``. 0: always ``grid_mm``.
    min_cells: int = 32
    # the deformable stage for such a small image when ``bspline_mm`` is 0 (hippocampus tuning subjects,
    # leave-one-out: fused DSC 0.73 -> 0.79 with one atlas, 0.77 -> 0.83 with eight; lib.experiments.datastore_atlases)
    small_bspline_mm: float = 10.0


@dataclass
class Registration:
    """The outcome of registering one atlas onto one image."""

    transform: sitk.Transform  # new-image point -> atlas point
    metric: float  # final Mattes MI (lower = better; SimpleITK minimises the negative MI)
    affine_metric: float
    seconds: float
    stages: Dict[str, float] = field(default_factory=dict)


def _method(cfg: RegistrationConfig) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(cfg.sampling, cfg.seed)
    r.SetInterpolator(sitk.sitkLinear)
    return r


def _metric(fixed, moving, transform, cfg, fixed_mask=None) -> float:
    r = _method(cfg)
    r.SetMetricSamplingStrategy(r.NONE)
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    r.SetInitialTransform(transform, inPlace=False)
    try:
        return float(r.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few samples overlap
        return 0.0


def _extent_centre(img: sitk.Image) -> np.ndarray:
    size = np.asarray(img.GetSize(), dtype=float)
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2.0)))


def _extent_mm(img: sitk.Image) -> np.ndarray:
    """Half extents of the image along the world axes (LPS), mm."""
    size = np.asarray(img.GetSize(), dtype=float)
    corners = np.array([[a, b, c] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)])
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(list(p)) for p in corners])
    return (pts.max(axis=0) - pts.min(axis=0)) / 2.0


def _body_centre(img: sitk.Image) -> np.ndarray:
    """World centre of the body: the centroid of the voxels above Otsu's threshold (falls back to the extent's
    centre when the threshold finds nothing)."""
    try:
        body = sitk.OtsuThreshold(img, 0, 1)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(body)
        if stats.HasLabel(1):
            return np.asarray(stats.GetCentroid(1))
    except RuntimeError:
        pass
    return _extent_centre(img)


def _start_positions(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig, fixed_mask=None):
    """Translations (fixed -> moving) tried as starts, best (lowest metric) first. Start: the body centres
    matched. Then, axis by axis (the one where the atlas is longest relative to the new image first), the new
    image's centre is slid over the atlas's whole extent along that axis (a slab of a body, a crop of a region)
    and the best position kept; last, the 27 neighbours (+-1 step) of the best are tried."""
    body = _body_centre(moving) - _body_centre(fixed)
    extent = _extent_centre(moving) - _extent_centre(fixed)
    room = _extent_mm(moving) - _extent_mm(fixed)
    seen: Dict[tuple, float] = {}

    def score(offset) -> float:
        k = tuple(round(float(v), 3) for v in offset)
        if k not in seen:
            seen[k] = _metric(fixed, moving, sitk.TranslationTransform(3, list(k)), cfg, fixed_mask)
        return seen[k]

    best = body.copy()
    for ax in np.argsort(-room):
        if room[ax] <= cfg.search_mm:
            continue
        n = int(room[ax] // cfg.search_mm)
        values = extent[ax] + np.arange(-n, n + 1) * cfg.search_mm
        trials = []
        for v in values:
            o = best.copy()
            o[ax] = v
            trials.append((score(o), o))
        best = min(trials, key=lambda t: t[0])[1]
    step = cfg.search_mm / 2.0
    for d in np.ndindex(3, 3, 3):
        score(best + (np.asarray(d) - 1) * step)
    ranked = sorted(seen.items(), key=lambda kv: kv[1])
    return [(v, sitk.TranslationTransform(3, list(k))) for k, v in ranked]


def working_grid(img: sitk.Image, cfg: RegistrationConfig) -> float:
    """The working grid (mm) for ``img``: ``cfg.grid_mm``, or finer for a small image (see ``min_cells``)."""
    if cfg.min_cells <= 0:
        return float(cfg.grid_mm)
    size = np.asarray(img.GetSize(), dtype=float)
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    extent = float(np.exp(np.mean(np.log(np.maximum(size * spacing, 1e-3)))))
    return float(min(cfg.grid_mm, max(float(spacing.min()), extent / cfg.min_cells)))


def prepare(img: sitk.Image, modality: str, cfg: RegistrationConfig) -> sitk.Image:
    """What registration works on: robust intensities on the isotropic working grid (cache it per image)."""
    return coarse(robust_intensities(img, modality), working_grid(img, cfg))


def register(fixed: sitk.Image, moving: sitk.Image, cfg: Optional[RegistrationConfig] = None) -> Registration:
    """Register ``moving`` (an atlas) onto ``fixed`` (the new image), both already ``prepare``d: returns the
    fixed -> moving transform (affine, then B-spline when it improves the metric)."""
    import time

    cfg = cfg or RegistrationConfig()
    t0 = time.perf_counter()
    f, m = fixed, moving
    stages: Dict[str, float] = {}
    grid = float(f.GetSpacing()[0])  # the fixed image's working grid (``prepare``)
    if grid < cfg.grid_mm:  # a small image: the translation search steps shrink with its grid
        cfg = replace(cfg, search_mm=cfg.search_mm * grid / cfg.grid_mm,
                      bspline_mm=cfg.bspline_mm or cfg.small_bspline_mm)
    # the search runs on a grid twice as coarse: it only has to find the neighbourhood
    starts = _start_positions(coarse(f, 2 * grid), coarse(m, 2 * grid), cfg)
    stages["search_s"] = time.perf_counter() - t0
    stages["starts"] = float(len(starts))

    t = time.perf_counter()
    best_affine, best_val = None, np.inf
    for _, start in starts[: max(1, cfg.search_top)]:
        aff = sitk.AffineTransform(3)
        aff.SetCenter(_extent_centre(f).tolist())
        aff.SetTranslation(start.GetOffset())
        r = _method(cfg)
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                   numberOfIterations=cfg.affine_iterations,
                                                   gradientMagnitudeTolerance=1e-6)
        r.SetOptimizerScalesFromPhysicalShift()
        r.SetShrinkFactorsPerLevel([2, 1])
        r.SetSmoothingSigmasPerLevel([1.0, 0.0])
        r.SetInitialTransform(aff, inPlace=True)
        try:
            r.Execute(f, m)
        except RuntimeError as e:  # e.g. the optimiser left the overlap
            logger.debug(f"affine stage failed from one start: {e}")
            continue
        val = _metric(f, m, aff, cfg)
        if val < best_val:
            best_affine, best_val = aff, val
    if best_affine is None:
        best_affine = sitk.AffineTransform(3)
        best_affine.SetTranslation(starts[0][1].GetOffset())
        best_val = starts[0][0]
    stages["affine_s"] = time.perf_counter() - t
    affine_val = best_val

    composite = sitk.CompositeTransform(3)
    composite.AddTransform(best_affine)
    final_val = affine_val
    if cfg.bspline_mm > 0:
        t = time.perf_counter()
        composite, final_val = _deform(f, m, best_affine, affine_val, cfg)
        stages["deform_s"] = time.perf_counter() - t
    return Registration(composite, final_val, affine_val, time.perf_counter() - t0, stages)


def _deform(f: sitk.Image, m: sitk.Image, affine: sitk.Transform, affine_val: float, cfg: RegistrationConfig):
    """B-spline stage on top of ``affine``; the composite is kept only when it improves the metric."""
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    mesh = [max(1, int(round(n * s / cfg.bspline_mm))) for n, s in zip(f.GetSize(), f.GetSpacing())]
    bsp = sitk.BSplineTransformInitializer(f, mesh, order=3)
    r = _method(cfg)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=cfg.bspline_iterations,
                           maximumNumberOfCorrections=5,
                           maximumNumberOfFunctionEvaluations=2 * cfg.bspline_iterations)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bsp, inPlace=True)
    try:
        r.Execute(f, m)
    except RuntimeError as e:
        logger.debug(f"deformable stage failed: {e}")
        return composite, affine_val
    candidate = sitk.CompositeTransform(3)
    candidate.AddTransform(affine)
    candidate.AddTransform(bsp)
    val = _metric(f, m, candidate, cfg)
    return (candidate, val) if val < affine_val else (composite, affine_val)


def propagate(labels: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """The atlas label map pulled onto the fixed image's voxel grid (nearest neighbour): array ``[i, j, k]``."""
    out = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return from_sitk(out)


def propagate_masks(labels: sitk.Image, fixed: sitk.Image, transform: sitk.Transform,
                    values: Sequence[int]) -> Dict[int, np.ndarray]:
    """One boolean mask per label value on the fixed grid (one resampling of the label map for all values)."""
    arr = propagate(labels, fixed, transform)
    return {int(v): arr == int(v) for v in values}
