"""geodiff_eval end to end with tiny checkpoints: synthetic NYU layout, and the real frames in shared/data.

Tiny-checkpoint numbers are meaningless; these tests check the protocol (datasets, masks, alignment,
pooling, output files).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

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
    assert nyu["num_images"] == 1 and nyu["processing_res"] == 0  # NYU runs at native size (spec C.1)
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
