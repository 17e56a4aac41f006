"""Find and load E2E-FT / Marigold checkpoints: a Hugging Face hub id or a local folder in the hub layout.

The hub repos (``GonzaloMG/marigold-e2e-ft-depth`` and friends) are saved as ``StableDiffusionPipeline`` folders
(spec E.3): model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/. Components are loaded one by
one (as the official ``run.py`` does, spec A.1) so any of these repos, the original Marigold ones and our own
fine-tuned checkpoints load through the same path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

LOG = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_PATTERNS = ["model_index.json", *(f"{sub}/*" for sub in REQUIRED_SUBFOLDERS)]
HUB_IGNORE = ["*.ckpt", "*.onnx", "*.msgpack", "*.h5", "*.fp16.*", "*.non_ema.*"]

# model_index.json of the GonzaloMG E2E-FT repos: saved as a StableDiffusionPipeline (spec E.3). Our fine-tuned and
# tiny test checkpoints are written with it too, so every checkpoint loads through one path.
HUB_MODEL_INDEX: dict = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

DEPTH_HUB_ID = "GonzaloMG/marigold-e2e-ft-depth"
NORMALS_HUB_ID = "GonzaloMG/marigold-e2e-ft-normals"


def download_hint(source: str) -> str:
    """How to supply weights on a machine without internet."""
    repo = source if HUB_ID_PATTERN.match(source) else DEPTH_HUB_ID
    return (
        f"on a machine with internet run `hf download {repo} --local-dir /path/to/{repo.split('/')[-1]}` "
        "(pip package huggingface_hub), copy the folder to this machine and pass the folder as the model "
        "(node parameter model_depth / model_normals, CLI --depth-model / --normals-model)"
    )


@dataclass
class ModelComponents:
    """The parts of one checkpoint, loaded on the CPU in ``torch_dtype``."""

    unet: Any
    vae: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    folder: Path
    model_index: dict = field(default_factory=dict)


def resolve_checkpoint(source: str, *, local_files_only: bool = False) -> Path:
    """Return a local folder in the hub layout for ``source`` (folder path or hub id), downloading if needed."""
    if not source:
        raise ModelLoadError("no model given: pass a Hugging Face hub id (e.g. GonzaloMG/marigold-e2e-ft-depth) "
                             "or a local folder in the hub layout")
    path = Path(source).expanduser()
    if path.exists():
        return check_folder(path)
    if source.startswith((".", "/", "~")) or not HUB_ID_PATTERN.match(source):
        raise ModelLoadError(f"model folder {source} does not exist and is not a hub id of the form owner/name; "
                             "fix the path or " + download_hint(source))
    return check_folder(_download(source, local_files_only=local_files_only))


def _download(repo_id: str, *, local_files_only: bool) -> Path:
    """snapshot_download of the subfolders we use; offline or unreachable hub -> ModelLoadError with the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE, local_files_only=offline
        )
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"hub repository {repo_id} not found (or private): check the id, e.g. "
                             f"{DEPTH_HUB_ID} or {NORMALS_HUB_ID}") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id} is not in the local Hugging Face cache and the hub is "
                             f"{'disabled (offline mode)' if offline else 'unreachable'}: " + download_hint(repo_id)
                             ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not download {repo_id} from the Hugging Face hub ({type(exc).__name__}: "
                             f"{exc}); " + download_hint(repo_id)) from exc
    return Path(folder)


def check_folder(folder: Path) -> Path:
    """Check the hub layout; name the missing piece and the fix."""
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder; pass a folder in the hub layout "
                             f"({', '.join(REQUIRED_SUBFOLDERS)}/ and model_index.json)")
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no model_index.json; it is not a diffusers checkpoint "
                             "folder: " + download_hint(DEPTH_HUB_ID))
    for sub in REQUIRED_SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise ModelLoadError(f"model folder {folder} has no {sub}/ subfolder; download the whole repository "
                                 "(" + download_hint(DEPTH_HUB_ID) + ")")
    return folder


def read_model_index(folder: Path) -> dict:
    """model_index.json as a dict (a broken file is a clear error)."""
    return _read_json(folder / "model_index.json")


def load_components(
    source: str,
    *,
    torch_dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    load_text_encoder: bool = True,
    timestep_spacing: str | None = None,
    require_image_conditional: bool = True,
) -> ModelComponents:
    """Load UNet, VAE, scheduler, text encoder and tokenizer of one checkpoint on the CPU.

    ``timestep_spacing`` overrides the scheduler config at load time, as the official run.py does (spec A.1).
    ``require_image_conditional=False`` admits a plain 4-channel Stable Diffusion UNet (fine-tuning, spec B.2).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_checkpoint(source, local_files_only=local_files_only)
    model_index = read_model_index(folder)
    sched_kwargs = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    if require_image_conditional:
        check_unet_config(_read_json(folder / "unet" / "config.json"), folder)  # before reading GBs of weights
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch_dtype)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **sched_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch_dtype)
                        if load_text_encoder else None)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the checkpoint in {folder} ({type(exc).__name__}: {exc}); the "
                             "download may be incomplete or corrupt: delete it and download again") from exc
    return ModelComponents(unet, vae, scheduler, text_encoder, tokenizer, folder, model_index)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is missing or unreadable ({exc}); re-download the checkpoint") from exc


def check_unet_config(config: dict, folder: Path) -> None:
    """Refuse checkpoints that are not image-conditional (8-channel) latent predictors."""
    in_ch, out_ch = config.get("in_channels"), config.get("out_channels")
    if in_ch != 8 or out_ch != 4:
        hint = (" This looks like plain Stable Diffusion: fine-tune it first with geodiff_train "
                "(spec B.2 doubles conv_in)." if in_ch == 4 else "")
        raise ModelLoadError(f"checkpoint {folder} has a UNet with in_channels={in_ch}, out_channels={out_ch}; "
                             "geodiff needs an image-conditional Marigold / E2E-FT UNet (8 in, 4 out)." + hint)


def checkpoint_task(source: str, model_index: dict) -> str | None:
    """The task a checkpoint was trained for, when its metadata or name tells ("depth", "normals" or None)."""
    declared = model_index.get("prediction_type") or model_index.get("geodiff_task")
    if isinstance(declared, str) and declared in ("depth", "disparity", "normals"):
        return "normals" if declared == "normals" else "depth"
    name = source.lower()
    has_depth, has_normals = "depth" in name, "normal" in name
    if has_depth != has_normals:
        return "depth" if has_depth else "normals"
    return None


def normals_frame_of(source: str, model_index: dict) -> str:
    """Frame of a normals checkpoint's raw output: E2E-FT = LUB (spec A.1-18), Marigold / diffusers = RUB."""
    declared = model_index.get("geodiff_normals_frame")
    if declared in ("LUB", "RUB"):
        return declared
    if model_index.get("_class_name", "").startswith("Marigold"):
        return "RUB"
    return "LUB"
