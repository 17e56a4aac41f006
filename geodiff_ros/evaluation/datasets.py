"""Evaluation datasets: the official E2E-FT benchmarks in their published layouts, plus manifests.

Depth (docs/method.md#depth-protocol): Marigold's evaluation folders and ``data_split`` file lists (NYUv2,
KITTI, ETH3D, ScanNet, DIODE), decoded and masked as Marigold's dataset classes do. Normals
(docs/method.md#normals-protocol): DSINE's evaluation folders (``dsine_eval/{nyuv2,scannet,ibims,sintel}``) and
split lists, decoded and masked as DSINE's loaders do.

Every loader yields :class:`EvalSample`: ``rgb`` uint8 ``[H,W,3]``; for depth ``depth_m`` float32 ``[H,W]``
metres and ``mask`` bool ``[H,W]`` (valid range AND evaluation crop); for normals ``normals`` float32
``[H,W,3]`` in the **ROS optical frame** (x right, y down, z forward) and ``mask``. Normals of the official
benchmarks are the stored vectors, not re-normalised (DSINE compares with cosine similarity); the frame
change from DSINE's LUB is an exact sign flip, so angles equal the official ones bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..geometry.normal_frames import to_optical
from ..manifest import ManifestError, read_manifest

logger = logging.getLogger("geodiff_ros.evaluation")

__all__ = [
    "DEPTH_DATASETS",
    "NORMALS_DATASETS",
    "DepthDatasetSpec",
    "EvalSample",
    "NORMALS_FORMATS",
    "NormalsDatasetSpec",
    "decode_normals_png",
    "dsine_model_input",
    "iter_depth_dataset",
    "iter_depth_manifest",
    "iter_normals_dataset",
    "iter_normals_manifest",
    "read_dsine_normals",
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
    """Per-dataset protocol constants (the table in docs/method.md#depth-protocol)."""

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
    """16-bit PNG depth / ``scale`` as the official loaders do: divided in float64, stored as float32."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        msg = f"Depth image {path} has shape {arr.shape}; expected one channel."
        raise EvalDataError(msg)
    return (arr / scale).astype(np.float32)


def _read_eth3d_depth(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """ETH3D raw float32 depth (no header) at the RGB size; +inf (no measurement) -> 0."""
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size != hw[0] * hw[1]:
        msg = f"ETH3D depth {path} has {raw.size} values; expected {hw[0]}x{hw[1]} like its RGB image."
        raise EvalDataError(msg)
    depth = raw.reshape(hw).copy()
    depth[depth == np.inf] = 0.0
    return depth


def range_mask(depth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """``min < d < max`` compared in float32 (the official loaders compare a float32 tensor with the bounds)."""
    d = depth.astype(np.float32, copy=False)
    return (d > np.float32(min_depth)) & (d < np.float32(max_depth))


def _kb_crop(x: np.ndarray) -> np.ndarray:
    """KITTI benchmark crop 352x1216 (bottom-aligned, centred)."""
    h, w = x.shape[:2]
    top, left = int(h - 352), int((w - 1216) / 2)
    return x[top : top + 352, left : left + 1216]


def kitti_eval_mask(h: int, w: int, crop: str | None) -> np.ndarray:
    """Garg (ECCV'16) or Eigen (NIPS'14) evaluation crop as a boolean mask."""
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
    """Yield samples of a Marigold-layout depth benchmark (docs/method.md#depth-protocol).

    nyu: ``rgb depth filled`` (png mm), valid (1e-3, 10), Eigen crop rows 45:471 cols 41:601;
    kitti: ``rgb depth focal`` ("None" depth skipped), png/256, valid (1e-5, 80), KB crop, Garg/Eigen;
    eth3d: ``rgb depth`` raw float32 at RGB size, +inf -> 0, valid (1e-5, inf);
    scannet: ``rgb depth`` png mm, valid (1e-3, 10); diode: ``rgb depth.npy mask.npy``, valid = the file's
    mask only (pixels with depth <= 0 inside it are logged: they make the image's AbsRel inf, officially too).
    """
    if kind not in DEPTH_DATASETS:
        msg = f"Unknown depth dataset {kind!r}; choose one of {sorted(DEPTH_DATASETS)} or 'manifest'."
        raise ValueError(msg)
    spec = DEPTH_DATASETS[kind]
    root = Path(root)
    flist = Path(filelist) if filelist else root / spec.default_filelist
    rows = _lines(flist)
    if kind == "kitti":
        rows = [r for r in rows if len(r) >= 2 and r[1] != "None"]  # 697 - 45 = 652
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
            depth = np.load(root / row[1]).squeeze().astype(np.float32)
        if depth.shape != rgb.shape[:2]:
            msg = f"{kind}: depth {depth.shape} and RGB {rgb.shape[:2]} differ for {row[0]}"
            raise EvalDataError(msg)
        if kind == "diode":
            # Marigold's DIODE class takes the dataset's own validity mask and nothing else.
            mask = np.load(root / row[2]).squeeze().astype(bool)
            nonpositive = int(np.count_nonzero(mask & ~(depth > 0)))
            if nonpositive:
                logger.warning(
                    "diode: %s has %d pixels inside the dataset's mask with depth <= 0; the official protocol "
                    "keeps them, so this image's AbsRel/SqRel/iRMSE are inf (and the dataset mean with them)",
                    row[0], nonpositive)
        else:
            mask = range_mask(depth, spec.min_depth, spec.max_depth)
        if kind == "nyu":
            crop = np.zeros_like(mask)
            crop[45:471, 41:601] = True  # Eigen crop for 640x480
            mask &= crop
        elif kind == "kitti":
            mask &= kitti_eval_mask(*mask.shape, kitti_crop)
        count += 1
        yield EvalSample(name=row[0], rgb=rgb, depth_m=depth, mask=mask, group=kind)


def _manifest_entries(manifest: str | Path, limit: int | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder of the manifest, entry) for its first ``limit`` entries (all with None; the count includes entries
    a caller then skips); a manifest that cannot be read is an EvalDataError."""
    try:
        base, entries = read_manifest(manifest)
    except ManifestError as err:
        raise EvalDataError(str(err)) from err
    for i, e in enumerate(entries):
        if limit is not None and i >= limit:
            return
        yield base, e


def iter_depth_manifest(
    manifest: str | Path, *, min_depth: float = 1e-3, max_depth: float = 80.0, limit: int | None = None
) -> Iterator[EvalSample]:
    """Yield samples of a generic RGB-D manifest (paths relative to it; metres = value/depth_scale).

    ``group`` is the entry's ``set`` (so results can be reported per recording); 0 = no depth.
    """
    for base, e in _manifest_entries(manifest, limit):
        rgb = _read_rgb(base / e["rgb"])
        dpath = base / e["depth"]
        if dpath.suffix == ".npy":
            depth = np.load(dpath).astype(np.float32).squeeze() / float(e["depth_scale"])
        else:
            depth = _read_png_depth(dpath, float(e["depth_scale"]))
        if depth.shape != rgb.shape[:2]:
            msg = f"manifest entry {e['rgb']}: depth {depth.shape} != RGB {rgb.shape[:2]}"
            raise EvalDataError(msg)
        mask = range_mask(depth, min_depth, max_depth)
        yield EvalSample(name=e["rgb"], rgb=rgb, depth_m=depth, mask=mask, group=str(e.get("set", "manifest")))


# ----------------------------------------------------------------------------- normals

#: How ground-truth normal PNGs of a *manifest* are encoded: channel order and frame. ``n = v / vmax * 2 - 1``.
#: (The official benchmarks use :func:`iter_normals_dataset`, which applies DSINE's own decoding and masks.)
#: rgb_lub: DSINE's PNG encoding (R,G,B = x,y,z in LUB; docs/method.md#normal-frames).
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
    """Manifest normal-map PNG -> (unit normals ``[H,W,3]`` optical frame, valid mask ``[H,W]``).

    Valid = non-zero encoded vector whose decoded norm is > 0.5 (drops encodings that are no direction).
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
    ``"set"`` groups entries (pixels are pooled per group, as the benchmarks pool theirs). Paths are relative to the
    manifest (absolute paths work too).
    """
    for base, e in _manifest_entries(manifest, limit):
        if "normals" not in e:
            continue
        rgb = _read_rgb(base / e["rgb"])
        normals, mask = decode_normals_png(base / e["normals"], e.get("normals_format", "rgb_lub"))
        yield EvalSample(name=e["rgb"], rgb=rgb, normals=normals, mask=mask,
                         group=str(e.get("set", "normals_manifest")))


# ----------------------------------------------------------------------------- official normals benchmarks


@dataclass(frozen=True)
class NormalsDatasetSpec:
    """One of DSINE's evaluation sets as E2E-FT evaluates it (DSINE ``data/datasets/<name>``)."""

    name: str  # folder in dsine_eval/ and DSINE's dataset name
    split_file: str  # DSINE's split list: data/datasets/<name>/split/<split_file>
    gt_suffix: str  # ground truth beside ``<stem>_img<ext>``: ``<stem><gt_suffix>``
    num_images: int  # lines of the official split


#: CLI kind -> spec. The E2E-FT normals run (``--eval_data all``) evaluates exactly these four, in this order.
NORMALS_DATASETS: dict[str, NormalsDatasetSpec] = {
    "normals-nyuv2": NormalsDatasetSpec("nyuv2", "test.txt", "_normal.png", 654),
    "normals-scannet": NormalsDatasetSpec("scannet", "test.txt", "_normal.png", 300),
    "normals-ibims": NormalsDatasetSpec("ibims", "ibims.txt", "_normal.exr", 100),
    "normals-sintel": NormalsDatasetSpec("sintel", "sintel.txt", "_normal.exr", 1064),
}


def _read_exr_rgb(path: Path) -> np.ndarray:
    """The R, G, B channels of an OpenEXR file as float32 ``[H,W,3]`` (what DSINE gets from OpenCV)."""
    try:
        import OpenEXR
    except ImportError as err:  # pragma: no cover - pinned in requirements.txt
        msg = f"Reading {path} needs the OpenEXR package (pip install -r requirements.txt)."
        raise EvalDataError(msg) from err
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            channels = exr.channels()
            missing = [c for c in "RGB" if c not in channels]
            if missing:
                msg = f"EXR normal map {path} has channels {sorted(channels)}; expected R, G and B (x, y, z)."
                raise EvalDataError(msg)
            return np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"], axis=-1)
    except EvalDataError:
        raise
    except Exception as err:  # OpenEXR raises plain exceptions for unreadable files
        msg = f"Cannot read EXR normal map {path} ({err})."
        raise EvalDataError(msg) from err


def read_dsine_normals(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """DSINE ground-truth normals -> (``[H,W,3]`` float32 in the ROS optical frame, valid mask ``[H,W]``).

    As DSINE's loaders: 8-bit PNG (NYUv2, ScanNet) ``n = v / 255 * 2 - 1`` with valid = ``sum(R,G,B) > 0``;
    EXR (iBims-1, Sintel) float R,G,B as stored with valid = ``|n| > 0.5``. Both in DSINE's LUB frame
    (x left, y up, z toward the camera), turned into the optical frame by an exact sign flip; not
    re-normalised.
    """
    path = Path(path)
    if path.suffix.lower() == ".exr":
        n_lub = _read_exr_rgb(path)
        mask = np.linalg.norm(n_lub, axis=2) > 0.5
    else:
        with Image.open(path) as im:
            arr = np.asarray(im)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] < 3:
            msg = (f"DSINE normal map {path} is {arr.dtype} {arr.shape}; the official loaders read 8-bit "
                   "RGB PNGs (n = v / 255 * 2 - 1).")
            raise EvalDataError(msg)
        rgb = arr[..., :3]
        mask = np.sum(rgb, axis=2) > 0
        n_lub = (rgb.astype(np.float32) / 255.0) * 2.0 - 1.0
    return to_optical(n_lub, "LUB").astype(np.float32), mask


def _dsine_rows(spec: NormalsDatasetSpec, root: Path, filelist: str | Path | None) -> list[str]:
    """Image paths (relative to ``root``) in the order of DSINE's split list, or found on disk."""
    if filelist is not None or (root / spec.split_file).is_file():
        flist = Path(filelist) if filelist is not None else root / spec.split_file
        return [r[0] for r in _lines(flist)]
    found = sorted(str(q.relative_to(root)) for q in root.glob("*/*_img.*"))
    if not found:
        msg = (f"No '*/*_img.*' images under {root}: pass the dsine_eval/{spec.name} folder, and --filelist "
               f"with DSINE's data/datasets/{spec.name}/split/{spec.split_file}.")
        raise EvalDataError(msg)
    logger.warning(
        "%s: no split list given (--filelist KIND:FILE, DSINE's data/datasets/%s/split/%s); evaluating the %d "
        "'*_img' images found under %s (the official split has %d)", spec.name, spec.name, spec.split_file,
        len(found), root, spec.num_images)
    return found


def iter_normals_dataset(
    kind: str, root: str | Path, filelist: str | Path | None = None, *, limit: int | None = None
) -> Iterator[EvalSample]:
    """Yield samples of one of DSINE's evaluation sets, the layout of ``dsine_eval/<name>/``.

    Split lines are image paths relative to ``root`` such as ``test/000000_img.png`` (nyuv2),
    ``scene0532_00/000000_img.png`` (scannet), ``ibims/corridor_01_img.png``, ``alley_1/frame_0001_img.png``
    (sintel); the ground truth lies beside each image as ``<stem>_normal.png`` or ``<stem>_normal.exr``.
    Without ``filelist``, ``root/<split file>`` is used if present, else every ``*/*_img.*`` (logged).
    """
    if kind not in NORMALS_DATASETS:
        msg = f"Unknown normals dataset {kind!r}; choose one of {sorted(NORMALS_DATASETS)} or 'normals'."
        raise ValueError(msg)
    spec = NORMALS_DATASETS[kind]
    root = Path(root)
    for count, rel in enumerate(_dsine_rows(spec, root, filelist)):
        if limit is not None and count >= limit:
            return
        cut = rel.rfind("_img")
        if cut < 0:
            msg = f"{kind}: split entry {rel!r} is not an '<name>_img.<ext>' image path."
            raise EvalDataError(msg)
        rgb = _read_rgb(root / rel)
        normals, mask = read_dsine_normals(root / (rel[:cut] + spec.gt_suffix))
        if normals.shape[:2] != rgb.shape[:2]:
            msg = f"{kind}: normals {normals.shape[:2]} and RGB {rgb.shape[:2]} differ for {rel}"
            raise EvalDataError(msg)
        yield EvalSample(name=rel, rgb=rgb, normals=normals, mask=mask, group=kind)


#: ImageNet statistics of DSINE's ``Normalize`` (float32, as torchvision builds them).
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def dsine_model_input(rgb: np.ndarray) -> np.ndarray:
    """The uint8 image the official normals evaluation feeds to the model (a quirk kept on purpose; see
    docs/method.md#normals-protocol).

    DSINE's loader gives the ImageNet-normalised image ``(v / 255 - mean) / std``; E2E-FT's ``test.py``
    stretches that float tensor by its global min/max over all channels to [0, 255] and truncates to uint8.
    The official run is on CUDA, where dividing a tensor by a Python number multiplies by its float32
    reciprocal; this reproduces that arithmetic exactly: ``((x - min) * float32(1 / float32(max - min))) * 255``
    in float32, ``max - min`` taken in float64 as Python does. A constant image (max = min) becomes zeros.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        msg = f"dsine_model_input needs a uint8 [H,W,3] image, got {rgb.dtype} {rgb.shape}"
        raise ValueError(msg)
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        logger.warning("dsine_model_input: constant image, the official stretch divides by zero; using zeros")
        return np.zeros_like(rgb)
    inv_range = np.float32(1.0) / np.float32(hi - lo)
    stretched = ((x - np.float32(lo)) * inv_range) * np.float32(255.0)
    return stretched.astype(np.uint8)
