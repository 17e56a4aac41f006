"""Sparse metric input from messages, for the node and ``geodiff_bag process`` alike: one edge conversion.

A sparse message is a depth Image of the same camera (``sparse_depth``: 32FC1 metres or 16UC1 millimetres, any
resolution of the same aspect ratio) or a PointCloud2 (``sparse_points``, e.g. a LiDAR) that is projected onto the
image grid through the camera's intrinsics (nearest point per pixel), after the extrinsic of its frame brings it
into the image's optical frame. Messages are duck-typed, so rclpy and rosbags messages both work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geodiff_ros.geometry import PinholeIntrinsics
from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.ros.conversions import ImageConversionError, depth_to_metres
from geodiff_ros.ros.pointcloud import PointCloudError, cloud_xyz, project_points_to_depth

__all__ = ["SparseUnusable", "sparse_metres"]


class SparseUnusable(Exception):
    """A matched sparse message cannot be used for this frame; the message says why and what to set or fix."""


def sparse_metres(kind: str, msg: Any, width: int, height: int, intr: PinholeIntrinsics | None,
                  extrinsic: RigidTransform | None) -> np.ndarray:
    """Sparse metres (NaN = none) of ``msg`` for a ``width x height`` image: a depth image on its own grid
    ``[h,w]`` (same aspect ratio; ``geometry.sparse_to_image_grid`` moves it onto the image grid), a cloud
    projected onto the image grid ``[H,W]``.

    Args:
        kind: ``"depth"`` (Image) or ``"points"`` (PointCloud2).
        intr: intrinsics of the image (a cloud needs them to be projected).
        extrinsic: ``p_optical = R p + t`` for a cloud's points (None: the cloud is in the image's optical frame).

    Raises:
        SparseUnusable: another aspect ratio, no camera model for a cloud, or an unreadable message.
    """
    if kind == "depth":
        # Same camera, any resolution: moved onto the image grid through the intrinsics ratio. Another aspect ratio
        # cannot be the same camera's image (it would pair pixels with the wrong depths).
        if msg.width and msg.height and abs(msg.width / msg.height - width / height) > 0.01 * width / height:
            msg_ = (f"sparse_depth is {msg.width}x{msg.height} but the image is {width}x{height} (another aspect "
                    "ratio): it must come from the same camera (register it to the camera first, e.g. "
                    "depth_image_proc register)")
            raise SparseUnusable(msg_)
        try:
            return depth_to_metres(msg)  # [h,w]
        except ImageConversionError as err:
            raise SparseUnusable(str(err)) from err
    if intr is None:
        raise SparseUnusable("sparse_points need a valid camera_info of the image to be projected")
    try:
        xyz = cloud_xyz(msg)  # [N,3] in the cloud's frame
    except PointCloudError as err:
        raise SparseUnusable(f"sparse_points: {err}") from err
    if extrinsic is not None:
        xyz = extrinsic.apply(xyz)  # [N,3] in the image's optical frame
    return project_points_to_depth(xyz, intr.fx, intr.fy, intr.cx, intr.cy, width, height)  # [H,W]
