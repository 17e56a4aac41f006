"""Benchmark loaders on tiny synthetic folders that follow Marigold's layouts and file lists (spec C.1, C.2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geodiff_ros.evaluation.datasets import decode_normals_png, iter_depth_dataset, iter_normals_manifest


def _rgb(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def _u16(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint16)).save(path)


def test_nyu_layout_decodes_mm_and_applies_eigen_crop_and_range(tmp_path: Path) -> None:
    _rgb(tmp_path / "test/kitchen_0004/rgb_0001.png", 480, 640)
    depth = np.full((480, 640), 2500)
    depth[200, 300] = 12000  # 12 m: outside (1e-3, 10)
    _u16(tmp_path / "test/kitchen_0004/depth_0001.png", depth)
    _u16(tmp_path / "test/kitchen_0004/filled_0001.png", depth)
    (tmp_path / "filename_list_test.txt").write_text(
        "test/kitchen_0004/rgb_0001.png test/kitchen_0004/depth_0001.png test/kitchen_0004/filled_0001.png\n")
    (s,) = list(iter_depth_dataset("nyu", tmp_path))
    assert s.depth_m[0, 0] == pytest.approx(2.5)
    assert not s.mask[44, 100] and s.mask[45, 41] and not s.mask[470, 601] and s.mask[470, 600]
    assert not s.mask[200, 300]
    assert s.mask.sum() == (471 - 45) * (601 - 41) - 1


def test_kitti_layout_skips_missing_gt_kb_crop_and_eval_crops(tmp_path: Path) -> None:
    rgb_rel = "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png"
    gt_rel = "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"
    _rgb(tmp_path / rgb_rel, 375, 1242)
    _u16(tmp_path / gt_rel, np.full((375, 1242), 10 * 256))
    lst = tmp_path / "eigen_test_files_with_gt.txt"
    lst.write_text(f"{rgb_rel} {gt_rel} 721.5377\n2011_09_26/x/image_02/data/0000000001.png None 721.5377\n")
    samples = list(iter_depth_dataset("kitti", tmp_path, lst, kitti_crop="eigen"))
    assert len(samples) == 1  # the "None" line is dropped (652 of 697 lines)
    s = samples[0]
    assert s.rgb.shape == (352, 1216, 3) and s.depth_m.shape == (352, 1216)
    assert s.depth_m[0, 0] == pytest.approx(10.0)
    rows = np.where(s.mask.any(1))[0]
    cols = np.where(s.mask.any(0))[0]
    assert (rows[0], rows[-1] + 1) == (int(0.3324324 * 352), int(0.91351351 * 352))
    assert (cols[0], cols[-1] + 1) == (int(0.0359477 * 1216), int(0.96405229 * 1216))
    (garg,) = list(iter_depth_dataset("kitti", tmp_path, lst, kitti_crop="garg"))
    assert np.where(garg.mask.any(1))[0][0] == int(0.40810811 * 352)


def test_eth3d_scannet_diode_layouts(tmp_path: Path) -> None:
    # ETH3D: raw float32 without header at the RGB size, inf = no measurement.
    _rgb(tmp_path / "eth3d/rgb/courtyard/images/dslr_images/DSC_0286.JPG", 8, 12)
    raw = np.full((8, 12), 4.0, np.float32)
    raw[0, 0] = np.inf
    (tmp_path / "eth3d/depth/courtyard_dslr_depth/courtyard/ground_truth_masks/dslr_images").mkdir(parents=True)
    d_rel = "depth/courtyard_dslr_depth/courtyard/ground_truth_masks/dslr_images/DSC_0286.JPG"
    raw.tofile(tmp_path / "eth3d" / d_rel)
    (tmp_path / "eth3d/eth3d_filename_list.txt").write_text(
        f"rgb/courtyard/images/dslr_images/DSC_0286.JPG {d_rel}\n")
    (e,) = list(iter_depth_dataset("eth3d", tmp_path / "eth3d"))
    assert e.depth_m[0, 0] == 0.0 and not e.mask[0, 0] and e.mask.sum() == 8 * 12 - 1

    # ScanNet: jpg colour + png mm depth, valid (1e-3, 10).
    _rgb(tmp_path / "scannet/scene0001_00/color/000100.jpg", 6, 8)
    _u16(tmp_path / "scannet/scene0001_00/depth/000100.png", np.array([[0, 1500, 11000, 9000]] * 6).repeat(2, 1))
    (tmp_path / "scannet/list.txt").write_text("scene0001_00/color/000100.jpg scene0001_00/depth/000100.png\n")
    (sc,) = list(iter_depth_dataset("scannet", tmp_path / "scannet", tmp_path / "scannet/list.txt"))
    assert sc.mask[0].tolist() == [False, False, True, True, False, False, True, True]

    # DIODE: depth .npy [H,W,1] + the dataset's own validity mask .npy.
    base = tmp_path / "diode/val/indoors/scene_00019/scan_00183"
    _rgb(base / "00019_00183_indoors_000_010.png", 4, 5)
    base.mkdir(parents=True, exist_ok=True)
    np.save(base / "00019_00183_indoors_000_010_depth.npy", np.full((4, 5, 1), 3.0, np.float32))
    mask = np.ones((4, 5), np.float32)
    mask[1, 2] = 0
    np.save(base / "00019_00183_indoors_000_010_depth_mask.npy", mask)
    rel = "val/indoors/scene_00019/scan_00183/00019_00183_indoors_000_010"
    (tmp_path / "diode/diode_val_all_filename_list.txt").write_text(
        f"{rel}.png {rel}_depth.npy {rel}_depth_mask.npy\n")
    (di,) = list(iter_depth_dataset("diode", tmp_path / "diode"))
    assert di.depth_m.shape == (4, 5) and di.mask.sum() == 19 and not di.mask[1, 2]


def test_missing_filelist_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--filelist"):
        list(iter_depth_dataset("nyu", tmp_path))


@pytest.mark.parametrize(
    ("fmt", "stored_rgb", "optical"),
    [
        # DSINE GT, LUB frame: (x left, y up, z to viewer) = (0, 0, 1) is optical (0, 0, -1).
        ("rgb_lub", (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)),
        # optical x,y,z written as B,G,R: stored R carries z.
        ("bgr_optical", (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
        ("rgb_optical", (0.6, 0.0, -0.8), (0.6, 0.0, -0.8)),
        ("rgb_rub", (0.6, 0.8, 0.0), (0.6, -0.8, 0.0)),
    ],
)
def test_normals_png_formats_convert_to_optical(tmp_path: Path, fmt: str, stored_rgb: tuple, optical: tuple) -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[0] = np.round((np.array(stored_rgb) + 1) / 2 * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "n.png")
    n, mask = decode_normals_png(tmp_path / "n.png", fmt)
    assert mask[0].all() and not mask[1].any()  # all-zero pixels carry no normal
    assert np.allclose(n[0], optical, atol=0.01)


def test_normals_manifest_groups_and_paths(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png", 4, 4)
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(tmp_path / "na.png")
    (tmp_path / "m.json").write_text(json.dumps([
        {"rgb": "a.png", "normals": "na.png", "normals_format": "rgb_optical", "set": "lab"},
        {"rgb": "a.png"},  # depth-only entries are skipped
    ]))
    samples = list(iter_normals_manifest(tmp_path / "m.json"))
    assert len(samples) == 1 and samples[0].group == "lab"
    assert np.allclose(samples[0].normals, 1 / np.sqrt(3), atol=1e-3)
