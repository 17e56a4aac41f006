"""Evaluation datasets (spec C.1 depth, C.2 normals) in Marigold's file-list layouts, plus manifests.

Every loader yields :class:`EvalSample`: ``rgb`` uint8 ``[H,W,3]``; for depth ``depth_m`` float32
``[H,W]`` metres and ``mask`` bool ``[H,W]`` (valid range AND evaluation crop); for normals
``normals`` float32 ``[H,W,3]`` unit vectors in the **ROS optical frame** (x right, y down,
z forward) and ``mask``. File lists: one sample per line, whitespace-separated paths relative to
the dataset root, exactly as Marigold's ``data_split/*`` files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..geometry.normal_frames import to_optical
from ..manifest import ManifestError, read_manifest

__all__ = [
    "DEPTH_DATASETS",
    "DepthDatasetSpec",
    "EvalSample",
    "NORMALS_FORMATS",
    "decode_normals_png",
    "iter_depth_dataset",
    "iter_depth_manifest",
    "iter_normals_manifest",
]


class EvalDataError(ValueError):
    """An evaluation dataset is missing or malformed."""


@dataclass
class EvalSample:
    """One evaluation frame; see the module docstring for units and frames."""

    name: str
    rgb: np.ndarray
    mask: np.ndarray
    depth_m: np.ndarray | None = None
    normals: np.ndarray | None = None
    group: str = ""


@dataclass(frozen=True)
class DepthDatasetSpec:
    """Per-dataset protocol constants (spec C.1 table)."""

    name: str
    min_depth: float
    max_depth: float
    processing_res: int  # engine longest edge, 0 = native
    default_filelist: str  # Marigold data_split file name (relative to the dataset root if present)
    alignment_max_res: int | None = None
    extra: dict = field(default_factory=dict)


DEPTH_DATASETS: dict[str, DepthDatasetSpec] = {
    "nyu": DepthDatasetSpec("nyu", 1e-3, 10.0, 0, "filename_list_test.txt"),
    "kitti": DepthDatasetSpec("kitti", 1e-5, 80.0, 0, "eigen_test_files_with_gt.txt"),
    "eth3d": DepthDatasetSpec("eth3d", 1e-5, math.inf, 756, "eth3d_filename_list.txt", 1024),
    "scannet": DepthDatasetSpec("scannet", 1e-3, 10.0, 0, "scannet_val_sampled_list_800_1.txt"),
    "diode": DepthDatasetSpec("diode", 0.6, 350.0, 640, "diode_val_all_filename_list.txt"),
}


# ----------------------------------------------------------------------------- readers


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_png_depth(path: Path, scale: float) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.float32)
    if arr.ndim != 2:
        msg = f"Depth image {path} has shape {arr.shape}; expected one channel."
        raise EvalDataError(msg)
    return arr / scale


def _read_eth3d_depth(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """ETH3D raw float32 depth (no header) at the RGB size; inf -> 0 (spec C.1)."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size != hw[0] * hw[1]:
        msg = f"ETH3D depth {path} has {raw.size} values; expected {hw[0]}x{hw[1]} like its RGB image."
        raise EvalDataError(msg)
    depth = raw.reshape(hw).copy()
    depth[~np.isfinite(depth)] = 0.0
    return depth


def _kb_crop(x: np.ndarray) -> np.ndarray:
    """KITTI benchmark crop 352x1216 (bottom-aligned, centred), spec C.1."""
    h, w = x.shape[:2]
    top, left = int(h - 352), int((w - 1216) / 2)
    return x[top : top + 352, left : left + 1216]


