"""Pipeline statistics and the /diagnostics status of the node.

diagnostic_updater is not installable from PyPI (ros2-from-pypi.md), so the node keeps its own counters and
publishes a ``diagnostic_msgs/DiagnosticArray`` from a timer, with the key names a realsense-style monitor shows
: input and output rates, drops, latency p50/p95, alignment inliers, scale, shift and residual.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from geodiff_ros.pipeline import AlignmentInfo

if TYPE_CHECKING:
    from diagnostic_msgs.msg import DiagnosticStatus

__all__ = ["STAGES", "AlignmentInfo", "PipelineStats", "build_status"]

_WINDOW_S = 5.0  # rates are averaged over the last few seconds so a stall shows up quickly
# Per-frame stages timed by the node, shown as <stage>_p50_ms / <stage>_p95_ms: decode (input message ->
# RGB), engine (the network call, shared by the frames batched in it), post (alignment, metric depth, colour views,
# cloud, copies to the host), publish (messages built and sent), stamp_to_publish (node clock at the end of
# publishing minus the image stamp: the delay a consumer sees, including the camera driver and DDS).
STAGES: tuple[str, ...] = ("decode", "engine", "post", "publish", "stamp_to_publish")


class PipelineStats:
    """Thread-safe counters shared by the subscription callbacks, the worker and the diagnostics timer."""

    def __init__(self, latency_window: int = 200) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.dropped = 0  # overwritten in the one-slot mailbox before the worker took them
        self.bad_input = 0  # could not be decoded or processed
        self.sparse_dropped = 0  # sparse messages too large to keep for matching
        self.processed = 0
        self.metric = 0  # frames published with metric depth
        self._in_times: deque[float] = deque()
        self._out_times: deque[float] = deque()
        self._latency_s: deque[float] = deque(maxlen=latency_window)
        self._stages: dict[str, deque[float]] = {name: deque(maxlen=latency_window) for name in STAGES}
        self.alignment = AlignmentInfo()
        self.last_error = ""

    def on_input(self, dropped_previous: bool) -> None:
        """A frame arrived; ``dropped_previous`` if it replaced one the worker never took."""
        now = time.monotonic()
        with self._lock:
            self.received += 1
            self.dropped += int(dropped_previous)
            self._in_times.append(now)
            self._trim(self._in_times, now)

    def on_sparse_dropped(self) -> None:
        """A sparse message was too large to keep for matching."""
        with self._lock:
            self.sparse_dropped += 1

    def on_bad_input(self, error: str) -> None:
        """A frame was dropped because it could not be converted or processed."""
        with self._lock:
            self.bad_input += 1
            self.last_error = error

    def on_output(self, latency_s: float, metric: bool, alignment: AlignmentInfo) -> None:
        """A frame was published ``latency_s`` after it arrived."""
        now = time.monotonic()
        with self._lock:
            self.processed += 1
            self.metric += int(metric)
            self._out_times.append(now)
            self._trim(self._out_times, now)
            self._latency_s.append(latency_s)
            self.alignment = alignment

    def on_stage(self, name: str, seconds: float) -> None:
        """One frame spent ``seconds`` in stage ``name`` (one of STAGES)."""
        with self._lock:
            self._stages[name].append(seconds)

    @staticmethod
    def _trim(times: deque[float], now: float) -> None:
        while times and now - times[0] > _WINDOW_S:
            times.popleft()

    @staticmethod
    def _rate(times: deque[float], now: float) -> float:
        PipelineStats._trim(times, now)
        if len(times) < 2:
            return 0.0
        span = max(now - times[0], times[-1] - times[0])
        return (len(times) - 1) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """All values as plain Python types (consistent under the lock)."""
        now = time.monotonic()
        with self._lock:
            lat = np.asarray(self._latency_s, dtype=np.float64)
            stages = {name: np.asarray(values, dtype=np.float64) for name, values in self._stages.items()}
            snap = {
                "input_rate_hz": self._rate(self._in_times, now),
                "output_rate_hz": self._rate(self._out_times, now),
                "received": self.received,
                "processed": self.processed,
                "dropped": self.dropped,
                "bad_input": self.bad_input,
                "sparse_dropped": self.sparse_dropped,
                "metric_frames": self.metric,
                "latency_p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
                "latency_p95_ms": float(np.percentile(lat, 95) * 1e3) if lat.size else float("nan"),
                "alignment": self.alignment,
                "last_error": self.last_error,
            }
        for name, values in stages.items():
            for q in (50, 95):
                snap[f"{name}_p{q}_ms"] = float(np.percentile(values, q) * 1e3) if values.size else float("nan")
        return snap


def build_status(name: str, hardware_id: str, snap: dict[str, Any], state: str) -> DiagnosticStatus:
    """One DiagnosticStatus from a stats snapshot; level says whether outputs and metric scale are flowing."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    al: AlignmentInfo = snap["alignment"]
    if state.startswith(("warming up", "compiling")):
        detail = state if state.startswith("compiling") else "(first run, compile or capture)"
        level, message = DiagnosticStatus.WARN, f"warming up {detail}: frames wait, newest first"
    elif state != "active":
        level, message = DiagnosticStatus.WARN, f"node is {state}, not processing"
    elif snap["received"] == 0:
        level, message = DiagnosticStatus.WARN, "no input images yet (check the image topic remap and QoS)"
    elif snap["output_rate_hz"] == 0.0 and snap["input_rate_hz"] > 0.0:
        level, message = DiagnosticStatus.WARN, "images arrive but nothing is published"
    elif al.source == "none":
        level, message = DiagnosticStatus.OK, "running; relative depth only (no metric scale)"
    else:
        level, message = DiagnosticStatus.OK, f"running; metric scale from {al.source}"
    if snap["last_error"] and level == DiagnosticStatus.OK and snap["bad_input"]:
        message += f'; last bad input: {snap["last_error"]}'

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    values = {k: v for k, v in snap.items() if k not in ("alignment", "last_error")}
    values.update({
        "alignment_source": al.source,
        "alignment_scale": al.scale,
        "alignment_shift": al.shift,
        "alignment_points": al.n_points,
        "alignment_inliers": al.n_inliers,
        "alignment_residual_rel": al.residual_rel,
        "alignment_reason": al.reason,
        # the sparse depth received (p5 / median / p95, metres): centimetres sent as millimetres show up here
        "sparse_depth_p5_m": al.sparse_range_m[0],
        "sparse_depth_median_m": al.sparse_range_m[1],
        "sparse_depth_p95_m": al.sparse_range_m[2],
        "state": state,
    })
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id)
    status.values = [KeyValue(key=k, value=fmt(v)) for k, v in values.items()]
    return status
