"""Sparse LiDAR points in their own frame: the static extrinsic (sparse_points.transform) that brings them into the
camera optical frame before projection, checked on real KITTI Velodyne scans against the dataset's calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from scipy.spatial.transform import Rotation

from geodiff_ros.geometry.transform import InvalidTransform, RigidTransform
from geodiff_ros.ros.pointcloud import project_points_to_depth
from geodiff_ros.testing.kitti import kitti_velodyne_to_camera2


def test_quaternion_convention_is_tf2s() -> None:
    """[x, y, z, qx, qy, qz, qw] as tf2_echo prints it: 90 deg about z maps x to y, then the translation."""
    half = math.pi / 4
    t = RigidTransform([1.0, 2.0, 3.0, 0.0, 0.0, math.sin(half), math.cos(half)])
    np.testing.assert_allclose(t.apply(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])),
                               [[1.0, 3.0, 3.0], [1.0, 2.0, 4.0]], atol=1e-12)
    q = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_quat()  # scipy: x, y, z, w as tf2
    rot = RigidTransform([0.0, 0.0, 0.0, *(2.0 * q)])  # not normalised: normalised on the way in
    np.testing.assert_allclose(rot.rotation, Rotation.from_quat(q).as_matrix(), atol=1e-12)
    points = np.array([[1.5, -2.0, 7.0], [np.nan, 0.0, 1.0]])
    moved = RigidTransform([0, 0, 0, 0, 0, 0, 1]).apply(points)
    np.testing.assert_array_equal(moved[0], points[0])
    assert np.isnan(moved[1]).all()  # a row with NaN stays invalid (projection drops it)


@pytest.mark.parametrize("values", [[0.0] * 7, [0.0] * 6, [0, 0, 0, 0, 0, 0, math.nan]])
def test_bad_transforms_say_what_a_transform_is(values: list[float]) -> None:
    with pytest.raises(InvalidTransform, match=r"\[x, y, z, qx, qy, qz, qw\]"):
        RigidTransform(values)


@pytest.mark.parametrize("frame", ["000114", "000000"])
def test_kitti_velodyne_through_the_extrinsic_lands_on_the_datasets_projection(shared_data: Path,
                                                                              frame: str) -> None:
    """Velodyne points -> camera 2 through Tr_velo_to_cam, R0_rect and P2's baseline, given to RigidTransform as
    tf2 would print it (quaternion + translation), projected with P2's intrinsics: the same sparse depth as the
    dataset's own projection (``proj_depth_velodyne``, P2 R0_rect Tr_velo_to_cam, nearest point kept)."""
    root = shared_data / "outdoor" / "kitti_object_lidar"
    pose, p2 = kitti_velodyne_to_camera2(root / "calib" / f"{frame}.txt")
    extrinsic = RigidTransform(pose)

    scan = np.fromfile(root / "velodyne" / f"{frame}.bin", np.float32).reshape(-1, 4)[:, :3]  # [N,3] velodyne
    expected = np.asarray(PILImage.open(root / "proj_depth_velodyne" / f"{frame}.png"), np.float64) / 256.0
    height, width = expected.shape
    depth = project_points_to_depth(extrinsic.apply(scan), p2[0, 0], p2[1, 1], p2[0, 2], p2[1, 2], width, height)

    # The dataset's projection sits one pixel up and left of round(u), round(v) (KITTI devkit's 1-based pixel
    # indices stored 0-based): compare depth[v, u] with expected[v - 1, u - 1].
    depth, expected = depth[1:, 1:], expected[:-1, :-1]
    ours, theirs = np.isfinite(depth) & (depth > 0), expected > 0
    both = ours & theirs
    assert theirs.sum() > 5000 and both.sum() >= 0.97 * theirs.sum(), (both.sum(), theirs.sum(), ours.sum())
    assert ours.sum() <= 1.03 * theirs.sum()
    close = np.abs(depth[both] - expected[both]) <= 1.0 / 256.0 + 1e-3
    assert close.mean() >= 0.99, np.abs(depth[both] - expected[both]).max()
    # without the extrinsic the Velodyne frame (x forward, z up) projects nowhere near
    raw = project_points_to_depth(scan, p2[0, 0], p2[1, 1], p2[0, 2], p2[1, 2], width, height)
    assert (np.isfinite(raw[1:, 1:]) & theirs).sum() < 0.5 * theirs.sum()
