"""CameraInfo -> intrinsics with image_geometry semantics (P, ROI, binning), and intrinsics scaling."""

from __future__ import annotations

import math

import pytest

from geodiff_ros.geometry import (
    InvalidCameraInfo,
    PinholeIntrinsics,
    intrinsics_from_camera_info,
    scale_intrinsics,
)

# K of the raw image differs from P on purpose, so a test notices which one is read.
K = [500.0, 0.0, 320.0, 0.0, 505.0, 240.0, 0.0, 0.0, 1.0]
P = [480.0, 0.0, 310.0, 0.0, 0.0, 482.0, 250.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_reads_p_not_k() -> None:
    intr = intrinsics_from_camera_info(K, P, 640, 480)
    assert intr == PinholeIntrinsics(fx=480.0, fy=482.0, cx=310.0, cy=250.0, width=640, height=480)


def test_binning_zero_means_one() -> None:
    assert intrinsics_from_camera_info(K, P, 640, 480, binning_x=0, binning_y=0) == intrinsics_from_camera_info(
        K, P, 640, 480, binning_x=1, binning_y=1
    )


def test_binning_and_roi() -> None:
    # ROI 400x300 at (100, 60), binned 2x2 -> a 200x150 image.
    intr = intrinsics_from_camera_info(
        K, P, 640, 480, binning_x=2, binning_y=2, roi_x_offset=100, roi_y_offset=60, roi_width=400, roi_height=300
    )
    assert intr.fx == pytest.approx(240.0)
    assert intr.fy == pytest.approx(241.0)
    assert intr.cx == pytest.approx((310.0 - 100) / 2)
    assert intr.cy == pytest.approx((250.0 - 60) / 2)
    assert (intr.width, intr.height) == (200, 150)


def test_anisotropic_binning_without_roi() -> None:
    intr = intrinsics_from_camera_info(K, P, 640, 480, binning_x=4, binning_y=2)
    assert (intr.fx, intr.cx, intr.width) == (120.0, 77.5, 160)
    assert (intr.fy, intr.cy, intr.height) == (241.0, 125.0, 240)


def test_unset_p_falls_back_to_k() -> None:
    unset_p = [0.0] * 10 + [1.0, 0.0]
    intr = intrinsics_from_camera_info(K, unset_p, 640, 480)
    assert (intr.fx, intr.fy, intr.cx, intr.cy) == (500.0, 505.0, 320.0, 240.0)


@pytest.mark.parametrize(
    ("k", "p", "match"),
    [
        ([0.0] * 9, [0.0] * 12, "uncalibrated"),
        ([0.0] * 8 + [1.0], [0.0] * 12, "uncalibrated"),
        (K, [math.nan, *P[1:]], "non-finite"),
        ([*K[:4], math.inf, *K[5:]], P, "non-finite"),
        (K, [-480.0, *P[1:]], "must be > 0"),
        (K, [*P[:5], 0.0, *P[6:]], "must be > 0"),
        (K[:8], P, "expected 9"),
    ],
)
def test_invalid_camera_info(k: list[float], p: list[float], match: str) -> None:
    with pytest.raises(InvalidCameraInfo, match=match) as info:
        intrinsics_from_camera_info(k, p, 640, 480)
    assert isinstance(info.value, ValueError)


def test_invalid_size_and_roi() -> None:
    with pytest.raises(InvalidCameraInfo, match="image size"):
        intrinsics_from_camera_info(K, P, 0, 480)
    with pytest.raises(InvalidCameraInfo, match="ROI"):
        intrinsics_from_camera_info(K, P, 640, 480, roi_x_offset=300, roi_width=400, roi_height=100)


def test_scale_intrinsics_per_axis() -> None:
    intr = PinholeIntrinsics(fx=480.0, fy=482.0, cx=310.0, cy=250.0, width=640, height=480)
    half = scale_intrinsics(intr, 320, 120)  # x by 1/2, y by 1/4
    assert (half.fx, half.cx) == (240.0, 155.0)
    assert (half.fy, half.cy) == (120.5, 62.5)
    assert (half.width, half.height) == (320, 120)
    centre = scale_intrinsics(intr, 320, 240, half_pixel=True)
    assert centre.cx == pytest.approx((310.0 + 0.5) / 2 - 0.5)
    # A round trip returns the original model in both conventions.
    for hp in (False, True):
        back = scale_intrinsics(scale_intrinsics(intr, 1000, 700, half_pixel=hp), 640, 480, half_pixel=hp)
        assert back.cx == pytest.approx(intr.cx)
        assert back.fy == pytest.approx(intr.fy)
