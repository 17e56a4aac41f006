"""Which transform brings a sparse cloud into the image's optical frame: one rule for the node and the bag tool.

1. A cloud in the image's optical frame (or with either frame_id empty) is used as it is.
2. A cloud in ``sparse_points.frame_id`` goes through ``sparse_points.transform``: the static parameters are an
   explicit override (robots without TF, or a calibration that is not on TF) and win over TF.
3. Otherwise the transform comes from TF (the node's tf2 buffer, or the bag's /tf and /tf_static), looked up at the
   cloud's stamp.
4. No transform: the cloud is not used for this frame, and the message says what to publish or set.
"""

from __future__ import annotations

from collections.abc import Callable

from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.pipeline.settings import SparseConfig
from geodiff_ros.ros.sparse import SparseUnusable

__all__ = ["TransformLookup", "cloud_extrinsic", "missing_transform_advice"]

# (target frame, source frame, stamp ns) -> the pose of source in target, or None when unknown (with the reason)
TransformLookup = Callable[[str, str, int], "tuple[RigidTransform | None, str]"]


def missing_transform_advice(image_frame: str, cloud_frame: str) -> str:
    """What a user publishes or sets so that clouds in ``cloud_frame`` can be used with images in ``image_frame``."""
    return (f"publish the transform on TF (e.g. `ros2 run tf2_ros static_transform_publisher --x X --y Y --z Z "
            f"--qx QX --qy QY --qz QZ --qw QW --frame-id {image_frame} --child-frame-id {cloud_frame}`), or set "
            f"sparse_points.frame_id to {cloud_frame!r} and sparse_points.transform to its pose in the image frame "
            f"(x y z qx qy qz qw, as `ros2 run tf2_ros tf2_echo {image_frame} {cloud_frame}` prints it)")


def cloud_extrinsic(cloud_frame: str, image_frame: str, stamp_ns: int, config: SparseConfig,
                    lookup: TransformLookup | None, no_lookup: str = "no TF available") -> RigidTransform | None:
    """The transform of a cloud's points into the image's optical frame (None: they are in it already).

    ``no_lookup`` says why ``lookup`` is None (tf2_ros not installed, a bag without /tf).

    Raises:
        SparseUnusable: no transform is known (the message names both frames and what to publish or set).
    """
    if not cloud_frame or not image_frame or cloud_frame == image_frame:
        return None
    if config.frame_id and cloud_frame == config.frame_id:
        return config.extrinsic()
    why = no_lookup
    if lookup is not None:
        transform, why = lookup(image_frame, cloud_frame, stamp_ns)
        if transform is not None:
            return transform
    msg = (f"sparse_points are in frame {cloud_frame!r}, the image in {image_frame!r}, and no transform between "
           f"them is known ({why}): {missing_transform_advice(image_frame, cloud_frame)}")
    raise SparseUnusable(msg)
