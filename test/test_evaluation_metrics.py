"""Evaluation metrics against hand-computed values (spec C.1 depth, C.2 normals)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geodiff_ros.evaluation.metrics import (
    abs_relative_difference,
    align_least_squares,
    angular_errors_deg,
    delta1_acc,
    delta2_acc,
    delta3_acc,
    evaluate_depth_image,
    normal_metrics,
    rmse_linear,
    rmse_log,
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


def test_least_squares_alignment_recovers_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    rel = rng.random((40, 60))
    gt = 3.5 * rel + 0.7
    mask = rng.random((40, 60)) > 0.3
    gt_corrupt = np.where(mask, gt, 1e3)  # invalid pixels must not influence the fit
    aligned, s, t = align_least_squares(rel, gt_corrupt, mask)
    assert s == pytest.approx(3.5) and t == pytest.approx(0.7)
    assert np.allclose(aligned[mask], gt[mask])
    # ETH3D path: fit on a nearest-downsampled copy (max side 16), applied at full resolution.
    _, s2, t2 = align_least_squares(rel, gt_corrupt, mask, max_resolution=16)
    assert s2 == pytest.approx(3.5) and t2 == pytest.approx(0.7)


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
    with pytest.raises(ValueError, match="no valid"):
        normal_metrics(np.array([]))
