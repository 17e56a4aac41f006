"""Camera geometry for geodiff_ros: intrinsics, back-projection, metric alignment. Pure numpy, no ROS imports."""

from geodiff_ros.geometry.alignment import (
    AlignmentResult,
    AlignmentState,
    TemporalAligner,
    apply_alignment,
    fit_scale_shift,
    fit_scale_shift_points,
    sparse_to_image_grid,
)
from geodiff_ros.geometry.backproject import backproject, ray_grid
from geodiff_ros.geometry.camera import (
    InvalidCameraInfo,
    PinholeIntrinsics,
    intrinsics_from_camera_info,
    scale_intrinsics,
)
from geodiff_ros.geometry.normals import normals_from_points

__all__ = [
    "AlignmentResult",
    "AlignmentState",
    "InvalidCameraInfo",
    "PinholeIntrinsics",
    "TemporalAligner",
    "apply_alignment",
    "backproject",
    "fit_scale_shift",
    "fit_scale_shift_points",
    "intrinsics_from_camera_info",
    "normals_from_points",
    "ray_grid",
    "scale_intrinsics",
    "sparse_to_image_grid",
]
