"""lib.correction: a corrective step changes the previous answer only near the click that asks for it (issue 27)."""

import numpy as np

from lib.correction import click_depth_mm, conservative_merge, contradicted_clicks


def _ball(shape, centre, r):
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((x - c) ** 2 for x, c in zip(g, centre)) <= r * r


def test_only_contradicted_clicks_count():
    prev = _ball((40, 40, 40), (20, 20, 20), 8)
    pts = np.array([[20, 20, 20], [2, 2, 2], [21, 20, 20], [30, 30, 30]])
    labels = np.array([1, 1, 0, 0])  # fg inside (agrees), fg outside (contradicts), bg inside (contradicts), bg out
    assert contradicted_clicks(prev, pts, labels).tolist() == [1, 2]


def test_depth_is_the_distance_to_the_boundary_in_mm():
    prev = _ball((40, 40, 40), (20, 20, 20), 8)
    assert abs(click_depth_mm(prev, (20, 20, 20), (1, 1, 1)) - 8.0) <= 1.0
    assert abs(click_depth_mm(prev, (20, 20, 20), (2, 2, 2)) - 16.0) <= 2.0
    assert click_depth_mm(np.zeros((5, 5, 5), bool), (2, 2, 2), (1, 1, 1)) == float("inf")


def test_a_background_click_cannot_delete_the_object_far_from_it():
    """The catastrophic case: a background click near the edge, and a new answer that lost the whole object. Only
    the click's neighbourhood may change; the rest of the object stays."""
    prev = _ball((60, 60, 60), (30, 30, 30), 15)
    click = np.array([[30, 30, 43]])  # 2 voxels inside the boundary
    out = conservative_merge(prev, np.zeros_like(prev), click, np.array([0]), (1, 1, 1), k=3.0, margin_mm=2.0)
    assert out[tuple(click[0])] == 0  # the click is answered
    kept = out.astype(bool).sum() / prev.sum()
    assert kept > 0.9, kept
    far = _ball(prev.shape, (30, 30, 19), 5) & prev
    assert far.sum() > 100 and out[far].all()  # the far side of the object is untouched


def test_a_deep_click_may_change_a_large_region_and_new_wins_inside():
    prev = _ball((60, 60, 60), (30, 30, 30), 15)
    leak = _ball((60, 60, 60), (30, 30, 30), 6)
    new = prev & ~leak  # the network removed the region around the click
    out = conservative_merge(prev, new, np.array([[30, 30, 30]]), np.array([0]), (1, 1, 1), k=3.0, margin_mm=2.0)
    assert np.array_equal(out.astype(bool), new)


def test_nothing_to_correct_returns_the_new_answer():
    prev = _ball((30, 30, 30), (15, 15, 15), 6)
    new = _ball((30, 30, 30), (15, 15, 15), 7)
    out = conservative_merge(prev, new, np.array([[15, 15, 15]]), np.array([1]), (1, 1, 1))
    assert np.array_equal(out.astype(bool), new)  # the click agrees with prev: no restriction
    out = conservative_merge(np.zeros_like(prev), new, np.array([[15, 15, 15]]), np.array([1]), (1, 1, 1))
    assert np.array_equal(out.astype(bool), new)  # no previous answer


def test_anisotropic_spacing_shapes_the_ball_in_mm():
    prev = np.zeros((40, 40, 40), bool)
    prev[5:35, 5:35, 5:35] = True
    click = np.array([[20, 20, 32]])  # 2 voxels from the k boundary: 2 mm, or 6 mm with 3 mm voxels along k
    for sp, kept in (((1, 1, 1), True), ((1, 1, 3), False)):
        out = conservative_merge(prev, np.zeros_like(prev), click, np.array([0]), sp, k=1.0, margin_mm=0.0)
        # 5 voxels (5 mm) away along i: outside a 2 mm ball (kept), inside a 6 mm one (changed)
        assert bool(out[15, 20, 32]) == kept and out[20, 20, 32] == 0


def test_asym_lets_a_foreground_click_grow_the_object_but_nothing_appears_elsewhere():
    prev = _ball((60, 60, 60), (20, 30, 30), 6)
    grown = _ball((60, 60, 60), (32, 30, 30), 12)  # the missed rest of the object, reached by the click
    stray = _ball((60, 60, 60), (50, 50, 8), 3)  # a false positive far away
    new = prev | grown | stray
    click = np.array([[38, 30, 30]])  # deep in the missed part: 12 voxels from prev
    ball = conservative_merge(prev, new, click, np.array([1]), (1, 1, 1), k=0.5, margin_mm=1.0, mode="ball")
    asym = conservative_merge(prev, new, click, np.array([1]), (1, 1, 1), k=0.5, margin_mm=1.0, mode="asym")
    assert asym[grown].all() and not asym[stray].any() and asym[prev].all()
    assert ball[grown].sum() < 0.8 * grown.sum()  # the plain ball cut the growth short


def test_asym_background_click_removes_only_near_it():
    prev = _ball((60, 60, 60), (30, 30, 30), 15)
    out = conservative_merge(prev, np.zeros_like(prev), np.array([[30, 30, 43]]), np.array([0]), (1, 1, 1), k=3.0,
                             margin_mm=2.0, mode="asym")
    assert out[30, 30, 43] == 0 and out.sum() > 0.9 * prev.sum()


