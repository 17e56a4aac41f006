"""Geometric normals from back-projected depth follow the ROS optical frame convention (x right, y down, z forward)."""

from __future__ import annotations

import numpy as np
import pytest

from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.geometry.normals import normals_from_points

INTR = PinholeIntrinsics(fx=100.0, fy=100.0, cx=31.5, cy=23.5, width=64, height=48)


def _valid(n: np.ndarray) -> np.ndarray:
    return n[np.isfinite(n).all(axis=2)]


def test_wall_facing_camera_points_back() -> None:
    n = normals_from_points(backproject(np.full((48, 64), 3.0, np.float32), INTR))
    v = _valid(n)
    assert len(v) == 46 * 62
    np.testing.assert_allclose(v, np.tile([0.0, 0.0, -1.0], (len(v), 1)), atol=1e-5)


def test_floor_below_level_camera_points_up() -> None:
    # Floor plane Y = 1.2 m (y down): depth along each ray below the horizon is Z = 1.2 / ((v - cy) / fy).
    v = np.arange(48, dtype=np.float64)[:, None] - INTR.cy
    with np.errstate(divide="ignore"):
        depth = np.where(v > 0, 1.2 * INTR.fy / v, np.nan) * np.ones((1, 64))
    pts = backproject(depth.astype(np.float32), INTR)
    floor = pts[np.isfinite(pts).all(axis=2)]
    assert np.allclose(floor[:, 1], 1.2, atol=1e-4)
    n = _valid(normals_from_points(pts))
    assert len(n) > 500
    np.testing.assert_allclose(np.median(n, axis=0), [0.0, -1.0, 0.0], atol=1e-3)


def test_invalid_neighbours_give_nan() -> None:
    depth = np.full((48, 64), 2.0, np.float32)
    depth[20, 30] = np.nan
    n = normals_from_points(backproject(depth, INTR))
    assert np.isnan(n[19, 30]).all() and np.isnan(n[20, 31]).all()
    assert np.isfinite(n[10, 10]).all()
    with pytest.raises(ValueError, match="organized"):
        normals_from_points(np.zeros((4, 4)))
