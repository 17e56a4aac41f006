"""E2E fine-tuning maths against hand-computed answers (docs/method.md#training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodiff_ros.training import (
    IterExponential,
    affine_invariant_l1_loss,
    angular_loss,
    expand_conv_in,
    solve_scale_shift,
)


def _depth(b: int = 2, h: int = 6, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 5.0 * torch.rand(b, 1, h, w, generator=g)


@pytest.mark.parametrize(("s", "t"), [(2.5, 0.3), (-1.7, 4.0), (0.01, -2.0)])
def test_affine_l1_is_zero_for_exact_affine_map_of_target(s: float, t: float) -> None:
    target = _depth()
    pred = (target - t) / s  # target = s * pred + t exactly, negative scale allowed
    mask = torch.ones_like(target, dtype=torch.bool)
    assert affine_invariant_l1_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-4)


def test_affine_l1_matches_hand_computed_value() -> None:
    # One image, 3 valid pixels: pred = [0, 1, 2], target = [0, 1, 5].
    # Normal equations: a00 = 5, a01 = 3, a11 = 3, b0 = 11, b1 = 6, det = 6 -> s = 5/2, t = -1/2.
    # Residuals |s p + t - g| = |-0.5|, |1.0|, |-0.5| -> mean 2/3.
    pred = torch.tensor([[[[0.0, 1.0, 2.0, 9.0]]]])
    target = torch.tensor([[[[0.0, 1.0, 5.0, -3.0]]]])
    mask = torch.tensor([[[[True, True, True, False]]]])
    s, t = solve_scale_shift(pred, target, mask)
    assert s.item() == pytest.approx(2.5) and t.item() == pytest.approx(-0.5)
    assert affine_invariant_l1_loss(pred, target, mask).item() == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_scale_shift_agrees_with_numpy_lstsq_per_image() -> None:
    pred, target = _depth(seed=1), _depth(seed=2)
    mask = _depth(seed=3) > 2.0
    s, t = solve_scale_shift(pred, target, mask)
    for i in range(pred.shape[0]):
        m = mask[i, 0].numpy()
        a = np.stack([pred[i, 0].numpy()[m], np.ones(m.sum())], 1).astype(np.float64)
        (s_ref, t_ref), *_ = np.linalg.lstsq(a, target[i, 0].numpy()[m].astype(np.float64), rcond=None)
        assert s[i].item() == pytest.approx(s_ref, rel=1e-4)
        assert t[i].item() == pytest.approx(t_ref, rel=1e-4, abs=1e-4)


def test_affine_l1_without_valid_pixels_is_zero_and_differentiable() -> None:
    pred = _depth().requires_grad_(True)
    loss = affine_invariant_l1_loss(pred, _depth(), torch.zeros_like(pred, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None and not pred.grad.any()


def test_affine_l1_runs_in_fp32_for_bf16_inputs() -> None:
    target = _depth()
    pred = ((target - 1.0) / 3.0).to(torch.bfloat16)
    loss = affine_invariant_l1_loss(pred, target, torch.ones_like(target, dtype=torch.bool))
    assert loss.dtype == torch.float32
    assert loss.item() < 0.05  # only bf16 rounding of pred remains


def _unit(v: list[float]) -> torch.Tensor:
    t = torch.tensor(v, dtype=torch.float32)
    return (t / t.norm()).view(1, 3, 1, 1).expand(1, 3, 4, 5).contiguous()


def test_angular_loss_orthogonal_is_half_pi_and_identical_is_zero() -> None:
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    assert angular_loss(_unit([1, 0, 0]), _unit([0, 1, 0]), mask).item() == pytest.approx(math.pi / 2, rel=1e-6)
    assert angular_loss(_unit([1, 2, 3]), _unit([1, 2, 3]), mask).item() == pytest.approx(0.0, abs=1e-3)
    assert angular_loss(_unit([0, 0, 1]), _unit([0, 0, -1]), mask).item() == pytest.approx(math.pi, rel=1e-6)


def test_angular_loss_averages_only_valid_pixels() -> None:
    pred = _unit([1, 0, 0]).clone()
    target = _unit([1, 0, 0]).clone()
    target[..., 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # one orthogonal pixel
    mask = torch.zeros(1, 1, 4, 5, dtype=torch.bool)
    mask[..., 0, :2] = True  # the orthogonal pixel and one identical pixel
    assert angular_loss(pred, target, mask).item() == pytest.approx(math.pi / 4, rel=1e-4)


def test_expand_conv_in_tiles_weights_and_halves_weight_and_bias() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=8,
    )
    old = torch.nn.Conv2d(4, 16, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    assert expand_conv_in(unet) is True
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    x = torch.randn(1, 4, 8, 8)
    # W' = [W, W] / 2 and b' = b / 2, so conv'([x, 0]) = conv(x) / 2.
    out = unet.conv_in(torch.cat([x, torch.zeros_like(x)], 1))
    assert torch.allclose(out, old(x) / 2, atol=1e-6)
    assert torch.allclose(unet.conv_in.bias, old.bias / 2)
    assert expand_conv_in(unet) is False  # already 8 channels: unchanged


def test_iter_exponential_schedule_values() -> None:
    f = IterExponential(total_steps=20000, warmup_steps=100, final_ratio=0.01)
    assert f(0) == 0.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(1.0)
    assert f(10050) == pytest.approx(0.1, rel=1e-9)  # halfway through the decay: sqrt(0.01)
    assert f(19999) == pytest.approx(0.01, rel=1e-3)
    assert f(20000) == 0.01 and f(30000) == 0.01
    with pytest.raises(ValueError, match="total_steps"):
        IterExponential(total_steps=100, warmup_steps=100)
