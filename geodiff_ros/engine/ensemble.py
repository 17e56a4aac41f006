"""Ensembling of several stochastic predictions, for the legacy multi-step Marigold path (spec A.1-13).

E2E-FT models are deterministic, so the single-step path never ensembles; these exist so a user can reproduce
the Marigold numbers the paper compares against.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize


def ensemble_depths(
    depths: torch.Tensor,
    regularizer_strength: float = 0.02,
    max_iter: int = 2,
    tol: float = 1e-3,
    reduction: str = "median",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align E depth maps [E,H,W] by per-member scale and shift and reduce them (older Marigold algorithm).

    Objective (spec A.1-13): RMS of all pairwise differences of the aligned members
    + 0.02 * (|min(agg)| + |1 - max(agg)|), minimised with BFGS (max_iter 2, tol 1e-3), initialised from each
    member's min/max. Returns (aggregate [H,W], uncertainty [H,W]) rescaled so the aggregate spans [0, 1].
    """
    e = depths.shape[0]
    flat = depths.reshape(e, -1).double()
    d_min, d_max = flat.min(dim=1).values, flat.max(dim=1).values
    s_init = 1.0 / (d_max - d_min).clamp_min(1e-8)
    t_init = -s_init * d_min
    x0 = torch.cat([s_init, t_init]).cpu().numpy()
    pairs = torch.triu_indices(e, e, offset=1)

    def aggregate(aligned: torch.Tensor) -> torch.Tensor:
        return aligned.median(dim=0).values if reduction == "median" else aligned.mean(dim=0)

    def objective(x: np.ndarray) -> float:
        s = torch.from_numpy(x[:e]).to(flat)
        t = torch.from_numpy(x[e:]).to(flat)
        aligned = flat * s[:, None] + t[:, None]
        diffs = aligned[pairs[0]] - aligned[pairs[1]]
        rms = torch.sqrt(torch.mean(diffs**2))
        agg = aggregate(aligned)
        reg = torch.abs(agg.min()) + torch.abs(1.0 - agg.max())
        return float(rms + regularizer_strength * reg)

    res = minimize(objective, x0, method="BFGS", tol=tol, options={"maxiter": max_iter, "disp": False})
    s = torch.from_numpy(res.x[:e]).to(depths)
    t = torch.from_numpy(res.x[e:]).to(depths)
    aligned = depths * s[:, None, None] + t[:, None, None]
    if reduction == "median":
        agg = aligned.median(dim=0).values
        uncertainty = (aligned - agg).abs().median(dim=0).values
    else:
        agg = aligned.mean(dim=0)
        uncertainty = aligned.std(dim=0)
    lo, hi = agg.min(), agg.max()
    span = (hi - lo).clamp_min(1e-8)
    return (agg - lo) / span, uncertainty / span


def ensemble_normals(normals: torch.Tensor) -> torch.Tensor:
    """GeoWizard-style normals ensemble (spec A.1-13), as the E2E-FT Marigold pipeline computes it:
    [E,3,H,W] members (each already unit length, A.1-12) -> the single member closest to their mean direction.

    The members are normalised once more (norm + 1e-5); each pixel's mean direction is rebuilt from the averaged
    spherical angles phi = atan2(y, x) and theta = atan2(|(x, y)|, z); the angle of every member to it is
    acos of the cosine similarity clipped to [-0.999, 0.999] (so angles under ~2.6 deg count as 2.6 deg), and
    the whole member with the smallest summed angle is returned. theta through atan2 rather than acos(z), and the
    clip, change which member wins in near ties; they are kept exactly so ensembles match the official ones.
    """
    n = normals / (torch.norm(normals, p=2, dim=1).unsqueeze(1) + 1e-5)  # [E,3,H,W]
    phi = torch.atan2(n[:, 1], n[:, 0]).mean(dim=0)  # [H,W]
    theta = torch.atan2(torch.norm(n[:, :2], p=2, dim=1), n[:, 2]).mean(dim=0)  # [H,W]
    mean = torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi), torch.cos(theta)])
    angle = torch.acos(torch.clip(torch.cosine_similarity(mean[None], n, dim=1), -0.999, 0.999))  # [E,H,W]
    best = torch.argmin(angle.reshape(n.shape[0], -1).sum(-1))
    return n[best]
