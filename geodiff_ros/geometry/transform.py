"""A static rigid transform for sparse points: LiDAR points into the camera optical frame before projection.

The transform is given as tf2 prints it (``ros2 run tf2_ros tf2_echo <camera optical frame> <lidar frame>``):
translation x, y, z in metres and rotation as a quaternion qx, qy, qz, qw, the pose of the points' frame in the
camera frame, so ``p_camera = R @ p_points + t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["InvalidTransform", "RigidTransform"]


class InvalidTransform(ValueError):
    """The seven numbers do not describe a rigid transform."""


class RigidTransform:
    """``p_out = R @ p_in + t`` from ``[x, y, z, qx, qy, qz, qw]`` (the quaternion is normalised)."""

    def __init__(self, values: Sequence[float]) -> None:
        values = [float(v) for v in values]
        if len(values) != 7 or not all(math.isfinite(v) for v in values):
            raise InvalidTransform(f"a transform is 7 finite numbers [x, y, z, qx, qy, qz, qw], got {values}")
        q = np.asarray(values[3:], np.float64)
        norm = float(np.linalg.norm(q))
        if norm < 1e-6:
            raise InvalidTransform(f"quaternion {values[3:]} has zero length; a transform is [x, y, z, qx, qy, qz, "
                                   "qw], the identity [0, 0, 0, 0, 0, 0, 1]")
        x, y, z, w = q / norm
        self.rotation = np.array([  # [3,3]
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
        self.translation = np.asarray(values[:3], np.float64)  # [3]

    def apply(self, xyz: np.ndarray) -> np.ndarray:
        """``[N,3]`` points -> ``[N,3]`` float64 points in the target frame (NaN rows stay NaN)."""
        pts = np.asarray(xyz, np.float64).reshape(-1, 3)
        return pts @ self.rotation.T + self.translation
