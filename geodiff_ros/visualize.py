"""Colour views of depth and normals (no ROS): Spectral depth like Marigold, normals as RGB.

Used by the CLI and by the node's ``*_vis`` topics, so both show the same colours.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    """256-entry uint8 colour table of a matplotlib colour map (built once)."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                   cmap: str = "Spectral") -> np.ndarray:
    """[H,W] depth -> [H,W,3] uint8 RGB; 0 (near) is red, 1 (far) is blue as in Marigold (Spectral).

    Values are mapped from [vmin, vmax] (default: finite min/max) to the colour map; NaN/inf become black.
    """
    d = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(d)
    if vmin is None or vmax is None:
        vals = d[finite]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    span = (vmax - vmin) or 1.0
    idx = np.clip((np.where(finite, d, vmin) - vmin) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = _lut(cmap)[idx]
    rgb[~finite] = 0
    return rgb


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """[H,W,3] unit normals -> [H,W,3] uint8, (n + 1) / 2 * 255 per channel; NaN become black.

    Input is in the ROS optical frame (x right, y down, z forward); it is shown in the Marigold / diffusers
    colour convention (x right, y up, z toward the viewer) so the views look like the paper's figures.
    """
    n = np.asarray(normals, dtype=np.float32) * np.array([1.0, -1.0, -1.0], dtype=np.float32)
    finite = np.all(np.isfinite(n), axis=-1)
    rgb = np.clip((np.nan_to_num(n) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    rgb[~finite] = 0
    return rgb


def depth_to_uint16(depth: np.ndarray) -> np.ndarray:
    """[0,1] relative depth -> uint16 = depth * 65535, as the official run.py saves it."""
    return np.round(np.clip(np.nan_to_num(depth), 0.0, 1.0) * 65535.0).astype(np.uint16)
