"""Evaluation metrics as named pure functions (spec C.1 depth, C.2 normals).

Depth metrics take ``(pred, gt, mask)`` numpy arrays ``[H,W]`` in metres and return one float for
one image; the benchmark value is the mean over images (Marigold's protocol). Normal metrics pool
the angular errors of all valid pixels of a dataset (DSINE's protocol).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DEPTH_METRICS",
    "abs_relative_difference",
    "align_least_squares",
    "angular_errors_deg",
    "delta1_acc",
    "delta2_acc",
    "delta3_acc",
    "evaluate_depth_image",
    "normal_metrics",
    "rmse_linear",
    "rmse_log",
    "squared_relative_difference",
]


def align_least_squares(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, max_resolution: int | None = None
) -> tuple[np.ndarray, float, float]:
    """Ordinary least squares ``[p, 1] @ [s, t] ~ g`` over ``mask``, in depth space (spec C.1).

    With ``max_resolution``, (s, t) are fitted on a nearest-downsampled copy whose longest side
    is at most that (ETH3D: 1024), then applied to the full-resolution prediction.
    Returns ``(s * pred + t, s, t)``.
    """
    if pred.shape != gt.shape or gt.shape != mask.shape:
        msg = f"pred {pred.shape}, gt {gt.shape} and mask {mask.shape} must have one shape"
        raise ValueError(msg)
    p, g, m = pred, gt, mask
    if max_resolution is not None and max(pred.shape) > max_resolution:
        f = max_resolution / max(pred.shape)
        h, w = max(int(pred.shape[0] * f), 1), max(int(pred.shape[1] * f), 1)
        rows = np.floor((np.arange(h) + 0.5) / f).astype(int).clip(0, pred.shape[0] - 1)
        cols = np.floor((np.arange(w) + 0.5) / f).astype(int).clip(0, pred.shape[1] - 1)
        p, g, m = pred[np.ix_(rows, cols)], gt[np.ix_(rows, cols)], mask[np.ix_(rows, cols)]
    pv = p[m].astype(np.float64)
    gv = g[m].astype(np.float64)
    if pv.size < 2:
        msg = "least-squares alignment needs at least 2 valid pixels"
        raise ValueError(msg)
    a = np.stack([pv, np.ones_like(pv)], axis=1)  # [N,2]
    (s, t), *_ = np.linalg.lstsq(a, gv, rcond=None)
    return (pred.astype(np.float64) * s + t), float(s), float(t)


def _valid(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pred[mask].astype(np.float64), gt[mask].astype(np.float64)


def abs_relative_difference(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """AbsRel = mean |p - g| / g over valid pixels."""
    p, g = _valid(pred, gt, mask)
    return float(np.mean(np.abs(p - g) / g))


def squared_relative_difference(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """SqRel = mean (p - g)^2 / g."""
    p, g = _valid(pred, gt, mask)
    return float(np.mean((p - g) ** 2 / g))


def rmse_linear(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """RMSE = sqrt(mean (p - g)^2) in metres."""
    p, g = _valid(pred, gt, mask)
    return float(np.sqrt(np.mean((p - g) ** 2)))


def rmse_log(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """RMSE-log = sqrt(mean (ln p - ln g)^2)."""
    p, g = _valid(pred, gt, mask)
    return float(np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)))


def _delta(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, k: int) -> float:
    p, g = _valid(pred, gt, mask)
    return float(np.mean(np.maximum(p / g, g / p) < 1.25**k))


def delta1_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta1 = fraction of pixels with max(p/g, g/p) < 1.25."""
    return _delta(pred, gt, mask, 1)


def delta2_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta2: threshold 1.25^2."""
    return _delta(pred, gt, mask, 2)


def delta3_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta3: threshold 1.25^3."""
    return _delta(pred, gt, mask, 3)


DEPTH_METRICS = (
    abs_relative_difference,
    delta1_acc,
    squared_relative_difference,
    rmse_linear,
    rmse_log,
    delta2_acc,
    delta3_acc,
)


def evaluate_depth_image(
    pred_rel: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray,
    *,
    min_depth: float,
    max_depth: float,
    alignment_max_res: int | None = None,
) -> dict[str, float]:
    """Marigold's per-image protocol (spec C.1): LS scale+shift in depth space, clip to the dataset
    range and to >= 1e-6, then every metric of :data:`DEPTH_METRICS`; also returns ``scale``/``shift``.
    """
    aligned, s, t = align_least_squares(pred_rel, gt, mask, alignment_max_res)
    aligned = np.clip(aligned, min_depth, max_depth if math.isfinite(max_depth) else None)
    aligned = np.clip(aligned, 1e-6, None)
    out = {fn.__name__: fn(aligned, gt, mask) for fn in DEPTH_METRICS}
    out.update(scale=s, shift=t)
    return out


def angular_errors_deg(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel angle in degrees between ``pred`` and ``gt`` ``[H,W,3]`` over ``mask`` (1-D output).

    arccos of the clamped cosine similarity (both vectors normalised), DSINE ``utils.py`` (spec C.2).
    """
    p = pred[mask].astype(np.float64)
    g = gt[mask].astype(np.float64)
    cos = np.sum(p * g, axis=-1) / np.maximum(
        np.linalg.norm(p, axis=-1) * np.linalg.norm(g, axis=-1), 1e-8
    )
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def normal_metrics(errors_deg: np.ndarray) -> dict[str, float]:
    """Pooled DSINE metrics: mean, median, RMSE (degrees) and % of pixels under 5/7.5/11.25/22.5/30 deg."""
    e = np.asarray(errors_deg, dtype=np.float64).ravel()
    if e.size == 0:
        msg = "no valid normal pixels to evaluate"
        raise ValueError(msg)
    out = {
        "mean": float(e.mean()),
        "median": float(np.median(e)),
        "rmse": float(np.sqrt(np.mean(e**2))),
    }
    for thr in (5.0, 7.5, 11.25, 22.5, 30.0):
        out[f"a{thr:g}"] = float(np.mean(e < thr) * 100.0)
    out["num_pixels"] = int(e.size)
    return out
