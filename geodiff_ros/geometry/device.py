"""Per-pixel post-processing of the node in torch, on the engine's device: no ROS, no host round trips.

The numpy functions stay the reference (``apply_alignment``, ``backproject``, ``visualize.colorize_depth``,
``visualize.normals_to_rgb``, ``ros.pointcloud.cloud_array``); each function here performs the same float32
operations in the same order, so on the CPU the results are bit-identical (test/test_geometry_device.py checks
it) and on a GPU the per-pixel work runs where the engine's outputs already are, and only the finished outputs are
copied to the host, once each.

Shapes: ``H,W`` image; ``H',W'`` after the cloud stride.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from geodiff_ros.geometry.backproject import ray_grid
from geodiff_ros.geometry.camera import PinholeIntrinsics
from geodiff_ros.geometry.depth_units import MAX_MM, MM_PER_M

__all__ = ["HostStaging", "cloud_points", "colorize_depth_t", "metres_to_mm16_t", "metric_depth_t", "normals_to_rgb_t",
           "rays_on"]

_OPTICAL_TO_VIEW = (1.0, -1.0, -1.0)  # visualize.normals_to_rgb: optical frame -> Marigold colour convention


def metric_depth_t(relative: torch.Tensor, scale: float, shift: float, min_depth: float = 0.0,
                   max_depth: float = math.inf) -> torch.Tensor:
    """``scale * relative + shift`` float32 ``[H,W]``, NaN outside ``(min_depth, max_depth]`` or ``<= 0``
    (geometry.apply_alignment)."""
    metric = relative.float() * float(np.float32(scale)) + float(np.float32(shift))
    bad = ~torch.isfinite(metric) | (metric <= max(min_depth, 0.0)) | (metric > max_depth)
    return metric.masked_fill_(bad, math.nan)



def metres_to_mm16_t(depth_m: torch.Tensor) -> torch.Tensor:
    """``[H,W]`` metres (NaN invalid) -> ``[H,W]`` uint16 millimetres, 0 = none and beyond 65.535 m
    (depth_units.metres_to_mm16, the same float64 operations): half the bytes of 32FC1 cross to the host."""
    mm = torch.round(torch.nan_to_num(depth_m.double(), nan=0.0, posinf=0.0, neginf=0.0) * MM_PER_M)
    mm = mm.masked_fill_((mm > MAX_MM) | (mm < 0), 0.0)
    return mm.to(torch.int32).to(torch.uint16)

@lru_cache(maxsize=8)
def _lut_on(name: str, device: torch.device) -> torch.Tensor:
    from geodiff_ros.visualize import _lut

    return torch.from_numpy(_lut(name)).to(device)  # [256,3] uint8


def colorize_depth_t(depth: torch.Tensor, cmap: str = "Spectral") -> torch.Tensor:
    """``[H,W]`` depth -> ``[H,W,3]`` uint8 over its finite min..max, NaN/inf black (visualize.colorize_depth).

    The range stays on the device (no host sync); the span is formed in float64 and rounded to float32 as numpy
    does with the Python float the reference computes.
    """
    d = depth.float()
    finite = torch.isfinite(d)
    any_finite = finite.any()
    lo = torch.where(any_finite, torch.where(finite, d, math.inf).amin(), 0.0)
    hi = torch.where(any_finite, torch.where(finite, d, -math.inf).amax(), 1.0)
    span = hi.double() - lo.double()
    span = torch.where(span != 0, span, 1.0).float()
    scaled = (torch.where(finite, d, lo) - lo) / span * 255.0 + 0.5
    idx = scaled.clamp_(0, 255).to(torch.uint8)
    rgb = _lut_on(cmap, d.device)[idx.long()]  # [H,W,3]
    return rgb.masked_fill_(~finite[..., None], 0)


def normals_to_rgb_t(normals: torch.Tensor) -> torch.Tensor:
    """``[H,W,3]`` unit normals (optical frame) -> ``[H,W,3]`` uint8 in the Marigold colours, NaN black
    (visualize.normals_to_rgb)."""
    n = normals.float() * torch.tensor(_OPTICAL_TO_VIEW, dtype=torch.float32, device=normals.device)
    finite = torch.isfinite(n).all(dim=-1)
    rgb = ((torch.nan_to_num(n) + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)
    return rgb.masked_fill_(~finite[..., None], 0)


@lru_cache(maxsize=16)
def rays_on(intr: PinholeIntrinsics, stride: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """backproject's cached ray slopes ``[1,W']`` and ``[H',1]`` on ``device`` (uploaded once per CameraInfo)."""
    rx, ry = ray_grid(intr, stride)
    return torch.from_numpy(rx.copy()).to(device), torch.from_numpy(ry.copy()).to(device)


def cloud_points(metric: torch.Tensor, intr: PinholeIntrinsics, stride: int = 1, rgb: torch.Tensor | None = None,
                 normals: torch.Tensor | None = None) -> torch.Tensor:
    """The organized cloud as float32 ``[H',W',k]``: x, y, z (+ rgb bits) (+ normal_x/y/z), k = 3, 4, 6 or 7.

    The memory layout of ``ros.pointcloud.cloud_array``'s structured array (tightly packed 4-byte fields in that
    order), so its bytes are the PointCloud2 data as they are. x, y, z follow backproject (depth_image_proc's
    formula, NaN where the depth is not finite or <= 0); rgb is ``0x00RRGGBB`` stored in the float's bits
    (pointcloud.pack_rgb). ``rgb`` ``[H,W,3]`` uint8 and ``normals`` ``[H,W,3]`` are strided here.
    """
    if metric.shape != (intr.height, intr.width):
        msg = f"depth is {tuple(metric.shape)} but the intrinsics describe {intr.width}x{intr.height}"
        raise ValueError(msg)
    rx, ry = rays_on(intr, stride, metric.device)
    z = metric[::stride, ::stride].float()
    z = torch.where(torch.isfinite(z) & (z > 0), z, math.nan)
    k = 3 + (rgb is not None) + 3 * (normals is not None)
    out = torch.empty((*z.shape, k), dtype=torch.float32, device=metric.device)  # [H',W',k]
    out[..., 0] = rx * z
    out[..., 1] = ry * z
    out[..., 2] = z
    c = 3
    if rgb is not None:
        px = rgb[::stride, ::stride].to(torch.int32)
        packed = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
        out[..., c] = packed.view(torch.float32)
        c += 1
    if normals is not None:
        out[..., c:c + 3] = normals[::stride, ::stride]
    return out


class HostStaging:
    """Reused host buffers for device -> host copies: pinned on CUDA (asynchronous DMA), plain on the CPU.

    ``to_host`` enqueues the copy on the current stream and returns the host tensor; call :meth:`wait` once
    before reading any of them. On the CPU a tensor is already on the host and is returned as is (no copy).
    Buffers are keyed by name, shape and dtype, so two outputs of one frame never share one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._stream: Any = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    @property
    def stream(self) -> Any:
        """The CUDA stream post-processing runs on (high priority, never waits for the engine's kernels)."""
        return self._stream

    def to_host(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if value.device.type == "cpu":
            return value.contiguous()
        key = (name, tuple(value.shape), value.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(tuple(value.shape), dtype=value.dtype, pin_memory=True)
        buf.copy_(value, non_blocking=True)
        return buf

    def wait(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
