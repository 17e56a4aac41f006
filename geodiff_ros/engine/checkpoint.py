"""Find and load E2E-FT / Marigold checkpoints: a Hugging Face hub id or a local folder in the hub layout.

The hub repos (``GonzaloMG/marigold-e2e-ft-depth`` and friends) are saved as ``StableDiffusionPipeline`` folders
(docs/method.md#checkpoint-layout): model_index.json, unet/, vae/, scheduler/, text_encoder/, tokenizer/.
Components are loaded one by one (as the official ``run.py`` does) so any of these repos, the original Marigold
ones and our own fine-tuned checkpoints load through the same path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DEPTH_HUB_ID, NORMALS_HUB_ID
from .errors import ModelLoadError

LOG = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_PATTERNS = ["model_index.json", *(f"{sub}/*" for sub in REQUIRED_SUBFOLDERS)]
HUB_IGNORE = ["*.ckpt", "*.onnx", "*.msgpack", "*.h5", "*.fp16.*", "*.non_ema.*"]

# model_index.json of the GonzaloMG E2E-FT repos: saved as a StableDiffusionPipeline. Our fine-tuned and
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



def download_hint(source: str) -> str:
    """How to supply weights on a machine without internet."""
    repo = source if HUB_ID_PATTERN.match(source) else DEPTH_HUB_ID
    return (
        f"on a machine with internet run `hf download {repo} --local-dir /path/to/{repo.split('/')[-1]}` "
        "(pip package huggingface_hub), copy the folder to this machine and pass the folder as the model "
        "(node parameter model_depth / model_normals, CLI --depth-model / --normals-model)"
    )


# Files each component folder must have; a missing one means an incomplete download (checked after a load error).
REQUIRED_FILES = {"unet": ("config.json",), "vae": ("config.json",), "text_encoder": ("config.json",),
                  "scheduler": ("scheduler_config.json",), "tokenizer": ("vocab.json", "merges.txt")}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
TASK_WORDS = {"depth": "depth", "normals": "normal"}
TASK_OVERRIDE_HINT = "node parameter check_model_task:=false, CLI --no-check-model-task"


@dataclass
class ModelComponents:
    """The parts of one checkpoint, loaded on the CPU: UNet and VAE in ``torch_dtype``, text encoder in fp32."""

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
        # A progress bar only on a terminal: in a node's or a pipe's log it is noise, and a closed pipe would
        # fail the download.
        with _quiet_progress_bars(keep_on_terminal=True):
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
    load_text_encoder: bool | Callable[[Path], bool] = True,
    timestep_spacing: str | None = None,
    require_image_conditional: bool = True,
    expected_task: str | None = None,
    device: torch.device | None = None,
) -> ModelComponents:
    """Load UNet, VAE, scheduler, text encoder and tokenizer of one checkpoint on the CPU.

    UNet and VAE load directly in ``torch_dtype`` (no cast afterwards); the text encoder loads in fp32 as in the
    official pipeline (it only computes the empty-prompt embedding).
    ``timestep_spacing`` overrides the scheduler config at load time, as the official run.py does
    (docs/method.md#timestep-spacing). ``require_image_conditional=False`` admits a plain 4-channel Stable
    Diffusion UNet (fine-tuning, docs/method.md#conv-in-expansion).
    ``expected_task`` ("depth" / "normals") refuses a checkpoint that says it is the other task, before any
    weights are read (:func:`check_task`). ``load_text_encoder`` may decide per folder (False: the caller has the
    empty-prompt embedding cached). ``device`` (CUDA): UNet and VAE weights are read straight onto it
    (safetensors to the GPU, no CPU copy; the CPU path is the fallback).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_checkpoint(source, local_files_only=local_files_only)
    model_index = read_model_index(folder)
    if expected_task is not None:
        check_task(source, folder, model_index, expected_task)
    if callable(load_text_encoder):
        load_text_encoder = load_text_encoder(folder)
    sched_kwargs = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    if require_image_conditional:
        check_unet_config(_read_json(folder / "unet" / "config.json"), folder)  # before reading GBs of weights
    def weights(cls: Any, sub: str) -> Any:
        if device is not None and device.type == "cuda":
            try:
                return cls.from_pretrained(folder, subfolder=sub, torch_dtype=torch_dtype, device_map={"": device})
            except Exception as err:  # noqa: BLE001 - the CPU path below is the reference; it reports real errors
                LOG.info("loading the %s straight onto %s failed (%s: %s); loading it on the CPU", sub, device,
                         type(err).__name__, err)
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=torch_dtype)

    loaders = {
        "unet": lambda: weights(UNet2DConditionModel, "unet"),
        "vae": lambda: weights(AutoencoderKL, "vae"),
        "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **sched_kwargs),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "text_encoder": lambda: (CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                               torch_dtype=torch.float32)
                                 if load_text_encoder else None),
    }
    parts: dict[str, Any] = {}
    with _quiet_progress_bars(keep_on_terminal=False):
        for name, load in loaders.items():
            try:
                parts[name] = load()
            except Exception as exc:  # every failure is re-raised as a ModelLoadError that says what failed
                raise _load_error(folder, name, exc) from exc
    return ModelComponents(parts["unet"], parts["vae"], parts["scheduler"], parts["text_encoder"],
                           parts["tokenizer"], folder, model_index)


