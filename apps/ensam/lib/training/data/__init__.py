"""Training data: (image, spacing, binary object mask) samples drawn from the real training volumes.

Sources (all on the volumes of ``sample-datasets/train``; the evaluation volumes are never read), registered by name
in :data:`SOURCES` (:mod:`.sources`, one module per family) and drawn by ``ObjectSampler(weights=...)``:

* ``real``: a labelled structure (TotalSegmentator labels of the small CT, brain / WM / GM / other of MNI152),
  with its vocabulary token id (so it can also train the prompt-free "concept" mode).
* ``synth``: the same structures on images rendered from the label maps with random contrasts (SynthSeg idea);
  not in :data:`SOURCE_WEIGHTS` (recipe v3 drew it with ``source_weights``).
* ``slic`` / ``watershed``: "segment anything" pseudo-labels, one 3D supervoxel / watershed region (computed once
  per volume and cached under ``runs/cache``).
* ``window``: the connected component, around a random seed voxel, of a random intensity window.
* ``blob`` / ``tube`` / ``shell`` / ``lesion``: synthetic objects with random contrast and texture pasted into a
  real volume.
* ``hippocampus``: one of three structures (anterior, posterior, whole) of one of 136 training subjects of the
  committed hippocampus MR set (``sample-datasets/hippocampus``, :mod:`lib.cohorts`; its tuning and loop subjects
  are never read); not in :data:`SOURCE_WEIGHTS` (a recipe names it in ``source_weights``).

Every sample is a small region around the object (with enough margin for the ROI that ``geometry.choose_roi``
will draw around it), then strongly augmented: spacing change (incl. thick slices), axis flips and permutations,
random intensity transfer curves, gamma, bias field, blur and noise. The interaction simulation (ROI, box, clicks)
happens in :mod:`lib.training.loop`, with the same geometry functions as the inference engine.

A sample: :class:`Sample` (image (X, Y, Z) float32, mask (X, Y, Z) bool, spacing (3,) mm, label_id, kind).

Modules: :mod:`.volumes` (loading, body masks), :mod:`.segmaps` (the pseudo-label cache), :mod:`.augmentation`
(regions, resampling, augmentation), :mod:`.shapes` (synthetic objects), :mod:`.sources` (the registry and the
sources), :mod:`.sampler` (:class:`ObjectSampler`, concept windows). Prompt-free windows take their spacing and
size from :mod:`lib.contract`.
"""

from .augmentation import augment, random_spacing, region_around, resample
from .sampler import CONCEPT_SPACING, CONCEPT_WINDOW, DEFAULT_HOLDOUT, SOURCE_WEIGHTS, ObjectSampler
from .segmaps import CACHE_DIR, precompute
from .shapes import paste, shape_blob, shape_tube
from .sources import SOURCES, register_source
from .volumes import TRAIN_ROOT, Sample, Volume, load_volumes, make_volume, norm01

# the names pre-training and fine-tuning have always used for these two helpers
_region = region_around
_norm01 = norm01

__all__ = ["Volume", "Sample", "load_volumes", "make_volume", "precompute", "ObjectSampler", "augment",
           "SOURCE_WEIGHTS", "SOURCES", "register_source", "DEFAULT_HOLDOUT", "TRAIN_ROOT", "CACHE_DIR",
           "CONCEPT_SPACING", "CONCEPT_WINDOW", "random_spacing", "resample", "region_around", "norm01",
           "shape_blob", "shape_tube", "paste"]
