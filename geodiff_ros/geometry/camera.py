"""Pinhole intrinsics from ``sensor_msgs/CameraInfo`` fields, with image_geometry semantics.

No ROS import: the ROS layer passes the message's ``k``, ``p``, binning and ROI fields as plain numbers, so the
same code serves the node, the evaluation scripts and the tests.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidCameraInfo",
    "PinholeIntrinsics",
    "intrinsics_from_camera_info",
    "scale_intrinsics",
]


class _KFallbackWarnings:
    """Warn once per K about the missing P, but bounded: a K that changes every frame (a
    broken driver, a zoom lens) used to grow an unbounded set (200k K values: 74 MB) and log every frame. Now the
    last ``size`` K values are remembered and at most one warning is logged per ``period_s``."""

    def __init__(self, size: int = 64, period_s: float = 30.0) -> None:
        self.size, self.period_s = size, period_s
        self._seen: collections.OrderedDict[tuple[float, ...], None] = collections.OrderedDict()
        self._last = -math.inf
        self._lock = threading.Lock()  # several cameras' CameraInfo can arrive on several threads

    def should_warn(self, k: tuple[float, ...]) -> bool:
        with self._lock:
            if k in self._seen:
                self._seen.move_to_end(k)
                return False
            now = time.monotonic()
            if now - self._last < self.period_s:
                return False  # not remembered: it may warn once the period is over
            self._last = now
            self._seen[k] = None
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return True


_k_fallback_warnings = _KFallbackWarnings()


class InvalidCameraInfo(ValueError):
    """CameraInfo that cannot back-project (uncalibrated, non-finite or non-positive focal length)."""


@dataclass(frozen=True)
class PinholeIntrinsics:
    """Rectified pinhole model of the image the depth lives on.

    ``fx, fy`` focal lengths and ``cx, cy`` principal point in pixels, in the ROS convention that pixel ``(u, v)``
    (integer column/row index) sits at coordinate ``(u, v)`` -- the one depth_image_proc uses for
    ``X = (u - cx) * Z / fx``. ``width``/``height`` are the size of that image. Frozen, hence hashable: it keys
    the ray-grid cache of :func:`geodiff_ros.geometry.backproject.backproject`.
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        """Reject models that would produce inf/NaN rays instead of failing later, per frame."""
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            if not math.isfinite(value):
                msg = f"`{name}` is {value}; intrinsics must be finite (check the CameraInfo publisher's calibration)"
                raise InvalidCameraInfo(msg)
        if self.fx <= 0 or self.fy <= 0:
            msg = (
                f"focal length fx={self.fx}, fy={self.fy} must be > 0; calibrate the camera "
                "(e.g. `ros2 run camera_calibration cameracalibrator`) or publish a CameraInfo with P/K filled in"
            )
            raise InvalidCameraInfo(msg)
        if self.width <= 0 or self.height <= 0:
            msg = f"image size {self.width}x{self.height} must be positive; set CameraInfo width/height"
            raise InvalidCameraInfo(msg)

    def as_k(self) -> tuple[float, ...]:
        """Row-major 3x3 camera matrix, e.g. to fill ``CameraInfo.k`` of an output image."""
        return (self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0)

    def as_p(self) -> tuple[float, ...]:
        """Row-major 3x4 projection matrix without a stereo baseline, e.g. for ``CameraInfo.p``."""
        return (self.fx, 0.0, self.cx, 0.0, 0.0, self.fy, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0)


def _check_len(name: str, values: Sequence[float], n: int) -> tuple[float, ...]:
    if len(values) != n:
        msg = f"CameraInfo `{name}` has {len(values)} entries, expected {n} (row-major {name.upper()} matrix)"
        raise InvalidCameraInfo(msg)
    out = tuple(float(v) for v in values)
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        msg = f"CameraInfo `{name}` contains non-finite values {bad}; fix the calibration file of the camera driver"
        raise InvalidCameraInfo(msg)
    return out


