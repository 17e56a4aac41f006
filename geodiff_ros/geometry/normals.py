"""Surface normals from an organized point grid, in the ROS optical frame (x right, y down, z forward).

Used to check predicted normals against metric depth (a floor in front of a level camera must give
``n ~ (0, -1, 0)``, a wall facing it ``n ~ (0, 0, -1)``) and as a geometric fallback.
"""

from __future__ import annotations

import numpy as np

__all__ = ["normals_from_points"]


def normals_from_points(points: np.ndarray) -> np.ndarray:
    """Unit normals ``[H,W,3]`` float32 from central differences of an organized ``[H,W,3]`` cloud.

    ``n = normalize(dP/du x dP/dv)``, flipped to face the camera (``n . p < 0``). NaN where a neighbour needed
    by the central difference is invalid (so depth edges stay NaN instead of getting a made-up normal) and on
    the one-pixel border.
    """
    if points.ndim != 3 or points.shape[2] != 3:
        msg = f"`points` must be an organized [H,W,3] grid, got shape {points.shape}"
        raise ValueError(msg)
    p = np.asarray(points, dtype=np.float32)
    out = np.full(p.shape, np.nan, dtype=np.float32)
    du = p[1:-1, 2:] - p[1:-1, :-2]  # [H-2,W-2,3]
    dv = p[2:, 1:-1] - p[:-2, 1:-1]
    n = np.cross(du, dv)
    norm = np.linalg.norm(n, axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = n / norm
        facing = np.sum(n * p[1:-1, 1:-1], axis=2, keepdims=True) > 0
    n = np.where(facing, -n, n)
    n[~(norm[..., 0] > 0)] = np.nan
    out[1:-1, 1:-1] = n
    return out
