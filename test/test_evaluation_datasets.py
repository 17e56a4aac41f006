"""Benchmark loaders on tiny synthetic folders in the official layouts and file formats.

Depth: Marigold's evaluation folders and data_split lists. Normals: DSINE's dsine_eval folders and split lists
(``<stem>_img.png`` beside ``<stem>_normal.png`` (NYUv2, ScanNet) or ``<stem>_normal.exr`` (iBims-1, Sintel)),
decoded and masked as DSINE's loaders do (E2E-FT's vendored ``DSINE/data/datasets/*/__init__.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
from PIL import Image

from geodiff_ros.evaluation.datasets import (
    NORMALS_DATASETS,
    decode_normals_png,
    dsine_model_input,
    iter_depth_dataset,
    iter_normals_dataset,
    iter_normals_manifest,
)


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


def test_eth3d_scannet_diode_layouts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # ETH3D: raw float32 without header at the RGB size, inf = no measurement.
    _rgb(tmp_path / "eth3d/rgb/courtyard/images/dslr_images/DSC_0286.JPG", 8, 12)
    raw = np.full((8, 12), 4.0, np.float32)
    raw[0, 0] = np.inf
    raw[0, 1] = np.nan  # only +inf means "no measurement" officially; NaN stays NaN (and is invalid)
    (tmp_path / "eth3d/depth/courtyard_dslr_depth/courtyard/ground_truth_masks/dslr_images").mkdir(parents=True)
    d_rel = "depth/courtyard_dslr_depth/courtyard/ground_truth_masks/dslr_images/DSC_0286.JPG"
    raw.tofile(tmp_path / "eth3d" / d_rel)
    (tmp_path / "eth3d/eth3d_filename_list.txt").write_text(
        f"rgb/courtyard/images/dslr_images/DSC_0286.JPG {d_rel}\n")
    (e,) = list(iter_depth_dataset("eth3d", tmp_path / "eth3d"))
    assert e.depth_m[0, 0] == 0.0 and not e.mask[0, 0] and e.mask.sum() == 8 * 12 - 2
    assert np.isnan(e.depth_m[0, 1]) and not e.mask[0, 1]

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
    depth = np.full((4, 5, 1), 3.0, np.float32)
    depth[3, 4] = 0.0  # inside the dataset's mask: the official keeps it (the image's AbsRel becomes inf)
    np.save(base / "00019_00183_indoors_000_010_depth.npy", depth)
    mask = np.ones((4, 5), np.float32)
    mask[1, 2] = 0
    np.save(base / "00019_00183_indoors_000_010_depth_mask.npy", mask)
    rel = "val/indoors/scene_00019/scan_00183/00019_00183_indoors_000_010"
    (tmp_path / "diode/diode_val_all_filename_list.txt").write_text(
        f"{rel}.png {rel}_depth.npy {rel}_depth_mask.npy\n")
    with caplog.at_level(logging.WARNING, logger="geodiff_ros.evaluation"):
        (di,) = list(iter_depth_dataset("diode", tmp_path / "diode"))
    assert di.depth_m.shape == (4, 5) and di.mask.sum() == 19 and not di.mask[1, 2]
    assert di.mask[3, 4] and di.depth_m[3, 4] == 0.0  # the file's mask only, no "depth > 0"
    assert "1 pixels inside the dataset's mask with depth <= 0" in caplog.text


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


# ----------------------------------------------------------------------------- DSINE normals benchmarks


def _dsine_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _exr(path: Path, n: np.ndarray, dtype: type = np.float32) -> None:
    """R, G, B = x, y, z float channels, the layout DSINE reads (cv2 BGR, then BGR2RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    channels = {c: np.ascontiguousarray(n[..., i].astype(dtype)) for i, c in enumerate("RGB")}
    with OpenEXR.File(header, channels) as f:
        f.write(str(path))


@pytest.mark.parametrize(("kind", "folder"), [("normals-nyuv2", "test"), ("normals-scannet", "scene0532_00")])
def test_dsine_png_benchmarks_decode_and_mask_as_dsine(tmp_path: Path, kind: str, folder: str) -> None:
    gt = np.zeros((2, 4, 3), np.uint8)
    gt[0, 0] = (128, 128, 255)  # LUB (0, 0, 1): facing the camera
    gt[0, 1] = (128, 128, 128)  # ~(0, 0, 0): no direction, but DSINE's mask is sum(RGB) > 0 -> valid
    gt[0, 2] = (1, 0, 0)  # barely non-zero: valid
    gt[1, 0] = (255, 128, 128)  # LUB x = +1 (image left)
    _rgb(tmp_path / folder / "000000_img.png", 2, 4)
    _dsine_png(tmp_path / folder / "000000_normal.png", gt)
    (tmp_path / "split.txt").write_text(f"{folder}/000000_img.png\n")
    (s,) = list(iter_normals_dataset(kind, tmp_path, tmp_path / "split.txt"))
    assert s.mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    # n = v / 255 * 2 - 1 in float32, LUB -> optical by an exact sign flip, not re-normalised
    lub = (gt.astype(np.float32) / 255.0) * 2.0 - 1.0
    assert s.normals.dtype == np.float32 and np.array_equal(s.normals, -lub)
    assert s.normals[0, 0, 2] < -0.99 and s.normals[1, 0, 0] == -1.0  # toward the camera; image left


@pytest.mark.parametrize(("kind", "rel"), [("normals-ibims", "ibims/corridor_01_img.png"),
                                           ("normals-sintel", "alley_1/frame_0001_img.png")])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dsine_exr_benchmarks_read_and_mask_norm_over_half(tmp_path: Path, kind: str, rel: str, dtype: type) -> None:
    n = np.zeros((2, 3, 3), np.float32)
    n[0, 0] = (0.0, 0.0, 1.0)
    n[0, 1] = (0.6, 0.0, 0.0)  # |n| 0.6: valid
    n[0, 2] = (0.0, 0.4, 0.0)  # |n| 0.4: invalid (mask |n| > 0.5)
    n[1, 0] = (-0.48, 0.6, 0.64)
    stem = rel.rsplit("_img", 1)[0]
    _rgb(tmp_path / rel, 2, 3)
    _exr(tmp_path / f"{stem}_normal.exr", n, dtype)
    (s,) = list(iter_normals_dataset(kind, tmp_path, _write(tmp_path / "split.txt", rel)))
    assert s.mask.tolist() == [[True, True, False], [True, False, False]]
    assert np.array_equal(s.normals, -n.astype(dtype).astype(np.float32))  # stored values, optical frame


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def test_dsine_split_default_and_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in (1, 0):
        _rgb(tmp_path / "test" / f"00000{i}_img.png", 2, 2)
        _dsine_png(tmp_path / "test" / f"00000{i}_normal.png", np.full((2, 2, 3), 200))
    # no split list: every '*/*_img.*' in sorted order, with a warning naming the official list
    with caplog.at_level(logging.WARNING, logger="geodiff_ros.evaluation"):
        names = [s.name for s in iter_normals_dataset("normals-nyuv2", tmp_path)]
    assert names == ["test/000000_img.png", "test/000001_img.png"]
    assert "split/test.txt" in caplog.text and "official split has 654" in caplog.text
    # DSINE's split file inside the root is picked up and its order kept
    _write(tmp_path / "test.txt", "test/000001_img.png")
    assert [s.name for s in iter_normals_dataset("normals-nyuv2", tmp_path)] == ["test/000001_img.png"]
    assert {k: v.num_images for k, v in NORMALS_DATASETS.items()} == {
        "normals-nyuv2": 654, "normals-scannet": 300, "normals-ibims": 100, "normals-sintel": 1064}


def test_dsine_nyuv2_layout_from_the_real_nyu_normal_map(shared_data: Path, tmp_path: Path) -> None:
    # The published NYUv2 normal map (optical x,y,z stored as B,G,R) re-encoded as DSINE's GT (R,G,B = LUB).
    src = shared_data / "normals" / "nyu_ladicky_vainf"
    stored = np.asarray(Image.open(src / "normal.png"))[..., :3]
    valid = stored.any(-1)
    lub_u8 = np.where(valid[..., None], 255 - stored[..., ::-1], 0)  # optical -> LUB: n -> -n, i.e. v -> 255 - v
    _dsine_png(tmp_path / "test" / "000003_normal.png", lub_u8)
    Image.open(src / "image_682x512.png").convert("RGB").resize((640, 480)).save(tmp_path / "test" / "000003_img.png")
    (s,) = list(iter_normals_dataset("normals-nyuv2", tmp_path, _write(tmp_path / "s.txt", "test/000003_img.png")))
    assert np.array_equal(s.mask, valid) and s.mask.mean() > 0.9
    # same directions as the map's own decoding (to within the 8-bit step)
    ref, _ = decode_normals_png(src / "normal.png", "bgr_optical")
    unit = s.normals / np.linalg.norm(s.normals, axis=-1, keepdims=True)
    assert np.degrees(np.arccos(np.clip(np.sum(unit * ref, -1)[valid], -1, 1))).max() < 1.0


def test_dsine_model_input_is_the_official_stretched_image() -> None:
    # Gray 0 and gray 203: ImageNet-normalised, the global min is R of the black pixel, the max B of the gray one.
    img = np.array([[[0, 0, 0], [203, 203, 203]]], np.uint8)
    out = dsine_model_input(img)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0
    assert out.tolist() == [[[0, 5, 20], [230, 240, 254]]]  # colours shift: not the raw image
    # The maximum is 254, not 255: the official run divides on CUDA, i.e. multiplies by the float32
    # reciprocal of the range, and here range * (1 / range) < 1 in float32 (plain division would give 255).
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    x = (img.astype(np.float32) / np.float32(255) - mean) / std
    r = np.float32(float(x.max()) - float(x.min()))
    assert r * (np.float32(1) / r) < 1 and int((x.max() - x.min()) / r * np.float32(255)) == 255
    # the stretch spans all channels at once: a uniform gray image reaches the model as a uniform colour
    assert dsine_model_input(np.full((2, 2, 3), 7, np.uint8)).reshape(-1, 3).tolist() == [[0, 68, 255]] * 4
