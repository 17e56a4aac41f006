"""The node's torch post-processing (geometry/device.py) equals the numpy reference bit for bit on the CPU.

The node runs alignment output, colour views and the cloud in torch on the engine's device; on the CPU
the published outputs must stay exactly what the numpy functions give. Inputs include NaN, inf, zeros, negative
depths and constant maps, the cases where a different operation order would show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodiff_ros.geometry import PinholeIntrinsics, apply_alignment, backproject
from geodiff_ros.geometry.depth_units import metres_to_mm16
from geodiff_ros.geometry.device import (
    HostStaging,
    cloud_points,
    colorize_depth_t,
    metres_to_mm16_t,
    metric_depth_t,
    normals_to_rgb_t,
)
from geodiff_ros.visualize import colorize_depth, normals_to_rgb

H, W = 37, 53  # odd sizes: strides leave partial rows/columns


def _relative(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rel = rng.random((H, W), dtype=np.float32)
    rel[0, :5] = [0.0, 1.0, np.nan, np.inf, -np.inf]
    return rel


def _normals(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(H, W, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[1, 0] = [np.nan, 0.0, 1.0]
    n[1, 1] = [np.inf, -np.inf, 0.5]
    return n


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bits, NaN where NaN (assert_array_equal treats NaN == NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    if a.dtype.kind == "f":
        np.testing.assert_array_equal(a.view(np.uint32 if a.itemsize == 4 else np.uint64),
                                      b.view(np.uint32 if b.itemsize == 4 else np.uint64))


@pytest.mark.parametrize(("scale", "shift", "lo", "hi"), [
    (3.0, 0.5, 0.1, 100.0), (1.6, 0.0, 0.0, math.inf), (0.37, -0.2, 0.05, 0.3), (1e-3, 1e-4, 0.0, 1.0)])
def test_metric_depth_equals_apply_alignment(scale: float, shift: float, lo: float, hi: float) -> None:
    rel = _relative(1)
    _same(metric_depth_t(torch.from_numpy(rel), scale, shift, lo, hi).numpy(),
          apply_alignment(rel, scale, shift, lo, hi))


def test_millimetres_equal_numpy_and_follow_rep_118() -> None:
    """16UC1 depth: rounded millimetres; NaN, inf, negative, under 0.5 mm and beyond 65.535 m are 0 (none)."""
    depth = apply_alignment(_relative(2), 80.0, -5.0, 0.0, math.inf)  # [H,W] m, up to 75 m, NaN where invalid
    depth[2, :8] = [0.0004, 0.00049, 0.0015, 65.535, 65.5354, 65.5356, 1e9, -1.0]
    mm = metres_to_mm16_t(torch.from_numpy(depth)).numpy()
    expected, far = metres_to_mm16(depth)
    _same(mm, expected)
    assert mm.dtype == np.uint16 and far > 0
    assert list(mm[2, :8]) == [0, 0, 2, 65535, 65535, 0, 0, 0]
    assert mm[0, 2] == 0 and mm[0, 3] == 0  # NaN, inf
    finite = np.isfinite(depth) & (depth > 0) & (depth <= 65.535)
    assert np.abs(mm[finite] / 1000.0 - depth[finite]).max() <= 0.0005 + 1e-9


@pytest.mark.parametrize("case", ["random", "metric", "constant", "all_nan", "one_finite"])
def test_colorize_depth_equals_numpy(case: str) -> None:
    d = {"random": _relative(2), "metric": apply_alignment(_relative(3), 7.3, 0.4, 0.1, 5.0),
         "constant": np.full((H, W), 2.5, np.float32), "all_nan": np.full((H, W), np.nan, np.float32),
         "one_finite": np.where(np.arange(H * W).reshape(H, W) == 7, 3.0, np.nan).astype(np.float32)}[case]
    _same(colorize_depth_t(torch.from_numpy(d)).numpy(), colorize_depth(d))


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_normals_view_equals_numpy() -> None:
    n = _normals(4)
    _same(normals_to_rgb_t(torch.from_numpy(n)).numpy(), normals_to_rgb(n))


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize(("colour", "with_normals"), [(False, False), (True, False), (True, True), (False, True)])
def test_cloud_bytes_equal_cloud_array(stride: int, colour: bool, with_normals: bool) -> None:
    from geodiff_ros.ros.pointcloud import cloud_array

    intr = PinholeIntrinsics(41.5, 39.0, 26.3, 17.9, W, H)
    metric = apply_alignment(_relative(5), 4.0, -0.3, 0.1, 3.0)
    rgb = np.random.default_rng(6).integers(0, 256, (H, W, 3), dtype=np.uint8)
    normals = _normals(7)
    ref = cloud_array(backproject(metric, intr, stride), rgb[::stride, ::stride] if colour else None,
                      normals[::stride, ::stride] if with_normals else None)
    got = cloud_points(torch.from_numpy(metric), intr, stride, torch.from_numpy(rgb) if colour else None,
                       torch.from_numpy(normals) if with_normals else None)
    assert got.shape == (*ref.shape, ref.dtype.itemsize // 4)
    assert got.numpy().tobytes() == ref.tobytes()


def test_cloud_checks_the_intrinsics_size() -> None:
    with pytest.raises(ValueError, match="intrinsics describe"):
        cloud_points(torch.zeros(H, W + 1), PinholeIntrinsics(1.0, 1.0, 0.0, 0.0, W, H))


def test_host_staging_on_the_cpu_is_a_no_copy_pass_through() -> None:
    staging = HostStaging(torch.device("cpu"))
    t = torch.arange(6, dtype=torch.float32)
    assert staging.to_host("x", t).data_ptr() == t.data_ptr()
    staging.wait()
