"""Surface-normal frame conversions (docs/method.md#normal-frames).

Checkpoint frames: E2E-FT = "LUB" (x image-left, y up, z toward the camera); Marigold / diffusers = "RUB"
(x right, y up, z toward the camera). geodiff publishes the ROS optical frame (REP 103): x right, y down,
z forward (away from the camera).
"""

from __future__ import annotations

import numpy as np

# Per-axis sign that maps a checkpoint frame to the ROS optical frame.
TO_OPTICAL_SIGNS: dict[str, tuple[float, float, float]] = {
    "LUB": (-1.0, -1.0, -1.0),
    "RUB": (1.0, -1.0, -1.0),
    "optical": (1.0, 1.0, 1.0),
}


def to_optical(normals: np.ndarray, frame: str, channel_axis: int = -1) -> np.ndarray:
    """Express normals given in ``frame`` in the ROS optical frame (a sign flip per axis)."""
    signs = np.asarray(TO_OPTICAL_SIGNS[frame], dtype=normals.dtype)
    shape = [1] * normals.ndim
    shape[channel_axis] = 3
    return normals * signs.reshape(shape)


def from_optical(normals: np.ndarray, frame: str, channel_axis: int = -1) -> np.ndarray:
    """Inverse of :func:`to_optical` (each sign flip is its own inverse)."""
    return to_optical(normals, frame, channel_axis)
