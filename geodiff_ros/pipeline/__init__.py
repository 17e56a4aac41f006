"""The per-frame pipeline after the engine, ROS-free: one home for what the node and the bag tool compute per frame.

- settings.py: the per-frame settings' table (``FRAME_PARAMS``) and config objects (alignment, outputs, sparse
  extrinsic), built from parameter-table names by the node and by ``geodiff_bag process`` alike
- matcher.py: the stamp matcher pairing an image with its CameraInfo and sparse depth
- frame.py: ``FrameProcessor``: metric fit and its temporal state, metric depth, colour views, cloud
"""

from geodiff_ros.pipeline.frame import AlignmentInfo, FrameProcessor, FrameResult, Wanted
from geodiff_ros.pipeline.matcher import StampMatcher
from geodiff_ros.pipeline.settings import (
    FRAME_PARAMS,
    AlignmentConfig,
    OutputConfig,
    ParamSpec,
    SparseConfig,
    depth_range_problem,
    frame_defaults,
    value_problem,
)

__all__ = [
    "FRAME_PARAMS",
    "AlignmentConfig",
    "AlignmentInfo",
    "FrameProcessor",
    "FrameResult",
    "OutputConfig",
    "ParamSpec",
    "SparseConfig",
    "StampMatcher",
    "Wanted",
    "depth_range_problem",
    "frame_defaults",
    "value_problem",
]
