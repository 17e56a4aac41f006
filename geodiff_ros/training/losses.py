"""Task losses of E2E fine-tuning (docs/method.md#depth-loss, docs/method.md#normals-loss).

Shapes: ``B`` batch, ``H,W`` image size. All losses run in fp32 with autocast disabled, as the
paper's code does, so that the 2x2 normal equations do not lose precision under bf16.
"""

from __future__ import annotations

import torch

__all__ = ["affine_invariant_l1_loss", "angular_loss", "solve_scale_shift"]


def _as_b1hw(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept ``[B,H,W]`` or ``[B,1,H,W]`` and return ``[B,1,H,W]``."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] == 1:
        return x
    msg = f"`{name}` must have shape [B,H,W] or [B,1,H,W]; got {tuple(x.shape)}"
    raise ValueError(msg)


def solve_scale_shift(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form per-image least squares ``s*pred + t ~ target`` over ``mask`` (docs/method.md#depth-loss).

    Returns ``(s, t)`` of shape ``[B]``; both are 0 where the system is singular (det <= 0),
    exactly as the paper's code does. Gradients flow through ``s`` and ``t`` (not detached).
    """
    pred = _as_b1hw(pred, "pred").float()
    target = _as_b1hw(target, "target").float()
    m = _as_b1hw(mask, "mask").to(pred.dtype)
    dims = (1, 2, 3)
    a00 = (m * pred * pred).sum(dims)
    a01 = (m * pred).sum(dims)
    a11 = m.sum(dims)
    b0 = (m * pred * target).sum(dims)
    b1 = (m * target).sum(dims)
    det = a00 * a11 - a01 * a01
    ok = det > 0
    safe_det = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe_det, torch.zeros_like(det))
    t = torch.where(ok, (-a01 * b0 + a00 * b1) / safe_det, torch.zeros_like(det))
    return s, t


def affine_invariant_l1_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Affine-invariant L1 depth loss (paper Eq. 1, docs/method.md#depth-loss).

    Args:
        pred: predicted relative depth ``[B,1,H,W]`` or ``[B,H,W]`` (any affine frame).
        target: metric ground-truth depth in metres, same shape (not normalised, not disparity).
        mask: valid pixels, same shape (bool).

    Returns:
        Scalar: mean over all valid pixels of the batch of ``|s*pred + t - target|`` with per-image
        ``(s, t)`` from :func:`solve_scale_shift`; 0 (still attached to ``pred``) if no pixel is valid.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred32 = _as_b1hw(pred, "pred").float()
        target32 = _as_b1hw(target, "target").float()
        mask_b = _as_b1hw(mask, "mask").bool()
        if not bool(mask_b.any()):
            return pred32.sum() * 0.0  # no valid pixel -> zero loss
        s, t = solve_scale_shift(pred32, target32, mask_b)
        aligned = s.view(-1, 1, 1, 1) * pred32 + t.view(-1, 1, 1, 1)  # [B,1,H,W]
        return (aligned - target32).abs()[mask_b].mean()


def angular_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean angular error in radians between unit normals (paper Eq. 2, docs/method.md#normals-loss).

    Args:
        pred: predicted normals ``[B,3,H,W]`` (already unit length: divided by norm + 1e-5).
        target: ground-truth unit normals ``[B,3,H,W]`` in the same frame.
        mask: valid pixels ``[B,1,H,W]`` or ``[B,H,W]``.

    Returns:
        Scalar mean over valid pixels of ``arccos(clamp(<pred, target>, -1, 1))``; 0 if none valid.
    """
    if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
        msg = (
            "`pred` and `target` must both have shape [B,3,H,W]; "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
        raise ValueError(msg)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        mask_b = _as_b1hw(mask, "mask").bool()[:, 0]  # [B,H,W]
        if not bool(mask_b.any()):
            return pred.float().sum() * 0.0  # no valid pixel -> zero loss
        dot = (pred.float() * target.float()).sum(dim=1).clamp(-1.0, 1.0)  # [B,H,W]
        return torch.acos(dot)[mask_b].mean()
