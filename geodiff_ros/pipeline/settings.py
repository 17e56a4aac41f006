"""The per-frame settings of the pipeline: their table (names, defaults, ranges) and one config object per concern.

``FRAME_PARAMS`` is the part of the node's parameter table (``geodiff_ros.ros.params.PARAMS``) that the frame
pipeline reads: metric alignment, depth limits and encoding, the point cloud, the sparse LiDAR extrinsic. The node
declares them as ROS parameters and ``geodiff_bag process`` generates its options from them, so both take the same
names, defaults and ranges, and both build the same config objects from them (``*.from_values``): offline and live
results cannot drift through their settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from geodiff_ros.geometry.alignment import TemporalAligner
from geodiff_ros.geometry.transform import InvalidTransform, RigidTransform

__all__ = [
    "FRAME_PARAMS",
    "AlignmentConfig",
    "OutputConfig",
    "ParamSpec",
    "SparseConfig",
    "depth_range_problem",
    "frame_defaults",
    "value_problem",
]


@dataclass(frozen=True)
class ParamSpec:
    """One setting: the default fixes its type; ``lo/hi`` give an inclusive numeric range; ``choices`` the allowed
    strings (for a list, of each element)."""

    name: str
    default: Any
    description: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    configure_time: bool = False  # node only: settable while unconfigured (engine / endpoints are built from it)


IDENTITY_TRANSFORM = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]

FRAME_PARAMS: tuple[ParamSpec, ...] = (
    # --- point cloud ---
    ParamSpec("publish_cloud", True, "Publish the points cloud (the node builds it only while someone subscribes)."),
    ParamSpec("cloud_stride", 1, "Keep every n-th pixel in x and y for the organized cloud.", lo=1, hi=64),
    ParamSpec("cloud_color", True, "Add the packed rgb field from the input image."),
    ParamSpec("cloud_normals", True, "Add normal_x/y/z fields when normals are predicted."),
    # --- metric alignment ---
    ParamSpec("alignment.method", "ransac", "Robust scale-and-shift fit to the sparse depth.",
              choices=("ransac", "irls", "lsq")),
    ParamSpec("alignment.min_points", 20, "Fewest valid sparse points for a fit.", lo=3, hi=10_000_000),
    ParamSpec("alignment.min_inlier_ratio", 0.3, "Fewest inliers (fraction of valid points) for a fit.",
              lo=0.0, hi=1.0),
    ParamSpec("alignment.inlier_threshold_rel", 0.1, "Inlier when |aligned - sparse| / sparse is below this.",
              lo=0.001, hi=10.0),
    ParamSpec("alignment.ema_alpha", 0.3, "Temporal smoothing weight of a new fit (1 = no smoothing).",
              lo=0.0, hi=1.0),
    ParamSpec("alignment.max_fallback_age_s", 2.0,
              "Reuse the last good fit for at most this long without a new one; then no metric output.",
              lo=0.0, hi=3600.0),
    ParamSpec("alignment.reset_ratio", 1.5,
              "A new fit whose scale differs from the smoothed one by more than this factor restarts smoothing.",
              lo=1.01, hi=100.0),
    ParamSpec("alignment.sparse_max_dt", 0.1,
              "Largest stamp difference in seconds between an image and the sparse depth matched to it.",
              lo=0.0, hi=10.0),
    ParamSpec("sparse_points.frame_id", "",
              "Frame of sparse_points clouds that sparse_points.transform maps into the image's optical frame "
              "(e.g. velodyne); empty: clouds must already be in the image frame."),
    ParamSpec("sparse_points.transform", IDENTITY_TRANSFORM,
              "Static extrinsic [x, y, z, qx, qy, qz, qw]: the pose of sparse_points.frame_id in the image's "
              "optical frame, as `ros2 run tf2_ros tf2_echo <image frame> <cloud frame>` prints it."),
    ParamSpec("alignment.fixed_scale", 0.0,
              "If > 0: metric depth = fixed_scale * relative for frames without a metric fit (no sparse input, or "
              "none usable for alignment.max_fallback_age_s); you vouch for the scale. A fit to sparse input, when "
              "there is one, wins.",
              lo=0.0, hi=100000.0),
    ParamSpec("min_depth", 0.1, "Metric depth below this is published as NaN (metres).", lo=0.0, hi=100000.0),
    ParamSpec("max_depth", 100.0, "Metric depth above this is published as NaN (metres).", lo=0.0, hi=100000.0),
    ParamSpec("depth_encoding", "32FC1",
              "Encoding of depth/image (REP 118): 32FC1 metres, NaN = invalid; 16UC1 millimetres, 0 = invalid "
              "(depth beyond 65.535 m is 0 too, never clipped), for consumers that take only 16-bit depth.",
              choices=("32FC1", "16UC1")),
)

_BY_NAME = {p.name: p for p in FRAME_PARAMS}


def frame_defaults() -> dict[str, Any]:
    """name -> default of every per-frame setting."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in FRAME_PARAMS}


