"""Training data for E2E fine-tuning: Hypersim, Virtual KITTI 2, generic RGB-D manifest (docs/method.md#training).

Every dataset returns a dict of tensors:
  ``rgb``        ``[3,H,W]`` float in [-1,1]
  ``depth``      ``[1,H,W]`` metric depth in metres, 2/98 % clamped, invalid -> q98 (the loss target)
  ``valid_mask`` ``[1,H,W]`` bool
  ``normals``    ``[3,H,W]`` unit normals in the **model frame** (only when ``modality="normals"``)
  ``normals_mask`` ``[1,H,W]`` bool, pixels with a ground-truth normal (idem)

Model normal frame: the E2E-FT checkpoints predict normals in DSINE "LUB" (x left, y up, z towards
the camera; docs/method.md#normal-frames). The ROS optical frame (x right, y down, z forward) is its exact negation,
so ``n_model = -n_optical``. A horizontal flip negates x in either frame.

Hypersim and Virtual KITTI 2 default to ``preprocess="official"``: the samples the paper's loader
(``training/dataloaders/load.py`` of the E2E-FT repository) produces, bit for bit: PIL images flipped and
resized as uint8, Hypersim normals oriented in float64 and re-quantised to uint8 by truncation, a flipped
normal map's x stored as ``255 - x``, normals supervised wherever depth is valid. ``preprocess="float"``
keeps everything in float and resizes with torch (no quantisation; not the paper's numbers).
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..manifest import ManifestError, read_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "HYPERSIM_FOCAL_PX",
    "HypersimDataset",
    "ManifestRGBDDataset",
    "MixedDataLoader",
    "VirtualKITTI2Dataset",
    "kitti_benchmark_crop",
    "make_depth_target",
    "optical_to_model_normals",
]

HYPERSIM_FOCAL_PX = 886.81  # focal length of the 1024x768 Hypersim renders
KB_CROP_HW = (352, 1216)  # KITTI benchmark crop (bottom rows, centred)
PREPROCESS_MODES = ("official", "float")


class DataError(ValueError):
    """A training dataset is missing, empty or malformed."""


# ----------------------------------------------------------------------------- helpers


def optical_to_model_normals(n: torch.Tensor) -> torch.Tensor:
    """ROS optical frame (x right, y down, z forward) -> model LUB frame: negate all axes."""
    return -n


def read_rgb(path: Path) -> torch.Tensor:
    """Image file -> ``[3,H,W]`` float in [0,1]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_depth(path: Path, scale: float) -> torch.Tensor:
    """Depth file (uint16/float PNG, .npy) -> ``[1,H,W]`` float metres (value / scale)."""
    if path.suffix == ".npy":
        arr = np.load(path).astype(np.float32).squeeze()
    else:
        with Image.open(path) as im:
            arr = np.asarray(im).astype(np.float32)
    if arr.ndim != 2:
        msg = f"Depth image {path} has shape {arr.shape}; expected a single-channel image."
        raise DataError(msg)
    return torch.from_numpy(arr / scale).unsqueeze(0)