def intrinsics_from_camera_info(
    k: Sequence[float],
    p: Sequence[float],
    width: int,
    height: int,
    binning_x: int = 0,
    binning_y: int = 0,
    roi_x_offset: int = 0,
    roi_y_offset: int = 0,
    roi_width: int = 0,
    roi_height: int = 0,
    warn: Callable[[str], None] | None = None,
) -> PinholeIntrinsics:
    """Intrinsics of the image that comes with this CameraInfo, as image_geometry computes them.

    image_geometry's ``PinholeCameraModel`` (C++ and Python) reads ``fx, fy, cx, cy`` from **P** (the rectified
    projection), not K; subtracts the ROI offset from the principal point; and divides focal length and principal
    point by the binning (0 means 1). The image the numbers refer to is the binned ROI: ``roi_width // binning_x``
    by ``roi_height // binning_y``, where an all-zero ROI means the full ``width x height``.

    Decision on an unset P (``P[0] == 0``) with a valid K: we fall back to K and warn once per K (at most one per
    30 s), through ``warn`` when given (the node passes its ROS logger, so the warning reaches /rosout), else
    through this module's Python logger.
    image_geometry would return fx = 0 and depth_image_proc would then emit inf/NaN clouds; many simulators and
    hand-written CameraInfos fill only K, and for a monocular camera without rectification P[:3,:3] equals K
    anyway. K describes the *raw* (distorted) image, so the cloud then carries the lens distortion error; rectify
    upstream (image_proc) to avoid it.

    Raises:
        InvalidCameraInfo: uncalibrated (``P[0] == 0`` and ``K[0] == 0``), non-finite entries, non-positive
            focal length, or an image size of zero.
    """
    k_vals = _check_len("k", k, 9)
    p_vals = _check_len("p", p, 12)
    if width <= 0 or height <= 0:
        msg = f"CameraInfo width x height = {width}x{height}; the camera driver must set the image size"
        raise InvalidCameraInfo(msg)

    # image_geometry's uncalibrated test is K[0] == 0; a P with P[0] == 0 (often all zero but P[10] = 1) is unset.
    if p_vals[0] != 0.0:
        fx, cx, fy, cy = p_vals[0], p_vals[2], p_vals[5], p_vals[6]
    elif k_vals[0] != 0.0:
        fx, cx, fy, cy = k_vals[0], k_vals[2], k_vals[4], k_vals[5]
        if _k_fallback_warnings.should_warn(k_vals):
            (warn or logger.warning)(
                "CameraInfo P is unset (P[0] == 0); using K instead (raw, possibly distorted image). "
                "Publish a rectified P (camera_calibration fills it) to silence this."
            )
    else:
        msg = (
            "CameraInfo is uncalibrated (K[0] and P[0] are zero); calibrate the camera "
            "(`ros2 run camera_calibration cameracalibrator`) or set `camera_info_url` of the driver"
        )
        raise InvalidCameraInfo(msg)

    bx = binning_x if binning_x > 0 else 1
    by = binning_y if binning_y > 0 else 1
    full_roi = roi_x_offset == 0 and roi_y_offset == 0 and roi_width == 0 and roi_height == 0
    roi_w = width if full_roi or roi_width == 0 else roi_width
    roi_h = height if full_roi or roi_height == 0 else roi_height
    if roi_x_offset < 0 or roi_y_offset < 0 or roi_x_offset + roi_w > width or roi_y_offset + roi_h > height:
        msg = (
            f"CameraInfo ROI (x={roi_x_offset}, y={roi_y_offset}, w={roi_w}, h={roi_h}) lies outside the "
            f"{width}x{height} image; fix the driver's ROI settings"
        )
        raise InvalidCameraInfo(msg)

    return PinholeIntrinsics(
        fx=fx / bx,
        fy=fy / by,
        cx=(cx - roi_x_offset) / bx,
        cy=(cy - roi_y_offset) / by,
        width=roi_w // bx,
        height=roi_h // by,
    )


def scale_intrinsics(
    intr: PinholeIntrinsics, new_width: int, new_height: int, *, half_pixel: bool = False
) -> PinholeIntrinsics:
    """Intrinsics of the same camera after resizing its image to ``new_width x new_height``.

    Default (``half_pixel=False``): ``fx, cx`` scale by ``new_w / w`` and ``fy, cy`` by ``new_h / h`` -- what
    depth_image_proc's xyzrgb path and Isaac ROS ResizeNode write into the resized CameraInfo, so our published
    ``depth/camera_info`` agrees with theirs. It treats pixel *indices* as coordinates; the exact map for an
    area/bilinear resize with pixel centres at ``i + 0.5`` is ``c' = (c + 0.5) * s - 0.5``, selected by
    ``half_pixel=True``. The two differ by ``0.5 * |s - 1|`` pixel in the principal point.
    """
    if new_width <= 0 or new_height <= 0:
        msg = f"target size {new_width}x{new_height} must be positive"
        raise ValueError(msg)
    sx = new_width / intr.width
    sy = new_height / intr.height
    if half_pixel:
        cx = (intr.cx + 0.5) * sx - 0.5
        cy = (intr.cy + 0.5) * sy - 0.5
    else:
        cx = intr.cx * sx
        cy = intr.cy * sy
    return PinholeIntrinsics(
        fx=intr.fx * sx, fy=intr.fy * sy, cx=cx, cy=cy, width=new_width, height=new_height
    )