@contextlib.contextmanager
def _quiet_progress_bars(*, keep_on_terminal: bool) -> Iterator[None]:
    """No tqdm progress bars from diffusers / transformers / huggingface_hub inside the block (restored after).

    Loading from disk takes seconds and a bar per component is log noise; a bar is also the one library write
    that raises when stderr is a closed pipe (tqdm does not swallow BrokenPipeError), which killed loading.
    ``keep_on_terminal`` keeps them when stderr is an interactive terminal (downloads of several GB).
    """
    if keep_on_terminal and _stderr_is_terminal():
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
           hub_utils.are_progress_bars_disabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also disables huggingface_hub's
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS overrides enabling
            warnings.simplefilter("ignore")
            if was[0]:
                diffusers_logging.enable_progress_bar()
            if was[1]:
                transformers_logging.enable_progress_bar()  # also enables the hub's: restored next
            if was[2]:
                hub_utils.disable_progress_bars()
            else:
                hub_utils.enable_progress_bars()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (OSError, ValueError):
        return False


def _load_error(folder: Path, component: str, exc: BaseException) -> ModelLoadError:
    """A ModelLoadError that says what really failed: re-downloading is suggested only for unreadable files."""
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE and not exc.filename:
        return ModelLoadError(f"loading the {component} of {folder} failed because writing to this process's "
                              f"log stream failed ({what}): the checkpoint is fine; keep stdout/stderr open "
                              "(or redirect them to a file)")
    if isinstance(exc, MemoryError):
        return ModelLoadError(f"out of memory while loading the {component} of {folder}: free memory or use a "
                              "smaller dtype (fp16 / bf16)")
    damage = unreadable_files(folder / component)
    if damage:
        return ModelLoadError(f"the {component} files of the checkpoint in {folder} are unreadable ({damage}); "
                              f"the download is incomplete or corrupt: delete {folder / component} (or the whole "
                              f"folder) and download it again ({what})")
    return ModelLoadError(f"could not load the {component} of the checkpoint in {folder} ({what}); its files read "
                          "fine, so keep them: check that the installed diffusers / transformers versions "
                          f"(requirements-ml.txt) can read this checkpoint's {component}/config.json")


