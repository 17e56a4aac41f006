"""Model pieces of E2E fine-tuning: loading, SD2 conv_in expansion, single-step forward (spec B.2, B.3).

Shape letters: ``B`` batch, ``H,W`` image, ``h,w`` latent (``H/8, W/8``), ``L`` text tokens.
Only the UNet is trained; the VAE and text encoder are frozen (spec B.1 "trainable").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "TIMESTEP",
    "TrainComponents",
    "decode_prediction",
    "e2e_forward",
    "encode_text_context",
    "expand_conv_in",
    "load_train_components",
    "predict_x0",
]

#: spec B.3-2: every training sample uses the last timestep of a 1000-step schedule.
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
    alphas_cumprod: torch.Tensor  # [T] float64, from the init checkpoint's scheduler (spec B.3-6)
    prediction_type: str  # "v_prediction" | "epsilon" | "sample"
    source: str


def expand_conv_in(unet: nn.Module) -> bool:
    """Turn a 4-channel SD UNet into the 8-channel image+target UNet (spec B.2).

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


def predict_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """Clean latent from the UNet output at one timestep (spec A.1-11, B.3-6).

    v: ``sqrt(a)*z - sqrt(1-a)*v``; epsilon: ``(z - sqrt(1-a)*eps)/sqrt(a)``; sample: identity.
    """
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64)
    sqrt_a = float(a.sqrt())
    sqrt_1ma = float((1 - a).sqrt())
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_1ma * model_output
    if prediction_type == "epsilon":
        return (sample - sqrt_1ma * model_output) / sqrt_a
    if prediction_type == "sample":
        return model_output
    msg = (
        f"Unknown scheduler `prediction_type` {prediction_type!r}; expected 'v_prediction', "
        "'epsilon' or 'sample'. Fix scheduler/scheduler_config.json of the init checkpoint."
    )
    raise ValueError(msg)


@torch.no_grad()
def encode_text_context(
    tokenizer: object, text_encoder: nn.Module, padding: TextPadding = "max_length"
) -> torch.Tensor:
    """Empty-prompt text context ``[1,L,C]`` for the UNet cross-attention.

    ``max_length`` (L=77) is what the paper's training code used (spec B.3-4); ``do_not_pad`` (L=2)
    is what every inference path uses (spec A.1-9). The mismatch is documented in spec F.5.
    """
    kwargs: dict = {"return_tensors": "pt", "truncation": True}
    kwargs["padding"] = padding
    kwargs["max_length"] = tokenizer.model_max_length
    ids = tokenizer([""], **kwargs).input_ids  # [1,L]
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]  # [1,L,C]


def _load_scheduler_config(source: str, local_files_only: bool) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler

    try:
        sched = DDPMScheduler.from_pretrained(
            source, subfolder="scheduler", local_files_only=local_files_only
        )
    except Exception:  # noqa: BLE001 - some hub repos ship DDIM-only configs
        sched = DDIMScheduler.from_pretrained(
            source, subfolder="scheduler", local_files_only=local_files_only
        )
    return dict(sched.config)


def load_train_components(
    source: str | Path, *, local_files_only: bool = False, expand_sd_conv_in: bool = True
) -> TrainComponents:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from a hub id or folder.

    Works for E2E-FT / Marigold (8-channel UNet) and Stable Diffusion 2 (4-channel UNet, expanded
    per spec B.2 when ``expand_sd_conv_in``). Everything is loaded in fp32 (spec B.1 "precision").
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    src = str(source)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            src, subfolder="unet", torch_dtype=torch.float32, local_files_only=local_files_only
        )
        vae = AutoencoderKL.from_pretrained(
            src, subfolder="vae", torch_dtype=torch.float32, local_files_only=local_files_only
        )
        text_encoder = CLIPTextModel.from_pretrained(
            src,
            subfolder="text_encoder",
            torch_dtype=torch.float32,
            local_files_only=local_files_only,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            src, subfolder="tokenizer", local_files_only=local_files_only
        )
        sched_cfg = _load_scheduler_config(src, local_files_only)
    except OSError as err:
        msg = (
            f"Cannot load the init checkpoint {src!r} ({err}). Pass a hub id such as "
            "'GonzaloMG/marigold-e2e-ft-depth', 'prs-eth/marigold-depth-v1-0' or "
            "'stabilityai/stable-diffusion-2', or a local folder with unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/ (add --local_files_only when offline)."
        )
        raise RuntimeError(msg) from err
    if expand_sd_conv_in and expand_conv_in(unet):
        logger.info("Expanded the SD UNet conv_in from 4 to 8 channels (spec B.2).")
    # alphas_cumprod from the init scheduler's betas (spec B.3-6), computed like diffusers does.
    ddpm = DDPMScheduler.from_config(sched_cfg)
    alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
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

    Depth: channel mean, clamp [-1,1]; normals: divide by (norm + 1e-5), clamp (spec B.3-8).
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
    """Single-step E2E forward with gradients into the UNet (spec B.3-1..8).

    Args:
        rgb: ``[B,3,H,W]`` in [-1,1].
        text_context: ``[1,L,C]`` empty-prompt embedding (repeated to the batch).

    Returns:
        Depth ``[B,1,H,W]`` in [-1,1] or unit normals ``[B,3,H,W]``, differentiable w.r.t. the UNet.
    """
    scale = float(vae.config.scaling_factor)  # 0.18215 for SD2 (spec A.1-7)
    # 1. Model invocation: vae.encoder (frozen, no graph needed). Mean of moments (spec B.3-1).
    with torch.no_grad():
        rgb_latent = vae.encode(rgb.to(vae.dtype)).latent_dist.mean * scale  # [B,4,h,w]
    # 2. Zero target latent at t=999 (spec B.3-2, B.3-3); image latent first (spec A.1-10).
    target_latent = torch.zeros_like(rgb_latent)  # [B,4,h,w]
    unet_in = torch.cat([rgb_latent, target_latent], dim=1)  # [B,8,h,w]
    bsz = rgb.shape[0]
    timesteps = torch.full((bsz,), TIMESTEP, device=rgb.device, dtype=torch.long)
    ctx = text_context.expand(bsz, -1, -1)  # [B,L,C]
    # 3. Model invocation: unet (trainable).
    out = unet(unet_in, timesteps, encoder_hidden_states=ctx).sample  # [B,4,h,w]
    # 4. x0 from the prediction type (spec B.3-6).
    x0 = predict_x0(out, target_latent, alpha_prod_t, prediction_type)  # [B,4,h,w]
    # 5. Model invocation: vae.decoder (frozen weights, gradients flow through, spec B.3-7).
    decoded = vae.decode(x0 / scale).sample  # [B,3,H,W]
    return decode_prediction(decoded, modality)