def test_remove_mode_keeps_additions_and_bounds_removals():
    prev = _ball((60, 60, 60), (30, 30, 30), 10)
    grown = _ball((60, 60, 60), (30, 30, 30), 13)
    new = grown.copy()
    new[:, :, 38:] = False  # the network also dropped the far side
    new[:, :, :24] = False  # and the side of the click
    out = conservative_merge(prev, new, np.array([[30, 30, 22]]), np.array([0]), (1, 1, 1), k=1.0, margin_mm=1.0,
                             mode="remove")
    assert out[new & ~prev].all() and (new & ~prev).sum() > 100  # additions anywhere
    assert out[prev & ~new].sum() > 0  # the far-side removal is refused...
    assert not out[30, 30, 22]  # ...the click's neighbourhood is answered


def test_guard_keeps_a_far_trim_but_refuses_a_deletion():
    """mode "guard": the network's far changes stand while they are small against the previous answer (a trim of a
    leak on the far side), the "asym" answer when they would delete the object."""
    prev = _ball((60, 60, 60), (30, 30, 30), 12)
    click = np.array([[30, 30, 40]])  # a background click 2 voxels inside the boundary
    trimmed = prev.copy()
    trimmed[:, :, :22] = False  # the far side trimmed too (a few % of the object)
    trimmed[30, 30, 38:] = False
    out = conservative_merge(prev, trimmed, click, np.array([0]), (1, 1, 1), k=1.0, margin_mm=1.0, mode="guard",
                             guard=0.3)
    assert np.array_equal(out.astype(bool), trimmed)  # kept whole, far trim included
    asym = conservative_merge(prev, trimmed, click, np.array([0]), (1, 1, 1), k=1.0, margin_mm=1.0, mode="asym")
    assert asym[:, :, :22].any()  # "asym" would have refused the trim
    gone = conservative_merge(prev, np.zeros_like(prev), click, np.array([0]), (1, 1, 1), k=1.0, margin_mm=1.0,
                              mode="guard", guard=0.3)
    assert gone[30, 30, 40] == 0 and gone.sum() > 0.9 * prev.sum()  # the deletion is refused
    strict = conservative_merge(prev, trimmed, click, np.array([0]), (1, 1, 1), k=1.0, margin_mm=1.0, mode="guard",
                                guard=0.0)
    assert np.array_equal(strict, asym)  # guard 0 is "asym"


def test_the_diagnosis_merges_on_a_crop_exactly_as_on_the_whole_image():
    """lib.evaluation.diagnose's counterfactual rules run on the box around both answers and the clicks: every rule
    must give there what it gives on the whole image (outside that box both answers are empty)."""
    from lib.evaluation.diagnose import GUARD_VARIANTS, _merged

    shape = (70, 60, 50)
    prev = _ball(shape, (30, 28, 25), 10)
    new = _ball(shape, (36, 30, 25), 9) | _ball(shape, (55, 45, 38), 6)  # a shifted answer and a far island
    pts = np.array([[30, 28, 25], [41, 30, 25], [22, 28, 25]])
    labels = np.array([1, 1, 0])
    spacing = (1.0, 1.2, 2.0)
    out = {}
    for name, rule in GUARD_VARIANTS.items():
        crop = _merged(prev, new, pts, labels, spacing, rule)
        whole = new
        for step in () if rule is None else rule if isinstance(rule[0], tuple) else (rule,):
            whole = conservative_merge(prev, whole, pts, labels, spacing, *step) > 0
        assert crop.shape == shape and np.array_equal(crop, whole), name
        out[name] = crop
    # the case separates the rules (the test compares something): the far island trips the tight guard only
    assert not np.array_equal(out["guard 0.15"], out["guard 1.0"])
    assert np.array_equal(out["guard 0.15"], out["asym"]) and np.array_equal(out["guard 1.0"], out["none"])


def test_flood_keeps_a_growth_near_the_click_and_drops_a_flood_far_from_it():
    prev = _ball((80, 80, 80), (40, 40, 40), 10)
    click = np.array([[40, 40, 53]])  # a foreground click 3 voxels outside the answer
    grown = prev | _ball(prev.shape, (40, 40, 53), 4)  # what the click asks: a little more near it
    out = conservative_merge(prev, grown, click, np.array([1]), (1, 1, 1), k=3.0, margin_mm=3.0, mode="flood",
                             guard=0.3)
    assert np.array_equal(out.astype(bool), grown)
    flood = grown | (_ball(prev.shape, (40, 40, 40), 30) & ~_ball(prev.shape, (40, 40, 40), 26))  # a far shell
    out = conservative_merge(prev, flood, click, np.array([1]), (1, 1, 1), k=3.0, margin_mm=3.0, mode="flood",
                             guard=0.3)
    assert np.array_equal(out.astype(bool), grown)  # the shell (far from the click, > 0.3 x prev) is dropped
    shrunk = prev & ~_ball(prev.shape, (40, 40, 30), 5)  # removals stay the network's: nothing is put back
    out = conservative_merge(prev, shrunk | flood, click, np.array([1]), (1, 1, 1), k=3.0, margin_mm=3.0,
                             mode="flood", guard=0.3)
    assert np.array_equal(out.astype(bool), shrunk | grown)