def read_normals_png(path: Path) -> torch.Tensor:
    """Normal-map PNG ``n = v/vmax*2-1`` (channel order R,G,B = x,y,z) -> ``[3,H,W]`` float."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 3 or arr.shape[2] < 3:
        msg = f"Normal map {path} has shape {arr.shape}; expected an RGB image."
        raise DataError(msg)
    vmax = 65535.0 if arr.dtype == np.uint16 else 255.0
    n = arr[..., :3].astype(np.float32) / vmax * 2.0 - 1.0
    return torch.from_numpy(n).permute(2, 0, 1).contiguous()


def _resize(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if mode == "nearest":
        return F.interpolate(x[None], size=hw, mode="nearest-exact")[0]
    return F.interpolate(x[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]


def kitti_benchmark_crop(x: torch.Tensor) -> torch.Tensor:
    """KITTI benchmark crop 352x1216: bottom-aligned, horizontally centred."""
    h, w = x.shape[-2:]
    top = int(h - KB_CROP_HW[0])
    left = int((w - KB_CROP_HW[1]) / 2)
    return x[..., top : top + KB_CROP_HW[0], left : left + KB_CROP_HW[1]]


def make_depth_target(
    depth_m: torch.Tensor, near: float, far: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid mask and loss target from metric depth (docs/method.md#depth-target).

    valid = near < d < far; q2/q98 = 2nd/98th percentile of valid depth; d clamped to [q2,q98];
    invalid pixels set to q98 (far plane). If no valid pixel or q2 == q98: zeros and empty mask.
    """
    valid = (depth_m > near) & (depth_m < far)  # [1,H,W]
    if not bool(valid.any()):
        return torch.zeros_like(depth_m), valid
    flat = depth_m[valid].float()
    q2 = torch.quantile(flat, 0.02)
    q98 = torch.quantile(flat, 0.98)
    if q2 == q98:
        return torch.zeros_like(depth_m), torch.zeros_like(valid)
    target = depth_m.clamp(q2, q98)
    target[~valid] = q98
    return target, valid


def _finish_sample(
    rgb01: torch.Tensor,
    depth_m: torch.Tensor,
    normals: torch.Tensor | None,
    near: float,
    far: float,
    modality: str,
    name: str,
    normals_need_depth: bool = True,
) -> dict[str, torch.Tensor | str]:
    target, valid = make_depth_target(depth_m, near, far)
    out: dict[str, torch.Tensor | str] = {
        "rgb": rgb01 * 2.0 - 1.0,
        "depth": target,
        "valid_mask": valid,
        "dataset": name,
    }
    if modality == "normals":
        if normals is None:
            msg = f"Dataset {name!r} has no normals for a sample; cannot train `--modality normals`."
            raise DataError(msg)
        raw_norm = torch.linalg.vector_norm(normals, dim=0, keepdim=True)  # [1,H,W]
        n_valid = raw_norm > 0.5  # zero / undefined GT normals are not supervised
        if normals_need_depth:
            n_valid = n_valid & valid  # Hypersim/VKITTI normals: valid where depth is
        n = F.normalize(normals, p=2, dim=0) * n_valid.to(normals.dtype)  # invalid -> zero vector
        out["normals"] = n
        out["normals_mask"] = n_valid
    return out


