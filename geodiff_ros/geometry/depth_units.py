"""Depth units of REP 118: ``32FC1`` metres (non-finite = no measurement) and ``16UC1`` millimetres (0 = none).

Sixteen bits of millimetres hold 0.001-65.535 m. Depth beyond that is written as 0 (no measurement), not clipped:
a clipped value would put a false surface at 65.5 m into a costmap or a training target.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_MM", "MM_PER_M", "metres_to_mm16"]

MM_PER_M = 1000.0  # stored value / MM_PER_M = metres (NYUv2, ScanNet, RealSense and REP 118 16UC1)
MAX_MM = 65535


def metres_to_mm16(depth_m: np.ndarray) -> tuple[np.ndarray, int]:
    """``[H,W]`` metres (NaN / 0 / negative = none) -> ``(uint16 millimetres, pixels beyond 65.535 m)``.

    0 means no measurement; depth beyond the 16-bit range becomes 0 too (see the module docstring), as does
    depth under 0.5 mm, which rounds to 0.
    """
    with np.errstate(invalid="ignore"):
        mm = np.rint(np.nan_to_num(np.asarray(depth_m, np.float64), nan=0.0, posinf=0.0, neginf=0.0) * MM_PER_M)
    far = mm > MAX_MM
    mm[far | (mm < 0)] = 0
    return mm.astype(np.uint16), int(far.sum())  # [H,W]