def kitti_eval_mask(h: int, w: int, crop: str | None) -> np.ndarray:
    """Garg (ECCV'16) or Eigen (NIPS'14) evaluation crop as a boolean mask (spec C.1)."""
    m = np.zeros((h, w), dtype=bool)
    if crop is None:
        m[:] = True
    elif crop == "garg":
        m[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
    elif crop == "eigen":
        m[int(0.3324324 * h) : int(0.91351351 * h), int(0.0359477 * w) : int(0.96405229 * w)] = True
    else:
        msg = f"KITTI eval crop must be 'eigen', 'garg' or None; got {crop!r}"
        raise ValueError(msg)
    return m


def _lines(filelist: Path) -> list[list[str]]:
    try:
        text = filelist.read_text()
    except OSError as err:
        msg = (f"Cannot read file list {filelist} ({err}); pass --filelist with Marigold's data_split "
               "file for this dataset.")
        raise EvalDataError(msg) from err
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# ----------------------------------------------------------------------------- depth datasets


def iter_depth_dataset(
    kind: str, root: str | Path, filelist: str | Path | None = None, *, kitti_crop: str | None = "eigen",
    limit: int | None = None,
) -> Iterator[EvalSample]:
    """Yield samples of a Marigold-layout depth benchmark (spec C.1).

    nyu: ``rgb depth filled`` (png mm), valid (1e-3, 10), Eigen crop rows 45:471 cols 41:601;
    kitti: ``rgb depth focal`` ("None" depth skipped), png/256, valid (1e-5, 80), KB crop, Garg/Eigen;
    eth3d: ``rgb depth`` raw float32 at RGB size, inf -> 0, valid (1e-5, inf);
    scannet: ``rgb depth`` png mm, valid (1e-3, 10); diode: ``rgb depth.npy mask.npy``, valid = mask.
    """
    if kind not in DEPTH_DATASETS:
        msg = f"Unknown depth dataset {kind!r}; choose one of {sorted(DEPTH_DATASETS)} or 'manifest'."
        raise ValueError(msg)
    spec = DEPTH_DATASETS[kind]
    root = Path(root)
    flist = Path(filelist) if filelist else root / spec.default_filelist
    rows = _lines(flist)
    if kind == "kitti":
        rows = [r for r in rows if len(r) >= 2 and r[1] != "None"]  # 697 - 45 = 652 (spec C.1)
    count = 0
    for row in rows:
        if limit is not None and count >= limit:
            return
        rgb = _read_rgb(root / row[0])
        if kind == "nyu" or kind == "scannet":
            depth = _read_png_depth(root / row[1], 1000.0)
        elif kind == "kitti":
            depth = _read_png_depth(root / row[1], 256.0)
            rgb, depth = _kb_crop(rgb), _kb_crop(depth)
        elif kind == "eth3d":
            depth = _read_eth3d_depth(root / row[1], rgb.shape[:2])
        else:  # diode
            depth = np.load(root / row[1]).astype(np.float32).squeeze()
        if depth.shape != rgb.shape[:2]:
            msg = f"{kind}: depth {depth.shape} and RGB {rgb.shape[:2]} differ for {row[0]}"
            raise EvalDataError(msg)
        if kind == "diode":
            # Marigold uses the dataset's own validity mask for DIODE; depth > 0 guards AbsRel.
            mask = np.load(root / row[2]).squeeze().astype(bool) & (depth > 0)
        else:
            mask = (depth > spec.min_depth) & (depth < spec.max_depth)
        if kind == "nyu":
            crop = np.zeros_like(mask)
            crop[45:471, 41:601] = True  # Eigen crop for 640x480 (spec C.1)
            mask &= crop
        elif kind == "kitti":
            mask &= kitti_eval_mask(*mask.shape, kitti_crop)
        count += 1
        yield EvalSample(name=row[0], rgb=rgb, depth_m=depth, mask=mask, group=kind)


def iter_depth_manifest(
    manifest: str | Path, *, min_depth: float = 1e-3, max_depth: float = 80.0, limit: int | None = None
) -> Iterator[EvalSample]:
    """Yield samples of a generic RGB-D manifest (paths relative to it; metres = value/depth_scale).

    ``group`` is the entry's ``set`` (so results can be reported per recording); 0 = no depth.
    """
    try:
        base, entries = read_manifest(manifest)
    except ManifestError as err:
        raise EvalDataError(str(err)) from err
    for i, e in enumerate(entries):
        if limit is not None and i >= limit:
            return
        rgb = _read_rgb(base / e["rgb"])
        dpath = base / e["depth"]
        if dpath.suffix == ".npy":
            depth = np.load(dpath).astype(np.float32).squeeze() / float(e["depth_scale"])
        else:
            depth = _read_png_depth(dpath, float(e["depth_scale"]))
        if depth.shape != rgb.shape[:2]:
            msg = f"manifest entry {e['rgb']}: depth {depth.shape} != RGB {rgb.shape[:2]}"
            raise EvalDataError(msg)
        mask = (depth > min_depth) & (depth < max_depth)
        yield EvalSample(name=e["rgb"], rgb=rgb, depth_m=depth, mask=mask, group=str(e.get("set", "manifest")))


# ----------------------------------------------------------------------------- normals

#: How ground-truth normal PNGs are encoded: channel order and frame. ``n = v / vmax * 2 - 1``.
#: rgb_lub: DSINE evaluation GT (R,G,B = x,y,z in LUB; spec C.2, A.1-18).
#: bgr_optical: optical-frame x,y,z written in B,G,R order (OpenCV imwrite); the NYUv2 Ladicky map in
#:   shared/data/normals was checked against its scene: frontal wall R = -0.97 (z toward camera),
#:   table top G = -0.65 (y up), left wall B = +0.97 (x right).
#: rgb_optical / rgb_rub: R,G,B = x,y,z in the optical or Marigold/diffusers RUB frame.
NORMALS_FORMATS: dict[str, tuple[tuple[int, int, int], str]] = {
    "rgb_lub": ((0, 1, 2), "LUB"),
    "bgr_optical": ((2, 1, 0), "optical"),
    "rgb_optical": ((0, 1, 2), "optical"),
    "rgb_rub": ((0, 1, 2), "RUB"),
}


def decode_normals_png(path: str | Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Normal-map PNG -> (unit normals ``[H,W,3]`` optical frame, valid mask ``[H,W]``).

    Valid = non-zero encoded vector (norm of the decoded vector > 0.5), as DSINE's loaders do.
    """
    if fmt not in NORMALS_FORMATS:
        msg = f"Unknown normals format {fmt!r}; choose one of {sorted(NORMALS_FORMATS)}."
        raise ValueError(msg)
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 3 or arr.shape[2] < 3:
        msg = f"Normal map {path} has shape {arr.shape}; expected an RGB image."
        raise EvalDataError(msg)
    vmax = 65535.0 if arr.dtype == np.uint16 else 255.0
    order, frame = NORMALS_FORMATS[fmt]
    n = arr[..., list(order)].astype(np.float32) / vmax * 2.0 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    mask = (norm[..., 0] > 0.5) & np.any(arr[..., :3] > 0, axis=-1)
    n = to_optical(n / np.maximum(norm, 1e-8), frame).astype(np.float32)
    return n, mask


def iter_normals_manifest(manifest: str | Path, *, limit: int | None = None) -> Iterator[EvalSample]:
    """Yield samples of a normals manifest: JSON list of ``{"rgb", "normals", "normals_format"}``.

    ``normals_format`` is a key of :data:`NORMALS_FORMATS` (default ``rgb_lub``); optional
    ``"set"`` groups entries (pixels are pooled per group, spec C.2). Paths are relative to the
    manifest (absolute paths work too).
    """
    try:
        base, entries = read_manifest(manifest)
    except ManifestError as err:
        raise EvalDataError(str(err)) from err
    for i, e in enumerate(entries):
        if limit is not None and i >= limit:
            return
        if "normals" not in e:
            continue
        rgb = _read_rgb(base / e["rgb"])
        normals, mask = decode_normals_png(base / e["normals"], e.get("normals_format", "rgb_lub"))
        yield EvalSample(name=e["rgb"], rgb=rgb, normals=normals, mask=mask,
                         group=str(e.get("set", "normals_manifest")))
