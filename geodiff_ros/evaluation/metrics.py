"""Evaluation metrics with the official E2E-FT evaluation's arithmetic.

Definitions: docs/method.md#depth-metrics and docs/method.md#normals-metrics.

Depth (Marigold's ``eval.py`` as run by E2E-FT's ``experiments/depth/eval_args/*``): every metric takes
``(pred, gt, mask)`` arrays ``[H,W]`` and returns one float for one image; the benchmark value is the plain
mean over images (:func:`mean_over_images`). The arithmetic is the official one, op for op, in the dtype
of the inputs: the data path gives float32 (ground truth as the official loaders decode it, the aligned
prediction in float32 like ``np.linalg.lstsq`` on float32 arrays), invalid pixels are zeroed and each sum
is divided by the number of valid pixels, so an image with an empty mask gives NaN (0 / 0), as it does
in the official code.

Normals (DSINE's ``test.py``/``utils.py``): per-pixel angle from ``torch.cosine_similarity`` in float32,
pooled over all valid pixels of a dataset, then mean/median/RMSE/thresholds with the official numpy calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch

logger = logging.getLogger("geodiff_ros.evaluation")

__all__ = [
    "DEPTH_METRICS",
    "abs_relative_difference",
    "align_least_squares",
    "angular_errors_deg",
    "delta1_acc",
    "delta2_acc",
    "delta3_acc",
    "evaluate_depth_image",
    "i_rmse",
    "log10",
    "mean_over_images",
    "nearest_columns_official",
    "normal_metrics",
    "numpy1_sum",
    "rmse_linear",
    "rmse_log",
    "silog_rmse",
    "squared_relative_difference",
]


# ----------------------------------------------------------------------------- least squares alignment


def nearest_columns_official(width: int, factor: float) -> np.ndarray:
    """Column indices the official ``alignment_max_res`` downsampling keeps (ETH3D, docs/method.md#depth-alignment).

    The official code applies ``torch.nn.Upsample(scale_factor=factor, mode="nearest")`` to a ``[1,H,W]``
    tensor, which torch reads as (batch, channels, length): only the width is resampled, rows are all kept.
    Output width ``floor(W * factor)``; source column ``min(floor(j * float32(1 / factor)), W - 1)``, the
    product taken in float32 (ATen's nearest index rule; 1:1 and 2x are special-cased there too).
    """
    out_w = int(math.floor(width * factor))
    if out_w == width:
        return np.arange(width)
    if out_w == 2 * width:
        return np.arange(out_w) >> 1
    step = np.float32(1.0 / factor)
    src = np.floor(np.arange(out_w, dtype=np.float32) * step).astype(np.int64)
    return np.minimum(src, width - 1)


def align_least_squares(
    pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, max_resolution: int | None = None
) -> tuple[np.ndarray, float, float]:
    """Ordinary least squares ``[p, 1] @ [s, t] ~ g`` over ``mask``, in depth space (docs/method.md#depth-alignment).

    As Marigold's ``align_depth_least_square``: ``np.linalg.lstsq`` on the valid pixels in the arrays' own
    dtype (float32 in, float32 scale/shift out), applied to the full prediction. With ``max_resolution``
    and ``min(max_resolution / [H, W]) < 1`` the fit uses only the columns of
    :func:`nearest_columns_official` (the official quirk: ETH3D at 1024 keeps all 4032 rows and 1024 of
    6048 columns). An empty mask gives scale = shift = 0 (numpy's answer for no equations); the metrics
    of such an image are NaN. Returns ``(s * pred + t, s, t)``.
    """
    if pred.shape != gt.shape or gt.shape != mask.shape:
        msg = f"pred {pred.shape}, gt {gt.shape} and mask {mask.shape} must have one shape"
        raise ValueError(msg)
    p_fit, g_fit, m_fit = pred, gt, mask
    if max_resolution is not None:
        factor = float(np.min(max_resolution / np.array(pred.shape[-2:])))
        if factor < 1:
            cols = nearest_columns_official(pred.shape[-1], factor)
            p_fit, g_fit, m_fit = pred[:, cols], gt[:, cols], mask[:, cols]
    g_valid = g_fit[m_fit].reshape(-1, 1)
    p_valid = p_fit[m_fit].reshape(-1, 1)
    design = np.concatenate([p_valid, np.ones_like(p_valid)], axis=-1)
    solution = np.linalg.lstsq(design, g_valid, rcond=None)[0]  # [2,1], dtype of the inputs
    scale, shift = solution
    aligned = pred * scale + shift
    return aligned, float(scale[0]), float(shift[0])


# ----------------------------------------------------------------------------- per-image depth metrics


def _tensors(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.ascontiguousarray(pred)), torch.from_numpy(np.ascontiguousarray(gt)),
            torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)))


def _valid_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``per_pixel`` over the valid pixels (others zeroed) / their count; 0 / 0 = NaN."""
    per_pixel[~mask] = 0
    return torch.sum(per_pixel, (-1, -2)) / mask.sum((-1, -2))


def abs_relative_difference(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """AbsRel = mean |p - g| / g over valid pixels."""
    p, g, m = _tensors(pred, gt, mask)
    return _valid_mean(torch.abs(p - g) / g, m).item()


def squared_relative_difference(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """SqRel = mean (p - g)^2 / g."""
    p, g, m = _tensors(pred, gt, mask)
    return _valid_mean(torch.pow(torch.abs(p - g), 2) / g, m).item()


def _valid_rms(diff: torch.Tensor, m: torch.Tensor) -> float:
    """sqrt(mean diff^2) over the valid pixels, with the official ops (invalid set to 0 in place, then squared):
    RMSE, RMSE-log and iRMSE differ only in ``diff``."""
    diff[~m] = 0
    return torch.sqrt(_valid_mean(torch.pow(diff, 2), m)).item()


def rmse_linear(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """RMSE = sqrt(mean (p - g)^2) in metres."""
    p, g, m = _tensors(pred, gt, mask)
    return _valid_rms(p - g, m)


def rmse_log(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """RMSE-log = sqrt(mean (ln p - ln g)^2)."""
    p, g, m = _tensors(pred, gt, mask)
    return _valid_rms(torch.log(p) - torch.log(g), m)


def log10(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """log10 = mean |log10 p - log10 g| over valid pixels (NaN for none)."""
    p, g, m = _tensors(pred, gt, mask)
    return torch.abs(torch.log10(p[m]) - torch.log10(g[m])).mean().item()


def _delta(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Fraction of valid pixels with max(p/g, g/p) < threshold; counted in float32 as the official code."""
    p, g, m = _tensors(pred, gt, mask)
    ratio = torch.max(p / g, g / p)
    inside = torch.where(ratio < threshold, torch.ones(ratio.shape), torch.zeros(ratio.shape))
    return _valid_mean(inside, m).item()


def delta1_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta1 = fraction of pixels with max(p/g, g/p) < 1.25."""
    return _delta(pred, gt, mask, 1.25)


def delta2_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta2: threshold 1.25^2."""
    return _delta(pred, gt, mask, 1.25**2)


def delta3_acc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """delta3: threshold 1.25^3."""
    return _delta(pred, gt, mask, 1.25**3)


def i_rmse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """iRMSE = sqrt(mean (1/p - 1/g)^2) in 1/m."""
    p, g, m = _tensors(pred, gt, mask)
    return _valid_rms(1.0 / p - 1.0 / g, m)


def silog_rmse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """SI-log = 100 * sqrt(mean d^2 - (mean d)^2), d = ln p - ln g over valid pixels (Eigen et al.)."""
    p, g, m = _tensors(pred, gt, mask)
    diff = torch.log(p) - torch.log(g)
    diff[~m] = 0
    n = m.sum((-1, -2))
    mean_sq = torch.sum(torch.pow(diff, 2), (-1, -2)) / n
    sq_mean = torch.pow(torch.sum(diff, (-1, -2)), 2) / (n**2)
    return (torch.sqrt(torch.mean(mean_sq - sq_mean)) * 100).item()


#: The official ``eval_metrics`` list, in its order (columns of the per-image CSV and of ``metrics.json``).
DEPTH_METRICS = (
    abs_relative_difference,
    squared_relative_difference,
    rmse_linear,
    rmse_log,
    log10,
    delta1_acc,
    delta2_acc,
    delta3_acc,
    i_rmse,
    silog_rmse,
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
    """Marigold's per-image protocol: LS scale+shift in depth space, clip to the dataset range
    and to >= 1e-6, then every metric of :data:`DEPTH_METRICS`; also returns ``scale``/``shift``.

    Pass ``pred_rel`` and ``gt`` as float32 (engine output, loaders) to get the official float32 numbers.
    """
    with torch.no_grad():
        aligned, s, t = align_least_squares(pred_rel, gt, mask, alignment_max_res)
        aligned = np.clip(aligned, min_depth, max_depth)
        aligned = np.clip(aligned, 1e-6, None)
        out = {fn.__name__: fn(aligned, gt, mask) for fn in DEPTH_METRICS}
    out.update(scale=s, shift=t)
    return out


def mean_over_images(values: Iterable[float]) -> float:
    """Benchmark value of a per-image metric: running float64 sum / count, as the official MetricTracker.

    NaN or inf of any image carries into the mean, as in the official tables.
    """
    total, count = 0.0, 0
    for v in values:
        total += v
        count += 1
    return total / count if count else math.nan


# ----------------------------------------------------------------------------- normals


def _nchw(normals_hw3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normals_hw3, -1, 0)))[None]


def angular_errors_deg(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel angle in degrees between ``pred`` and ``gt`` ``[H,W,3]`` over ``mask`` (1-D, row-major).

    DSINE's ``compute_normal_error``: ``acos(clamp(cosine_similarity(p, g), -1, 1)) * 180 / pi`` on
    contiguous ``[1,3,H,W]`` tensors in the inputs' dtype (float32 for engine output and loaders). Neither
    vector needs unit length (cosine similarity normalises; DSINE's PNG ground truth is not re-normalised).
    """
    if pred.shape != gt.shape or pred.shape[:2] != mask.shape or pred.shape[-1] != 3:
        msg = f"pred {pred.shape} and gt {gt.shape} must be [H,W,3] with mask {mask.shape} [H,W]"
        raise ValueError(msg)
    with torch.no_grad():
        cos = torch.cosine_similarity(_nchw(pred), _nchw(gt), dim=1)
        cos = torch.clamp(cos, min=-1.0, max=1.0)
        err = torch.acos(cos) * 180.0 / np.pi
    return err[0][torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))].numpy()


#: numpy < 2 reduces a contiguous array in chunks of its 8192-element buffer: pairwise within a chunk,
#: sequential across chunks. numpy 2 sums the whole array pairwise; in float32 the two differ in the last bits.
_NUMPY1_BUFSIZE = 8192
_PAIRWISE_LEAF = 128


def _pairwise_leaf(a: np.ndarray) -> np.generic:
    """numpy's pairwise-sum leaf (n <= 128): eight running partial sums, combined as a balanced tree."""
    zero = a.dtype.type(0)
    if a.size < 8:
        total = zero
        for v in a:
            total = a.dtype.type(total + v)
        return total
    body = a.size - a.size % 8
    acc = a[:8].copy()
    for i in range(8, body, 8):
        acc += a[i : i + 8]
    total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for v in a[body:]:
        total = a.dtype.type(total + v)
    return total


def _pairwise(a: np.ndarray) -> np.generic:
    if a.size <= _PAIRWISE_LEAF:
        return _pairwise_leaf(a)
    half = a.size // 2
    half -= half % 8
    return a.dtype.type(_pairwise(a[:half]) + _pairwise(a[half:]))


def numpy1_sum(values: np.ndarray) -> np.generic:
    """``np.sum`` of a 1-D array as numpy 1.26 (the official environment's pin) computes it, in its dtype.

    Full 8192-element chunks are summed vectorised (64 leaves of 128, each 16 steps of 8 partial sums, then
    the balanced tree), the tail chunk recursively; chunk sums are added in order.
    """
    a = np.ascontiguousarray(values).ravel()
    full = a.size // _NUMPY1_BUFSIZE
    chunk_sums: list[np.generic] = []
    if full:
        blocks = a[: full * _NUMPY1_BUFSIZE].reshape(full, _NUMPY1_BUFSIZE // _PAIRWISE_LEAF, _PAIRWISE_LEAF // 8, 8)
        acc = blocks[:, :, 0, :].copy()
        for k in range(1, _PAIRWISE_LEAF // 8):
            acc += blocks[:, :, k, :]
        tree = ((acc[..., 0] + acc[..., 1]) + (acc[..., 2] + acc[..., 3])) + (
            (acc[..., 4] + acc[..., 5]) + (acc[..., 6] + acc[..., 7]))
        while tree.shape[1] > 1:
            tree = tree[:, 0::2] + tree[:, 1::2]
        chunk_sums = list(tree[:, 0])
    if a.size % _NUMPY1_BUFSIZE:
        chunk_sums.append(_pairwise(a[full * _NUMPY1_BUFSIZE :]))
    total = a.dtype.type(0)
    for c in chunk_sums:
        total = a.dtype.type(total + c)
    return total


def normal_metrics(errors_deg: np.ndarray) -> dict[str, float]:
    """Pooled DSINE metrics: mean, median, RMSE (degrees) and % of pixels under 5/7.5/11.25/22.5/30 deg.

    DSINE's numpy calls on the pooled float32 errors, evaluated as numpy 1.26 (the official pin) does:
    float32 sums in 8192-element chunks (:func:`numpy1_sum`), mean = float32(sum / n), RMSE = sqrt(sum of
    squares / n) with that division in float64 (numpy 1.26 promotes a float32 scalar by a Python int),
    median with ``np.median``. No valid pixel: NaN, as the official.
    """
    e = np.ascontiguousarray(errors_deg).ravel()
    n = int(e.size)
    if n == 0:
        logger.warning("no valid normal pixels: every normals metric is NaN (as in the official evaluation)")
        out = {k: math.nan for k in ("mean", "median", "rmse", "a5", "a7.5", "a11.25", "a22.5", "a30")}
        out["num_pixels"] = 0
        return out
    out = {
        "mean": float(e.dtype.type(np.float64(numpy1_sum(e)) / n)),
        "median": float(np.median(e)),
        "rmse": float(np.sqrt(np.float64(numpy1_sum(e * e)) / n)),
    }
    for thr in (5, 7.5, 11.25, 22.5, 30):
        out[f"a{thr:g}"] = float(100.0 * (np.sum(e < thr) / n))
    out["num_pixels"] = n
    return out
