"""Evaluation metrics against hand-computed values and the official evaluation's rules (docs/method.md#evaluation).

The official rules restated here come from E2E-FT's vendored Marigold ``eval.py``/``src/util/{metric,alignment}.py``
and DSINE ``utils/utils.py``: float32 arithmetic, NaN for an image without valid pixels, the ETH3D width-only
subsample (``torch.nn.Upsample`` on a 3-D tensor, used below as the oracle), numpy 1.26's float32 sums.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodiff_ros.evaluation.metrics import (
    DEPTH_METRICS,
    abs_relative_difference,
    align_least_squares,
    angular_errors_deg,
    delta1_acc,
    delta2_acc,
    delta3_acc,
    evaluate_depth_image,
    i_rmse,
    log10,
    mean_over_images,
    nearest_columns_official,
    normal_metrics,
    rmse_linear,
    rmse_log,
    silog_rmse,
    squared_relative_difference,
)

PRED = np.array([[1.0, 2.0], [3.0, 8.0]])
GT = np.array([[1.0, 4.0], [2.0, 4.0]])
MASK = np.array([[True, True], [True, False]])  # the 8 vs 4 pixel is excluded


def test_depth_metrics_hand_computed() -> None:
    # valid pairs (p, g): (1, 1), (2, 4), (3, 2)
    assert abs_relative_difference(PRED, GT, MASK) == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert squared_relative_difference(PRED, GT, MASK) == pytest.approx((0 + 4 / 4 + 1 / 2) / 3)
    assert rmse_linear(PRED, GT, MASK) == pytest.approx(math.sqrt((0 + 4 + 1) / 3))
    assert rmse_log(PRED, GT, MASK) == pytest.approx(math.sqrt((0 + math.log(2) ** 2 + math.log(1.5) ** 2) / 3))
    # ratios max(p/g, g/p): 1, 2, 1.5 -> < 1.25: 1/3; < 1.5625: 2/3; < 1.953125: 2/3 (2 is never inside)
    assert delta1_acc(PRED, GT, MASK) == pytest.approx(1 / 3)
    assert delta2_acc(PRED, GT, MASK) == pytest.approx(2 / 3)
    assert delta3_acc(PRED, GT, MASK) == pytest.approx(2 / 3)


def test_official_extra_metrics_hand_computed() -> None:
    # log10, iRMSE and SI-log, which the official eval prints too; valid pairs (1, 1), (2, 4), (3, 2)
    assert log10(PRED, GT, MASK) == pytest.approx((0 + math.log10(2) + math.log10(1.5)) / 3)
    assert i_rmse(PRED, GT, MASK) == pytest.approx(math.sqrt((0 + 0.25**2 + (1 / 3 - 1 / 2) ** 2) / 3))
    d = [0.0, math.log(0.5), math.log(1.5)]
    silog = 100 * math.sqrt(sum(x * x for x in d) / 3 - (sum(d) / 3) ** 2)
    assert silog_rmse(PRED, GT, MASK) == pytest.approx(silog)
    # the official eval_metrics list, in its order
    assert [fn.__name__ for fn in DEPTH_METRICS] == [
        "abs_relative_difference", "squared_relative_difference", "rmse_linear", "rmse_log", "log10",
        "delta1_acc", "delta2_acc", "delta3_acc", "i_rmse", "silog_rmse"]


def test_metrics_keep_float32_like_the_official_eval() -> None:
    # One valid pixel p = 0.1, g = 0.3 in float32: AbsRel is the float32 quotient, not the float64 one.
    p, g, m = np.float32([[0.1]]), np.float32([[0.3]]), np.ones((1, 1), bool)
    f32 = float(np.abs(np.float32(0.1) - np.float32(0.3)) / np.float32(0.3))
    assert abs_relative_difference(p, g, m) == f32 != abs(0.1 - 0.3) / 0.3
    # LS alignment of float32 arrays stays float32 (np.linalg.lstsq returns float32 scale and shift)
    rng = np.random.default_rng(3)
    pred = rng.random((20, 30), dtype=np.float32)
    aligned, s, t = align_least_squares(pred, (2 * pred + 1).astype(np.float32), np.ones((20, 30), bool))
    assert aligned.dtype == np.float32 and s == float(np.float32(s)) and t == float(np.float32(t))


def test_empty_mask_gives_nan_for_the_image_and_the_mean() -> None:
    # The official eval divides by the number of valid pixels: 0 / 0 = NaN, and the benchmark mean with it.
    gt = np.full((4, 5), 2.0, np.float32)
    pred = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    m = evaluate_depth_image(pred, gt, np.zeros((4, 5), bool), min_depth=1e-3, max_depth=10.0)
    assert all(math.isnan(m[fn.__name__]) for fn in DEPTH_METRICS)
    assert math.isnan(mean_over_images([0.05, m["abs_relative_difference"], 0.07]))
    assert mean_over_images([0.1, 0.2, 0.4]) == ((0.0 + 0.1) + 0.2 + 0.4) / 3  # running sum, as MetricTracker


def test_masked_pixel_with_zero_depth_gives_inf_not_skipped() -> None:
    # DIODE's own mask may include depth 0 (the official keeps it): AbsRel is inf, visible in the result.
    gt = np.array([[1.0, 2.0, 0.0, 4.0]], np.float32)
    pred = np.array([[0.25, 0.5, 0.6, 1.0]], np.float32)
    m = evaluate_depth_image(pred, gt, np.ones((1, 4), bool), min_depth=0.6, max_depth=350.0)
    assert m["abs_relative_difference"] == math.inf and m["i_rmse"] == math.inf


def test_least_squares_alignment_recovers_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    rel = rng.random((40, 60))
    gt = 3.5 * rel + 0.7
    mask = rng.random((40, 60)) > 0.3
    gt_corrupt = np.where(mask, gt, 1e3)  # invalid pixels must not influence the fit
    aligned, s, t = align_least_squares(rel, gt_corrupt, mask)
    assert s == pytest.approx(3.5) and t == pytest.approx(0.7)
    assert np.allclose(aligned[mask], gt[mask])
    # ETH3D path: fit on a downsampled copy, applied at full resolution.
    _, s2, t2 = align_least_squares(rel, gt_corrupt, mask, max_resolution=16)
    assert s2 == pytest.approx(3.5) and t2 == pytest.approx(0.7)


def _official_downsample(x: np.ndarray, factor: float) -> np.ndarray:
    """What the official alignment does: nn.Upsample(nearest) on the [1, H, W] tensor (a 1-D resize of W)."""
    return torch.nn.Upsample(scale_factor=factor, mode="nearest")(torch.as_tensor(x).unsqueeze(0)).numpy()[0]


@pytest.mark.parametrize(("h", "w", "max_res"), [(4032, 6048, 1024), (6048, 4032, 1024), (480, 640, 300),
                                                  (375, 1242, 1000), (101, 257, 64), (30, 40, 39)])
def test_eth3d_alignment_subsample_columns_match_the_official_upsample(h: int, w: int, max_res: int) -> None:
    factor = float(np.min(max_res / np.array([h, w])))
    row = np.arange(w, dtype=np.float32)[None, :]
    assert np.array_equal(nearest_columns_official(w, factor), _official_downsample(row, factor)[0].astype(int))


def test_eth3d_alignment_keeps_every_row_and_fits_like_the_official() -> None:
    # Noisy data: the fitted (s, t) depends on which pixels are used, so it tells the subsample apart.
    rng = np.random.default_rng(2)
    h, w, max_res = 90, 160, 40
    pred = rng.random((h, w), dtype=np.float32)
    gt = (3 * pred + 1 + rng.normal(0, 0.3, (h, w))).astype(np.float32)
    mask = rng.random((h, w)) > 0.2
    factor = float(np.min(max_res / np.array([h, w])))
    sub = [_official_downsample(a, factor) for a in (pred, gt, mask.astype(np.float32))]
    assert sub[0].shape == (h, 40)  # all 90 rows, 40 columns
    keep = sub[2].astype(bool)
    design = np.stack([sub[0][keep], np.ones(keep.sum(), np.float32)], axis=1)
    (s_ref, t_ref), *_ = np.linalg.lstsq(design, sub[1][keep], rcond=None)
    aligned, s, t = align_least_squares(pred, gt, mask, max_resolution=max_res)
    assert (s, t) == (float(s_ref), float(t_ref))
    assert np.array_equal(aligned, pred * np.float32(s_ref) + np.float32(t_ref))


def test_evaluate_depth_image_perfect_affine_prediction() -> None:
    rng = np.random.default_rng(1)
    gt = 1.0 + 9.0 * rng.random((30, 40))
    pred01 = (gt - gt.min()) / (gt.max() - gt.min())  # [0,1] relative depth like the engine
    m = evaluate_depth_image(pred01, gt, np.ones_like(gt, bool), min_depth=1e-3, max_depth=10.0)
    assert m["abs_relative_difference"] == pytest.approx(0.0, abs=1e-9)
    assert m["delta1_acc"] == 1.0 and m["rmse_linear"] == pytest.approx(0.0, abs=1e-8)


def test_evaluate_depth_image_clips_to_dataset_range() -> None:
    gt = np.array([[1.0, 2.0, 3.0, 20.0]])
    pred = np.array([[0.1, 0.2, 0.3, 2.0]])  # exactly gt / 10
    m = evaluate_depth_image(pred, gt, np.ones_like(gt, bool), min_depth=1e-3, max_depth=10.0)
    # aligned 20 m is clipped to 10 m: AbsRel = (10/20) / 4 pixels
    assert m["abs_relative_difference"] == pytest.approx(0.5 / 4)


def test_angular_errors_and_pooled_normal_metrics() -> None:
    gt = np.zeros((1, 4, 3))
    gt[..., 2] = 1.0
    pred = np.array([[[0, 0, 1], [0, 1, 1], [0, 1, 0], [0, 0, -1]]], dtype=float)  # 0, 45, 90, 180 deg
    err = angular_errors_deg(pred, gt, np.ones((1, 4), bool))
    assert np.allclose(err, [0.0, 45.0, 90.0, 180.0])
    m = normal_metrics(err)
    assert m["mean"] == pytest.approx(78.75) and m["median"] == pytest.approx(67.5)
    assert m["rmse"] == pytest.approx(math.sqrt((45**2 + 90**2 + 180**2) / 4))
    assert m["a11.25"] == pytest.approx(25.0) and m["a30"] == pytest.approx(25.0) and m["num_pixels"] == 4
    # no valid pixel at all: NaN like the official, not an exception
    empty = normal_metrics(np.array([], np.float32))
    assert empty["num_pixels"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["a11.25"])


def test_angular_errors_float32_and_unnormalised_gt() -> None:
    # DSINE's PNG ground truth is v/255*2-1, not unit length; cosine similarity makes that irrelevant.
    gt = np.float32([[[0.0, 0.0, 0.9], [1.0, 0.0, 0.0]]])
    pred = np.float32([[[0.0, 0.0, 1.0], [0.0, 0.6, 0.0]]])
    err = angular_errors_deg(pred, gt, np.ones((1, 2), bool))
    assert err.dtype == np.float32 and err.tolist() == pytest.approx([0.0, 90.0], abs=1e-5)


def test_pooled_normal_metrics_sum_like_numpy_1_26() -> None:
    # The official environment pins numpy 1.26.4, whose float32 sums go in 8192-element chunks; these values
    # were computed there (np.average and np.sqrt(np.sum(e * e) / n) of this exact array). numpy 2 and float64
    # give other last bits (numpy 2.4: mean 0x1.40996cp+4).
    e = np.random.default_rng(7).random(100_003, dtype=np.float32) * np.float32(40)
    m = normal_metrics(e)
    assert m["mean"] == float.fromhex("0x1.40996ap+4")
    assert m["rmse"] == float.fromhex("0x1.7216c5b4d3e6dp+4")
    assert m["median"] == float(np.median(e))
