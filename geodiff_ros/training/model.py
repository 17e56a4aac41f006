"""Model pieces of E2E fine-tuning: loading, SD2 conv_in expansion, single-step forward (docs/method.md#training).

Shape letters: ``B`` batch, ``H,W`` image, ``h,w`` latent (``H/8, W/8``), ``L`` text tokens.
Only the UNet is trained; the VAE and text encoder are frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..engine.checkpoint import load_components
from ..engine.latent import x0_from_prediction

logger = logging.getLogger(__name__)

__all__ = [
    "TIMESTEP",
    "TrainComponents",
    "decode_prediction",
    "e2e_forward",
    "expand_conv_in",
    "load_train_components",
]

#: Every training sample uses the last timestep of the 1000-step schedule (docs/method.md#training-forward).
TIMESTEP = 999

TextPadding = Literal["max_length", "do_not_pad"]


@dataclass
class TrainComponents:
    """Everything the trainer needs from the init checkpoint."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    alphas_cumprod: torch.Tensor  # [T] float32, from the init checkpoint's scheduler config
    prediction_type: str  # "v_prediction" | "epsilon" | "sample"
    source: str


def expand_conv_in(unet: nn.Module) -> bool:
    """Turn a 4-channel SD UNet into the 8-channel image+target UNet (docs/method.md#conv-in-expansion).

    The new ``conv_in`` weight is the old weight tiled twice along the input channels and halved;
    the **bias is halved too** (E2E ``replace_unet_conv_in``; Marigold's own trainer kept the bias).
    Returns True if the UNet was changed, False if it already had 8 input channels.
    """
    conv: nn.Conv2d = unet.conv_in
    if conv.in_channels == 8:
        return False
    if conv.in_channels != 4:
        msg = (
            f"UNet conv_in has {conv.in_channels} input channels; expected 4 (Stable Diffusion) "
            "or 8 (Marigold / E2E-FT). Use an SD2 or Marigold-style checkpoint as `--init`."
        )
        raise ValueError(msg)
    new = nn.Conv2d(
        8,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([conv.weight, conv.weight], dim=1) / 2.0)
        if conv.bias is not None:
            new.bias.copy_(conv.bias / 2.0)
    unet.conv_in = new
    unet.register_to_config(in_channels=8)
    return True


def load_train_components(
    source: str | Path, *, local_files_only: bool = False, expand_sd_conv_in: bool = True
) -> TrainComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from a hub id or folder.

    Works for E2E-FT / Marigold (8-channel UNet) and Stable Diffusion 2 (4-channel UNet, expanded
    by :func:`expand_conv_in` when ``expand_sd_conv_in``). Everything is loaded in fp32, as the paper trained.
    """
    from diffusers import DDPMScheduler

    src = str(source)
    # The engine's loader (hub id or folder, clear errors), admitting plain 4-channel SD2 UNets (expanded below).
    parts = load_components(src, torch_dtype=torch.float32, local_files_only=local_files_only,
                            require_image_conditional=False)
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    sched_cfg = dict(parts.scheduler.config)
    if expand_sd_conv_in and expand_conv_in(unet):
        logger.info("Expanded the SD UNet conv_in from 4 to 8 channels (weight and bias halved).")
    # alphas_cumprod from the init scheduler's betas: the DDPM scheduler's float32 values, as the
    # paper's code takes them (x0's square roots are then taken in float32 too, bit for bit theirs).
    ddpm = DDPMScheduler.from_config(sched_cfg)
    alphas_cumprod = ddpm.alphas_cumprod
    prediction_type = str(sched_cfg.get("prediction_type", "epsilon"))
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.eval()
    text_encoder.eval()
    return TrainComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=sched_cfg,
        alphas_cumprod=alphas_cumprod,
        prediction_type=prediction_type,
        source=src,
    )


def decode_prediction(decoded: torch.Tensor, modality: str) -> torch.Tensor:
    """VAE output ``[B,3,H,W]`` -> depth ``[B,1,H,W]`` in [-1,1] or unit normals ``[B,3,H,W]``.

    Depth: channel mean, clamp [-1,1]; normals: divide by (norm + 1e-5), clamp (docs/method.md#training-forward).
    """
    if modality == "depth":
        return decoded.mean(dim=1, keepdim=True).clamp(-1.0, 1.0)  # [B,1,H,W]
    if modality == "normals":
        norm = torch.linalg.vector_norm(decoded, dim=1, keepdim=True)
        return (decoded / (norm + 1e-5)).clamp(-1.0, 1.0)  # [B,3,H,W]
    msg = f"`modality` must be 'depth' or 'normals'; got {modality!r}"
    raise ValueError(msg)


def e2e_forward(
    unet: nn.Module,
    vae: nn.Module,
    rgb: torch.Tensor,
    text_context: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    prediction_type: str,
    modality: str,
) -> torch.Tensor:
    """Single-step E2E forward with gradients into the UNet (docs/method.md#training-forward).

    Args:
        rgb: ``[B,3,H,W]`` in [-1,1].
        text_context: ``[1,L,C]`` empty-prompt embedding (repeated to the batch).
        alpha_prod_t: alphas_cumprod[999] as a tensor in the dtype the paper's code uses (float32, or the
            weight dtype with half weights); a Python float is taken as float32.

    Returns:
        Depth ``[B,1,H,W]`` in [-1,1] or unit normals ``[B,3,H,W]``, differentiable w.r.t. the UNet.
    """
    scale = float(vae.config.scaling_factor)  # 0.18215 for SD2
    # 1. Model invocation: vae.encoder (frozen, no graph needed). Mean of moments (docs/method.md#image-latent).
    with torch.no_grad():
        rgb_latent = vae.encode(rgb.to(vae.dtype)).latent_dist.mean * scale  # [B,4,h,w]
    # 2. Zero target latent at t=999; image latent in channels 0-3, target in 4-7 (docs/method.md#unet-call).
    target_latent = torch.zeros_like(rgb_latent)  # [B,4,h,w]
    unet_in = torch.cat([rgb_latent, target_latent], dim=1)  # [B,8,h,w]
    bsz = rgb.shape[0]
    timesteps = torch.full((bsz,), TIMESTEP, device=rgb.device, dtype=torch.long)
    ctx = text_context.repeat(bsz, 1, 1)  # [B,L,C]
    # 3. Model invocation: unet (trainable).
    out = unet(unet_in, timesteps, encoder_hidden_states=ctx).sample  # [B,4,h,w]
    # 4. x0 from the prediction type (docs/method.md#x0).
    x0 = x0_from_prediction(out, target_latent, alpha_prod_t, prediction_type)  # [B,4,h,w]
    # 5. Model invocation: vae.decoder (frozen weights, gradients flow through).
    # The UNet output comes back in fp32 under accelerate's mixed precision: decode in the VAE's dtype (the
    # paper's code omits this cast and fails with bf16 weights; a no-op for an fp32 VAE).
    decoded = vae.decode((x0 / scale).to(vae.dtype)).sample  # [B,3,H,W]
    return decode_prediction(decoded, modality)
