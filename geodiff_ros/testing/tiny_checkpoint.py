"""Write a tiny checkpoint in the exact Hugging Face hub layout of the GonzaloMG E2E-FT repos.

Model weights cannot be downloaded everywhere (CI, offline robots), yet the real loading code must run in tests
and in the `--tiny` demo. This writes a few-hundred-kB model with the same folder layout and the same
configuration keys as ``GonzaloMG/marigold-e2e-ft-depth`` (docs/method.md#checkpoint-layout): a
``StableDiffusionPipeline`` model_index.json, an 8-channel UNet, an SD-style VAE (8x down-sampling), a DDIM
scheduler with ``v_prediction``, ``trailing``, scaled_linear 0.00085-0.012, ``set_alpha_to_one false``,
``steps_offset 1``, a CLIP text encoder and a real CLIP BPE tokenizer built from a small vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.checkpoint import HUB_MODEL_INDEX

TINY_TEXT_WIDTH = 32

# The scheduler configuration stored on the hub for GonzaloMG/marigold-e2e-ft-depth.
E2E_SCHEDULER_CONFIG: dict = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.30.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _write_tokenizer(folder: Path) -> int:
    """Write a real CLIP BPE tokenizer (vocab.json + merges.txt) with a small vocabulary; returns its size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = [("d", "e"), ("de", "p"), ("t", "h</w>"), ("dep", "th</w>"), ("n", "o"), ("no", "r")]
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return len(vocab)


def write_tiny_checkpoint(folder: str | Path, task: str = "depth", seed: int = 0) -> Path:
    """Write a tiny E2E-FT-style checkpoint for ``task`` ("depth" or "normals") into ``folder``.

    VAE and text encoder depend only on ``seed`` (as the real depth and normals checkpoints share the frozen SD2
    VAE and text encoder: only the UNet is fine-tuned); the UNet also depends on ``task``.
    Returns the folder path.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if task not in ("depth", "normals"):
        raise ValueError(f"task must be 'depth' or 'normals', got {task!r}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)

    vocab_size = _write_tokenizer(root / "tokenizer")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TINY_TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=TINY_TEXT_WIDTH,
        )
    )
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)

    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)

    torch.manual_seed(seed + 2 + (0 if task == "depth" else 1000))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
    )
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)

    scheduler = DDIMScheduler.from_config(E2E_SCHEDULER_CONFIG)
    scheduler.save_pretrained(str(root / "scheduler"))

    # geodiff_task: the task is stated, not guessed from the folder name (as geodiff_train's export does).
    index = dict(HUB_MODEL_INDEX, geodiff_task=task)
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return root