def value_problem(spec: ParamSpec, value: Any) -> str | None:
    """Why ``value`` is invalid for ``spec`` (range, choices, and the rules of the per-frame settings), or None."""
    if spec.lo is not None and spec.hi is not None and not isinstance(value, bool):
        if not spec.lo <= value <= spec.hi:
            return f"{spec.name}={value!r} is outside [{spec.lo:g}, {spec.hi:g}]"
    if spec.choices:
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in spec.choices]
        if bad:
            return f"{spec.name}={value!r}: {bad[0]!r} is not one of {', '.join(spec.choices)}"
    if spec.name == "sparse_points.transform":
        try:
            RigidTransform(list(value))
        except (InvalidTransform, TypeError, ValueError) as err:
            return f"sparse_points.transform: {err}"
    if spec.name == "alignment.ema_alpha" and float(value) <= 0.0:
        return "alignment.ema_alpha must be > 0 (0 would never take a new fit); use 1 for no smoothing"
    return None


def depth_range_problem(min_depth: float, max_depth: float, where: str = "") -> str | None:
    """Why ``(min_depth, max_depth)`` is not a usable depth range (every metric pixel would be NaN), or None."""
    if float(min_depth) >= float(max_depth):
        return f"{where}min_depth ({min_depth}) must be smaller than max_depth ({max_depth})"
    return None


@dataclass(frozen=True)
class AlignmentConfig:
    """How relative depth becomes metric: the robust fit to sparse depth, its temporal smoothing, the depth range."""

    method: str = "ransac"
    min_points: int = 20
    min_inlier_ratio: float = 0.3
    inlier_threshold_rel: float = 0.1
    ema_alpha: float = 0.3
    max_fallback_age_s: float = 2.0
    reset_ratio: float = 1.5
    sparse_max_dt: float = 0.1
    fixed_scale: float = 0.0  # > 0: metric = fixed_scale x relative for frames without a fit
    min_depth: float = 0.1
    max_depth: float = 100.0

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AlignmentConfig:
        """From parameter-table names (``alignment.method``, ``min_depth``, ...); missing ones take the default."""
        v = {**frame_defaults(), **values}
        return cls(method=str(v["alignment.method"]), min_points=int(v["alignment.min_points"]),
                   min_inlier_ratio=float(v["alignment.min_inlier_ratio"]),
                   inlier_threshold_rel=float(v["alignment.inlier_threshold_rel"]),
                   ema_alpha=float(v["alignment.ema_alpha"]),
                   max_fallback_age_s=float(v["alignment.max_fallback_age_s"]),
                   reset_ratio=float(v["alignment.reset_ratio"]), sparse_max_dt=float(v["alignment.sparse_max_dt"]),
                   fixed_scale=float(v["alignment.fixed_scale"]), min_depth=float(v["min_depth"]),
                   max_depth=float(v["max_depth"]))

    @property
    def depth_range(self) -> tuple[float, float]:
        return self.min_depth, self.max_depth

    def make_aligner(self) -> TemporalAligner:
        fixed = self.fixed_scale if self.fixed_scale > 0 and math.isfinite(self.fixed_scale) else None
        return TemporalAligner(ema_alpha=self.ema_alpha, max_fallback_age_s=self.max_fallback_age_s,
                               reset_ratio=self.reset_ratio, fixed_scale=fixed)


@dataclass(frozen=True)
class OutputConfig:
    """What a frame produces besides the relative depth and normals, and in which form."""

    depth_encoding: str = "32FC1"  # 32FC1 metres (NaN invalid) or 16UC1 millimetres (0 invalid)
    cloud: bool = True
    cloud_stride: int = 1
    cloud_color: bool = True
    cloud_normals: bool = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> OutputConfig:
        v = {**frame_defaults(), **values}
        return cls(depth_encoding=str(v["depth_encoding"]), cloud=bool(v["publish_cloud"]),
                   cloud_stride=int(v["cloud_stride"]), cloud_color=bool(v["cloud_color"]),
                   cloud_normals=bool(v["cloud_normals"]))

    def cloud_fields(self, with_normals: bool) -> list[str]:
        """PointCloud2 field names of the cloud, in the order ``geometry.device.cloud_points`` packs them."""
        names = ["x", "y", "z"]
        if self.cloud_color:
            names.append("rgb")
        if with_normals and self.cloud_normals:
            names += ["normal_x", "normal_y", "normal_z"]
        return names


@dataclass(frozen=True)
class SparseConfig:
    """Where sparse LiDAR clouds are: a static extrinsic of ``frame_id`` in the image's optical frame."""

    frame_id: str = ""
    transform: tuple[float, ...] = tuple(IDENTITY_TRANSFORM)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> SparseConfig:
        v = {**frame_defaults(), **values}
        return cls(frame_id=str(v["sparse_points.frame_id"]),
                   transform=tuple(float(x) for x in v["sparse_points.transform"]))

    def extrinsic(self) -> RigidTransform:
        return RigidTransform(list(self.transform))
