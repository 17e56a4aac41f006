"""Depth image -> organized xyz point grid, matching depth_image_proc's point_cloud_xyz(rgb).

X = (u - cx) * Z / fx, Y = (v - cy) * Z / fy, Z = depth, with fx, fy, cx, cy from the CameraInfo's P.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from geodiff_ros.geometry.camera import PinholeIntrinsics

__all__ = ["backproject", "ray_grid"]


@lru_cache(maxsize=8)
def ray_grid(intr: PinholeIntrinsics, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel ray slopes ``((u - cx) / fx, (v - cy) / fy)`` at the pixels kept by ``stride``.

    Shapes ``[1, W']`` and ``[H', 1]`` (they broadcast), float32, read-only. Cached per (intrinsics, stride) so
    the per-frame cost of :func:`backproject` is one multiply per coordinate; a new CameraInfo (or a resize)
    yields a new key. ``u, v`` are integer indices of the full-resolution image, so a strided grid holds exactly
    the full grid's rays at those pixels.
    """
    if stride < 1:
        msg = f"`stride` must be >= 1, got {stride}"
        raise ValueError(msg)
    u = np.arange(0, intr.width, stride, dtype=np.float64)
    v = np.arange(0, intr.height, stride, dtype=np.float64)
    rx = ((u - intr.cx) / intr.fx).astype(np.float32)[None, :]  # [1,W']
    ry = ((v - intr.cy) / intr.fy).astype(np.float32)[:, None]  # [H',1]
    rx.flags.writeable = False
    ry.flags.writeable = False
    return rx, ry


def backproject(depth: np.ndarray, intr: PinholeIntrinsics, stride: int = 1) -> np.ndarray:
    """Organized point grid ``[H', W', 3]`` float32 in the camera optical frame (x right, y down, z forward).

    ``X = (u - cx) * Z / fx``, ``Y = (v - cy) * Z / fy``, ``Z = depth`` with ``depth`` in metres along the optical
    axis (REP 118) and ``u, v`` the integer pixel indices -- depth_image_proc's formula with P-based intrinsics.
    Every coordinate is NaN where the depth is not finite or ``<= 0``. Note: depth_image_proc's float traits treat
    a float 0 as a *valid* point at the camera origin; we treat it as invalid, because a 0-depth point is never a
    real measurement and REP 117/118 reserve NaN for invalid. ``stride`` keeps rows/columns ``0, s, 2s, ...``.

    Raises:
        ValueError: depth is not 2-D or its size differs from the intrinsics (rescale them with
            :func:`geodiff_ros.geometry.camera.scale_intrinsics` first).
    """
    if depth.ndim != 2:
        msg = f"`depth` must be [H,W], got shape {depth.shape}"
        raise ValueError(msg)
    if depth.shape != (intr.height, intr.width):
        msg = (
            f"depth is {depth.shape[1]}x{depth.shape[0]} but the intrinsics describe {intr.width}x{intr.height}; "
            "rescale them with scale_intrinsics(intr, width, height)"
        )
        raise ValueError(msg)
    rx, ry = ray_grid(intr, stride)
    z = np.asarray(depth[::stride, ::stride], dtype=np.float32)  # [H',W']
    with np.errstate(invalid="ignore"):
        invalid = ~(np.isfinite(z) & (z > 0))
    z = np.where(invalid, np.float32(np.nan), z)
    out = np.empty((*z.shape, 3), dtype=np.float32)  # [H',W',3]
    np.multiply(rx, z, out=out[..., 0])
    np.multiply(ry, z, out=out[..., 1])
    out[..., 2] = z
    return out
