"""geodiff_predict end to end: four outputs per image, on synthetic and on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from geodiff_ros.cli.predict import main

OUTPUTS = ("_depth.png", "_depth.npy", "_depth_colored.png", "_normals.png")


def run_cli(inputs: list[str], out: Path, depth: Path, normals: Path) -> int:
    return main([*inputs, "-o", str(out), "--depth-model", str(depth), "--normals-model", str(normals),
                 "--device", "cpu", "--dtype", "fp32", "--processing-res", "64"])


def check_outputs(out: Path, stem: str, size: tuple[int, int]) -> None:
    for suffix in OUTPUTS:
        assert (out / f"{stem}{suffix}").is_file(), f"missing {stem}{suffix}"
    depth16 = np.array(Image.open(out / f"{stem}_depth.png"))
    assert depth16.dtype == np.uint16 and depth16.shape == size
    depth = np.load(out / f"{stem}_depth.npy")
    np.testing.assert_allclose(depth16 / 65535.0, depth, atol=1.0 / 65535)
    assert np.array(Image.open(out / f"{stem}_depth_colored.png")).shape == (*size, 3)
    assert np.array(Image.open(out / f"{stem}_normals.png")).shape == (*size, 3)


def test_cli_folder_of_mixed_images(tmp_path: Path, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)).save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run_cli([str(folder)], out, tiny_depth_ckpt, tiny_normals_ckpt) == 0
    check_outputs(out, "rgb", (30, 40))
    check_outputs(out, "gray", (20, 24))
    check_outputs(out, "rgba", (16, 16))


def test_cli_reports_unreadable_files(tmp_path: Path, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert run_cli([str(bad)], tmp_path / "out", tiny_depth_ckpt, tiny_normals_ckpt) == 1
    assert run_cli([str(tmp_path / "missing")], tmp_path / "out", tiny_depth_ckpt, tiny_normals_ckpt) == 2


def test_cli_on_real_images(tmp_path: Path, shared_data: Path, tiny_depth_ckpt: Path,
                            tiny_normals_ckpt: Path) -> None:
    tum = shared_data / "indoor" / "tum_fr2_desk_slambook2"
    kitti = shared_data / "outdoor" / "kitti_object_lidar" / "image_2" / "000000.png"
    out = tmp_path / "out"
    assert run_cli([str(tum / "1.png"), str(tum / "2.png"), str(kitti)], out, tiny_depth_ckpt,
                   tiny_normals_ckpt) == 0
    check_outputs(out, "1", (480, 640))
    check_outputs(out, "000000", (370, 1224))
