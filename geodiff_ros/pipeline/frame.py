"""The per-frame work after the engine, ROS-free: metric fit and its temporal state, metric depth, views, cloud.

One ``FrameProcessor`` per camera stream holds what carries over between frames (the temporal aligner, the last
stamp). The node's camera channel and ``geodiff_bag process`` both call :meth:`FrameProcessor.process` with the
engine's outputs, the camera model and the sparse depth matched to the frame, and only do their own I/O (topics vs
bag records), so the same frame gives the same outputs live and offline.

The per-pixel work runs in torch where the engine's outputs are (``geometry/device.py``: bit-identical to the numpy
reference on the CPU), and each output crosses to the host once, through ``HostStaging``'s reused buffers.

Shapes: ``H,W`` image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from geodiff_ros.geometry.alignment import AlignmentResult, AlignmentState, TemporalAligner, fit_scale_shift
from geodiff_ros.geometry.camera import PinholeIntrinsics
from geodiff_ros.pipeline.settings import AlignmentConfig, OutputConfig

if TYPE_CHECKING:
    import torch

    from geodiff_ros.geometry.device import HostStaging

__all__ = ["AlignmentInfo", "FrameProcessor", "FrameResult", "Wanted"]


@dataclass
class AlignmentInfo:
    """A frame's alignment as reported (source: fit, fallback, fixed or none), with the reason when there is none,
    and the range of the sparse depth it received (p5, median, p95 in metres: a user checks the units there)."""

    source: str = "none"
    scale: float = float("nan")
    shift: float = float("nan")
    n_points: int = 0
    n_inliers: int = 0
    residual_rel: float = float("nan")
    reason: str = ""
    sparse_range_m: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))


# A fit whose scale is ~10x, 100x or 1000x (or 1/10 ...) the last good fit's while the view did not change (the
# relative depth maps agree) is a sparse sensor that changed its units (centimetres sent as 16UC1 millimetres, metres
# as millimetres), not a new scene: a real scene change changes the relative depth too. The fit is refused, the last
# good one serves on (fallback). Nothing here fires on a close-range scene: only a jump of a unit factor between two
# fits of one view does.
UNIT_FACTORS = (10.0, 100.0, 1000.0)
UNIT_TOLERANCE = 1.25  # the scale ratio is within this factor of a unit factor
SAME_VIEW_MEAN_ABS = 0.05  # mean |difference| of the 32x24 relative depth thumbnails (depth in [0,1]) of one view
_THUMB = (24, 32)


def _thumbnail(relative: np.ndarray) -> np.ndarray:
    """[24,32] block means of a relative depth map (NaN-free), cheap to keep and compare between frames."""
    h, w = relative.shape
    rows = np.linspace(0, h, _THUMB[0] + 1).astype(int)
    cols = np.linspace(0, w, _THUMB[1] + 1).astype(int)
    r = np.nan_to_num(np.asarray(relative, np.float64))
    sums = np.add.reduceat(np.add.reduceat(r, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.outer(np.diff(rows), np.diff(cols)).clip(min=1)
    return sums / counts


def unit_jump(scale: float, last_scale: float) -> float | None:
    """The unit factor (e.g. 10.0 or 0.1) that ``scale / last_scale`` is, within UNIT_TOLERANCE, else None."""
    if not (scale > 0 and last_scale > 0):
        return None
    ratio = scale / last_scale
    for factor in UNIT_FACTORS:
        for f in (factor, 1.0 / factor):
            if abs(math.log(ratio / f)) < math.log(UNIT_TOLERANCE):
                return f
    return None


@dataclass(frozen=True)
class Wanted:
    """Which optional outputs this frame builds (the node: those someone subscribes to; the bag tool: its flags)."""

    depth_vis: bool = False
    normals_vis: bool = False
    cloud: bool = True


@dataclass
class FrameResult:
    """One frame's outputs on the host and what happened.

    ``host`` holds, each present only when produced: ``relative`` [H,W] float32, ``depth`` [H,W] float32 metres
    (NaN invalid) or uint16 millimetres (0 invalid) by ``OutputConfig.depth_encoding``, ``depth_vis`` and
    ``normals_vis`` [H,W,3] uint8, ``normals`` [H,W,3] float32 (optical frame), ``points`` [H',W',k] float32 (the
    bytes of the cloud's points, fields ``cloud_fields``). The host tensors are reused buffers: use them before the
    next frame of the same processor.
    """

    host: dict[str, torch.Tensor] = field(default_factory=dict)
    alignment: AlignmentInfo = field(default_factory=AlignmentInfo)
    state: AlignmentState | None = None
    cloud_fields: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, text): the caller logs, throttled

    @property
    def metric(self) -> bool:
        return self.state is not None


class FrameProcessor:
    """The per-frame steps after the engine for one camera stream; holds the temporal alignment state."""

    def __init__(self, config: AlignmentConfig) -> None:
        self.aligner: TemporalAligner = config.make_aligner()
        self._last_stamp_ns: int | None = None
        self._had_metric = False
        self._last_good: tuple[float, np.ndarray] | None = None  # (scale, relative thumbnail) of the last good fit

    def reset(self, config: AlignmentConfig) -> None:
        """Start the temporal alignment over with ``config`` (its settings changed)."""
        self.aligner = config.make_aligner()

    def time_went_backwards(self, stamp_ns: int, config: AlignmentConfig) -> float | None:
        """Seconds by which ``stamp_ns`` is older than the previous frame's stamp (a bag loop or a sim-time reset;
        the alignment state starts over: the caller forgets sparse input of the old timeline), else None."""
        last, self._last_stamp_ns = self._last_stamp_ns, stamp_ns
        if last is None or stamp_ns >= last:
            return None
        self.aligner = config.make_aligner()
        return (last - stamp_ns) * 1e-9

    def process(self, *, stamp_ns: int, relative: torch.Tensor | None, normals: torch.Tensor | None,
                rgb: np.ndarray, intr: PinholeIntrinsics | None, sparse: np.ndarray | None,
                alignment: AlignmentConfig, output: OutputConfig, wanted: Wanted,
                staging: HostStaging) -> FrameResult:
        """Align -> metric depth, views, cloud, all copied to the host.

        Args:
            stamp_ns: the image stamp (the temporal smoothing's clock).
            relative: [H,W] in [0,1] (0 near) or None; normals: [H,W,3] optical frame or None (engine device).
            rgb: [H,W,3] uint8 input image (host), coloured cloud points.
            intr: intrinsics of exactly these pixels, or None (no cloud).
            sparse: [H,W] metres on the image grid (NaN = none), matched to the frame, or None.
        """
        import torch

        from geodiff_ros.geometry.device import (
            cloud_points,
            colorize_depth_t,
            metres_to_mm16_t,
            metric_depth_t,
            normals_to_rgb_t,
        )

        result = FrameResult(cloud_fields=output.cloud_fields(normals is not None))
        host = result.host
        stream = staging.stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if relative is not None:
                host["relative"] = staging.to_host("relative", relative)
            if normals is not None:
                host["normals"] = staging.to_host("normals", normals)
            staging.wait()  # the fit below needs the relative depth on the host
            if relative is not None:
                result.state, result.alignment = self._align(host["relative"].numpy(), sparse, stamp_ns, alignment,
                                                             result.warnings)
            metric = None
            if result.state is not None:
                metric = metric_depth_t(relative, result.state.scale, result.state.shift, alignment.min_depth,
                                        alignment.max_depth)  # [H,W] m, NaN invalid
                encoded = metres_to_mm16_t(metric) if output.depth_encoding == "16UC1" else metric
                host["depth"] = staging.to_host("depth", encoded)  # [H,W] float32 m or uint16 mm
            if relative is not None and wanted.depth_vis:
                host["depth_vis"] = staging.to_host("depth_vis", colorize_depth_t(metric if metric is not None
                                                                                  else relative))
            if normals is not None and wanted.normals_vis:
                host["normals_vis"] = staging.to_host("normals_vis", normals_to_rgb_t(normals))
            if metric is not None and intr is not None and output.cloud and wanted.cloud:
                colours = None
                if output.cloud_color:  # (a rosbags message's pixels are read-only: torch wants writable arrays)
                    colours = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).to(metric.device)
                nrm = normals if output.cloud_normals else None
                host["points"] = staging.to_host("points", cloud_points(metric, intr, output.cloud_stride, colours,
                                                                        nrm))  # [H',W',k]
            staging.wait()
        return result

    def _align(self, relative: np.ndarray, sparse: np.ndarray | None, stamp_ns: int, config: AlignmentConfig,
               warnings: list[tuple[str, str]]) -> tuple[AlignmentState | None, AlignmentInfo]:
        """Robust fit of ``relative`` [H,W] to ``sparse`` [H,W], smoothed over time: the scale/shift to apply (None:
        no metric output) and what the diagnostics show."""
        fit: AlignmentResult | None = None
        sparse_range = (math.nan, math.nan, math.nan)
        if sparse is not None:
            with np.errstate(invalid="ignore"):
                values = sparse[np.isfinite(sparse) & (sparse > 0)]
            if values.size:
                lo, med, hi = np.percentile(values, (5.0, 50.0, 95.0))
                sparse_range = (float(lo), float(med), float(hi))
            fit = fit_scale_shift(relative, sparse, method=config.method, min_points=config.min_points,
                                  min_inlier_ratio=config.min_inlier_ratio,
                                  inlier_threshold_rel=config.inlier_threshold_rel, depth_range=config.depth_range)
            if fit.ok:
                fit = self._check_units(fit, relative, sparse_range, warnings)  # warns itself when it refuses
            else:
                warnings.append(("no_fit", f"no metric fit this frame: {fit.reason}"))
        state = self.aligner.update(fit, stamp_ns * 1e-9)
        if state is None and self._had_metric:
            warnings.append(("fallback_expired", "no usable sparse depth for longer than alignment.max_fallback_age_s: "
                             "publishing relative depth only (no depth/image, no points)"))
        self._had_metric = state is not None
        if state is not None:
            return state, AlignmentInfo(state.source, state.scale, state.shift, fit.n_points if fit else 0,
                                        state.n_inliers, state.residual_rel,
                                        fit.reason if fit else "no sparse depth matched", sparse_range)
        if fit is not None:
            return None, AlignmentInfo("none", math.nan, math.nan, fit.n_points, fit.n_inliers, fit.residual_rel,
                                       fit.reason, sparse_range)
        return None, AlignmentInfo(reason="no sparse depth within alignment.sparse_max_dt")

    def _check_units(self, fit: AlignmentResult, relative: np.ndarray, sparse_range: tuple[float, float, float],
                     warnings: list[tuple[str, str]]) -> AlignmentResult:
        """The fit, or a refusal when its scale jumped by a unit factor against the last good fit of the same view
        (see UNIT_FACTORS)."""
        thumb = _thumbnail(relative)
        last = self._last_good
        if last is not None:
            factor = unit_jump(fit.scale, last[0])
            if factor is not None and float(np.mean(np.abs(thumb - last[1]))) < SAME_VIEW_MEAN_ABS:
                lo, med, hi = sparse_range
                reason = (f"sparse depth looks {factor:g}x off: the fitted scale jumped from {last[0]:.4g} to "
                          f"{fit.scale:.4g} while the view did not change (sparse depth now {lo:.3g}..{hi:.3g} m, "
                          f"median {med:.3g} m); did its units change? 16UC1 must be millimetres, 32FC1 metres; "
                          "the last good fit is used meanwhile")
                warnings.append(("units", reason))
                return AlignmentResult(ok=False, scale=math.nan, shift=math.nan, n_points=fit.n_points,
                                       n_inliers=fit.n_inliers, residual_rel=fit.residual_rel, reason=reason,
                                       method=fit.method)
        self._last_good = (fit.scale, thumb)
        return fit
