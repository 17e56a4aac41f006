"""``geodiff_bag process``: the engine run offline over a bag, written to a new bag with the original topics.

Most tests use a stand-in engine whose relative depth is a known affine map of the true depth,
``relative = (depth - t) / s``; the metric output must then come back as the true depth, which checks the
alignment, the stamps, the cloud and the copy of the inputs without model weights. One test runs the real engine
with ``--tiny`` checkpoints through the CLI, and one shows the model-loading error a user sees without weights.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rosbags.typesys import get_types_from_msg
from scipy.spatial.transform import Rotation

from geodiff_ros.bag.cli import main as bag_main
from geodiff_ros.bag.process import ProcessOptions, process_bag
from geodiff_ros.bag.storage import BagError, BagWriter, jazzy_typestore, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.ros.conversions import depth_to_metres, image_to_numpy, image_to_rgb8
from geodiff_ros.ros.pointcloud import read_cloud

S, T = 3.0, 0.5  # relative = (depth - T) / S: the metric fit must find S and T
OUT_TOPICS = ("/depth/relative", "/depth/image", "/depth/camera_info", "/normals/image", "/points")


def _key(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()


class AffineEngine:
    """Stand-in for GeoDiffEngine: relative depth = (true depth - T) / S for the images of a known bag."""

    tasks = ("depth", "normals")
    device = "cpu"

    def __init__(self, bag_path: Path) -> None:
        self.relative: dict[str, np.ndarray] = {}
        self.true_depth: dict[str, np.ndarray] = {}
        with open_bag(bag_path) as bag:
            depth_by_stamp = {}
            images = []
            for raw in bag.messages([IMAGE_TOPIC, DEPTH_TOPIC]):
                msg = bag.deserialize(raw)
                if raw.topic == DEPTH_TOPIC:
                    depth_by_stamp[msg.header.stamp.sec, msg.header.stamp.nanosec] = depth_to_metres(msg)
                else:
                    images.append(msg)
        for img in images:
            depth = depth_by_stamp[img.header.stamp.sec, img.header.stamp.nanosec]  # [H,W] m, NaN = dropout
            filled = np.where(np.isfinite(depth), depth, np.nanmedian(depth))
            key = _key(image_to_rgb8(img))
            self.relative[key] = ((filled - T) / S).astype(np.float32)
            self.true_depth[key] = depth
        self.calls = 0

    def predict(self, images: list[np.ndarray], on_device: bool = False) -> SimpleNamespace:
        self.calls += 1
        depth = [self.relative[_key(im)] for im in images]
        normals = [np.broadcast_to(np.array([0, 0, -1], np.float32), (*im.shape[:2], 3)).copy() for im in images]
        return SimpleNamespace(depth=depth, normals=normals)


def _read(path: Path) -> dict[str, list[tuple[int, object]]]:
    out: dict[str, list[tuple[int, object]]] = {}
    with open_bag(path) as bag:
        for raw in bag.messages():
            out.setdefault(raw.topic, []).append((raw.timestamp, bag.deserialize(raw)))
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp("in") / "synth", frames=3)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_outputs_are_metric_in_sync_and_inputs_copied(synth: Path, tmp_path: Path, storage: str) -> None:
    src = synth
    if storage == "sqlite3":  # the same bag in the other storage format
        src = tmp_path / "in_sqlite3"
        with open_bag(synth) as bag, BagWriter(src, storage="sqlite3") as w:
            for m in bag.messages():
                w.add_topic(m.topic, m.msgtype)
                w.write(m.topic, m.timestamp, m.data)
    engine = AffineEngine(src)
    out = tmp_path / "out"
    with open_bag(src) as bag, BagWriter(out, storage=storage, typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC,
                                                                  batch_size=2))
    assert (summary.frames_in, summary.frames_out, summary.frames_metric, summary.frames_failed) == (3, 3, 3, 0)
    assert summary.camera_info_topic == INFO_TOPIC  # found as the image topic's sibling
    assert np.allclose(summary.scales, S, rtol=2e-3)
    assert engine.calls == 2  # batches of 2 + 1

    inp, res = _read(src), _read(out)
    for topic in inp:  # originals copied unchanged
        assert [(t, str(m)) for t, m in res[topic]] == [(t, str(m)) for t, m in inp[topic]]
    images = inp[IMAGE_TOPIC]
    for topic in OUT_TOPICS:
        assert len(res[topic]) == 3, topic
        for (t_out, m_out), (t_in, m_in) in zip(res[topic], images, strict=True):
            assert t_out == t_in  # stored at the input's bag time
            assert m_out.header == m_in.header  # same stamp and optical frame_id as the input image
    assert {m.encoding for _, m in res["/depth/relative"] + res["/depth/image"]} == {"32FC1"}
    assert {m.encoding for _, m in res["/normals/image"]} == {"32FC3"}

    info = inp[INFO_TOPIC][0][1]
    assert np.array_equal(res["/depth/camera_info"][0][1].p, info.p)
    for (_, img), (_, depth_msg), (_, cloud) in zip(images, res["/depth/image"], res["/points"], strict=True):
        truth = engine.true_depth[_key(image_to_rgb8(img))]
        metric = image_to_numpy(depth_msg)
        ok = np.isfinite(truth)
        assert np.allclose(metric[ok], truth[ok], rtol=2e-3)  # metric depth = the sensor's depth
        assert (cloud.height, cloud.width) == (img.height, img.width)  # organized, stride 1
        pts = read_cloud(cloud)
        assert pts.dtype.names == ("x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z")
        intr = PinholeIntrinsics(info.p[0], info.p[5], info.p[2], info.p[6], img.width, img.height)
        xyz = backproject(metric, intr)
        assert np.allclose(pts["x"], xyz[..., 0], equal_nan=True) and np.allclose(pts["z"], metric, equal_nan=True)


def test_sparse_fraction_measures_held_out_error(synth: Path, tmp_path: Path) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(
            image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC, sparse_fraction=0.02, visualize=True))
    assert summary.frames_metric == 3 and len(summary.absrel_heldout) == 3
    assert max(summary.absrel_heldout) < 0.01  # fitted on 2 % of the pixels, right on the other 98 %
    assert summary.outputs["/depth/image_vis"] == summary.outputs["/normals/image_vis"] == 3


def test_without_camera_info_no_cloud_but_depth(synth: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(
            image_topic=IMAGE_TOPIC, camera_info_topic="", sparse_topic=DEPTH_TOPIC, output_namespace="geodiff"))
    assert set(summary.outputs) == {"/geodiff/depth/relative", "/geodiff/depth/image", "/geodiff/normals/image"}


def test_without_sparse_depth_relative_only(synth: Path, tmp_path: Path) -> None:
    with open_bag(synth) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(image_topic=IMAGE_TOPIC))
    assert summary.frames_metric == 0  # never metric output without a fit
    assert set(summary.outputs) == {"/depth/relative", "/depth/camera_info", "/normals/image"}


def test_bad_topics_are_clear_errors(synth: Path, tmp_path: Path) -> None:
    engine = AffineEngine(synth)
    cases = [
        (ProcessOptions(image_topic="/nope"), r"/nope.*not in bag"),
        (ProcessOptions(image_topic=INFO_TOPIC), r"has type sensor_msgs/msg/CameraInfo; it must be"),
        (ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=INFO_TOPIC), r"--sparse-topic .* must be a depth"),
        (ProcessOptions(image_topic=IMAGE_TOPIC, camera_info_topic=DEPTH_TOPIC), r"expected sensor_msgs/msg/Camera"),
        (ProcessOptions(image_topic=IMAGE_TOPIC, output_namespace="camera/color/.."), None),
    ]
    for i, (opts, pattern) in enumerate(cases):
        with open_bag(synth) as bag, BagWriter(tmp_path / f"o{i}", typestore=bag.typestore) as writer:
            if pattern is None:
                process_bag(bag, writer, engine, opts)  # odd but legal namespace
                continue
            with pytest.raises(BagError, match=pattern):
                process_bag(bag, writer, engine, opts)
    processed = tmp_path / "o0_again"
    with open_bag(synth) as bag, BagWriter(processed, typestore=bag.typestore) as writer:
        process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC))
    with open_bag(processed) as bag, BagWriter(tmp_path / "twice", typestore=bag.typestore) as writer, \
            pytest.raises(BagError, match="already has output topic.*--output-namespace"):
        process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC))


def test_custom_types_are_copied(synth: Path, tmp_path: Path) -> None:
    store = jazzy_typestore()
    store.register(get_types_from_msg("uint32 a\nstring b\n", "geodiff_test_msgs/msg/Blob"))
    src = tmp_path / "with_blob"
    with open_bag(synth) as bag, BagWriter(src, typestore=store) as w:
        for m in bag.messages():
            w.add_topic(m.topic, m.msgtype)
            w.write(m.topic, m.timestamp, m.data)
        w.write_msg("/blob", 1_700_000_000_050_000_000, store.types["geodiff_test_msgs/msg/Blob"](a=3, b="c"))
    with open_bag(src) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(synth), ProcessOptions(image_topic=IMAGE_TOPIC))
    assert summary.passthrough["/blob"] == 1 and not summary.skipped_topics
    with open_bag(tmp_path / "o") as bag:
        blob = bag.deserialize(next(iter(bag.messages(["/blob"]))))
        assert (blob.a, blob.b) == (3, "c")


def test_truncated_input_is_processed_up_to_the_damage(tmp_path: Path) -> None:
    src = write_synthetic_bag(tmp_path / "long", frames=20)
    engine = AffineEngine(src)
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    f = next(cut.glob("*.mcap"))
    f.chmod(0o644)
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with open_bag(cut) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, engine, ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC))
    assert summary.damage is not None and "stopped at byte" in summary.damage
    assert 5 <= summary.frames_out < 20 and summary.frames_out == summary.frames_in
    res = _read(tmp_path / "o")  # the output bag is complete and readable
    assert len(res["/depth/image"]) == summary.frames_out


# ------------------------------------------------------------------------------------------------ LiDAR clouds

CLOUD_TOPIC = "/lidar/points"
# A LiDAR (x forward, y left, z up) 12 cm above and 8 cm left of the camera, pitched 3 degrees: the pose of its
# frame in the optical frame (x right, y down, z forward), as tf2_echo prints it.
_LIDAR_ROT = Rotation.from_matrix([[0, -1, 0], [0, 0, -1], [1, 0, 0]]) * Rotation.from_euler("y", 3, degrees=True)
LIDAR_POSE = [-0.08, -0.12, 0.03, *_LIDAR_ROT.as_quat()]


def _cloud(store: object, header: object, xyz: np.ndarray) -> object:
    """Unorganized PointCloud2 (rosbags) of ``[N,3]`` float32 points, fields x, y, z."""
    field = store.types["sensor_msgs/msg/PointField"]
    data = np.ascontiguousarray(xyz, "<f4").reshape(-1).view(np.uint8)
    return store.types["sensor_msgs/msg/PointCloud2"](
        header=header, height=1, width=len(xyz), fields=[field(name=n, offset=4 * i, datatype=7, count=1)
                                                         for i, n in enumerate("xyz")],
        is_bigendian=False, point_step=12, row_step=12 * len(xyz), data=data, is_dense=True)


def _bag_with_clouds(src: Path, dst: Path, frame_id: str, pose: list[float] | None,
                     malformed: int | None = None) -> Path:
    """``src`` plus a cloud per depth image: every third pixel's point (from the true depth and the camera_info) in
    the optical frame, moved into ``frame_id`` by the inverse of ``pose`` (LiDAR-like sparse input with a known
    truth); cloud number ``malformed`` claims more points than its data holds."""
    with open_bag(src) as bag, BagWriter(dst, typestore=bag.typestore) as w:
        store = bag.typestore
        info, clouds = None, 0
        for m in bag.messages():
            w.add_topic(m.topic, m.msgtype)
            w.write(m.topic, m.timestamp, m.data)
            if m.topic == INFO_TOPIC:
                info = bag.deserialize(m)
            if m.topic != DEPTH_TOPIC:
                continue
            depth = bag.deserialize(m)
            intr = PinholeIntrinsics(info.p[0], info.p[5], info.p[2], info.p[6], depth.width, depth.height)
            xyz = backproject(depth_to_metres(depth), intr)[::3, ::3].reshape(-1, 3)  # [N,3] optical frame
            xyz = xyz[np.isfinite(xyz).all(axis=1)]
            if pose is not None:
                extrinsic = RigidTransform(pose)  # p_optical = R p + t, so p = R^T (p_optical - t)
                xyz = (xyz - extrinsic.translation) @ extrinsic.rotation
            header = type(depth.header)(stamp=depth.header.stamp, frame_id=frame_id)
            msg = _cloud(store, header, xyz.astype(np.float32))
            if clouds == malformed:
                msg.width *= 2  # the header promises twice the points the data holds
            w.write_msg(CLOUD_TOPIC, m.timestamp, msg)
            clouds += 1
    return dst


def _process(src: Path, out: Path, sparse_frame: str | None = None, sparse_transform: object = None,
             **options: object) -> tuple[object, dict[str, list[tuple[int, object]]]]:
    settings = {}
    if sparse_frame is not None:
        settings = {"sparse_points.frame_id": sparse_frame, "sparse_points.transform": list(sparse_transform)}
    with open_bag(src) as bag, BagWriter(out, typestore=bag.typestore) as writer:
        summary = process_bag(bag, writer, AffineEngine(src), ProcessOptions(
            image_topic=IMAGE_TOPIC, sparse_topic=CLOUD_TOPIC, settings=settings, **options))
    return summary, _read(out)


def test_lidar_cloud_through_the_extrinsic_gives_the_optical_frame_result(synth: Path, tmp_path: Path) -> None:
    """The same points recorded in a LiDAR frame, processed with --sparse-frame/--sparse-transform, give the metric
    depth they give in the optical frame, and that depth is the true one."""
    lidar = _bag_with_clouds(synth, tmp_path / "lidar", "lidar", LIDAR_POSE)
    optical = _bag_with_clouds(synth, tmp_path / "optical", "camera_color_optical_frame", None)
    s_lidar, r_lidar = _process(lidar, tmp_path / "o1", sparse_frame="lidar", sparse_transform=LIDAR_POSE)
    s_opt, r_opt = _process(optical, tmp_path / "o2")
    assert s_lidar.frames_metric == s_opt.frames_metric == 3 and s_lidar.sparse_unused == 0
    engine = AffineEngine(lidar)
    for (_, img), (_, d_lidar), (_, d_opt) in zip(r_lidar[IMAGE_TOPIC], r_lidar["/depth/image"], r_opt["/depth/image"],
                                                  strict=True):
        a, b = image_to_numpy(d_lidar), image_to_numpy(d_opt)
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        np.testing.assert_allclose(a, b, rtol=1e-5)
        truth = engine.true_depth[_key(image_to_rgb8(img))]
        ok = np.isfinite(truth)
        np.testing.assert_allclose(a[ok], truth[ok], rtol=2e-3)
    assert np.allclose(s_lidar.scales, S, rtol=2e-3)
    # Held-out evaluation works on the projected cloud pixels: fitted on 20 % of them, right on the other 80 %.
    s_held, _ = _process(lidar, tmp_path / "o3", sparse_frame="lidar", sparse_transform=LIDAR_POSE,
                         sparse_fraction=0.2)
    assert s_held.frames_metric == 3 and len(s_held.absrel_heldout) == 3 and max(s_held.absrel_heldout) < 0.01


def test_lidar_cloud_in_an_unknown_frame_is_not_used_and_says_which_options(synth: Path, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    lidar = _bag_with_clouds(synth, tmp_path / "lidar", "lidar", LIDAR_POSE)
    caplog.set_level(logging.WARNING)
    summary, res = _process(lidar, tmp_path / "o")
    assert summary.frames_out == 3 and summary.frames_metric == 0 and summary.sparse_unused == 3
    assert "/depth/image" not in res and len(res["/depth/relative"]) == 3  # never metric without a fit
    warnings = [r.getMessage() for r in caplog.records if "'lidar'" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not once per frame
    assert "--sparse-frame lidar --sparse-transform X Y Z QX QY QZ QW" in warnings[0]


def test_malformed_cloud_loses_only_its_fit(synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lidar = _bag_with_clouds(synth, tmp_path / "lidar", "lidar", LIDAR_POSE, malformed=1)
    caplog.set_level(logging.WARNING)
    summary, res = _process(lidar, tmp_path / "o", sparse_frame="lidar", sparse_transform=LIDAR_POSE)
    assert summary.frames_out == 3 and summary.frames_failed == 0 and summary.sparse_unused == 1
    assert len(res["/depth/relative"]) == len(res["/normals/image"]) == 3  # the image of the bad cloud too
    assert "sparse input at stamp 1700000000.100000 s unusable" in caplog.text
    assert "PointCloud2 header is malformed: row_step" in caplog.text  # width doubled, row_step kept


def test_bad_sparse_transform_options_exit_2_and_name_the_format(synth: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    lidar = _bag_with_clouds(synth, tmp_path / "lidar", "lidar", LIDAR_POSE)
    base = ["process", str(lidar), str(tmp_path / "o"), "--image-topic", IMAGE_TOPIC, "--sparse-topic", CLOUD_TOPIC,
            "--tiny", "--sparse-frame", "lidar", "--sparse-transform"]
    for values in (["0", "0", "0", "0", "0", "1"], ["0", "0", "0", "0", "0", "0", "0"], ["0", "a", "0", "0", "0",
                                                                                         "0", "1"]):
        caplog.clear()
        assert bag_main([*base, *values]) == 2, values
        assert "X Y Z QX QY QZ QW" in caplog.text and "tf2_echo" in caplog.text, caplog.text
    caplog.clear()
    assert bag_main([*base[:-3], "--sparse-transform", *["0"] * 6, "1"]) == 2
    assert "--sparse-transform needs --sparse-frame" in caplog.text
    with open_bag(lidar) as bag, BagWriter(tmp_path / "o2", typestore=bag.typestore) as writer, \
            pytest.raises(BagError, match="--sparse-frame / --sparse-transform place a PointCloud2"):
        process_bag(bag, writer, AffineEngine(lidar), ProcessOptions(
            image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC, settings={"sparse_points.frame_id": "lidar"}))
    assert not (tmp_path / "o").exists()


def test_sparse_transform_takes_numbers_in_any_notation() -> None:
    """tf2_echo or a calibration file may give -1.2e-3: argparse alone reads that as an unknown option."""
    from geodiff_ros.bag.cli import build_parser, transform_in_fixed_notation

    values = ["1e-3", "-1.2e-3", "-5", "-0.25", "0", "-7.071067811865476e-01", "0.7071067811865476"]
    argv = ["process", "IN", "OUT", "--image-topic", IMAGE_TOPIC, "--sparse-transform", *values, "--tiny"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    args = build_parser().parse_args(transform_in_fixed_notation(argv))
    given = getattr(args, "sparse_points.transform")
    assert [float(v) for v in given] == [float(v) for v in values] and args.tiny


@pytest.mark.parametrize("frame", ["000114"])
def test_cli_real_kitti_velodyne_through_the_calibration(shared_data: Path, tmp_path: Path, frame: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A real KITTI frame (colour image, P2 camera_info, raw Velodyne scan in its own frame) through the CLI with
    --sparse-frame/--sparse-transform from the dataset calibration: the metric fit lands on the dataset's own
    projected LiDAR depth. The stand-in engine's relative depth is that projection (``(d - T) / S``), so a wrong
    extrinsic, projection or stamp match cannot give the right metric depth."""
    from PIL import Image as PILImage

    from geodiff_ros.testing.kitti import kitti_velodyne_to_camera2

    root = shared_data / "outdoor" / "kitti_object_lidar"
    pose, p2 = kitti_velodyne_to_camera2(root / "calib" / f"{frame}.txt")
    rgb = np.asarray(PILImage.open(root / "image_2" / f"{frame}.png").convert("RGB"))  # [H,W,3]
    expected = np.asarray(PILImage.open(root / "proj_depth_velodyne" / f"{frame}.png"), np.float64) / 256.0
    height, width = expected.shape
    scan = np.fromfile(root / "velodyne" / f"{frame}.bin", np.float32).reshape(-1, 4)  # x, y, z, intensity
    # The dataset's projection sits one pixel up-left of round(u), round(v) (test_geometry_transform): undo it.
    truth = np.full((height, width), np.nan)
    truth[1:, 1:] = np.where(expected[:-1, :-1] > 0, expected[:-1, :-1], np.nan)
    relative = np.where(np.isfinite(truth), (truth - T) / S, 0.5).astype(np.float32)  # no truth: an outlier

    src = tmp_path / "kitti"
    stamp = 1_700_000_000_000_000_000
    with BagWriter(src) as w:
        types = w.typestore.types
        header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=stamp // 10**9,
                                                                                          nanosec=0),
                                              frame_id="camera2_optical")
        w.write_msg("/kitti/image", stamp, types["sensor_msgs/msg/Image"](
            header=header, height=height, width=width, encoding="rgb8", is_bigendian=0, step=width * 3,
            data=rgb.reshape(-1)))
        k = p2[:, :3].reshape(-1)
        w.write_msg("/kitti/camera_info", stamp, types["sensor_msgs/msg/CameraInfo"](
            header=header, height=height, width=width, distortion_model="plumb_bob", d=np.zeros(5), k=k,
            r=np.eye(3).reshape(-1), p=p2.reshape(-1), binning_x=0, binning_y=0,
            roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)))
        field = types["sensor_msgs/msg/PointField"]
        cloud = types["sensor_msgs/msg/PointCloud2"](
            header=types["std_msgs/msg/Header"](stamp=header.stamp, frame_id="velodyne"), height=1, width=len(scan),
            fields=[field(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate(("x", "y", "z",
                                                                                            "intensity"))],
            is_bigendian=False, point_step=16, row_step=16 * len(scan), data=scan.reshape(-1).view(np.uint8),
            is_dense=True)
        w.write_msg("/velodyne_points", stamp + 20_000_000, cloud)  # arrives after the image, as in a recording

    engine = SimpleNamespace(device="cpu", predict=lambda images, on_device=False: SimpleNamespace(depth=[relative],
                                                                                                 normals=None))
    monkeypatch.setattr("geodiff_ros.bag.cli.build_engine", lambda args: engine)
    out = tmp_path / "out"
    code = bag_main(["process", str(src), str(out), "--image-topic", "/kitti/image", "--sparse-topic",
                     "/velodyne_points", "--sparse-frame", "velodyne", "--sparse-transform",
                     *(f"{v:.12f}" for v in pose)])
    text = capsys.readouterr().out
    assert code == 0 and "frames: 1 in, 1 out, 1 metric" in text, text
    metric = image_to_numpy(_read(out)["/depth/image"][0][1])
    ok = np.isfinite(truth) & (truth < 100.0)  # max_depth
    assert ok.sum() > 5000
    assert np.mean(np.abs(metric[ok] - truth[ok]) <= 0.01 * truth[ok]) >= 0.97

    code = bag_main(["process", str(src), str(tmp_path / "no_extrinsic"), "--image-topic", "/kitti/image",
                     "--sparse-topic", "/velodyne_points"])
    text = capsys.readouterr().out
    assert code == 0 and "1 metric" not in text and "not usable for 1 frame" in text


# ------------------------------------------------------------------------------------------------ CLI, real engine


def test_cli_tiny_on_a_recorded_bag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bags" / "tum_fr2_desk_rgbd_mcap"
    src = shared if shared.is_dir() else write_synthetic_bag(tmp_path / "synth", frames=2)
    out = tmp_path / "out"
    code = bag_main(["process", str(src), str(out), "--image-topic", IMAGE_TOPIC, "--sparse-topic", DEPTH_TOPIC,
                     "--sparse-fraction", "0.05", "--tiny", "--processing-res", "64", "--storage", "sqlite3"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "frames: 2 in, 2 out" in text and f"bag: {out}" in text
    res = _read(out)
    assert len(res["/depth/relative"]) == 2 and len(res[IMAGE_TOPIC]) == 2
    rel = image_to_numpy(res["/depth/relative"][0][1])
    img = res[IMAGE_TOPIC][0][1]
    assert rel.shape == (img.height, img.width) and np.nanmin(rel) >= 0 and np.nanmax(rel) <= 1


def test_cli_missing_weights_says_how_to_fix(synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    code = bag_main(["process", str(synth), str(tmp_path / "o"), "--image-topic", IMAGE_TOPIC, "--depth-model",
                     str(tmp_path / "no_such_model"), "--normals-model", "", "--device", "cpu",
                     "--local-files-only"])
    assert code == 1
    assert "cannot load the model" in caplog.text and "no_such_model" in caplog.text


def test_cli_input_errors_exit_2_and_damage_exits_3(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    assert bag_main(["process", str(synth), str(tmp_path / "o"), "--image-topic", "/nope", "--tiny"]) == 2
    (tmp_path / "exists").mkdir()
    assert bag_main(["process", str(synth), str(tmp_path / "exists"), "--image-topic", IMAGE_TOPIC]) == 2
    cut = tmp_path / "cut"
    shutil.copytree(synth, cut)
    f = next(cut.glob("*.mcap"))
    f.chmod(0o644)
    with f.open("r+b") as fh:
        fh.truncate(int(f.stat().st_size * 0.8))
    capsys.readouterr()
    code = bag_main(["process", str(cut), str(tmp_path / "o2"), "--image-topic", IMAGE_TOPIC, "--depth-model",
                     str(tiny_depth_ckpt), "--normals-model", str(tiny_normals_ckpt), "--device", "cpu",
                     "--dtype", "fp32", "--processing-res", "64"])
    out = capsys.readouterr().out
    assert code == 3 and "input bag damaged, processed up to there: stopped at byte" in out
