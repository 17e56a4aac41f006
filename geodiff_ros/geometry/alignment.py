"""Metric scale-and-shift alignment of affine-invariant depth to sparse metric depth.

E2E-FT Marigold predicts affine-invariant *depth* (trained with a scale-and-shift-invariant loss in depth space,
docs/method.md#depth-semantics), so metric depth is ``z = s * r + t`` with ``t != 0`` in general: we fit both in
depth space, robustly (RANSAC with 2-point minimal sets, or IRLS), with residuals measured relative to the depth
(``|s r + t - z| / z``) so near and far points count alike (plain depth-space residuals let far points, whose
sensor error grows with range, dominate). Gates (point count, inlier ratio, ``s > 0``, depth spread) turn a
doubtful fit into ``ok=False`` with a reason instead of wrong metres, and :class:`TemporalAligner` smooths fits
over time and bounds how long a stale fit may be reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "AlignmentResult",
    "AlignmentState",
    "TemporalAligner",
    "apply_alignment",
    "fit_scale_shift",
    "fit_scale_shift_points",
    "sparse_to_image_grid",
]

Method = Literal["ransac", "irls", "lsq"]
Weights = Literal["relative", "uniform"]

# A fit is rejected when fewer than this fraction of its inliers map into [min_depth, max_depth] (depth_range).
_MIN_IN_RANGE = 0.5
# RANSAC scores hypotheses on at most this many points (a random subset); the refit uses all of them.
_MAX_SCORING_POINTS = 2048
_RANSAC_CHUNK = 32


@dataclass(frozen=True)
class AlignmentResult:
    """Outcome of one fit. ``scale``/``shift`` are NaN when ``ok`` is False; ``reason`` says why (or "ok")."""

    ok: bool
    scale: float
    shift: float
    n_points: int
    n_inliers: int
    residual_rel: float  # median |s*r + t - z| / z over the inliers
    reason: str
    method: str = ""


@dataclass(frozen=True)
class AlignmentState:
    """The alignment to apply to the current frame, as decided by :class:`TemporalAligner`."""

    scale: float
    shift: float
    age_s: float  # seconds since the fit this state comes from (0 for a fresh fit or a fixed scale)
    source: Literal["fit", "fallback", "fixed"]
    n_inliers: int
    residual_rel: float


def _fail(reason: str, n_points: int, method: str, n_inliers: int = 0) -> AlignmentResult:
    return AlignmentResult(
        ok=False, scale=math.nan, shift=math.nan, n_points=n_points, n_inliers=n_inliers,
        residual_rel=math.nan, reason=reason, method=method,
    )


def _weighted_ls(r: np.ndarray, z: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """Closed-form argmin_{s,t} sum w (s r + t - z)^2 via the 2x2 normal equations; None if singular."""
    sw = w.sum()
    if sw <= 0:
        return None
    mr = (w * r).sum() / sw
    mz = (w * z).sum() / sw
    dr = r - mr
    var = (w * dr * dr).sum()
    if not var > 1e-12 * sw * max(mr * mr, 1.0):
        return None
    s = (w * dr * (z - mz)).sum() / var
    return float(s), float(mz - s * mr)


def _base_weights(z: np.ndarray, weights: Weights) -> np.ndarray:
    # w = 1/z^2 turns the depth residual into a relative one: sum ((s r + t - z) / z)^2.
    return 1.0 / (z * z) if weights == "relative" else np.ones_like(z)


def _rel_residual(r: np.ndarray, z: np.ndarray, s: float, t: float) -> np.ndarray:
    return np.abs(s * r + t - z) / z


def _ransac(
    r: np.ndarray, z: np.ndarray, w0: np.ndarray, thr: float, max_iterations: int, rng: np.random.Generator
) -> tuple[float, float] | None:
    n = r.size
    if n > _MAX_SCORING_POINTS:
        sub = rng.choice(n, _MAX_SCORING_POINTS, replace=False)
        rs, zs = r[sub], z[sub]
    else:
        rs, zs = r, z
    i = rng.integers(0, n, max_iterations)
    j = rng.integers(0, n - 1, max_iterations)
    j = j + (j >= i)  # distinct pairs without rejection sampling
    dr = r[i] - r[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        s_h = (z[i] - z[j]) / dr  # [K]
    t_h = z[i] - s_h * r[i]
    good = np.isfinite(s_h) & (s_h > 0) & (np.abs(dr) > 1e-9)
    s_h, t_h = s_h[good], t_h[good]
    if s_h.size == 0:
        return None
    inv_z = 1.0 / zs
    best_count, best = -1, (0.0, 0.0)
    needed = s_h.size
    k = 0
    while k < min(needed, s_h.size):
        sc, tc = s_h[k:k + _RANSAC_CHUNK, None], t_h[k:k + _RANSAC_CHUNK, None]
        counts = (np.abs(sc * rs + tc - zs) * inv_z < thr).sum(axis=1)  # [chunk]
        m = int(counts.argmax())
        if counts[m] > best_count:
            best_count, best = int(counts[m]), (float(sc[m, 0]), float(tc[m, 0]))
            # Hypotheses needed to draw one all-inlier pair with 99.9 % probability at this inlier ratio.
            w2 = (best_count / rs.size) ** 2
            needed = 0 if w2 >= 1.0 else math.ceil(math.log(1e-3) / math.log1p(-w2)) if w2 > 0 else s_h.size
        k += _RANSAC_CHUNK
    # Refit on the consensus set, twice: the LS line can gain or lose a few border points.
    s, t = best
    for _ in range(3):
        inl = _rel_residual(r, z, s, t) < thr
        if inl.sum() < 2:
            break
        fit = _weighted_ls(r[inl], z[inl], w0[inl])
        if fit is None:
            break
        s, t = fit
    return s, t


def _irls(r: np.ndarray, z: np.ndarray, w0: np.ndarray, thr: float, max_iterations: int) -> tuple[float, float] | None:
    """LS start, Huber reweighting (MAD scale), then Tukey biweight to zero out gross outliers.

    Each phase gets half of ``max_iterations`` and stops early once (s, t) move by less than 1e-7 relative.
    """
    fit = _weighted_ls(r, z, w0)
    if fit is None:
        return None
    s, t = fit
    half = max(max_iterations // 2, 1)
    for phase in ("huber", "tukey"):
        for _ in range(half):
            e = (s * r + t - z) / z  # signed relative residual
            sigma = max(1.4826 * float(np.median(np.abs(e - np.median(e)))), 0.1 * thr, 1e-9)
            a = np.abs(e) / sigma
            if phase == "huber":
                rw = np.minimum(1.0, 1.345 / np.maximum(a, 1e-12))
            else:
                c = max(4.685, thr / sigma)  # never cut below the inlier threshold
                rw = np.where(a < c, (1.0 - (a / c) ** 2) ** 2, 0.0)
            new = _weighted_ls(r, z, w0 * rw)
            if new is None:
                return s, t
            done = abs(new[0] - s) <= 1e-7 * abs(s) and abs(new[1] - t) <= 1e-7 * max(abs(t), abs(s))
            s, t = new
            if done:
                break
    return s, t


def fit_scale_shift_points(
    relative: np.ndarray,
    metric: np.ndarray,
    *,
    method: Method = "ransac",
    min_points: int = 20,
    min_inlier_ratio: float = 0.5,
    inlier_threshold_rel: float = 0.1,
    max_iterations: int | None = None,
    seed: int = 0,
    weights: Weights = "relative",
    min_depth_spread: float = 0.05,
    depth_range: tuple[float, float] | None = None,
) -> AlignmentResult:
    """Fit ``metric ~ scale * relative + shift`` on paired 1-D samples; see :func:`fit_scale_shift`.

    Pairs with a non-finite value or ``metric <= 0`` are dropped first (REP 117: NaN/inf are not measurements;
    0 is the "no return" code of 16UC1 depth).
    """
    if method not in ("ransac", "irls", "lsq"):
        msg = f"`method` must be 'ransac', 'irls' or 'lsq', got {method!r}"
        raise ValueError(msg)
    if weights not in ("relative", "uniform"):
        msg = f"`weights` must be 'relative' or 'uniform', got {weights!r}"
        raise ValueError(msg)
    r_all = np.asarray(relative, dtype=np.float64).ravel()
    z_all = np.asarray(metric, dtype=np.float64).ravel()
    if r_all.shape != z_all.shape:
        msg = f"`relative` and `metric` differ in size ({r_all.size} vs {z_all.size})"
        raise ValueError(msg)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(r_all) & np.isfinite(z_all) & (z_all > 0)
    r, z = r_all[valid], z_all[valid]
    n = int(r.size)
    need = max(min_points, 2)
    if n < need:
        return _fail(f"too few valid sparse points: {n} < min_points={need}", n, method)

    # Conditioning: with all points at about one depth, scale and shift trade off freely.
    z_lo, z_med, z_hi = np.percentile(z, (5.0, 50.0, 95.0))
    spread = (z_hi - z_lo) / z_med
    if spread < min_depth_spread:
        return _fail(
            f"sparse depths span too narrow a range ({100 * spread:.1f}% of the median, need "
            f"{100 * min_depth_spread:.0f}%) to separate scale from shift; set a fixed scale or wait for more "
            "varied depth",
            n, method,
        )
    if float(np.ptp(r)) <= 1e-9 * max(float(np.abs(r).max()), 1.0):
        return _fail("relative depth is constant at the sparse points; the model output is degenerate", n, method)

    w0 = _base_weights(z, weights)
    thr = float(inlier_threshold_rel)
    if method == "ransac":
        fit = _ransac(r, z, w0, thr, max_iterations or 256, np.random.default_rng(seed))
    elif method == "irls":
        fit = _irls(r, z, w0, thr, max_iterations or 20)
    else:
        fit = _weighted_ls(r, z, w0)
    if fit is None:
        return _fail("no finite fit (relative depth nearly constant at the sparse points)", n, method)
    s, t = fit
    if not (math.isfinite(s) and math.isfinite(t)):
        return _fail("fit is not finite", n, method)
    res = _rel_residual(r, z, s, t)
    inl = res < thr
    n_inl = int(inl.sum())
    if s <= 0:
        reason = f"fitted scale {s:.4g} <= 0: the relative depth is not ordered like the sparse depth"
        return _fail(reason, n, method, n_inl)
    ratio = n_inl / n
    if n_inl < need or ratio < min_inlier_ratio:
        return _fail(
            f"too few inliers: {n_inl}/{n} ({100 * ratio:.0f}%) within {100 * thr:.0f}% relative error, need "
            f"{100 * min_inlier_ratio:.0f}% and >= {need}",
            n, method, n_inl,
        )
    if depth_range is not None:
        reason = _out_of_range(s * r[inl] + t, depth_range)
        if reason:
            return _fail(reason, n, method, n_inl)
    return AlignmentResult(
        ok=True, scale=s, shift=t, n_points=n, n_inliers=n_inl,
        residual_rel=float(np.median(res[inl])), reason="ok", method=method,
    )


def _out_of_range(fitted: np.ndarray, depth_range: tuple[float, float]) -> str | None:
    """Why a fit whose metric depths at its inliers are ``fitted`` is useless in ``depth_range``, or None.

    A consistent fit can still be wrong in scale: sparse depth in the wrong units (micrometres as 32FC1 "metres")
    fits perfectly and maps every pixel beyond max_depth, i.e. all-NaN output until the fallback expires.
    Such a fit must not replace a good one.
    """
    lo, hi = depth_range
    inside = (fitted > max(lo, 0.0)) & (fitted <= hi)  # what apply_alignment keeps
    if fitted.size == 0 or inside.mean() >= _MIN_IN_RANGE:
        return None
    return (
        f"fitted metric depths lie outside [min_depth, max_depth] = [{lo:g}, {hi:g}] m (median {np.median(fitted):.4g} "
        f"m, {100 * inside.mean():.0f}% inside): sparse depth in the wrong units? (32FC1 is metres, 16UC1 "
        "millimetres, REP 118); otherwise widen min_depth / max_depth"
    )


def fit_scale_shift(
    relative: np.ndarray,
    sparse: np.ndarray,
    *,
    method: Method = "ransac",
    min_points: int = 20,
    min_inlier_ratio: float = 0.5,
    inlier_threshold_rel: float = 0.1,
    max_iterations: int | None = None,
    seed: int = 0,
    weights: Weights = "relative",
    min_depth_spread: float = 0.05,
    depth_range: tuple[float, float] | None = None,
) -> AlignmentResult:
    """Fit metric ``sparse ~ scale * relative + shift`` over the pixels where ``sparse`` holds a measurement.

    Args:
        relative: ``[H,W]`` model output (affine-invariant depth, e.g. in [0,1], 0 near).
        sparse: ``[H,W]`` metres on the same pixel grid (use :func:`sparse_to_image_grid` for another resolution);
            0, negative, NaN or inf mean "no measurement".
        method: ``"ransac"`` (2-point hypotheses scored by relative error, then weighted LS on the inliers),
            ``"irls"`` (LS start, Huber then Tukey reweighting) or ``"lsq"`` (plain weighted LS, not robust).
        min_points: fewer valid pixels (or inliers) than this -> ``ok=False``.
        min_inlier_ratio: fraction of points within ``inlier_threshold_rel`` required for ``ok``.
        inlier_threshold_rel: inlier iff ``|s r + t - z| / z`` is below it.
        max_iterations: RANSAC hypotheses (default 256) or IRLS iterations (default 20).
        seed: RANSAC random seed; the result is deterministic for a given seed.
        weights: ``"relative"`` (w = 1/z^2: least squares on relative error) or ``"uniform"`` (metres).
        min_depth_spread: reject when ``(p95 - p5) / median`` of the sparse depths is below this.
        depth_range: ``(min_depth, max_depth)`` of the output: reject a fit that maps most of its inliers outside
            it (``apply_alignment`` would publish them as NaN), e.g. sparse depth in the wrong units.

    Never raises on bad data (only on bad arguments): failures come back as ``ok=False`` with a ``reason``.
    """
    if relative.shape != sparse.shape:
        msg = (
            f"`relative` {relative.shape} and `sparse` {sparse.shape} differ; resample the sparse depth onto the "
            "image grid with sparse_to_image_grid()"
        )
        raise ValueError(msg)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(sparse) & (sparse > 0)
    return fit_scale_shift_points(
        relative[mask], sparse[mask], method=method, min_points=min_points, min_inlier_ratio=min_inlier_ratio,
        inlier_threshold_rel=inlier_threshold_rel, max_iterations=max_iterations, seed=seed, weights=weights,
        min_depth_spread=min_depth_spread, depth_range=depth_range,
    )


def apply_alignment(
    relative: np.ndarray, scale: float, shift: float, min_depth: float = 0.0, max_depth: float = math.inf
) -> np.ndarray:
    """Metric depth ``scale * relative + shift`` as float32, NaN outside ``(min_depth, max_depth]`` or ``<= 0``.

    NaN marks invalid pixels (REP 117/118); with ``shift < 0`` the predicted near plane can map to negative depth.
    """
    metric = (np.float32(scale) * np.asarray(relative, dtype=np.float32) + np.float32(shift)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(metric) | (metric <= max(min_depth, 0.0)) | (metric > max_depth)
    metric[bad] = np.nan
    return metric


def sparse_to_image_grid(
    sparse: np.ndarray, target_w: int, target_h: int, *, half_pixel: bool = False
) -> np.ndarray:
    """Move a sparse depth image of the same camera onto a ``target_w x target_h`` grid, without interpolation.

    Each valid source pixel ``(u, v)`` lands on the nearest target pixel under the intrinsics ratio used by
    :func:`geodiff_ros.geometry.camera.scale_intrinsics` (``u' = u * W'/W``, or ``(u + 0.5) * W'/W - 0.5`` with
    ``half_pixel``); when several land on one pixel the nearest depth wins (z-buffer: foreground occludes).
    Measurements are never blended with each other or with holes, so no depth is invented at edges. Output
    float32 with NaN for "no measurement"; input 0/NaN/inf/negative count as no measurement.
    """
    if sparse.ndim != 2:
        msg = f"`sparse` must be [h,w], got shape {sparse.shape}"
        raise ValueError(msg)
    if target_w <= 0 or target_h <= 0:
        msg = f"target size {target_w}x{target_h} must be positive"
        raise ValueError(msg)
    h, w = sparse.shape
    src = np.asarray(sparse, dtype=np.float32)
    if (h, w) == (target_h, target_w):
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(src) & (src > 0), src, np.float32(np.nan)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        v, u = np.nonzero(np.isfinite(src) & (src > 0))
    z = src[v, u]
    sx, sy = target_w / w, target_h / h
    off = 0.5 if half_pixel else 0.0
    tu = np.rint((u + off) * sx - off).astype(np.int64)
    tv = np.rint((v + off) * sy - off).astype(np.int64)
    keep = (tu >= 0) & (tu < target_w) & (tv >= 0) & (tv < target_h)
    flat = tv[keep] * target_w + tu[keep]
    out = np.full(target_h * target_w, np.inf, dtype=np.float32)
    np.minimum.at(out, flat, z[keep])
    out[np.isinf(out)] = np.nan
    return out.reshape(target_h, target_w)


class TemporalAligner:
    """Smooths per-frame fits and decides which alignment (if any) a frame gets.

    EMA on ``log(scale)`` (scale is multiplicative) and on ``shift``; a new fit whose scale differs from the
    smoothed one by more than ``reset_ratio`` (either way) replaces the state (scene cut, new surface). A failed
    fit reuses the last good state for at most ``max_fallback_age_s``, then yields None: no metric output without
    a fit. Time going backwards (bag loop, sim reset) clears the state. ``fixed_scale`` (user
    set, shift 0) is the alignment of frames that have no fit (no sparse input, or none usable for longer than
    ``max_fallback_age_s``): a fit, when there is one, wins.
    """

    def __init__(
        self,
        ema_alpha: float = 0.3,
        max_fallback_age_s: float = 2.0,
        reset_ratio: float = 1.5,
        fixed_scale: float | None = None,
    ) -> None:
        """Validate settings here, so a bad parameter fails at configure time rather than on the first frame."""
        if not 0.0 < ema_alpha <= 1.0:
            msg = f"`ema_alpha` must be in (0, 1] (1 = no smoothing), got {ema_alpha}"
            raise ValueError(msg)
        if not max_fallback_age_s >= 0.0:
            msg = f"`max_fallback_age_s` must be >= 0, got {max_fallback_age_s}"
            raise ValueError(msg)
        if not reset_ratio > 1.0:
            msg = f"`reset_ratio` must be > 1, got {reset_ratio}"
            raise ValueError(msg)
        if fixed_scale is not None and not (math.isfinite(fixed_scale) and fixed_scale > 0):
            msg = f"`fixed_scale` must be a finite value > 0 or None, got {fixed_scale}"
            raise ValueError(msg)
        self.ema_alpha = ema_alpha
        self.max_fallback_age_s = max_fallback_age_s
        self.reset_ratio = reset_ratio
        self.fixed_scale = fixed_scale
        self.n_resets = 0
        self.reset()

    def reset(self) -> None:
        """Forget the smoothed fit (no metric output until the next good fit)."""
        self._log_scale: float | None = None
        self._shift = 0.0
        self._fit_stamp = 0.0
        self._n_inliers = 0
        self._residual = math.nan
        self._last_stamp: float | None = None

    @property
    def has_fit(self) -> bool:
        """Whether a smoothed fit is held (it may still be too old to use)."""
        return self._log_scale is not None

    def update(self, result: AlignmentResult | None, stamp_s: float) -> AlignmentState | None:
        """Fold in this frame's fit (None: no sparse data this frame) and return the alignment to use."""
        state = self._from_fits(result, stamp_s)
        if state is None and self.fixed_scale is not None:
            return AlignmentState(scale=self.fixed_scale, shift=0.0, age_s=0.0, source="fixed",
                                  n_inliers=0, residual_rel=math.nan)
        return state

    def _from_fits(self, result: AlignmentResult | None, stamp_s: float) -> AlignmentState | None:
        """The smoothed fit, the fallback to the last one, or None."""
        if self._last_stamp is not None and stamp_s < self._last_stamp:
            self.reset()
            self.n_resets += 1
        self._last_stamp = stamp_s

        if result is not None and result.ok and result.scale > 0 and math.isfinite(result.shift):
            log_s = math.log(result.scale)
            # History older than the fallback window (at least 1 s, so max_fallback_age_s=0 still smooths a
            # 10 Hz LiDAR) is not blended in: after a long gap the scene may be a different one.
            stale = self._log_scale is not None and stamp_s - self._fit_stamp > max(self.max_fallback_age_s, 1.0)
            if self._log_scale is None or stale or abs(log_s - self._log_scale) > math.log(self.reset_ratio):
                if self._log_scale is not None:
                    self.n_resets += 1
                self._log_scale, self._shift = log_s, result.shift
            else:
                a = self.ema_alpha
                self._log_scale = (1.0 - a) * self._log_scale + a * log_s
                self._shift = (1.0 - a) * self._shift + a * result.shift
            self._fit_stamp = stamp_s
            self._n_inliers, self._residual = result.n_inliers, result.residual_rel
            return AlignmentState(
                scale=math.exp(self._log_scale), shift=self._shift, age_s=0.0, source="fit",
                n_inliers=self._n_inliers, residual_rel=self._residual,
            )

        if self._log_scale is None:
            return None
        age = stamp_s - self._fit_stamp
        if age > self.max_fallback_age_s:
            self._log_scale = None  # expired: the next fit starts fresh instead of blending with old history
            return None
        return AlignmentState(
            scale=math.exp(self._log_scale), shift=self._shift, age_s=age, source="fallback",
            n_inliers=self._n_inliers, residual_rel=self._residual,
        )
