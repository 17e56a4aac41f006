"""What the engine's eager path (core.py) and its optimised paths (accel.py, fused_vae.py) share: the latent scale,
the x0 formula and the output type. A module of its own so the optimised paths do not import core (which imports
them): no import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ModelLoadError

__all__ = ["LATENT_SCALE", "Prediction", "x0_from_prediction"]

LATENT_SCALE = 0.18215  # SD2's rgb_latent_scale_factor (docs/method.md#image-latent)


@dataclass
class Prediction:
    """Engine output for B frames. depth: [B,H,W] in [0,1], 0 near; normals: [B,H,W,3] optical frame."""

    depth: np.ndarray | None = None
    normals: np.ndarray | None = None
    timesteps: list[int] = field(default_factory=list)



def x0_from_prediction(pred: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor | float,
                       prediction_type: str) -> torch.Tensor:
    """Clean latent from the UNet output at noise level alpha_bar (docs/method.md#x0).

    Op for op as diffusers' DDIM ``step`` (the official inference) and the official training code: the square
    roots are taken in the dtype of ``alpha_bar`` (float32 ``alphas_cumprod`` of the scheduler), not in float64,
    so the result is bit-identical to theirs.
    """
    alpha_prod_t = torch.as_tensor(alpha_bar)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * z_t - (beta_prod_t**0.5) * pred
    if prediction_type == "epsilon":
        return (z_t - beta_prod_t ** (0.5) * pred) / alpha_prod_t ** (0.5)
    if prediction_type == "sample":
        return pred
    raise ModelLoadError(f"scheduler prediction_type {prediction_type!r} is not supported "
                         "(expected v_prediction, epsilon or sample); fix scheduler/scheduler_config.json")
