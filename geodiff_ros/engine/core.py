"""The geodiff engine: single-step E2E-FT depth and normals (docs/method.md#single-step-forward), and the legacy
multi-step path (docs/method.md#multi-step-path).

One forward path, shapes in comments:

    rgb uint8 [B,H,W,3] -> resize longest edge to R (AA)            [B,3,h,w] in [-1, 1]
    z_img = 0.18215 * mean(VAE.enc(x))                               [B,4,h/8,w/8]
    v     = UNet(cat[z_img, 0], t=999, ctx=CLIP("") [1,2,C])         [B,4,h/8,w/8]   (one call per task)
    z0    = -sqrt(1 - abar_999) * v        (v-prediction)            [B,4,h/8,w/8]
    y     = VAE.dec(z0 / 0.18215)                                    [B,3,h',w']
    depth   = minmax01((clip(mean_c(y), -1, 1) + 1) / 2) -> resize   [B,H,W]
    normals = y / (|y| + 1e-5) -> resize -> clip -> optical frame    [B,H,W,3]

With both tasks loaded the VAE and the empty-prompt embedding are shared: each frame is encoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..geometry.normal_frames import TO_OPTICAL_SIGNS
from .checkpoint import DEPTH_HUB_ID, load_components, normals_frame_of
from .config import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_PROCESSING_RES, processing_res_problem
from .ensemble import ensemble_depths, ensemble_normals
from .errors import DeviceError, ImageFormatError, ModelLoadError
from .latent import LATENT_SCALE, Prediction, x0_from_prediction
from .preprocess import processing_size, resize_output, resize_uint8_batch, to_rgb_uint8

LOG = logging.getLogger(__name__)

NORMAL_EPS = 1e-5  # added to the norm before dividing, after decoding and at the end (docs/method.md#normals-output)
TASKS = ("depth", "normals")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    """What to load and how to run it. A task whose model is None (or "") is not loaded."""

    depth_model: str | None = DEPTH_HUB_ID
    normals_model: str | None = None
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    processing_res: int = DEFAULT_PROCESSING_RES  # longest edge at inference (multiple of 8), 0 = native size
    resample: str = "bilinear"  # bilinear | bicubic | nearest, antialiased (docs/method.md#resize)
    match_input_res: bool = True  # resize outputs back to the input size
    allow_cpu_fallback: bool = False
    local_files_only: bool = False
    batch_size: int = 4
    normals_frame: str | None = None  # checkpoint frame override: "LUB" (E2E-FT) or "RUB" (Marigold)
    # Refuse a checkpoint whose model_index.json (geodiff_task) or own name says it is the other task (swapped
    # settings). False trusts the depth / normals slot it was given in (node parameter check_model_task).
    check_model_task: bool = True
    # Optimised path (engine/accel.py): "none" = official eager computation; "channels_last", "graph",
    # "compile", "compile+graph" trade start-up time for speed (see benchmarks/README.md); "auto" = compile+graph
    # on CUDA, none on the CPU.
    optimize: str = "none"
    # CPU only: torch intra-op threads for this process (0 = torch's default, one per core). 1 avoids barrier
    # stalls when ROS threads share few cores (benchmarks/README.md, multi-camera); large models want more.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        problem = processing_res_problem(self.processing_res, "EngineConfig.processing_res")
        if problem:
            raise ValueError(problem)


@dataclass
class TaskModel:
    """The per-task parts: UNet and the scheduler constants for the x0 conversion."""

    name: str
    unet: Any
    scheduler: Any
    source: str
    normals_frame: str = "LUB"


def resolve_device(device: str, allow_cpu_fallback: bool) -> torch.device:
    """torch.device for ``device``; a missing GPU is an error naming the fix unless CPU fallback is allowed."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type != "cuda":
        return dev
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = dev.index or 0
    if index < count:
        return dev
    if allow_cpu_fallback:
        LOG.warning("device %s requested but only %d CUDA device(s) visible: falling back to the CPU "
                    "(slow: expect seconds per frame at processing_res 768)", device, count)
        return torch.device("cpu")
    raise DeviceError(f"device {device} requested but {count} CUDA device(s) are visible "
                      f"(torch.cuda.is_available() = {torch.cuda.is_available()}); set device to cpu, "
                      "or allow CPU fallback (node parameter allow_cpu_fallback, CLI --allow-cpu-fallback)")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """torch dtype for fp32 / fp16 / bf16; fp16 on the CPU runs in fp32 (CPU half convolutions are unsupported)."""
    try:
        torch_dtype = DTYPES[dtype.lower()]
    except KeyError as exc:
        raise DeviceError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16") from exc
    if device.type == "cpu" and torch_dtype == torch.float16:
        LOG.warning("fp16 is not supported for CPU inference: using fp32")
        return torch.float32
    return torch_dtype


