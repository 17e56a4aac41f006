"""Back-projection equals depth_image_proc's point_cloud_xyz formula, incl. on real KITTI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from geodiff_ros.geometry import (
    PinholeIntrinsics,
    backproject,
    intrinsics_from_camera_info,
)

INTR = PinholeIntrinsics(fx=50.0, fy=40.0, cx=7.3, cy=5.1, width=16, height=12)


def _shared_data() -> Path:
    env = os.environ.get("GEODIFF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _loop_reference(depth: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Per-pixel loop as in depth_image_proc's convertDepth (float depth, invalid -> NaN)."""
    h, w = depth.shape
    out = np.full((h, w, 3), np.nan)
    for v in range(h):
        for u in range(w):
            z = float(depth[v, u])
            if np.isfinite(z) and z > 0:
                out[v, u] = ((u - cx) * z / fx, (v - cy) * z / fy, z)
    return out


def _random_depth(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.2, 10.0, (INTR.height, INTR.width)).astype(np.float32)
    depth[0, 0] = np.nan
    depth[3, 4] = 0.0
    depth[5, 9] = -1.0
    depth[7, 2] = np.inf
    return depth


def test_hand_formula_single_pixel() -> None:
    depth = np.full((12, 16), 2.0, np.float32)
    pts = backproject(depth, INTR)
    assert pts.shape == (12, 16, 3)
    assert pts.dtype == np.float32
    np.testing.assert_allclose(pts[9, 14], [(14 - 7.3) * 2.0 / 50.0, (9 - 5.1) * 2.0 / 40.0, 2.0], rtol=1e-6)


def test_matches_per_pixel_loop_and_nans_invalid() -> None:
    depth = _random_depth()
    pts = backproject(depth, INTR)
    ref = _loop_reference(depth, INTR.fx, INTR.fy, INTR.cx, INTR.cy)
    np.testing.assert_allclose(pts, ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    for v, u in [(0, 0), (3, 4), (5, 9), (7, 2)]:
        assert np.isnan(pts[v, u]).all(), (v, u)
    assert np.isfinite(pts).all(axis=2).sum() == depth.size - 4


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_stride_picks_full_cloud_points(stride: int) -> None:
    depth = _random_depth(1)
    full = backproject(depth, INTR)
    strided = backproject(depth, INTR, stride=stride)
    assert strided.shape == (len(range(0, 12, stride)), len(range(0, 16, stride)), 3)
    np.testing.assert_array_equal(strided, full[::stride, ::stride])


def test_binned_roi_camera_info_matches_loop() -> None:
    k = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]
    p = [480.0, 0.0, 310.0, 0.0, 0.0, 482.0, 250.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    intr = intrinsics_from_camera_info(
        k, p, 640, 480, binning_x=2, binning_y=2, roi_x_offset=100, roi_y_offset=60, roi_width=64, roi_height=48
    )
    depth = np.random.default_rng(2).uniform(0.5, 5.0, (intr.height, intr.width)).astype(np.float32)
    ref = _loop_reference(depth, 240.0, 241.0, 105.0, 95.0)
    np.testing.assert_allclose(backproject(depth, intr), ref, rtol=1e-6, atol=1e-6)


def test_shape_mismatch_names_the_fix() -> None:
    with pytest.raises(ValueError, match="scale_intrinsics"):
        backproject(np.ones((10, 16), np.float32), INTR)
    with pytest.raises(ValueError, match="stride"):
        backproject(np.ones((12, 16), np.float32), INTR, stride=0)


def test_kitti_road_plane_at_camera_height() -> None:
    """Road points below the camera near the bottom centre lie ~1.65 m down (KITTI camera height)."""
    data = _shared_data()
    manifest = data / "manifest.json"
    if not manifest.is_file():
        pytest.skip(f"real data not found at {data} (set GEODIFF_SHARED_DATA)")
    from PIL import Image

    entries = [e for e in json.loads(manifest.read_text()) if e["set"] == "kitti_object_lidar"]
    assert entries
    heights = []
    for e in entries:
        depth = np.asarray(Image.open(data / e["depth"]), dtype=np.float32) / e["depth_scale"]
        depth[depth == 0] = np.nan
        i = e["intrinsics"]
        intr = PinholeIntrinsics(i["fx"], i["fy"], i["cx"], i["cy"], e["width"], e["height"])
        assert depth.shape == (intr.height, intr.width)
        pts = backproject(depth, intr)
        h, w = depth.shape
        # Bottom quarter of the image, middle third of the columns: road in front of the car (5-20 m ahead).
        patch = pts[3 * h // 4 :, w // 3 : 2 * w // 3].reshape(-1, 3)
        patch = patch[np.isfinite(patch).all(axis=1)]
        road = patch[(patch[:, 1] > 1.0) & (patch[:, 1] < 2.5) & (patch[:, 2] < 20.0)]
        assert len(road) > 200, e["depth"]
        heights.append(float(np.median(road[:, 1])))
    # Per frame the road tilts a little (frame 000000 gives 1.51 m, 000002 1.73 m); the mean is tighter.
    assert heights == pytest.approx([1.65] * len(heights), abs=0.15), heights
    assert np.mean(heights) == pytest.approx(1.65, abs=0.05), heights
