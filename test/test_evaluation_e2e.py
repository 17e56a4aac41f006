"""geodiff_eval end to end: tiny checkpoints on a synthetic NYU layout and the real frames in shared/data, and a
recording stand-in engine where the test must see exactly what the protocol feeds the model.

Tiny-checkpoint numbers are meaningless; these tests check the protocol (datasets, resolution, model input,
masks, alignment, pooling, empty images, output files).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from geodiff_ros.evaluation.datasets import dsine_model_input
from geodiff_ros.evaluation.evaluate import build_parser, evaluate


def _nyu_layout(root: Path) -> None:
    yy, xx = np.mgrid[0:480, 0:640]
    depth_mm = (1000 + 4 * xx + 2 * yy).astype(np.uint16)
    d = root / "test" / "office_0005"
    d.mkdir(parents=True)
    rgb = np.stack([(xx % 256), (yy % 256), np.full_like(xx, 100)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb_0009.png")
    Image.fromarray(depth_mm).save(d / "depth_0009.png")
    Image.fromarray(depth_mm).save(d / "filled_0009.png")
    (root / "filename_list_test.txt").write_text(
        "test/office_0005/rgb_0009.png test/office_0005/depth_0009.png test/office_0005/filled_0009.png\n")


def test_eval_synthetic_nyu_writes_json_and_markdown(tiny_depth_ckpt: Path, tmp_path: Path) -> None:
    _nyu_layout(tmp_path / "nyu")
    out = tmp_path / "out"
    args = build_parser().parse_args([
        "--depth-model", str(tiny_depth_ckpt), "--device", "cpu", "--dataset", f"nyu:{tmp_path / 'nyu'}",
        "--output_dir", str(out), "--local_files_only",
    ])
    res = evaluate(args)
    nyu = res["depth"]["nyu"]
    assert nyu["num_images"] == 1 and nyu["processing_res"] == 0  # NYU runs at native size
    assert 0.0 <= nyu["delta1_acc"] <= 1.0 and math.isfinite(nyu["abs_relative_difference"])
    assert json.loads((out / "metrics.json").read_text())["depth"]["nyu"]["num_images"] == 1
    md = (out / "metrics.md").read_text()
    assert "| nyu | 1 |" in md and "AbsRel x100" in md
    assert (out / "per_image_depth.csv").read_text().startswith("dataset,group,name,sec,")


def test_eval_real_shared_frames(tiny_depth_ckpt: Path, tiny_normals_ckpt: Path, shared_data: Path,
                                 tmp_path: Path) -> None:
    normals_manifest = tmp_path / "normals.json"
    nyu = shared_data / "normals" / "nyu_ladicky_vainf"
    normals_manifest.write_text(json.dumps([{
        "rgb": str(nyu / "image_682x512.png"), "normals": str(nyu / "normal.png"),
        "normals_format": "bgr_optical", "set": "nyu_ladicky"}]))
    out = tmp_path / "out"
    args = build_parser().parse_args([
        "--depth-model", str(tiny_depth_ckpt), "--normals-model", str(tiny_normals_ckpt), "--device", "cpu",
        "--dataset", f"manifest:{shared_data / 'manifest.json'}", "--dataset", f"normals:{normals_manifest}",
        "--processing_res", "128", "--output_dir", str(out), "--local_files_only",
    ])
    res = evaluate(args)
    manifest = json.loads((shared_data / "manifest.json").read_text())
    assert res["depth"]["manifest"]["num_images"] == len(manifest)
    sets = {e["set"] for e in manifest}
    assert {k.split("/", 1)[1] for k in res["depth"] if k.startswith("manifest/")} == sets
    for m in res["depth"].values():
        assert math.isfinite(m["abs_relative_difference"]) and 0.0 <= m["delta1_acc"] <= 1.0
    n = res["normals"]["nyu_ladicky"]
    assert n["num_images"] == 1 and n["num_pixels"] > 0.9 * 640 * 480  # the GT map is nearly dense
    assert 0.0 <= n["mean"] <= 180.0 and n["a5"] <= n["a11.25"] <= n["a30"] <= 100.0
    assert "### Normals" in (out / "metrics.md").read_text()


class RecordingEngine:
    """Stands in for GeoDiffEngine: records each input image and the processing resolution it was run at."""

    def __init__(self, normals: np.ndarray | None = None) -> None:
        self.config = SimpleNamespace(processing_res=768)
        self.calls: list[tuple[np.ndarray, int]] = []
        self.normals = normals

    def predict(self, image: np.ndarray, tasks: list[str]) -> SimpleNamespace:
        self.calls.append((image.copy(), self.config.processing_res))
        h, w = image.shape[:2]
        if tasks == ["normals"]:
            n = self.normals if self.normals is not None else np.tile(np.float32([0, 0, -1]), (h, w, 1))
            return SimpleNamespace(normals=[n.astype(np.float32)])
        return SimpleNamespace(depth=[np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)])


def _dsine_nyuv2(root: Path, rgb: np.ndarray) -> None:
    (root / "test").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "test" / "000000_img.png")
    gt = np.zeros(rgb.shape, np.uint8)
    gt[:, :] = (128, 128, 255)  # LUB (0, 0, 1) = optical (0, 0, -1)
    gt[0, 0] = 0
    Image.fromarray(gt).save(root / "test" / "000000_normal.png")
    (root / "test.txt").write_text("test/000000_img.png\n")


@pytest.mark.parametrize(("flags", "want_res", "want_input"), [
    ([], 0, "dsine"),  # the official protocol: native resolution, DSINE-preprocessed image
    (["--normals_input", "raw", "--processing_res", "768"], 768, "raw"),
])
def test_normals_benchmark_resolution_and_model_input(tmp_path: Path, flags: list, want_res: int,
                                                      want_input: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    _dsine_nyuv2(tmp_path / "nyuv2", rgb)
    engine = RecordingEngine()
    args = build_parser().parse_args(["--normals-model", "x", "--dataset", f"normals-nyuv2:{tmp_path / 'nyuv2'}",
                                      "--output_dir", str(tmp_path / "out"), *flags])
    res = evaluate(args, engine=engine)
    ((image, res_used),) = engine.calls
    assert res_used == want_res
    assert np.array_equal(image, dsine_model_input(rgb) if want_input == "dsine" else rgb)
    m = res["normals"]["normals-nyuv2"]
    assert m["processing_res"] == want_res and m["input_image"] == want_input
    assert m["num_images"] == 1 and m["num_pixels"] == 6 * 8 - 1  # sum(RGB) > 0 mask
    assert m["mean"] < 0.5 and m["a11.25"] == 100.0  # (0, 0, -1) optical vs GT (128, 128, 255)


def test_depth_benchmark_empty_mask_is_nan_like_official_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "scannet"
    (root / "d").mkdir(parents=True)
    lines = []
    for i, value in enumerate((2000, 0, 3000)):  # image 1 has no valid depth at all
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / "d" / f"{i}.jpg")
        Image.fromarray(np.full((6, 8), value, np.uint16) + np.arange(8, dtype=np.uint16) * (value > 0)).save(
            root / "d" / f"{i}.png")
        lines.append(f"d/{i}.jpg d/{i}.png")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    engine = RecordingEngine()
    out = tmp_path / "out"
    args = build_parser().parse_args(["--depth-model", "x", "--dataset", f"scannet:{root}",
                                      "--filelist", f"scannet:{root / 'list.txt'}", "--output_dir", str(out)])
    m = evaluate(args, engine=engine)["depth"]["scannet"]
    assert len(engine.calls) == 2  # no model run for the empty image (its metrics are NaN either way)
    assert m["num_images"] == 3 and math.isnan(m["abs_relative_difference"]) and math.isnan(m["silog_rmse"])
    assert m["images_without_valid_pixels"] == ["d/1.jpg"]
    assert "1 image(s) without valid ground truth, NaN (official): d/1.jpg" in (out / "metrics.md").read_text()
    header, *rows = (out / "per_image_depth.csv").read_text().splitlines()
    assert header.split(",")[4:15] == ["valid_pixels", "abs_relative_difference", "squared_relative_difference",
                                       "rmse_linear", "rmse_log", "log10", "delta1_acc", "delta2_acc",
                                       "delta3_acc", "i_rmse", "silog_rmse"]
    assert rows[1].split(",")[4:6] == ["0", "nan"]


def test_manifest_skips_images_without_depth_but_lists_them(tmp_path: Path) -> None:
    for i, value in enumerate((1500, 0)):
        Image.fromarray(np.full((4, 6, 3), 80, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full((4, 6), value, np.uint16) + np.arange(6, dtype=np.uint16) * (value > 0)).save(
            tmp_path / f"{i}_d.png")
    (tmp_path / "m.json").write_text(json.dumps(
        [{"rgb": f"{i}.png", "depth": f"{i}_d.png", "depth_scale": 1000.0} for i in range(2)]))
    args = build_parser().parse_args(["--depth-model", "x", "--dataset", f"manifest:{tmp_path / 'm.json'}",
                                      "--output_dir", str(tmp_path / "out")])
    m = evaluate(args, engine=RecordingEngine())["depth"]["manifest"]
    assert m["num_images"] == 1 and math.isfinite(m["abs_relative_difference"])
    assert m["images_without_valid_pixels"] == ["1.png"] and m["empty_images"] == "skipped"


def test_eval_real_nyu_normals_in_dsine_layout_native_resolution(tiny_normals_ckpt: Path, shared_data: Path,
                                                                  tmp_path: Path) -> None:
    # The real NYUv2 normal map re-encoded as DSINE's GT, evaluated by the tiny model at native 640x480.
    src = shared_data / "normals" / "nyu_ladicky_vainf"
    stored = np.asarray(Image.open(src / "normal.png"))[..., :3]
    root = tmp_path / "nyuv2"
    (root / "test").mkdir(parents=True)
    lub = np.where(stored.any(-1, keepdims=True), 255 - stored[..., ::-1], 0).astype(np.uint8)
    Image.fromarray(lub).save(root / "test" / "000003_normal.png")
    Image.open(src / "image_682x512.png").convert("RGB").resize((640, 480)).save(root / "test" / "000003_img.png")
    args = build_parser().parse_args([
        "--normals-model", str(tiny_normals_ckpt), "--device", "cpu", "--local_files_only",
        "--dataset", f"normals-nyuv2:{root}", "--output_dir", str(tmp_path / "out")])
    m = evaluate(args)["normals"]["normals-nyuv2"]
    assert m["processing_res"] == 0 and m["input_image"] == "dsine"
    assert m["num_images"] == 1 and m["num_pixels"] == int(stored.any(-1).sum())
    assert 0.0 <= m["mean"] <= 180.0 and m["a5"] <= m["a11.25"] <= m["a30"] <= 100.0