def encode_empty_prompt(tokenizer: Any, text_encoder: Any, padding: str = "do_not_pad") -> torch.Tensor:
    """CLIP embedding of the empty prompt: [1, 2, C] as at inference; ``padding="max_length"`` gives
    the [1, 77, C] context the paper's training code used (docs/method.md#text-context).

    Runs on the text encoder's device and dtype: the official pipeline encodes on the inference device (a CPU
    embedding differs from a GPU one in the last bits)."""
    tokens = tokenizer([""], padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    ids = tokens.input_ids.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def _embedding_cache_path(folder: Path, device: torch.device) -> Path | None:
    """Where the empty-prompt embedding of this checkpoint's text encoder is kept for this kind of device and torch
    build (None when the checkpoint has no text encoder config)."""
    try:
        digest = hashlib.sha1(_files_fingerprint(folder / "text_encoder").encode())
        digest.update(_files_fingerprint(folder / "tokenizer").encode())
    except OSError:
        return None
    from .startup import compile_cache_key

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "geodiff_ros" / "empty_prompt" / compile_cache_key(device) / f"{digest.hexdigest()}.pt"


def read_cached_embedding(folder: Path, device: torch.device) -> torch.Tensor | None:
    """The cached fp32 empty-prompt embedding [1,2,C] of this checkpoint on this kind of device, or None."""
    path = _embedding_cache_path(folder, device)
    if path is None or not path.is_file():
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a broken cache file: compute the embedding again
        LOG.info("ignoring the cached empty-prompt embedding %s (%s)", path, err)
        return None
    return value if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def write_cached_embedding(folder: Path, device: torch.device, embedding: torch.Tensor) -> None:
    """Keep the embedding for the next start (best effort: a read-only home just computes it each time)."""
    path = _embedding_cache_path(folder, device)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(embedding.detach().cpu(), tmp)
        tmp.replace(path)
    except OSError as err:
        LOG.info("could not cache the empty-prompt embedding in %s (%s)", path, err)


def _files_fingerprint(sub: Path) -> str:
    """Cheap identity of a component folder: its JSON/text files, plus size and head/tail bytes of weight files."""
    digest = hashlib.sha1()
    for item in sorted(sub.iterdir()):
        if not item.is_file():
            continue
        size = item.stat().st_size
        digest.update(f"{item.name}:{size}".encode())
        with item.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _vae_fingerprint(folder: Path) -> str:
    """Cheap identity of a checkpoint's VAE: config plus size and head/tail bytes of its weight files."""
    digest = hashlib.sha1()
    vae_dir = folder / "vae"
    config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    for key in ("_diffusers_version", "_name_or_path", "_class_name"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(vae_dir.glob("*.safetensors")) + sorted(vae_dir.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(str(size).encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


class GeoDiffEngine:
    """Loads one or two E2E-FT checkpoints and turns RGB frames into relative depth and optical-frame normals."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.resample not in ("bilinear", "bicubic", "nearest"):
            raise ImageFormatError(f"unknown resample method {config.resample!r}: use bilinear, bicubic or nearest")
        if config.processing_res < 0:
            raise ValueError(f"processing_res must be >= 0 (0 = native size), got {config.processing_res}")
        if config.optimize not in ("none", ""):
            from .accel import parse_optimize

            parse_optimize(config.optimize)  # an unknown mode fails before the weights load
        self.device = resolve_device(config.device, config.allow_cpu_fallback)
        if self.device.type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)  # process-wide: one engine per process
        self.dtype = resolve_dtype(config.dtype, self.device)
        sources = {"depth": config.depth_model or "", "normals": config.normals_model or ""}
        wanted = [task for task in TASKS if sources[task]]
        if not wanted:
            raise ModelLoadError("no model given: set a depth model, a normals model or both "
                                 f"(e.g. {DEPTH_HUB_ID}, GonzaloMG/marigold-e2e-ft-normals)")
        self.models: dict[str, TaskModel] = {}
        self.accelerator: Any = None
        self._sign_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.vae: Any = None
        self.empty_embedding: torch.Tensor | None = None
        self._extra_vaes: dict[str, Any] = {}
        first_folder: Path | None = None
        # Seconds per loading step (logged once; benchmarks read it): where a restart's time goes.
        self.load_times: dict[str, float] = {}
        cached_embedding: list[torch.Tensor] = []

        def need_text_encoder(folder: Path) -> bool:  # no text encoder to load when its embedding is cached
            if self.empty_embedding is not None:
                return False
            cached_embedding[:] = [e for e in [read_cached_embedding(folder, self.device)] if e is not None]
            return not cached_embedding

        for task in wanted:
            # Weights load in self.dtype (torch_dtype), so moving them is a device move only, no cast.
            t0 = time.perf_counter()
            parts = load_components(sources[task], torch_dtype=self.dtype,
                                    local_files_only=config.local_files_only,
                                    load_text_encoder=need_text_encoder,
                                    expected_task=task if config.check_model_task else None,
                                    device=self.device)
            t1 = time.perf_counter()
            self.load_times[f"read {task}"] = t1 - t0
            if self.vae is None:
                first_folder = parts.folder
                self.vae = parts.vae.to(self.device).eval()
                # The text encoder (fp32, as in the official pipeline) only serves the empty-prompt embedding,
                # computed on the inference device and cast like the official one; released after.
                # It is kept on disk per checkpoint, device kind and torch build (the same bits), so a restart
                # does not load the text encoder at all.
                if cached_embedding:
                    embedding = cached_embedding[0].to(self.device)
                else:
                    embedding = encode_empty_prompt(parts.tokenizer, parts.text_encoder.to(self.device))
                    write_cached_embedding(parts.folder, self.device, embedding)
                self.empty_embedding = embedding.to(self.dtype)
                parts.text_encoder = None
                self.load_times["empty prompt" + (" (cached)" if cached_embedding else "")] = \
                    time.perf_counter() - t1
            elif _vae_fingerprint(parts.folder) != _vae_fingerprint(first_folder):
                LOG.warning("the %s checkpoint %s has a different VAE than %s: encoding each frame twice",
                            task, parts.folder, first_folder)
                self._extra_vaes[task] = parts.vae.to(self.device).eval()
            width = self.empty_embedding.shape[-1]
            if parts.unet.config.cross_attention_dim != width:
                raise ModelLoadError(f"the {task} checkpoint {parts.folder} expects text width "
                                     f"{parts.unet.config.cross_attention_dim} but the shared text encoder gives "
                                     f"{width}: load the two tasks from matching checkpoints")
            frame = config.normals_frame or normals_frame_of(sources[task], parts.model_index)
            t2 = time.perf_counter()
            self.models[task] = TaskModel(task, parts.unet.to(self.device).eval(), parts.scheduler, sources[task],
                                          frame)
            self.load_times[f"{task} unet to {self.device.type}"] = time.perf_counter() - t2
        self.optimize = "none"  # the mode in use ("auto" resolved for the device)
        if config.optimize not in ("none", ""):
            from .accel import Accelerator, resolve_optimize

            self.optimize = resolve_optimize(config.optimize, self.device)
            if self.optimize != "none":
                t0 = time.perf_counter()
                self.accelerator = Accelerator(self, self.optimize)
                self.load_times["accelerator"] = time.perf_counter() - t0
        LOG.info("geodiff engine ready: tasks %s on %s (%s), processing_res %d, optimize %s; loaded in %s",
                 self.tasks, self.device, str(self.dtype).replace("torch.", ""), config.processing_res,
                 self.optimize, ", ".join(f"{k} {v:.1f} s" for k, v in self.load_times.items()))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.models)

    # ------------------------------------------------------------ building blocks (docs/method.md#single-step-forward)

    def preprocess(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] uint8 -> [B,3,h,w] in [-1,1] at the processing size, on its device."""
        h, w = processing_size(batch_u8.shape[-2], batch_u8.shape[-1], self.config.processing_res)
        x = resize_uint8_batch(batch_u8, (h, w), self.config.resample)
        return (x / 255.0 * 2.0 - 1.0).to(self.dtype)

    def encode(self, x: torch.Tensor, vae: Any = None) -> torch.Tensor:
        """Image latent: mean of the VAE posterior x 0.18215, [B,4,h/8,w/8]."""
        return (vae or self.vae).encode(x).latent_dist.mean * LATENT_SCALE

    def denoise_single_step(self, task: str, z_img: torch.Tensor) -> torch.Tensor:
        """One UNet call at t = T-1 on a zero target latent, returning x0 (docs/method.md#x0).

        As the official pipeline: a contiguous zero latent (``zeros_like`` would copy the image latent's memory
        layout) and the embedding repeated over the batch.
        """
        model = self.models[task]
        t = model.scheduler.config.num_train_timesteps - 1  # 999
        z_t = torch.zeros(z_img.shape, device=z_img.device, dtype=z_img.dtype)  # [B,4,h,w]
        context = self.empty_embedding.repeat(z_img.shape[0], 1, 1)  # [B,2,C]
        pred = model.unet(torch.cat([z_img, z_t], dim=1), t, encoder_hidden_states=context).sample
        return x0_from_prediction(pred, z_t, model.scheduler.alphas_cumprod[t],
                                  model.scheduler.config.prediction_type)

    def decode(self, z0: torch.Tensor, vae: Any = None) -> torch.Tensor:
        """[B,4,h/8,w/8] latent -> [B,3,h',w'] decoder output."""
        return (vae or self.vae).decode(z0 / LATENT_SCALE).sample

    def postprocess_depth(self, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder output [B,3,h',w'] -> [B,H,W] depth in [0,1] (docs/method.md#depth-output)."""
        return self.finish_depth(decoder_to_depth(y), size)

    def finish_depth(self, d: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B,1,h',w'] depth -> min-max to [0,1], resize back, clip: [B,H,W]."""
        d = minmax_per_image(d)
        if self.config.match_input_res:
            d = resize_output(d, size, self.config.resample)
        return d.clamp(0.0, 1.0)[:, 0]

    def postprocess_normals(self, y: torch.Tensor, size: tuple[int, int], frame: str) -> torch.Tensor:
        """Decoder output [B,3,h',w'] -> [B,H,W,3] unit normals in the ROS optical frame
        (docs/method.md#normals-output)."""
        n = y.float()
        n = n / (n.norm(dim=1, keepdim=True) + NORMAL_EPS)  # unit length after decoding
        return self.finish_normals(n, size, frame)

    def finish_normals(self, n: torch.Tensor, size: tuple[int, int], frame: str) -> torch.Tensor:
        """Unit normals [B,3,h',w'] (after decoding or ensembling) -> [B,H,W,3] in the optical frame
        (docs/method.md#normal-frames)."""
        n = n / (n.norm(dim=1, keepdim=True) + NORMAL_EPS)  # re-normalised once more
        if self.config.match_input_res:
            n = resize_output(n, size, self.config.resample)  # not re-normalised after resizing, as the official
        n = n.clamp(-1.0, 1.0)
        return (n * self._optical_signs(frame, n.device, n.dtype)[None, :, None, None]).permute(0, 2, 3, 1)

    def _optical_signs(self, frame: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Per-axis signs to the optical frame, cached on the device: no host copy per frame (CUDA-graph safe)."""
        key = (frame, device, dtype)
        if key not in self._sign_cache:
            self._sign_cache[key] = torch.tensor(TO_OPTICAL_SIGNS[frame], device=device, dtype=dtype)
        return self._sign_cache[key]

    # ---------------------------------------------------------------- public API

    def predict(self, images: np.ndarray | Sequence[np.ndarray], tasks: Sequence[str] | None = None, *,
                on_device: bool = False) -> Prediction:
        """Single-step E2E-FT inference on one frame [H,W,3] or many ([B,H,W,3] or a list; sizes may differ).

        ``on_device``: depth and normals come back as lists of per-frame torch tensors on the engine's device
        (the same values; nothing copied to the host), for callers that post-process there (the ROS node).
        """
        frames = self._as_frame_list(images)
        tasks = self._select_tasks(tasks)
        depth: list[Any] = [None] * len(frames)
        normals: list[Any] = [None] * len(frames)
        for indices in self._batches(frames):
            batch = np.stack([frames[i] for i in indices])
            if on_device:
                out = Prediction(**self._forward_tensors(batch, tasks))
            else:
                out = self._forward(batch, tasks)
            for j, i in enumerate(indices):
                if out.depth is not None:
                    depth[i] = out.depth[j]
                if out.normals is not None:
                    normals[i] = out.normals[j]
        pack = (lambda items: items) if on_device else _stack_or_list
        return Prediction(
            depth=pack(depth) if "depth" in tasks else None,
            normals=pack(normals) if "normals" in tasks else None,
            timesteps=[self.models[tasks[0]].scheduler.config.num_train_timesteps - 1],
        )

    def warmup(self, height: int = 480, width: int = 640, tasks: Sequence[str] | None = None,
               batch: int = 1) -> float:
        """Run ``batch`` dummy frames of this size in one call so kernels load (and, when optimised, compile /
        capture for that batch size) now, not on the first real frame; returns the seconds it took. Compiled
        artefacts are cached on disk (accel.py)."""
        start = time.perf_counter()
        rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H,W,3]
        self.predict([rgb] * batch, tasks)
        return time.perf_counter() - start

    @property
    def bit_exact(self) -> bool:
        """True when the eager path reproduces the official computation bit for bit: fp32, the only precision the
        official code runs in (its fp16 flag is a no-op, docs/method.md#precision)."""
        return self.dtype == torch.float32

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray, tasks: Sequence[str]) -> Prediction:
        """[B,H,W,3] uint8 frames of one size -> Prediction with [B,...] arrays."""
        if self.accelerator is not None:
            return self.accelerator.forward(batch, tasks)
        return Prediction(**{task: value.cpu().numpy() for task, value in self._eager_tensors(batch, tasks).items()})

    @torch.inference_mode()
    def _forward_tensors(self, batch: np.ndarray, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """{task: [B,H,W] / [B,H,W,3] float32 on the device}; safe to keep while the next batch runs."""
        if self.accelerator is not None:
            return self.accelerator.forward_device(batch, tasks)
        out = self._eager_tensors(batch, tasks)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def _eager_tensors(self, batch: np.ndarray, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """[B,H,W,3] uint8 frames of one size -> {task: [B,...] tensor on the device}."""
        if not self.bit_exact:  # fp16 / bf16: no official result to equal, so the batch runs in one pass
            return self._eager_frames(batch, tasks)
        # fp32: the official pipeline runs one image at a time. Convolutions round differently with the batch size
        # (CPU and GPU), so batching would make a frame's output depend on the frames that share its call.
        outs = [self._eager_frames(batch[i:i + 1], tasks) for i in range(batch.shape[0])]
        return {task: torch.cat([o[task] for o in outs]) for task in tasks}

    def _eager_frames(self, frames: np.ndarray, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """[B,H,W,3] frames through the official computation ; fp32 and B=1: bit for bit."""
        size = (frames.shape[1], frames.shape[2])
        x = self._network_input(frames)  # [B,3,h,w] contiguous
        z_img = self.encode(x)
        out: dict[str, torch.Tensor] = {}
        for task in tasks:
            vae = self._extra_vaes.get(task)
            z = self.encode(x, vae) if vae is not None else z_img
            y = self.decode(self.denoise_single_step(task, z), vae)
            if task == "depth":
                out[task] = self.postprocess_depth(y, size)
            else:
                out[task] = self.postprocess_normals(y, size, self.models[task].normals_frame)
        return out

    def scheduler_timesteps(self, num_steps: int, timestep_spacing: str, task: str | None = None) -> list[int]:
        """Timesteps DDIM runs for ``num_steps`` with the given spacing (the paper's finding,
        docs/method.md#timestep-spacing)."""
        from diffusers import DDIMScheduler

        model = self.models[task or self.tasks[0]]
        scheduler = DDIMScheduler.from_config(model.scheduler.config, timestep_spacing=timestep_spacing)
        scheduler.set_timesteps(num_steps)
        return [int(t) for t in scheduler.timesteps]

    @torch.inference_mode()
    def predict_multistep(
        self,
        image: np.ndarray,
        *,
        task: str = "depth",
        num_steps: int = 10,
        ensemble_size: int = 1,
        timestep_spacing: str = "leading",
        noise: str = "gaussian",
        seed: int | None = 0,
    ) -> Prediction:
        """Legacy Marigold inference on one frame: DDIM, N steps, noise, ensemble (docs/method.md#multi-step-path).

        With ``leading`` spacing and one step DDIM runs at t=1 (the bug the paper found); ``trailing`` runs t=999.
        The last step returns x0 (pred_original_sample) as the E2E-FT pipeline does.
        ``seed`` (Gaussian noise): ``seed=s`` gives the official noise of a call made right after
        ``torch.manual_seed(s)``, drawn from a fresh generator (torch's global generators are left alone);
        ``seed=None`` draws from torch's global generators exactly as the official call does. The official
        pipeline iterates a ``DataLoader`` over the input before its first ``randn``, and starting that iteration
        takes one int64 draw from the global CPU generator (the loader's base seed). So on the CPU the noise is the
        draw after that int64 draw; on CUDA the noise comes from the CUDA generator, which the loader's CPU draw
        does not advance (the global CPU generator still loses one int64 with ``seed=None``, as in the official).
        fp32 members run one at a time (the official batch size on a CPU), fp16 / bf16 members as one batch.
        """
        from diffusers import DDIMScheduler

        if noise not in ("gaussian", "zeros"):
            raise ValueError(f"noise must be gaussian or zeros, got {noise!r}")
        model = self.models[self._select_tasks([task])[0]]
        frame = to_rgb_uint8(image)
        size = frame.shape[:2]
        scheduler = DDIMScheduler.from_config(model.scheduler.config, timestep_spacing=timestep_spacing)
        scheduler.set_timesteps(num_steps, device=self.device)
        x = self._network_input(frame[None])  # [1,3,h,w]
        generator = _official_noise_generator(self.device, seed)
        # fp32: one member at a time, as the official runs on a CPU (batch size 1; batching changes rounding) and
        # with the same sequence of draws; fp16 / bf16: all E members in one batch.
        groups = [1] * ensemble_size if self.bit_exact else [ensemble_size]
        y = torch.cat([self._denoise(model, scheduler, x.repeat(n, 1, 1, 1), noise, generator) for n in groups])
        timesteps = [int(t) for t in scheduler.timesteps]
        if task == "depth":
            members = decoder_to_depth(y)[:, 0]  # [E,h,w]
            agg = ensemble_depths(members)[0] if ensemble_size > 1 else members[0]
            depth = self.finish_depth(agg[None, None], size)
            return Prediction(depth=depth[0].cpu().numpy(), timesteps=timesteps)
        if ensemble_size > 1:  # members unit length, ensembled, then re-normalised and resized
            members = y.float()
            members = members / (members.norm(dim=1, keepdim=True) + NORMAL_EPS)
            normals = self.finish_normals(ensemble_normals(members)[None], size, model.normals_frame)
        else:
            normals = self.postprocess_normals(y[:1], size, model.normals_frame)
        return Prediction(normals=normals[0].cpu().numpy(), timesteps=timesteps)

    def _denoise(self, model: Any, scheduler: Any, x: torch.Tensor, noise: str,
                 generator: torch.Generator | None) -> torch.Tensor:
        """[B,3,h,w] network input -> [B,3,h',w'] decoder output after the DDIM loop."""
        z_img = self.encode(x)  # [B,4,h/8,w/8]
        if noise == "gaussian":  # torch.randn on the device in the model dtype (docs/method.md#gaussian-noise)
            latent = torch.randn(z_img.shape, generator=generator, device=self.device, dtype=self.dtype)
        else:
            latent = torch.zeros(z_img.shape, device=self.device, dtype=self.dtype)
        context = self.empty_embedding.repeat(x.shape[0], 1, 1)
        last = len(scheduler.timesteps) - 1
        for i, t in enumerate(scheduler.timesteps):
            pred = model.unet(torch.cat([z_img, latent], dim=1), t, encoder_hidden_states=context).sample
            step = scheduler.step(pred, t, latent)
            latent = step.pred_original_sample if i == last else step.prev_sample  # x0 on the last step
        return self.decode(latent.to(self.dtype))

    # ---------------------------------------------------------------- helpers

    def _network_input(self, batch: np.ndarray) -> torch.Tensor:
        """[B,H,W,3] uint8 frames -> [B,3,h,w] network input on the device, built as the official pipeline does.

        A contiguous NCHW tensor (a bare ``permute`` would leave it channels-last and the VAE, UNet and decoder
        would then round differently). In fp32 it is resized and scaled to [-1, 1] on the CPU like the
        official ``resize_max_res`` + ``/255*2-1`` (CUDA divides by a scalar through its reciprocal: not always the
        same bits); in fp16 / bf16 on the device (14-34 ms of one CPU core per frame saved).
        """
        if self.bit_exact:
            u8 = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # [B,3,H,W] uint8, CPU
            return self.preprocess(u8).to(self.device)
        u8 = torch.from_numpy(batch).to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return self.preprocess(u8)

    def _select_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        if tasks is None:
            return list(self.models)
        missing = [t for t in tasks if t not in self.models]
        if missing:
            raise ModelLoadError(f"task(s) {missing} requested but not loaded (loaded: {list(self.models)}); "
                                 "give a model for them in the configuration")
        return list(tasks)

    @staticmethod
    def _as_frame_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(images, np.ndarray):
            if images.ndim == 4:
                return [to_rgb_uint8(im) for im in images]
            return [to_rgb_uint8(images)]
        if len(images) == 0:
            raise ImageFormatError("no images given")
        return [to_rgb_uint8(im) for im in images]

    def _batches(self, frames: list[np.ndarray]) -> list[list[int]]:
        """Indices grouped by frame size, in order, at most batch_size per group."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            groups.setdefault(frame.shape[:2], []).append(i)
        size = max(1, self.config.batch_size)
        return [idx[k:k + size] for idx in groups.values() for k in range(0, len(idx), size)]


def _official_noise_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """The generator whose next ``randn`` on ``device`` is the official pipeline's first noise draw (None: torch's
    global generator, with the global CPU generator advanced as the official advances it).

    The official pipeline starts iterating a ``torch.utils.data.DataLoader`` over the input before drawing noise;
    the loader's iterator takes its base seed as one int64 draw from the global CPU generator
    (``torch.empty((), dtype=torch.int64).random_()``). That draw moves the CPU generator only.
    """
    if seed is None:
        torch.empty((), dtype=torch.int64).random_()  # the loader's base seed, from the global CPU generator
        return None
    generator = torch.Generator(device=device).manual_seed(seed)
    if generator.device.type == "cpu":
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the same draw on the fresh generator
    return generator


def decoder_to_depth(y: torch.Tensor) -> torch.Tensor:
    """[B,3,h,w] decoder output -> [B,1,h,w] depth in [0,1]: channel mean, clip, (d+1)/2."""
    return (y.float().mean(dim=1, keepdim=True).clamp(-1.0, 1.0) + 1.0) / 2.0


def minmax_per_image(d: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each [1,h,w] map of a [B,1,h,w] batch to [0,1]; constant maps become 0."""
    lo = d.amin(dim=(1, 2, 3), keepdim=True)
    hi = d.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (d - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(d))


def _stack_or_list(items: list[np.ndarray | None]) -> np.ndarray | list[np.ndarray]:
    """One array when all frames share a size, else a list (mixed sizes in one call)."""
    shapes = {item.shape for item in items if item is not None}
    if len(shapes) == 1:
        return np.stack(items)
    return items
