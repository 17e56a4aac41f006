"""Ensembling of several stochastic predictions, for the legacy multi-step Marigold path
(docs/method.md#multi-step-path).

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
    max_res: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align E depth maps [E,H,W] by per-member scale and shift and reduce them (older Marigold algorithm).

    Objective (docs/method.md#depth-ensemble): RMS of all pairwise differences of the aligned members
    + 0.02 * (|min(agg)| + |1 - max(agg)|), minimised with BFGS (max_iter 2, tol 1e-3), initialised from each
    member's min/max; optimised on a nearest-downscaled copy when ``max_res`` is set (the E2E-FT code passes
    None). As the official code it runs in the members' dtype with float32 parameters and objective values:
    BFGS's finite-difference steps follow the parameters' dtype, so a float64 objective ends elsewhere after
    its two iterations. Returns (aggregate [H,W], uncertainty [H,W]) rescaled so the aggregate spans [0, 1].
    """
    e = depths.shape[0]
    work = depths
    if max_res is not None:
        factor = torch.min(max_res / torch.tensor(depths.shape[-2:]))
        if factor < 1:
            work = torch.nn.Upsample(scale_factor=factor, mode="nearest")(depths)
    flat = work.reshape(e, -1).cpu().numpy()
    d_min, d_max = np.min(flat, axis=1), np.max(flat, axis=1)
    s_init = 1.0 / (d_max - d_min).reshape(-1, 1, 1)
    t_init = (-1 * s_init.flatten() * d_min.flatten()).reshape(-1, 1, 1)
    x0 = np.concatenate([s_init, t_init]).reshape(-1).astype(np.float32)
    pairs = torch.combinations(torch.arange(e))  # [P,2]: (0,1), (0,2), ..., as the official loops over them

    def params(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        half = len(x) // 2
        return (torch.from_numpy(x[:half]).to(dtype=depths.dtype, device=depths.device),
                torch.from_numpy(x[half:]).to(dtype=depths.dtype, device=depths.device))

    def aggregate(aligned: torch.Tensor) -> torch.Tensor:
        if reduction == "median":
            return torch.median(aligned, dim=0).values
        if reduction == "mean":
            return torch.mean(aligned, dim=0)
        raise ValueError(f"reduction must be median or mean, got {reduction!r}")

    def objective(x: np.ndarray) -> np.ndarray:
        s, t = params(x)
        aligned = work * s.view(-1, 1, 1) + t.view(-1, 1, 1)  # [E,h,w]
        diffs = torch.cat([aligned[i:i + 1] - aligned[j:j + 1] for i, j in pairs.tolist()])  # [P,h,w]
        rms = torch.sqrt(torch.mean(diffs**2))
        agg = aggregate(aligned)
        near, far = torch.sqrt((0 - torch.min(agg)) ** 2), torch.sqrt((1 - torch.max(agg)) ** 2)
        return (rms + (near + far) * regularizer_strength).detach().cpu().numpy().astype(np.float32)

    res = minimize(objective, x0, method="BFGS", tol=tol, options={"maxiter": max_iter, "disp": False})
    s, t = params(res.x)
    aligned = depths * s.view(-1, 1, 1) + t.view(-1, 1, 1)
    agg = aggregate(aligned)
    if reduction == "median":  # MAD as the uncertainty
        uncertainty = torch.median(torch.abs(aligned - agg), dim=0).values
    else:
        uncertainty = torch.std(aligned, dim=0)
    lo, hi = torch.min(agg), torch.max(agg)
    return (agg - lo) / (hi - lo), uncertainty / (hi - lo)


def ensemble_normals(normals: torch.Tensor) -> torch.Tensor:
    """GeoWizard-style normals ensemble (docs/method.md#normals-ensemble), as the E2E-FT Marigold pipeline computes it:
    [E,3,H,W] members (each already unit length) -> the single member closest to their mean direction.

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
