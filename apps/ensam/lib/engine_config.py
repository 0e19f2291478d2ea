"""The engine's inference settings (:class:`EngineConfig`); what the weights were trained under is their contract
(:mod:`lib.contract`), not a setting. Every default is decided on the tuning split (model card, "Engine settings
decided on the tuning split"); knobs measured no better were removed (``keep_fine_prev``, ``local_edits``: their
figures are in docs/HISTORY.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .click_scale import LoneClickView
from .graphcut import BoundaryCut

__all__ = ["EngineConfig"]


@dataclass
class EngineConfig:
    """Inference-only settings (what the network learned under, ROI policy, click maps, intensities, label
    spacing, is the weights' :class:`lib.contract.Contract`, not a setting). ``max_zoom``: how many times the ROI
    may grow by ``zoom_factor`` when the mask touches its border (AutoZoom; only without a box, which bounds the
    object: with one, each zoom re-encoded a larger ROI for a mask leaking past the box's margin);
    ``cache_bytes``: bound of the encoding cache; ``label_overlap``: sliding-window overlap of prompt-free
    segmentation. ``bf16``: run the network under bf16 autocast: "auto" (where :func:`bf16_ok`: CUDA, CPUs with
    AVX512-BF16/AMX), "on", "off".
    ``tta_flips``: test-time augmentation of the interactive path: each entry is a set of model-grid axes, e.g.
    ``((0,), (1,))``; the ROI is also encoded flipped along them (each view cached like the plain one), decoded
    with the prompts flipped the same way, and the logits of all views (the plain one included) averaged.

    Native-resolution refinement (AutoZoom's second half; only with weights whose contract says they were trained
    for it, ``Contract.refine``): when one model voxel of the ROI spans more than
    ``refine_factor`` scan voxels, up to ``refine_windows`` windows (``refine_windows_click`` for a corrective
    step) of the model size, ``refine_zoom`` times finer than the ROI (never finer than the scan), are placed on
    the new boundary (the latest click's first) and re-predicted with the coarse mask as the previous mask and the
    prompts inside them; each is written back inside, ``refine_margin`` fine voxels from its faces.

    ``boundary_cut``: a :class:`lib.graphcut.BoundaryCut` (or its settings as a dict; None = off) run on each
    answer after the network, on the scan's own grid: the network's mask as a soft prior, an intensity model, the
    clicks as hard seeds, the box as a bound. On: without it the tuning split is lower on all ten averages of the
    two protocols (release 6, box start: DSC_AUC 2.527 -> 2.490, final NSD 0.699 -> 0.642).
    ``lone_click_view``: a :class:`lib.click_scale.LoneClickView` (or its settings as a dict; None = off) that sizes
    the view around a lone first click (no box, no previous mask) from how far the tissue under it extends, in
    place of the contract's fixed ``click_extent_mm``. Off: on the tuning split it raises the first click's DSC
    (0.340 -> 0.430) but lowers NSD_AUC (2.337 -> 2.303) and the final DSC (0.670 -> 0.663).
    (Every setting's figures, both sets: model card, "Engine settings decided on the tuning split".)
    ``lone_click_probe``: ``(probe_mm, scale[, rounds])`` or () (off): the view around a lone first click is sized
    by the network itself: a pass in a ``probe_mm`` view, then the answer's largest extent x ``scale`` (within the
    contract's minimum ROI edge and the previous view) is the next view, ``rounds`` times (default 1; a round whose
    view would not shrink by 10 % ends them), then the real pass (AutoZoom as usual). For weights trained on
    object-relative lone-click views (recipe v8, ``LoopConfig.click_view_object``), which answer a click with the
    object under it at any share of the view; one more encoding per round, on the first click only.
    ``refiner_warm``: with weights that carry a refiner, the first prompt's ROI is also encoded by the refiner
    (cached), so the corrective clicks that follow, which reuse that ROI (their session's previous step's, passed
    as ``prev_info``), cost a decode, not an encode: the first interaction pays one more encoding instead.
    ``reuse_roi_growth``: a corrective step reuses its session's previous ROI when that contains the prompts and is
    at most this x the fresh choice per axis.
    ``multimask``: with weights whose network has a multi-mask head (``NetworkConfig.n_masks`` > 1,
    :class:`lib.network.mask_head.MultiMaskHead`), a lone first click (no box, no previous mask) is answered by the
    mask with the highest predicted DSC (AutoZoom then grows the view while that mask touches it); every other
    prompt by mask 0, the network's own. ``last_info["mask"]`` reports the choice.
    ``correction_reach``: ``(k, margin_mm[, mode[, guard]])`` or () (off): a corrective step changes the previous answer only
    near the clicks the previous answer contradicts, balls of radius k x the click's distance to the previous
    answer's boundary + margin_mm (mode "ball": every change; "asym": removals near background clicks, additions
    connected to foreground clicks; "guard": the network's answer unless what "asym" refuses exceeds guard x the
    previous answer's volume; "flood": the network's answer less the additions far from the foreground clicks
    when they exceed guard x the previous answer's volume; :func:`lib.correction.conservative_merge`, issue 27);
    applied last, after the boundary cut, in sessions with a box. Default ``(3, 3, "guard", 0.15)``, chosen on the
    tuning split (box start: DSC_AUC 2.527 -> 2.604, NSD_AUC 2.519 -> 2.587, final DSC 0.693 -> 0.698, destructive
    steps 3.6 % -> 0.4 %; model card, "Engine settings decided on the tuning split").
    ``lone_correction_reach``: the same for sessions without a box; default () (off): a lone click's first answer
    is a guess at the extent that the corrections must be free to move (the box default on click starts cost DSC_AUC
    0.13, "flood" (3, 3 mm, 0.3) cost 0.054 on the tuning split)."""

    max_zoom: int = 2
    zoom_factor: float = 1.5
    reuse_roi_growth: float = 1.6
    cache_bytes: int = 512 * 2 ** 20
    label_overlap: float = 0.25
    threshold: float = 0.0
    refine_factor: float = 2.0
    refine_zoom: float = 3.0
    refine_windows: int = 2
    refine_windows_click: int = 1
    refine_margin: int = 4
    bf16: str = "auto"
    tta_flips: tuple = ()
    boundary_cut: BoundaryCut | None = field(default_factory=BoundaryCut)
    lone_click_view: LoneClickView | None = None
    lone_click_probe: tuple = ()
    refiner_warm: bool = True
    correction_reach: tuple = (3.0, 3.0, "guard", 0.15)
    lone_correction_reach: tuple = ()
    multimask: bool = True

    def __post_init__(self) -> None:
        # one normal form (tuples of int axes: hashable cache keys), whether given as tuples or as JSON lists
        self.tta_flips = tuple(tuple(int(d) for d in f) for f in self.tta_flips)
        if isinstance(self.boundary_cut, dict):  # JSON settings (the evaluator's --engine, a config file)
            self.boundary_cut = BoundaryCut(**self.boundary_cut)
        if isinstance(self.lone_click_view, dict):
            self.lone_click_view = LoneClickView(**self.lone_click_view)