def unreadable_files(sub: Path) -> str | None:
    """What is wrong with the files of one component folder (missing, bad JSON, truncated weights), or None."""
    if not sub.is_dir():
        return f"{sub} is missing"
    needed = REQUIRED_FILES.get(sub.name, ())
    missing = [name for name in needed if not (sub / name).is_file()]
    if sub.name == "tokenizer" and (sub / "tokenizer.json").is_file():
        missing = []  # a fast-tokenizer file replaces vocab.json + merges.txt
    if missing:
        return f"{', '.join(missing)} missing"
    for config in sorted(sub.glob("*.json")):
        try:
            index = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{config.name}: {exc}"
        if config.name.endswith(".index.json") and isinstance(index.get("weight_map"), dict):
            absent = sorted({shard for shard in index["weight_map"].values() if not (sub / shard).is_file()})
            if absent:
                return f"weight shard(s) {', '.join(absent)} listed in {config.name} missing"
    weights = sorted(sub.glob("*.safetensors")) + sorted(sub.glob("*.bin"))
    if sub.name in WEIGHTED_COMPONENTS and not weights:
        return "no weights file (*.safetensors or *.bin)"
    for path in weights:
        problem = _weights_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def _weights_problem(path: Path) -> str | None:
    """Read the header (safetensors) or unpickle lazily (.bin) and check the size the header promises."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
            return None
        torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is the answer
        return f"{type(exc).__name__}: {exc}"


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
                "(it widens conv_in from 4 to 8 channels)." if in_ch == 4 else "")
        raise ModelLoadError(f"checkpoint {folder} has a UNet with in_channels={in_ch}, out_channels={out_ch}; "
                             "geodiff needs an image-conditional Marigold / E2E-FT UNet (8 in, 4 out)." + hint)


def checkpoint_task(source: str, model_index: dict) -> tuple[str | None, str]:
    """The task a checkpoint was trained for ("depth", "normals" or None) and how that is known.

    Its model_index.json entry ``geodiff_task`` (written by geodiff_train and the tiny checkpoints; diffusers'
    Marigold pipelines write ``prediction_type``) decides. Without one, the checkpoint's own name is read: the
    folder name or the hub repo name, never the folders above it (``~/models/depth_and_normals/normals_v2`` is
    a normals model). A name with both words or neither says nothing.
    """
    for key in ("geodiff_task", "prediction_type"):
        declared = model_index.get(key)
        if isinstance(declared, str) and declared in ("depth", "disparity", "normals"):
            return ("normals" if declared == "normals" else "depth"), f'model_index.json declares {key} "{declared}"'
    name = checkpoint_name(source).lower()
    found = [task for task, word in TASK_WORDS.items() if word in name]
    if len(found) == 1:
        return found[0], f"its name {checkpoint_name(source)!r} says so"
    return None, ""


def checkpoint_name(source: str) -> str:
    """The checkpoint's own name: last folder of a path (the repo of a hub-cache snapshot), or the repo of a hub id."""
    path = Path(source.rstrip("/\\")).expanduser()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]  # .../models--owner--name/snapshots/<hash>
    return path.name


def check_task(source: str, folder: Path, model_index: dict, task: str) -> None:
    """Refuse a checkpoint given for ``task`` that says it is the other task (swapped settings), naming both fixes."""
    declared, reason = checkpoint_task(source, model_index)
    if declared is None or declared == task:
        return
    slots = "node parameters model_depth / model_normals, CLI --depth-model / --normals-model"
    if "model_index" in reason:
        state = f"if that entry is wrong, correct it in {folder / 'model_index.json'}"
    else:
        state = (f'if it really is a {task} model, state it: add "geodiff_task": "{task}" to '
                 f"{folder / 'model_index.json'}")
    raise ModelLoadError(f"checkpoint {source} is a {declared} model but was given as the {task} model ({reason}): "
                         f"swap the depth and normals model settings ({slots}); {state}, or turn this check off "
                         f"({TASK_OVERRIDE_HINT})")


def normals_frame_of(source: str, model_index: dict) -> str:
    """Frame of a normals checkpoint's raw output: E2E-FT = LUB, Marigold / diffusers = RUB
    (docs/method.md#normal-frames)."""
    declared = model_index.get("geodiff_normals_frame")
    if declared in ("LUB", "RUB"):
        return declared
    if model_index.get("_class_name", "").startswith("Marigold"):
        return "RUB"
    return "LUB"
