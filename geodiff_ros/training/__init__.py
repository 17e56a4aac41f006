"""E2E fine-tuning (docs/method.md#training): losses, data, single-step forward, hub export; no ROS imports.

Heavy dependencies (accelerate) are imported only by :mod:`geodiff_ros.training.train`.
"""

from __future__ import annotations

from .losses import affine_invariant_l1_loss, angular_loss, solve_scale_shift
from .model import TIMESTEP, e2e_forward, expand_conv_in
from .schedule import IterExponential

__all__ = [
    "TIMESTEP",
    "IterExponential",
    "affine_invariant_l1_loss",
    "angular_loss",
    "e2e_forward",
    "expand_conv_in",
    "solve_scale_shift",
]
