"""Scale-and-shift alignment in depth space, sparse resampling and the temporal aligner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geodiff_ros.geometry import (
    AlignmentResult,
    TemporalAligner,
    apply_alignment,
    fit_scale_shift,
    fit_scale_shift_points,
    sparse_to_image_grid,
)

METHODS = ("ransac", "irls", "lsq")


def _scene(h: int = 120, w: int = 160, seed: int = 0, frac: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Metric depth with a slanted plane + bumps, relative depth r = (z - 0.8) / 6.5, sparse sample of z."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    z = 1.0 + 6.0 * v / h + 0.5 * np.sin(u / 9.0) ** 2
    rel = (z - 0.8) / 6.5
    sparse = np.zeros((h, w))
    mask = rng.random((h, w)) < frac
    sparse[mask] = z[mask]
    return z, rel, sparse


@pytest.mark.parametrize("method", METHODS)
def test_exact_affine_map_recovered(method: str) -> None:
    _, rel, sparse = _scene()
    res = fit_scale_shift(rel, sparse, method=method)
    assert res.ok, res.reason
    assert res.scale == pytest.approx(6.5, rel=1e-6)
    assert res.shift == pytest.approx(0.8, rel=1e-6)
    assert res.n_inliers == res.n_points == int((sparse > 0).sum())
    assert res.residual_rel < 1e-6


@pytest.mark.parametrize("method", ["ransac", "irls"])
def test_robust_to_30_percent_gross_outliers(method: str) -> None:
    _, rel, sparse = _scene(seed=3)
    rng = np.random.default_rng(4)
    v, u = np.nonzero(sparse)
    bad = rng.random(v.size) < 0.3
    # Gross errors both ways: 1.5-3x too far (points behind edges) and 0.3-0.6x too near.
    factor = np.where(rng.random(bad.sum()) < 0.5, rng.uniform(1.5, 3.0, bad.sum()), rng.uniform(0.3, 0.6, bad.sum()))
    sparse[v[bad], u[bad]] *= factor
    res = fit_scale_shift(rel, sparse, method=method)
    assert res.ok, res.reason
    assert res.scale == pytest.approx(6.5, rel=0.01)
    assert res.shift == pytest.approx(0.8, abs=0.05)
    assert res.n_inliers == pytest.approx((~bad).sum(), rel=0.02)
    # Plain least squares fails on the same outliers (gated out or pulled off): the robust methods do real work.
    lsq = fit_scale_shift(rel, sparse, method="lsq")
    assert not lsq.ok or abs(lsq.scale / 6.5 - 1.0) > 0.05


def test_ransac_deterministic_for_seed() -> None:
    _, rel, sparse = _scene(seed=5)
    sparse[sparse > 0] *= np.random.default_rng(0).uniform(0.9, 1.1, (sparse > 0).sum())
    a = fit_scale_shift(rel, sparse, method="ransac", seed=7)
    b = fit_scale_shift(rel, sparse, method="ransac", seed=7)
    assert a == b


@pytest.mark.parametrize(
    ("sparse_value", "reason"),
    [(0.0, "too few"), (np.nan, "too few"), (np.inf, "too few"), (-3.0, "too few")],
)
def test_invalid_sparse_values_give_reason_not_exception(sparse_value: float, reason: str) -> None:
    _, rel, _ = _scene()
    sparse = np.full(rel.shape, sparse_value)
    for method in METHODS:
        res = fit_scale_shift(rel, sparse, method=method)
        assert not res.ok
        assert reason in res.reason
        assert math.isnan(res.scale)
        assert res.n_points == 0


def test_invalid_values_are_ignored_among_valid_ones() -> None:
    _, rel, sparse = _scene()
    sparse[:10, :] = np.nan
    sparse[10:20, :] = -1.0
    sparse[20:30, :] = np.inf
    res = fit_scale_shift(rel, sparse)
    assert res.ok
    assert res.scale == pytest.approx(6.5, rel=1e-6)


def test_too_few_points() -> None:
    _, rel, sparse = _scene(frac=0.0005)
    n = int((sparse > 0).sum())
    assert 0 < n < 20
    res = fit_scale_shift(rel, sparse, min_points=20)
    assert not res.ok
    assert "too few valid sparse points" in res.reason
    assert res.n_points == n


def test_narrow_depth_range_is_rejected() -> None:
    rel = np.random.default_rng(0).uniform(0, 1, (50, 50))
    sparse = 5.0 + 0.01 * rel  # all points at ~5 m: scale and shift are not separable
    res = fit_scale_shift(rel, sparse)
    assert not res.ok
    assert "narrow" in res.reason


def test_negative_scale_is_rejected() -> None:
    _, rel, sparse = _scene()
    res = fit_scale_shift(1.0 - rel, sparse, method="lsq")
    assert not res.ok
    assert "scale" in res.reason


def test_min_inlier_ratio_gate() -> None:
    _, rel, sparse = _scene(seed=8)
    noisy = sparse * np.random.default_rng(1).uniform(0.6, 1.4, sparse.shape)
    res = fit_scale_shift(rel, noisy, min_inlier_ratio=0.9, inlier_threshold_rel=0.05)
    assert not res.ok
    assert "inliers" in res.reason


def test_points_api_matches_image_api() -> None:
    _, rel, sparse = _scene()
    m = sparse > 0
    assert fit_scale_shift_points(rel[m], sparse[m]) == fit_scale_shift(rel, sparse)


def test_bad_arguments_raise() -> None:
    _, rel, sparse = _scene()
    with pytest.raises(ValueError, match="sparse_to_image_grid"):
        fit_scale_shift(rel, sparse[:-1])
    with pytest.raises(ValueError, match="method"):
        fit_scale_shift(rel, sparse, method="median")  # type: ignore[arg-type]


def test_ransac_fast_on_vga_lidar_density() -> None:
    """~20k sparse points at 640x480 fit in a few ms (generous bound for slow CI machines)."""
    import time

    _, rel, sparse = _scene(480, 640, frac=0.066)
    fit_scale_shift(rel, sparse)
    t0 = time.perf_counter()
    for _ in range(5):
        fit_scale_shift(rel, sparse)
    assert (time.perf_counter() - t0) / 5 < 0.05


def test_apply_alignment_ranges() -> None:
    rel = np.array([[-0.5, 0.0, 0.1], [0.5, 1.0, np.nan]], np.float32)
    out = apply_alignment(rel, 10.0, -1.0, min_depth=0.5, max_depth=8.0)
    assert out.dtype == np.float32
    # -6 and -1 are <= 0, 0.0 is not > min 0.5, 4 kept, 9 > max 8, NaN stays NaN.
    expected = np.array([[np.nan, np.nan, np.nan], [4.0, np.nan, np.nan]], np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(apply_alignment(np.array([0.8]), 10.0, 0.0, 0.0, 8.0), [8.0])  # max is inclusive


def test_sparse_to_image_grid_downsample_keeps_nearest() -> None:
    sparse = np.zeros((4, 4), np.float32)
    sparse[0, 0] = 5.0
    sparse[0, 1] = 3.0  # lands on the same 2x2 target pixel as (0,0) and (1,1) when halving (nearest: u*0.5 -> 0)
    sparse[1, 1] = np.nan
    sparse[2, 2] = 7.0
    out = sparse_to_image_grid(sparse, 2, 2)
    assert out.shape == (2, 2)
    assert out[0, 0] == 3.0  # nearest depth wins
    assert out[1, 1] == 7.0
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0])


def test_sparse_to_image_grid_upsample_never_interpolates() -> None:
    sparse = np.zeros((3, 3), np.float32)
    sparse[1, 1] = 2.0
    sparse[2, 2] = 4.0
    out = sparse_to_image_grid(sparse, 9, 6)
    assert out.shape == (6, 9)
    assert np.isfinite(out).sum() == 2
    assert out[2, 3] == 2.0 and out[4, 6] == 4.0
    assert set(out[np.isfinite(out)].tolist()) == {2.0, 4.0}


def test_sparse_to_image_grid_alignment_roundtrip() -> None:
    """A half-resolution LiDAR image rescaled to the image grid aligns like the full-resolution one."""
    z, rel, _ = _scene(120, 160, frac=0.0)
    low = np.zeros((60, 80))
    rng = np.random.default_rng(0)
    m = rng.random((60, 80)) < 0.2
    low[m] = z[::2, ::2][m]
    grid = sparse_to_image_grid(low, 160, 120)
    res = fit_scale_shift(rel, grid)
    assert res.ok
    assert res.scale == pytest.approx(6.5, rel=1e-5)


def _ok(scale: float, shift: float = 0.5, n: int = 100) -> AlignmentResult:
    return AlignmentResult(True, scale, shift, n, n, 0.01, "ok", "ransac")


FAILED = AlignmentResult(False, math.nan, math.nan, 3, 0, math.nan, "too few valid sparse points", "ransac")


def test_temporal_no_metric_without_fit() -> None:
    ta = TemporalAligner()
    assert ta.update(None, 0.0) is None
    assert ta.update(FAILED, 0.1) is None


def test_temporal_ema_smooths_log_scale_and_shift() -> None:
    ta = TemporalAligner(ema_alpha=0.5, reset_ratio=1.5)
    s0 = ta.update(_ok(2.0, 1.0), 0.0)
    assert s0 is not None and s0.source == "fit" and s0.scale == pytest.approx(2.0)
    s1 = ta.update(_ok(2.4, 0.0), 0.1)
    assert s1 is not None
    assert s1.scale == pytest.approx(math.sqrt(2.0 * 2.4))  # geometric mean at alpha 0.5
    assert s1.shift == pytest.approx(0.5)


def test_temporal_reset_on_scene_cut() -> None:
    ta = TemporalAligner(ema_alpha=0.2, reset_ratio=1.5)
    ta.update(_ok(2.0), 0.0)
    s = ta.update(_ok(4.0, 2.0), 0.1)  # x2 > reset_ratio: take the new fit as is
    assert s is not None and s.scale == pytest.approx(4.0) and s.shift == pytest.approx(2.0)
    s = ta.update(_ok(4.0 / 1.6), 0.2)  # /1.6 is a cut too (ratio applies both ways)
    assert s is not None and s.scale == pytest.approx(2.5)


def test_temporal_fallback_then_expiry() -> None:
    ta = TemporalAligner(max_fallback_age_s=2.0)
    ta.update(_ok(3.0, 0.2), 10.0)
    s = ta.update(FAILED, 11.5)
    assert s is not None and s.source == "fallback" and s.age_s == pytest.approx(1.5) and s.scale == pytest.approx(3.0)
    s = ta.update(None, 12.0)
    assert s is not None and s.source == "fallback"
    assert ta.update(FAILED, 12.01) is None  # older than 2 s: no metric output
    assert ta.update(None, 12.5) is None
    s = ta.update(_ok(5.0), 13.0)  # a new fit starts fresh, not blended with the expired one
    assert s is not None and s.scale == pytest.approx(5.0)


def test_temporal_zero_fallback_still_smooths() -> None:
    ta = TemporalAligner(ema_alpha=0.5, max_fallback_age_s=0.0)
    ta.update(_ok(2.0), 0.0)
    s = ta.update(_ok(2.4), 0.1)
    assert s is not None and s.scale == pytest.approx(math.sqrt(2.0 * 2.4))
    assert ta.update(FAILED, 0.15) is None  # no fallback at all


def test_temporal_time_backwards_resets() -> None:
    ta = TemporalAligner(ema_alpha=0.5)
    ta.update(_ok(2.0), 100.0)
    ta.update(_ok(2.2), 100.1)
    assert ta.update(FAILED, 5.0) is None  # bag looped: old fit is not reused
    s = ta.update(_ok(2.2), 5.1)
    assert s is not None and s.scale == pytest.approx(2.2)  # no blending with pre-loop history


def test_temporal_fixed_scale_applies_without_sparse_input() -> None:
    ta = TemporalAligner(fixed_scale=7.0)
    for stamp, res in [(0.0, None), (1.0, FAILED), (2.0, None)]:
        s = ta.update(res, stamp)
        assert s is not None
        assert (s.scale, s.shift, s.source) == (7.0, 0.0, "fixed")


def test_temporal_fixed_scale_gives_way_to_a_fit_and_returns_after_the_fallback_age() -> None:
    """As the parameter says: fixed_scale is for frames *without* sparse input; a fit, when there is one, wins
    (it used to be ignored while the node still fitted, and warned, every frame)."""
    ta = TemporalAligner(fixed_scale=7.0, max_fallback_age_s=2.0)
    s = ta.update(_ok(2.0, 0.5), 10.0)
    assert (s.scale, s.shift, s.source) == (pytest.approx(2.0), pytest.approx(0.5), "fit")
    s = ta.update(None, 11.0)  # no sparse this frame: the last fit, within max_fallback_age_s
    assert (s.scale, s.source) == (pytest.approx(2.0), "fallback")
    s = ta.update(FAILED, 13.5)  # fit too old: back to the user's scale
    assert (s.scale, s.shift, s.source) == (7.0, 0.0, "fixed")
    s = ta.update(None, 5.0)  # time went backwards: fit history gone, fixed scale still applies
    assert (s.scale, s.source) == (7.0, "fixed")


@pytest.mark.parametrize(
    "kwargs",
    [{"ema_alpha": 0.0}, {"ema_alpha": 1.5}, {"reset_ratio": 1.0}, {"max_fallback_age_s": -1.0},
     {"fixed_scale": 0.0}, {"fixed_scale": math.nan}],
)
def test_temporal_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TemporalAligner(**kwargs)


def test_fit_in_wrong_units_is_rejected_naming_the_range() -> None:
    """Sparse depth x1e6 (micrometres sent as metres) fits perfectly but maps every pixel
    beyond max_depth; with the output range given, such a fit is refused with a reason a user can act on."""
    _, rel, sparse = _scene()
    ok = fit_scale_shift(rel, sparse, depth_range=(0.1, 100.0))
    assert ok.ok, ok.reason
    bad = fit_scale_shift(rel, sparse * 1e6, depth_range=(0.1, 100.0))
    assert not bad.ok and "wrong units" in bad.reason and "[0.1, 100]" in bad.reason
    assert fit_scale_shift(rel, sparse * 1e6).ok  # without a range: the fit itself is consistent
    tiny = fit_scale_shift(rel, sparse * 1e-3, depth_range=(0.1, 100.0))  # millimetres read as kilometres
    assert not tiny.ok and "min_depth" in tiny.reason


def test_fit_with_part_of_the_scene_beyond_max_depth_is_kept() -> None:
    """Far points beyond max_depth (sky, a far wall) are NaN in the output, but the fit is good: kept."""
    _, rel, sparse = _scene()  # depths 1..7.5 m
    res = fit_scale_shift(rel, sparse, depth_range=(0.1, 5.0))  # ~40 % of the points beyond 5 m
    assert res.ok, res.reason
