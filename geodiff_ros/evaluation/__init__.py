"""Zero-shot evaluation (docs/method.md#evaluation): metrics, benchmark loaders, ``geodiff_eval``; no ROS."""

from __future__ import annotations

from .metrics import (
    DEPTH_METRICS,
    abs_relative_difference,
    align_least_squares,
    angular_errors_deg,
    delta1_acc,
    evaluate_depth_image,
    normal_metrics,
)

__all__ = [
    "DEPTH_METRICS",
    "abs_relative_difference",
    "align_least_squares",
    "angular_errors_deg",
    "delta1_acc",
    "evaluate_depth_image",
    "normal_metrics",
]
