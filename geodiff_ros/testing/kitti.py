"""KITTI object-detection calibration for tests: the Velodyne -> camera 2 extrinsic as tf2 would print it.

Used by the tests that put real Velodyne scans through ``RigidTransform`` (node parameter and bag option) and compare
with the dataset's own projection (``proj_depth_velodyne``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geodiff_ros.geometry.transform import RigidTransform

__all__ = ["kitti_velodyne_to_camera2"]


def _calib(path: Path) -> dict[str, np.ndarray]:
    rows = (line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    return {k: np.array([float(v) for v in rest.split()]) for k, rest in rows}


def kitti_velodyne_to_camera2(calib_file: Path) -> tuple[list[float], np.ndarray]:
    """``([x, y, z, qx, qy, qz, qw], P2 [3,4])``: Velodyne -> camera 2 through Tr_velo_to_cam, R0_rect and P2's
    baseline, as a quaternion + translation (the form of the node parameter and the bag option)."""
    from scipy.spatial.transform import Rotation

    cal = _calib(Path(calib_file))
    p2 = cal["P2"].reshape(3, 4)
    velo_to_cam0 = np.vstack([cal["Tr_velo_to_cam"].reshape(3, 4), [0, 0, 0, 1]])
    rect = np.eye(4)
    rect[:3, :3] = cal["R0_rect"].reshape(3, 3)
    cam0_to_cam2 = np.eye(4)
    cam0_to_cam2[:3, 3] = np.linalg.solve(p2[:, :3], p2[:, 3])  # P2 = K [I | t]
    matrix = cam0_to_cam2 @ rect @ velo_to_cam0  # [4,4] velodyne -> camera 2 (rectified, optical)
    rot = Rotation.from_matrix(matrix[:3, :3] / np.cbrt(np.linalg.det(matrix[:3, :3])))  # R0_rect: 1e-7 off
    pose = [*map(float, matrix[:3, 3]), *map(float, rot.as_quat())]
    RigidTransform(pose)  # a valid transform, or InvalidTransform here rather than in the test
    return pose, p2