def _draw_flip(flip_p: float) -> bool:
    """One draw of Python's RNG per sample, mapped as the paper's loader does (flip when ``random() > 0.5``)."""
    return random.random() > 1.0 - flip_p


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` of a PIL image: uint8 -> float32 / 255 ``[C,H,W]``; float ("F") kept as is."""
    arr = np.array(image, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div(255) if t.dtype == torch.uint8 else t


def _pil_flip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _flip_normal_image(image: Image.Image) -> Image.Image:
    """Mirror a uint8 normal map and negate x as the paper's loader does: ``x -> 255 - x`` on the stored byte."""
    arr = np.array(_pil_flip(image))
    arr[:, :, 0] = 255 - arr[:, :, 0]
    return Image.fromarray(arr)


def _official_normals(normals01: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3,H,W]`` in [0,1] (ToTensor of the uint8 map) -> unit normals, zero where depth is invalid; the mask
    is the depth mask (the paper's angular loss uses ``val_mask``)."""
    n = F.normalize(normals01 * 2.0 - 1.0, p=2, dim=0)
    n[:, ~valid[0]] = 0.0
    return n, valid.clone()


def _hflip(
    rgb: torch.Tensor, depth: torch.Tensor, normals: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rgb = rgb.flip(-1)
    depth = depth.flip(-1)
    if normals is not None:
        normals = normals.flip(-1).clone()
        normals[0] = -normals[0]  # a horizontal flip negates x of the normals
    return rgb, depth, normals


def _check_modality(modality: str) -> None:
    if modality not in ("depth", "normals"):
        msg = f"`modality` must be 'depth' or 'normals'; got {modality!r}"
        raise ValueError(msg)


def _check_preprocess(preprocess: str) -> None:
    if preprocess not in PREPROCESS_MODES:
        msg = f"`preprocess` must be one of {PREPROCESS_MODES}; got {preprocess!r}"
        raise ValueError(msg)


# ----------------------------------------------------------------------------- Hypersim

_HYPERSIM_RGB_RE = re.compile(r"rgb_(cam_\d+)_fr(\d+)\.png$")


class HypersimDataset(Dataset):
    """Hypersim in Marigold's preprocessed layout (docs/method.md#hypersim).

    ``root/train/<scene>/rgb_cam_XX_frYYYY.png`` + ``depth_plane_cam_XX_frYYYY.png`` (uint16 mm,
    planar). Normals from the E2E layout beside ``train/``:
    ``root/normals/<scene>/images/scene_cam_XX_geometry_preview/frame.YYYY.normal_cam.png``.
    Split: ``split_file`` = E2E's ``filename_meta_train.csv`` (rows with included_in_public_release
    and split_partition_name == train), or Marigold's list (``rgb depth`` per line, relative to
    ``root``); without one, every ``rgb_*.png`` under ``root/train`` is used.
    Rows: the paper's loader keeps a row only if its rgb, depth **and normals** files exist, for depth
    training too; ``require_normals=False`` also keeps depth-only rows (depth training on a download
    without the normal maps; not the paper's set).
    Transform: h-flip p=0.5, resize to 480x640 (RGB/normals bilinear, depth nearest); valid
    1e-5 < d < 65 m. ``preprocess`` (module docstring): "official" = the paper's loader bit for bit.
    """

    near = 1e-5
    far = 65.0

    def __init__(
        self,
        root: str | Path,
        *,
        split_file: str | Path | None = None,
        modality: str = "depth",
        size_hw: tuple[int, int] = (480, 640),
        flip_p: float = 0.5,
        preprocess: str = "official",
        require_normals: bool = True,
    ) -> None:
        _check_modality(modality)
        _check_preprocess(preprocess)
        self.root = Path(root)
        self.modality = modality
        self.size_hw = size_hw
        self.flip_p = flip_p
        self.preprocess = preprocess
        self.require_normals = require_normals or modality == "normals"
        self.items = self._find_items(split_file)
        if not self.items:
            msg = (
                f"No Hypersim samples found under {self.root} (split {split_file}). Expected "
                "Marigold's preprocessed layout train/<scene>/rgb_cam_00_fr0000.png + "
                "depth_plane_cam_00_fr0000.png, and the normal maps under normals/ (the paper's loader "
                "keeps only rows that have one"
                + ("; for depth training without them pass --hypersim_all_depth_rows)."
                   if modality == "depth" else ").")
            )
            raise DataError(msg)

    def _normal_path(self, rgb_path: Path) -> Path | None:
        m = _HYPERSIM_RGB_RE.search(rgb_path.name)
        if m is None:
            return None
        scene = rgb_path.parent.name
        cam, frame = m.group(1), int(m.group(2))
        return (
            self.root / "normals" / scene / "images" / f"scene_{cam}_geometry_preview"
            / f"frame.{frame:04d}.normal_cam.png"
        )

    def _find_items(self, split_file: str | Path | None) -> list[tuple[Path, Path, Path | None]]:
        pairs: list[tuple[Path, Path]] = []
        if split_file is not None and str(split_file).endswith(".csv"):
            with open(split_file, newline="") as f:
                for row in csv.DictReader(f):
                    public = str(row.get("included_in_public_release", "True")).lower() == "true"
                    if public and row.get("split_partition_name", "train") == "train":
                        pairs.append(
                            (self.root / "train" / row["rgb_path"],
                             self.root / "train" / row["depth_path"])
                        )
        elif split_file is not None:
            for line in Path(split_file).read_text().splitlines():
                cols = line.split()
                if len(cols) >= 2:
                    pairs.append((self.root / cols[0], self.root / cols[1]))
        else:
            for rgb in sorted((self.root / "train").glob("*/rgb_*.png")):
                pairs.append((rgb, rgb.with_name(rgb.name.replace("rgb_", "depth_plane_", 1))))
        items = []
        for rgb, depth in pairs:
            normal = self._normal_path(rgb)
            if not (rgb.exists() and depth.exists()):
                continue
            has_normal = normal is not None and normal.exists()
            if self.require_normals and not has_normal:
                continue  # the paper's loader keeps only rows whose normal file exists
            items.append((rgb, depth, normal if has_normal else None))
        return items

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def orient_normals(normal_cam: torch.Tensor, depth_m: torch.Tensor) -> torch.Tensor:
        """Hypersim ``normal_cam`` (x right, y up, z backward) -> LUB, facing the camera (float path).

        docs/method.md#normal-frames: negate y and z (-> OpenCV), flip normals whose dot product with the camera
        ray is positive (K: f=886.81, c=(W/2,H/2)), then negate everything (-> LUB).
        """
        n = normal_cam.clone()
        n[1:] = -n[1:]
        _, h, w = n.shape
        v, u = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
            indexing="ij",
        )
        rays = torch.stack([(u - w / 2) / HYPERSIM_FOCAL_PX, (v - h / 2) / HYPERSIM_FOCAL_PX,
                            torch.ones_like(u)])  # [3,H,W]
        points = rays * depth_m  # [3,H,W]
        back = (n * points).sum(0) > 0
        n[:, back] = -n[:, back]
        return -n

    @staticmethod
    def orient_normals_uint8(normal_u8: np.ndarray, depth_m: np.ndarray) -> np.ndarray:
        """The paper's loader on a uint8 ``normal_cam`` map ``[H,W,3]``: LUB, facing the camera, re-quantised.

        float64 throughout, as the loader computes it: ``n = u8/255*2-1``; y, z negated; camera points
        ``depth * K^-1 [u, v, 1]`` (K: f=886.81, c=(W/2,H/2)); normals with ``<n, p> > 0`` flipped; all
        negated; stored back as ``uint8((n+1)/2*255)`` (truncation, so 128 can come back as 127).
        ``depth_m``: ``[H,W]`` float32 metres at the map's resolution.
        """
        n = normal_u8.astype(np.float64) / 255.0 * 2.0 - 1.0  # [H,W,3]
        h, w = n.shape[:2]
        n[:, :, 1:] *= -1
        k = np.array([[HYPERSIM_FOCAL_PX, 0.0, w / 2], [0.0, HYPERSIM_FOCAL_PX, h / 2], [0.0, 0.0, 1.0]])
        rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        pixels = np.concatenate([np.stack((cols, rows)).reshape(2, -1), np.ones((1, h * w))], axis=0)  # [3,HW]
        points = (depth_m * (np.linalg.inv(k) @ pixels).reshape(3, h, w)).transpose(1, 2, 0)  # [H,W,3]
        facing_away = np.sum(n * points, axis=2) > 0
        n[facing_away] *= -1
        n = n * -1
        return ((n + 1.0) / 2.0 * 255).astype(np.uint8)

    def __getitem__(self, idx: int) -> dict:
        if self.preprocess == "official":
            return self._official_sample(idx)
        rgb_path, depth_path, normal_path = self.items[idx]
        rgb = read_rgb(rgb_path)  # [3,H,W]
        depth = read_depth(depth_path, 1000.0)  # [1,H,W] mm -> m
        normals = None
        if self.modality == "normals" and normal_path is not None:
            normals = self.orient_normals(read_normals_png(normal_path), depth)
        if _draw_flip(self.flip_p):
            rgb, depth, normals = _hflip(rgb, depth, normals)
        rgb = _resize(rgb, self.size_hw, "bilinear")
        depth = _resize(depth, self.size_hw, "nearest")
        if normals is not None:
            normals = _resize(normals, self.size_hw, "bilinear")
        return _finish_sample(rgb, depth, normals, self.near, self.far, self.modality, "hypersim")

    def _official_sample(self, idx: int) -> dict:
        """The paper's Hypersim sample: PIL uint8 flip + resize, float64 orientation, uint8 normals."""
        rgb_path, depth_path, normal_path = self.items[idx]
        with Image.open(rgb_path) as im:
            rgb = im.convert("RGB")
        with Image.open(depth_path) as im:
            depth_mm = np.array(im)
        depth = Image.fromarray(depth_mm / 1000)  # float64 metres -> PIL "F" (float32), as the loader
        normal = None
        if self.modality == "normals":
            with Image.open(normal_path) as im:
                normal_u8 = np.array(im.convert("RGB"))
            normal = Image.fromarray(self.orient_normals_uint8(normal_u8, np.array(depth)))
        if _draw_flip(self.flip_p):
            rgb, depth = _pil_flip(rgb), _pil_flip(depth)
            if normal is not None:
                normal = _flip_normal_image(normal)
        size_wh = (self.size_hw[1], self.size_hw[0])
        rgb = rgb.resize(size_wh, Image.Resampling.BILINEAR)
        depth = depth.resize(size_wh, Image.Resampling.NEAREST)
        rgb01, depth_m = _to_tensor(rgb), _to_tensor(depth)  # [3,H,W] in [0,1], [1,H,W] metres
        target, valid = make_depth_target(depth_m, self.near, self.far)
        out: dict[str, torch.Tensor | str] = {"rgb": rgb01 * 2.0 - 1.0, "depth": target, "valid_mask": valid,
                                              "dataset": "hypersim"}
        if normal is not None:
            out["normals"], out["normals_mask"] = _official_normals(
                _to_tensor(normal.resize(size_wh, Image.Resampling.BILINEAR)), valid)
        return out


# ----------------------------------------------------------------------------- Virtual KITTI 2


class VirtualKITTI2Dataset(Dataset):
    """Virtual KITTI 2 (docs/method.md#virtual-kitti-2): scenes 01/02/06/18/20 x 5 weathers x Camera_0/1.

    ``root/vkitti_2.0.3_rgb/<Scene>/<weather>/frames/rgb/<Camera>/rgb_XXXXX.jpg``,
    ``root/vkitti_2.0.3_depth/.../frames/depth/<Camera>/depth_XXXXX.png`` (uint16 cm), normals
    ``root/vkitti_DAG_normals/.../frames/normal/<Camera>/normal_XXXXX.png`` (already LUB).
    Transform: h-flip p=0.5, KITTI benchmark crop 352x1216, no resize; valid 1e-5 < d < 80 m.
    ``preprocess`` (module docstring): "official" reads the normal map as 8-bit RGB like the paper's loader.
    """

    near = 1e-5
    far = 80.0
    scenes = ("Scene01", "Scene02", "Scene06", "Scene18", "Scene20")
    weathers = ("morning", "fog", "rain", "sunset", "overcast")
    cameras = ("Camera_0", "Camera_1")

    def __init__(
        self, root: str | Path, *, modality: str = "depth", flip_p: float = 0.5, preprocess: str = "official"
    ) -> None:
        _check_modality(modality)
        _check_preprocess(preprocess)
        self.root = Path(root)
        self.modality = modality
        self.flip_p = flip_p
        self.preprocess = preprocess
        self.items: list[tuple[Path, Path, Path]] = []
        for scene in self.scenes:
            for weather in self.weathers:
                for cam in self.cameras:
                    rgb_dir = self.root / "vkitti_2.0.3_rgb" / scene / weather / "frames" / "rgb" / cam
                    rel = Path(scene) / weather / "frames"
                    for rgb in sorted(rgb_dir.glob("rgb_*.jpg")):
                        stem = rgb.stem[len("rgb"):]
                        depth = self.root / "vkitti_2.0.3_depth" / rel / "depth" / cam / f"depth{stem}.png"
                        normal = self.root / "vkitti_DAG_normals" / rel / "normal" / cam / f"normal{stem}.png"
                        if not depth.exists():
                            continue
                        if modality == "normals" and not normal.exists():
                            continue
                        self.items.append((rgb, depth, normal))
        if not self.items:
            msg = (
                f"No Virtual KITTI 2 samples under {self.root}. Expected vkitti_2.0.3_rgb/ and "
                "vkitti_2.0.3_depth/ (and vkitti_DAG_normals/ for --modality normals)."
            )
            raise DataError(msg)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        if self.preprocess == "official":
            return self._official_sample(idx)
        rgb_path, depth_path, normal_path = self.items[idx]
        rgb = read_rgb(rgb_path)
        depth = read_depth(depth_path, 100.0)  # cm -> m
        normals = read_normals_png(normal_path) if self.modality == "normals" else None
        if _draw_flip(self.flip_p):
            rgb, depth, normals = _hflip(rgb, depth, normals)
        rgb = kitti_benchmark_crop(rgb)
        depth = kitti_benchmark_crop(depth)
        if normals is not None:
            normals = kitti_benchmark_crop(normals)
        return _finish_sample(rgb, depth, normals, self.near, self.far, self.modality, "vkitti2")

    def _official_sample(self, idx: int) -> dict:
        """The paper's VKITTI sample: PIL flip (normal x as ``255 - x``), ToTensor, KITTI benchmark crop."""
        rgb_path, depth_path, normal_path = self.items[idx]
        with Image.open(rgb_path) as im:
            rgb = im.convert("RGB")
        depth = Image.fromarray(read_depth(depth_path, 100.0)[0].numpy())  # float32 metres, PIL "F"
        normal = None
        if self.modality == "normals":
            with Image.open(normal_path) as im:
                normal = im.convert("RGB")
        if _draw_flip(self.flip_p):
            rgb, depth = _pil_flip(rgb), _pil_flip(depth)
            if normal is not None:
                normal = _flip_normal_image(normal)
        rgb01 = kitti_benchmark_crop(_to_tensor(rgb))
        target, valid = make_depth_target(kitti_benchmark_crop(_to_tensor(depth)), self.near, self.far)
        out: dict[str, torch.Tensor | str] = {"rgb": rgb01 * 2.0 - 1.0, "depth": target, "valid_mask": valid,
                                              "dataset": "vkitti2"}
        if normal is not None:
            out["normals"], out["normals_mask"] = _official_normals(kitti_benchmark_crop(_to_tensor(normal)), valid)
        return out


# ----------------------------------------------------------------------------- generic manifest


class ManifestRGBDDataset(Dataset):
    """A user's own RGB-D recordings, listed in a JSON manifest (same format as shared/data).

    The manifest is a list of entries ``{"rgb": str, "depth": str, "depth_scale": float,
    "intrinsics": {"fx","fy","cx","cy"}}`` with paths relative to the manifest's folder; metres =
    value / depth_scale; depth 0 = no measurement. Optional ``"normals"`` (PNG, ``n = v/vmax*2-1``,
    R,G,B = x,y,z) with ``"normals_frame"`` ``"optical"`` (default; x right, y down, z forward) or
    ``"lub"`` (model frame). Frames are resized to ``size_hw`` (None keeps native size; then all
    frames must share one size or use batch size 1); the same h-flip, 2/98 % clamping and
    valid range ``(near, far)`` as the synthetic sets apply.
    """

    def __init__(
        self,
        manifest: str | Path,
        *,
        modality: str = "depth",
        size_hw: tuple[int, int] | None = (480, 640),
        near: float = 1e-5,
        far: float = 80.0,
        flip_p: float = 0.5,
    ) -> None:
        _check_modality(modality)
        try:
            self.base, entries = read_manifest(manifest)
        except ManifestError as err:
            raise DataError(str(err)) from err
        self.modality = modality
        self.size_hw = size_hw
        self.near, self.far, self.flip_p = near, far, flip_p
        self.entries: list[dict] = []
        for i, e in enumerate(entries):
            for key in ("rgb", "depth", "depth_scale"):
                if key not in e:
                    msg = f"Manifest {manifest} entry {i} lacks {key!r}; every entry needs rgb, depth, depth_scale."
                    raise DataError(msg)
            if modality == "normals" and "normals" not in e:
                continue
            self.entries.append(e)
        if not self.entries:
            msg = f"Manifest {manifest} has no usable entries for modality {modality!r}."
            raise DataError(msg)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int) -> dict:
        e = self.entries[idx]
        rgb = read_rgb(self.base / e["rgb"])
        depth = read_depth(self.base / e["depth"], float(e["depth_scale"]))
        if depth.shape[-2:] != rgb.shape[-2:]:
            msg = (
                f"Manifest entry {e['rgb']}: depth {tuple(depth.shape[-2:])} and rgb "
                f"{tuple(rgb.shape[-2:])} differ; register depth to the colour camera first."
            )
            raise DataError(msg)
        normals = None
        if self.modality == "normals":
            normals = read_normals_png(self.base / e["normals"])
            if e.get("normals_frame", "optical") == "optical":
                normals = optical_to_model_normals(normals)
        if _draw_flip(self.flip_p):
            rgb, depth, normals = _hflip(rgb, depth, normals)
        if self.size_hw is not None:
            rgb = _resize(rgb, self.size_hw, "bilinear")
            depth = _resize(depth, self.size_hw, "nearest")
            if normals is not None:
                normals = _resize(normals, self.size_hw, "bilinear")
        else:  # native size: crop bottom/right to a multiple of 8 (VAE down-sampling)
            h8, w8 = (rgb.shape[-2] // 8) * 8, (rgb.shape[-1] // 8) * 8
            rgb, depth = rgb[..., :h8, :w8], depth[..., :h8, :w8]
            if normals is not None:
                normals = normals[..., :h8, :w8]
        return _finish_sample(
            rgb, depth, normals, self.near, self.far, self.modality, "manifest",
            normals_need_depth=False,  # own recordings: sparse depth must not mask dense normals
        )


# ----------------------------------------------------------------------------- mixing


class MixedDataLoader:
    """Interleave whole batches of several loaders at fixed ratios, as the paper's MixedDataLoader
    (docs/method.md#data-mixing).

    Each batch comes from one dataset only. Per epoch, with ``n_i`` batches per loader and weights
    ``r_i``, loader ``i`` contributes ``int(n_i * min(base * r_i / n_i, 1))`` batches where
    ``base = min_j n_j / r_j`` (for two loaders and 9:1 this is E2E's effective fractions
    ``min((n2/n1)*9, 1)`` and ``min((n1/n2)/9, 1)``); the order is shuffled.
    """

    def __init__(
        self, loaders: Sequence[DataLoader], weights: Sequence[float], seed: int = 0
    ) -> None:
        if len(loaders) != len(weights) or not loaders:
            msg = "`loaders` and `weights` must be non-empty and of equal length."
            raise ValueError(msg)
        if any(w <= 0 for w in weights):
            msg = f"Mixing weights must be positive; got {list(weights)}"
            raise ValueError(msg)
        self.loaders = list(loaders)
        self.weights = [float(w) for w in weights]
        self.rng = np.random.default_rng(seed)
        sizes = [len(dl) for dl in self.loaders]
        base = min(n / w for n, w in zip(sizes, self.weights, strict=True))
        self.counts = [
            int(n * min(base * w / n, 1.0)) if n > 0 else 0
            for n, w in zip(sizes, self.weights, strict=True)
        ]

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[dict]:
        order = np.concatenate([np.full(c, i) for i, c in enumerate(self.counts)])
        self.rng.shuffle(order)
        iters = [iter(dl) for dl in self.loaders]
        for i in order:
            yield next(iters[int(i)])
