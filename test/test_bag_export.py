"""``geodiff_bag export``: colour/depth pairs of a bag written as an RGB-D manifest folder.

Synthetic bags with known pixels, depth and stamps check what a user relies on: which frames are paired, that the
PNGs give back the recorded colour and metres, the intrinsics, and that the folder loads in the fine-tuning dataset
and the evaluation reader. The real TUM bag (../shared/data) is exported too where it is present. No DDS.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from geodiff_ros.bag.cli import main as bag_main
from geodiff_ros.bag.export import pair_by_stamp
from geodiff_ros.bag.storage import BagWriter, open_bag
from geodiff_ros.evaluation.datasets import iter_depth_manifest
from geodiff_ros.manifest import read_manifest
from geodiff_ros.ros.conversions import depth_to_metres, numpy_to_image_fields
from geodiff_ros.training.data import ManifestRGBDDataset

IMAGE, INFO = "/cam/color/image", "/cam/color/camera_info"
DEPTH, DEPTH_INFO = "/cam/depth/image", "/cam/depth/camera_info"
W, H = 32, 24
FX, FY, CX, CY = 30.0, 31.0, 15.5, 11.5
T0 = 1_700_000_000_000_000_000
PERIOD = 100_000_000  # ns, 10 Hz
MAX_M = 65.5355  # largest depth a 16-bit millimetre PNG holds (65535 mm), with float32 slack
DEPTH_LAG = 7_000_000  # ns: depth stamped 7 ms after its image (within the default --max-dt 0.02 s)


def _stamp(types: dict, ns: int) -> object:
    sec, nsec = divmod(ns, 1_000_000_000)
    return types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec)


def _image(types: dict, ns: int, array: np.ndarray, encoding: str, frame: str = "cam_optical") -> object:
    fields = numpy_to_image_fields(array, encoding)
    fields["data"] = np.frombuffer(fields["data"], np.uint8)
    header = types["std_msgs/msg/Header"](stamp=_stamp(types, ns), frame_id=frame)
    return types["sensor_msgs/msg/Image"](header=header, **fields)


def _info(types: dict, ns: int, width: int, height: int, fx: float, fy: float, cx: float, cy: float) -> object:
    header = types["std_msgs/msg/Header"](stamp=_stamp(types, ns), frame_id="cam_optical")
    roi = types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return types["sensor_msgs/msg/CameraInfo"](
        header=header, height=height, width=width, distortion_model="plumb_bob", d=np.zeros(5),
        k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], float), r=np.eye(3).reshape(-1),
        p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], float), binning_x=0, binning_y=0, roi=roi)


def _depth_m(i: int, h: int, w: int) -> np.ndarray:
    """Known metres ``[h,w]`` with holes: NaN and 0 (no measurement) and one pixel at 70 m (beyond 16 bits)."""
    rng = np.random.default_rng(100 + i)
    depth = rng.uniform(0.3, 9.0, (h, w)).astype(np.float32)
    depth[0, :5] = np.nan
    depth[1, :5] = 0.0
    depth[2, 0] = 70.0
    return depth


def write_rgbd_bag(path: Path, *, frames: int = 6, encoding: str = "16UC1", skip_depth: tuple[int, ...] = (2,),
                   late_depth: tuple[int, ...] = (4,), depth_size: tuple[int, int] = (W, H),
                   depth_intrinsics: tuple[float, float, float, float] | None = None, compressed: bool = False,
                   storage: str = "mcap", size: tuple[int, int] = (W, H)) -> tuple[Path, dict]:
    """A bag with ``frames`` colour images + CameraInfo; a depth image per frame, DEPTH_LAG after it, except
    ``skip_depth`` (none) and ``late_depth`` (60 ms late: no pair). Returns the bag and what a pair must hold:
    ``{image stamp: (rgb [H,W,3], depth metres [h,w] as the depth message decodes)}``."""
    width, height = size
    dw, dh = depth_size
    expected: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with BagWriter(path, storage=storage) as writer:
        types = writer.typestore.types
        for i in range(frames):
            ns = T0 + i * PERIOD
            rgb = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H,W,3]
            if compressed:
                buf = io.BytesIO()
                PILImage.fromarray(rgb).save(buf, format="PNG")
                header = types["std_msgs/msg/Header"](stamp=_stamp(types, ns), frame_id="cam_optical")
                msg = types["sensor_msgs/msg/CompressedImage"](header=header, format="png",
                                                               data=np.frombuffer(buf.getvalue(), np.uint8))
            else:
                msg = _image(types, ns, rgb, "rgb8")
            writer.write_msg(IMAGE, ns, msg)
            writer.write_msg(INFO, ns, _info(types, ns, width, height, FX, FY, CX, CY))
            if i in skip_depth:
                continue
            depth = _depth_m(i, dh, dw)
            if encoding == "16UC1":
                mm = np.clip(np.rint(np.nan_to_num(depth) * 1000), 0, 65535).astype(np.uint16)
                dmsg = _image(types, ns + DEPTH_LAG, mm, "16UC1")
            else:
                dmsg = _image(types, ns + DEPTH_LAG, depth, "32FC1")
            dns = ns + (60_000_000 if i in late_depth else DEPTH_LAG)
            dmsg.header.stamp = _stamp(types, dns)
            writer.write_msg(DEPTH, dns, dmsg)
            if depth_intrinsics is not None:
                writer.write_msg(DEPTH_INFO, dns, _info(types, dns, dw, dh, *depth_intrinsics))
            if i not in late_depth:
                expected[ns] = (rgb, depth_to_metres(dmsg))
    return path, expected


def _export(bag: Path, out: Path, *extra: str) -> int:
    return bag_main(["export", str(bag), str(out), "--image-topic", IMAGE, "--depth-topic", DEPTH, *extra])


def _png(path: Path) -> np.ndarray:
    with PILImage.open(path) as im:
        return np.asarray(im)


def _check_frames(out: Path, expected: dict, entries: list[dict]) -> None:
    """Every entry holds exactly the recorded pixels and metres (to 1 mm) of the image with its stamp."""
    stamps = [T0 + round((e["stamp"] - T0 * 1e-9) * 10) * PERIOD for e in entries]
    assert sorted(stamps) == stamps
    for stamp, entry in zip(stamps, entries, strict=True):
        assert abs(entry["stamp"] - stamp * 1e-9) < 1e-6
        rgb, depth = expected[stamp]
        np.testing.assert_array_equal(_png(out / entry["rgb"]), rgb)
        mm = _png(out / entry["depth"])
        assert mm.dtype == np.uint16 and mm.shape == rgb.shape[:2]
        metres = mm / entry["depth_scale"]
        valid = np.isfinite(depth) & (depth < MAX_M)
        np.testing.assert_allclose(metres[valid], depth[valid], atol=0.0005 + 1e-6)  # rounded to the millimetre
        assert (mm[~valid] == 0).all()  # NaN, 0 and (32FC1) the 70 m pixel -> 0 = no measurement
        assert (mm[:2, :5] == 0).all()


# ------------------------------------------------------------------------------------------------ pairing


def test_pairing_is_nearest_within_max_dt_and_one_to_one() -> None:
    images = [0, 100, 200, 300]
    depths = [5, 96, 104, 260, 1000]
    pairs, nearest = pair_by_stamp(images, depths, max_dt_ns=10)
    assert pairs == [(0, 0), (1, 1)] and nearest == 4  # 104 is 4 from image 100 too, 96 wins (first nearest)
    # one depth image nearest to two images stays with the nearer one
    pairs, _ = pair_by_stamp([0, 8], [6], max_dt_ns=10)
    assert pairs == [(1, 0)]
    assert pair_by_stamp([0], [], 10) == ([], None)


# ------------------------------------------------------------------------------------------------ synthetic bags


@pytest.mark.parametrize(("encoding", "storage"), [("16UC1", "mcap"), ("32FC1", "sqlite3")])
def test_export_writes_the_recorded_pixels_metres_and_intrinsics(tmp_path: Path, encoding: str, storage: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    bag, expected = write_rgbd_bag(tmp_path / "bag", encoding=encoding, storage=storage)
    out = tmp_path / "out"
    assert _export(bag, out) == 0
    base, entries = read_manifest(out)
    assert base == out
    assert len(entries) == 4  # 6 images: frame 2 has no depth, frame 4's depth is 60 ms late
    assert set(json.loads((out / "manifest.json").read_text())[0]) >= {
        "rgb", "depth", "depth_scale", "intrinsics", "width", "height", "set", "stamp"}
    _check_frames(out, expected, entries)
    for e in entries:
        assert e["intrinsics"] == {"fx": FX, "fy": FY, "cx": CX, "cy": CY}
        assert (e["width"], e["height"], e["set"], e["depth_scale"]) == (W, H, "bag", 1000.0)
    assert [e["rgb"] for e in entries] == [f"rgb/{i:06d}.png" for i in range(4)]
    text = capsys.readouterr().out
    assert "pairs within 0.02 s: 4 (unpaired images skipped: 2, unused depth images: 1)" in text
    far = 4 if encoding == "32FC1" else 0  # one 70 m pixel a frame; 16-bit input cannot hold it (stored 65.535)
    assert f"beyond 65.535 m written as 0: {far}" in text


def test_exported_folder_loads_for_fine_tuning_and_evaluation(tmp_path: Path) -> None:
    bag, expected = write_rgbd_bag(tmp_path / "bag", encoding="32FC1")
    out = tmp_path / "out"
    assert _export(bag, out, "--set", "robot_lab") == 0
    ds = ManifestRGBDDataset(out, size_hw=None, flip_p=0.0)
    assert len(ds) == 4
    sample = ds[0]
    rgb0, depth0 = expected[T0]
    assert tuple(sample["rgb"].shape) == (3, H, W) and tuple(sample["depth"].shape) == (1, H, W)
    np.testing.assert_allclose((sample["rgb"].permute(1, 2, 0).numpy() + 1) * 127.5, rgb0, atol=1e-3)
    valid = np.isfinite(depth0) & (depth0 < MAX_M)
    np.testing.assert_array_equal(sample["valid_mask"][0].numpy(), valid)  # holes and the 70 m pixel masked
    samples = list(iter_depth_manifest(out))
    assert len(samples) == 4 and {s.group for s in samples} == {"robot_lab"}
    for s, stamp in zip(samples, sorted(expected), strict=True):
        rgb, depth = expected[stamp]
        assert s.rgb.shape == (H, W, 3) and s.depth_m.shape == (H, W)
        np.testing.assert_array_equal(s.rgb, rgb)
        ok = np.isfinite(depth) & (depth < MAX_M)
        np.testing.assert_allclose(s.depth_m[ok], depth[ok], atol=0.0005 + 1e-6)  # metres
        np.testing.assert_array_equal(s.mask, ok)


def test_every_nth_pair_and_compressed_png_without_camera_info(tmp_path: Path) -> None:
    bag, expected = write_rgbd_bag(tmp_path / "bag", frames=9, skip_depth=(), late_depth=(), compressed=True)
    out = tmp_path / "out"
    assert _export(bag, out, "--every", "3", "--camera-info-topic", "") == 0
    _, entries = read_manifest(out)
    assert [round(e["stamp"] - T0 * 1e-9, 3) for e in entries] == [0.0, 0.3, 0.6]
    assert all("intrinsics" not in e for e in entries)  # none asked for
    _check_frames(out, expected, entries)


def test_half_resolution_registered_depth_is_moved_onto_the_image_grid(tmp_path: Path) -> None:
    # depth at half size with the colour intrinsics halved: registered, so each depth pixel (u, v) lands on
    # (2u, 2v) of the image grid (nearest neighbour, no interpolation) and the other pixels stay 0
    half = (FX / 2, FY / 2, CX / 2, CY / 2)
    bag, expected = write_rgbd_bag(tmp_path / "bag", depth_size=(W // 2, H // 2), depth_intrinsics=half,
                                   skip_depth=(), late_depth=())
    out = tmp_path / "out"
    assert _export(bag, out) == 0
    _, entries = read_manifest(out)
    assert len(entries) == 6
    for e in entries:
        stamp = T0 + round((e["stamp"] - T0 * 1e-9) * 10) * PERIOD
        small = expected[stamp][1]  # [H/2,W/2] metres
        mm = _png(out / e["depth"])
        assert mm.shape == (H, W)
        ok = np.isfinite(small) & (small < MAX_M)
        np.testing.assert_allclose(mm[::2, ::2][ok] / 1000.0, small[ok], atol=0.0005 + 1e-6)
        assert (mm[1::2, :] == 0).all() and (mm[:, 1::2] == 0).all()


def test_depth_of_another_camera_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag, _ = write_rgbd_bag(tmp_path / "bag", depth_intrinsics=(25.0, 25.0, 16.0, 12.0))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert _export(bag, out) == 2
    assert "not registered to the colour camera" in caplog.text and "aligned" in caplog.text
    assert not out.exists()  # checked before anything is written
    caplog.clear()
    bag2, _ = write_rgbd_bag(tmp_path / "bag2", depth_size=(W, W))  # square depth for a 4:3 image
    with caplog.at_level(logging.ERROR):
        assert _export(bag2, out) == 2
    assert "different aspect ratio" in caplog.text


# ------------------------------------------------------------------------------------------------ errors


def test_missing_topic_names_the_topics_present(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag, _ = write_rgbd_bag(tmp_path / "bag", frames=2)
    with caplog.at_level(logging.ERROR):
        rc = bag_main(["export", str(bag), str(tmp_path / "out"), "--image-topic", IMAGE,
                       "--depth-topic", "/cam/depth/nope"])
    assert rc == 2
    assert "/cam/depth/nope" in caplog.text
    assert f"{DEPTH} (sensor_msgs/msg/Image)" in caplog.text and f"{INFO} (sensor_msgs/msg/CameraInfo)" in caplog.text


def test_wrong_topics_and_no_pairs_are_usage_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag, _ = write_rgbd_bag(tmp_path / "bag", frames=3)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert bag_main(["export", str(bag), str(out), "--image-topic", DEPTH, "--depth-topic", IMAGE]) == 2
        assert "--depth-topic /cam/color/image has encoding 'rgb8'" in caplog.text  # topics swapped
        assert bag_main(["export", str(bag), str(out), "--image-topic", IMAGE, "--depth-topic", IMAGE]) == 2
        assert "are both /cam/color/image" in caplog.text
        assert bag_main(["export", str(bag), str(out), "--image-topic", INFO, "--depth-topic", DEPTH]) == 2
        assert "sensor_msgs/msg/CameraInfo; it must be" in caplog.text
        assert _export(bag, out, "--max-dt", "0.005") == 2  # depth is 7 ms after its image
        assert "no colour/depth pairs within --max-dt 0.005 s" in caplog.text and "0.0070 s apart" in caplog.text
    assert not out.exists()


def test_existing_non_empty_output_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bag, _ = write_rgbd_bag(tmp_path / "bag", frames=2, skip_depth=(), late_depth=())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with caplog.at_level(logging.ERROR):
        assert _export(bag, out) == 2
    assert "exists and is not empty" in caplog.text
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(bag, empty) == 0  # an empty folder is fine
    assert len(read_manifest(empty)[1]) == 2


def test_damaged_bag_exports_the_readable_frames_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 160x120 frames (~135 kB each with 32FC1 depth): several MCAP chunks, so a cut keeps the earlier ones
    bag, expected = write_rgbd_bag(tmp_path / "bag", frames=20, encoding="32FC1", skip_depth=(), late_depth=(),
                                   size=(160, 120), depth_size=(160, 120))
    storage = next(bag.glob("*.mcap"))
    with storage.open("r+b") as fh:
        fh.truncate(int(storage.stat().st_size * 0.6))
    out = tmp_path / "out"
    assert _export(bag, out) == 3
    assert "input bag damaged, exported up to there" in capsys.readouterr().out
    _, entries = read_manifest(out)
    assert 5 <= len(entries) < 20
    _check_frames(out, expected, entries)  # the readable frames are complete and correct


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_shared_tum_bag_exports_plausible_rgbd_frames(shared_data: Path, tmp_path: Path, storage: str) -> None:
    bag = shared_data / "bags" / f"tum_fr2_desk_rgbd_{storage}"
    out = tmp_path / "tum"
    rc = bag_main(["export", str(bag), str(out), "--image-topic", "/camera/color/image_raw",
                   "--depth-topic", "/camera/aligned_depth_to_color/image_raw"])
    assert rc == 0
    _, entries = read_manifest(out)
    assert len(entries) == 2  # two frames, colour and depth stamped together
    with open_bag(bag) as b:
        recorded = [depth_to_metres(b.deserialize(m)) for m in b.messages(["/camera/aligned_depth_to_color/image_raw"])]
    for e, want in zip(entries, recorded, strict=True):
        assert e["intrinsics"] == {"fx": 520.9, "fy": 521.0, "cx": 325.1, "cy": 249.7}  # TUM fr2 (P = K)
        depth = _png(out / e["depth"]) / e["depth_scale"]  # [480,640] m
        assert depth.shape == (480, 640)
        valid = depth > 0
        assert 0.5 < valid.mean() < 0.8  # Kinect v1: holes at edges and dark surfaces
        assert 0.5 < depth[valid].min() and depth[valid].max() < 12.0 and 0.5 < np.median(depth[valid]) < 5.0
        np.testing.assert_allclose(depth[valid], want[valid], atol=0.0005 + 1e-6)
        assert (np.isfinite(want) == valid).all()
    # the bag was packed from the shared TUM PNGs: the export gives back their depth (/5000) to the millimetre
    ref = shared_data / "indoor" / "tum_fr2_desk_slambook2"
    np.testing.assert_allclose(_png(out / entries[0]["depth"]) / 1000.0, _png(ref / "1_depth.png") / 5000.0,
                               atol=0.0005 + 1e-6)
    with PILImage.open(ref / "1.png") as im:
        np.testing.assert_array_equal(_png(out / entries[0]["rgb"]), np.asarray(im.convert("RGB")))
    samples = list(iter_depth_manifest(out))
    assert [s.depth_m.shape for s in samples] == [(480, 640)] * 2

