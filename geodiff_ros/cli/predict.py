"""``geodiff_predict``: run the engine on image files or folders and write depth and normals files.

Per input image ``<stem>`` it writes, in the output folder:
``<stem>_depth.png`` (16-bit, depth * 65535), ``<stem>_depth.npy`` (float32 [H,W], 0 near, 1 far),
``<stem>_depth_colored.png`` (Spectral) and, with a normals model, ``<stem>_normals.png`` (RGB view) and
``<stem>_normals.npy`` (float32 [H,W,3], ROS optical frame). The arrays and views come from the per-frame pipeline
the node and ``geodiff_bag process`` use (``geodiff_ros.pipeline``), so they are the node's ``depth/relative``,
``depth/image_vis``, ``normals/image`` and ``normals/image_vis`` for the same image.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import EngineConfig, GeoDiffEngine, GeoDiffError
from ..engine.config import (
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DEPTH_HUB_ID,
    DTYPE_CHOICES,
    NORMALS_HUB_ID,
    processing_res_argument,
)
from ..pipeline import AlignmentConfig, FrameProcessor, OutputConfig, Wanted
from ..visualize import depth_to_uint16

LOG = logging.getLogger("geodiff_predict")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


def find_images(inputs: Iterable[str]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image paths."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input {item} is neither an image file nor a folder")
    return paths


def read_image(path: Path) -> np.ndarray:
    """Read an image as an array the engine converts (8/16-bit, gray, RGB, RGBA, palette)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.array(img, dtype=np.uint16)
        if img.mode == "I":
            arr = np.array(img)
            return arr.astype(np.uint16) if arr.min() >= 0 and arr.max() < 65536 else arr
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        return np.array(img)


def tiny_models(folder: Path) -> tuple[str, str]:
    """Generate tiny depth and normals checkpoints (random weights) to show the plumbing without downloads."""
    from ..testing.tiny_checkpoint import write_tiny_checkpoint

    depth, normals = folder / "tiny-depth", folder / "tiny-normals"
    if not (depth / "model_index.json").exists():
        write_tiny_checkpoint(depth, "depth")
    if not (normals / "model_index.json").exists():
        write_tiny_checkpoint(normals, "normals")
    return str(depth), str(normals)


def write_outputs(out_dir: Path, stem: str, host: dict[str, Any]) -> None:
    """The files of one image from the pipeline's host outputs (``FrameResult.host``)."""
    from PIL import Image

    if "relative" in host:
        depth = host["relative"].numpy()  # [H,W] in [0,1]
        Image.fromarray(depth_to_uint16(depth)).save(out_dir / f"{stem}_depth.png")
        np.save(out_dir / f"{stem}_depth.npy", depth.astype(np.float32))
        Image.fromarray(host["depth_vis"].numpy()).save(out_dir / f"{stem}_depth_colored.png")
    if "normals" in host:
        np.save(out_dir / f"{stem}_normals.npy", host["normals"].numpy().astype(np.float32))
        Image.fromarray(host["normals_vis"].numpy()).save(out_dir / f"{stem}_normals.png")


def predict_files(engine: Any, image: np.ndarray, frames: FrameProcessor, staging: Any) -> dict[str, Any]:
    """One image through the engine and the per-frame pipeline: relative depth, normals and their views."""
    from ..engine.preprocess import to_rgb_uint8

    pred = engine.predict(image, on_device=True)
    rgb = to_rgb_uint8(image)  # [H,W,3] uint8
    result = frames.process(stamp_ns=0, relative=None if pred.depth is None else pred.depth[0],
                            normals=None if pred.normals is None else pred.normals[0], rgb=rgb, intr=None,
                            sparse=None, alignment=AlignmentConfig(), output=OutputConfig(cloud=False),
                            wanted=Wanted(depth_vis=True, normals_vis=True, cloud=False), staging=staging)
    return result.host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geodiff_predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("-o", "--output-dir", default="geodiff_out", help="output folder (created)")
    parser.add_argument("--depth-model", default=DEPTH_HUB_ID, help="hub id or local folder; '' disables depth")
    parser.add_argument("--normals-model", default=NORMALS_HUB_ID, help="hub id or local folder; '' disables normals")
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    parser.add_argument("--allow-cpu-fallback", action="store_true", help="use the CPU when no GPU is visible")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES)
    parser.add_argument("--processing-res", type=processing_res_argument, default=DEFAULT_PROCESSING_RES,
                        help="longest edge at inference (multiple of 8), 0 = native")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--offline", action="store_true", help="never contact the hub (HF_HUB_OFFLINE)")
    parser.add_argument("--no-check-model-task", dest="check_model_task", action="store_false",
                        help="trust the --depth-model / --normals-model slots: do not refuse a checkpoint whose "
                        "name or model_index.json says it is the other task")
    parser.add_argument("--tiny", action="store_true",
                        help="use generated tiny random-weight checkpoints (shows the plumbing; outputs meaningless)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    try:
        images = find_images(args.inputs)
    except FileNotFoundError as exc:
        LOG.error("%s", exc)
        return 2
    if not images:
        LOG.error("no images found in %s (suffixes %s)", args.inputs, sorted(IMAGE_SUFFIXES))
        return 2
    depth_model, normals_model = args.depth_model, args.normals_model
    if args.tiny:
        cache = Path(tempfile.gettempdir()) / "geodiff_tiny_checkpoints"
        depth_model, normals_model = tiny_models(cache)
        LOG.warning("--tiny: random-weight checkpoints in %s; the outputs only show the plumbing", cache)
    config = EngineConfig(depth_model=depth_model or None, normals_model=normals_model or None, device=args.device,
                          dtype=args.dtype, processing_res=args.processing_res, batch_size=args.batch_size,
                          allow_cpu_fallback=args.allow_cpu_fallback, local_files_only=args.offline,
                          check_model_task=args.check_model_task)
    try:
        engine = GeoDiffEngine(config)
    except GeoDiffError as exc:
        LOG.error("%s", exc)
        return 1
    from ..geometry.device import HostStaging

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    frames, staging = FrameProcessor(AlignmentConfig()), HostStaging(engine.device)
    for path in tqdm(images, desc="geodiff", unit="img", disable=len(images) < 2):
        try:
            host = predict_files(engine, read_image(path), frames, staging)
        except (OSError, GeoDiffError, ValueError) as exc:
            LOG.error("skipping %s: %s", path, exc)
            failures += 1
            continue
        write_outputs(out_dir, path.stem, host)
    LOG.info("wrote %d of %d images to %s", len(images) - failures, len(images), out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
