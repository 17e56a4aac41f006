"""Write a fine-tuned model in the hub layout the engine and the node load unchanged.

Layout (docs/method.md#checkpoint-layout, like the GonzaloMG repos): model_index.json (StableDiffusionPipeline), unet/,
vae/, text_encoder/, tokenizer/, scheduler/ (DDIM, ``timestep_spacing="trailing"``, the init
checkpoint's betas and prediction type: the UNet was trained to give x0 through that type).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..engine.checkpoint import HUB_MODEL_INDEX

__all__ = ["save_hub_checkpoint"]


def save_hub_checkpoint(
    folder: str | Path,
    *,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer: object,
    scheduler_config: dict,
    modality: str,
    extra: dict | None = None,
) -> Path:
    """Save all parts into ``folder``; returns the folder.

    ``model_index.json`` also records ``geodiff_task`` (depth|normals) and, for normals,
    ``geodiff_normals_frame = "LUB"``: the training targets are in the E2E-FT frame (docs/method.md#normal-frames).
    """
    import diffusers
    from diffusers import DDIMScheduler

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
    scheduler.save_pretrained(str(root / "scheduler"))
    index = dict(HUB_MODEL_INDEX, _diffusers_version=diffusers.__version__, geodiff_task=modality)
    if modality == "normals":
        index["geodiff_normals_frame"] = "LUB"
    if extra:
        index.update(extra)
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return root
