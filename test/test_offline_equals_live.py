"""Offline equals live: a recorded bag processed by ``geodiff_bag process`` and the same bag played into the node
(``geodiff_bag play`` -> node -> ``geodiff_bag record``) give bit-identical ``depth/relative``, ``depth/image``,
``normals/image`` and ``points`` for every frame, with min/max depth and fixed_scale set to non-defaults.

Both run the same tiny checkpoints on the CPU in fp32 (the engine's official path, one frame per network pass) in
separate processes, as users run them, so any difference comes from the per-frame work after the engine: sparse
matching, the metric fit and its temporal state, the depth limits, the cloud.

Two recordings: the shared TUM bag with its depth camera turned into LiDAR-like sparse depth (5 % of the pixels),
and a synthetic bag whose sparse input is a PointCloud2 in a LiDAR frame (static extrinsic given as settings), built
from the model's own relative depth so that the metric fit succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from ros_helpers import NodeProcess, module_domain_id, shared_data_dir
from scipy.spatial.transform import Rotation
from test_bag_replay import BagTool, play_and_record, read_bag, replay_env

from geodiff_ros.bag.process import sparse_depth_image
from geodiff_ros.bag.storage import BagWriter, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.geometry import backproject
from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.ros.conversions import image_to_numpy, intrinsics_from_msg, numpy_to_image_fields, stamp_ns
from geodiff_ros.ros.pointcloud import cloud_array

DOMAIN = module_domain_id(71)
NS = f"/geodiff_offline_live_{os.getpid()}"
SPARSE_TOPIC = "/lidar_like/depth"
CLOUD_TOPIC = "/lidar/points"
COMPARED = ("depth/relative", "depth/image", "normals/image", "points")
RECORDED = (*COMPARED, "depth/camera_info")
ENGINE = {"device": "cpu", "dtype": "fp32", "processing_res": 64, "optimize": "none"}
S, T = 2.5, 0.8  # the synthetic LiDAR sees depth S * relative + T
_ROT = Rotation.from_euler("xyz", [-88.0, 3.0, -91.0], degrees=True)  # a LiDAR frame: x forward, z up, tilted
LIDAR_POSE = [0.05, -0.1, 0.02, *_ROT.as_quat()]  # its pose in the camera's optical frame


def _write_sorted(out: Path, items: list[tuple[int, str, Any]]) -> Path:
    with BagWriter(out) as writer:
        if any(topic == "/tf_static" for _, topic, _ in items):  # latched, as tf2's static broadcaster offers it
            from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

            from geodiff_ros.bag.live import to_bag_qos

            latched = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                 reliability=ReliabilityPolicy.RELIABLE)
            writer.add_topic("/tf_static", "tf2_msgs/msg/TFMessage", qos=[to_bag_qos(latched)])
        for bag_time, topic, msg in sorted(items, key=lambda it: it[0]):
            writer.write_msg(topic, bag_time, msg)
    return out


def _image_msg(types: Any, header: Any, array: np.ndarray, encoding: str) -> Any:
    fields = numpy_to_image_fields(array, encoding)
    fields["data"] = np.frombuffer(fields["data"], np.uint8)
    return types["sensor_msgs/msg/Image"](header=header, **fields)


def tum_with_lidar_like_depth(src: Path, out: Path, fraction: float = 0.05) -> Path:
    """Colour, camera_info and 5 % of the depth camera's pixels as a 16UC1 sparse depth, 20 ms (bag time) before
    its image, same header stamp."""
    items = []
    with open_bag(src) as bag:
        types = bag.typestore.types
        for raw in bag.messages([IMAGE_TOPIC, INFO_TOPIC, DEPTH_TOPIC]):
            msg = bag.deserialize(raw)
            if raw.topic == DEPTH_TOPIC:
                mm = sparse_depth_image(msg, fraction, seed=stamp_ns(msg.header) % 2**32)  # [H,W] uint16
                items.append((raw.timestamp - 20_000_000, SPARSE_TOPIC, _image_msg(types, msg.header, mm, "16UC1")))
            else:
                items.append((raw.timestamp, raw.topic, msg))
    return _write_sorted(out, items)


def with_lidar_cloud(src: Path, relative: dict[int, np.ndarray], out: Path, tf_static: bool = False) -> Path:
    """Colour and camera_info of ``src`` and a LiDAR-like cloud (every 3rd row and column of the depth
    S * relative + T) in frame ``lidar``, 20 ms (bag time) before each image, same header stamp; with ``tf_static``
    the lidar's pose on /tf_static at the start, as robot_state_publisher latches it."""
    to_lidar = RigidTransform(LIDAR_POSE)
    items = []
    with open_bag(src) as bag:
        types = bag.typestore.types
        if tf_static:
            first = min(raw.timestamp for raw in bag.messages([IMAGE_TOPIC]))
            stamped = types["geometry_msgs/msg/TransformStamped"](
                header=types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                                    frame_id="camera_color_optical_frame"),
                child_frame_id="lidar",
                transform=types["geometry_msgs/msg/Transform"](
                    translation=types["geometry_msgs/msg/Vector3"](x=LIDAR_POSE[0], y=LIDAR_POSE[1], z=LIDAR_POSE[2]),
                    rotation=types["geometry_msgs/msg/Quaternion"](x=LIDAR_POSE[3], y=LIDAR_POSE[4], z=LIDAR_POSE[5],
                                                                   w=LIDAR_POSE[6])))
            items.append((first - 500_000_000, "/tf_static", types["tf2_msgs/msg/TFMessage"](transforms=[stamped])))
        infos = {}
        raws = list(bag.messages([IMAGE_TOPIC, INFO_TOPIC]))
        for raw in raws:
            msg = bag.deserialize(raw)
            items.append((raw.timestamp, raw.topic, msg))
            if raw.topic == INFO_TOPIC:
                infos[stamp_ns(msg.header)] = msg
        for bag_time, topic, msg in list(items):
            if topic != IMAGE_TOPIC:
                continue
            stamp = stamp_ns(msg.header)
            intr = intrinsics_from_msg(infos[stamp])
            depth = S * relative[stamp] + T  # [H,W] metres
            xyz = backproject(depth, intr, stride=3).reshape(-1, 3)  # optical frame
            lidar = (xyz - np.asarray(LIDAR_POSE[:3])) @ to_lidar.rotation  # p_lidar = R^T (p_opt - t)
            points = cloud_array(lidar.astype(np.float32)[None])  # [1,N]
            fields = [types["sensor_msgs/msg/PointField"](name=n, offset=4 * i, datatype=7, count=1)
                      for i, n in enumerate(points.dtype.names)]
            header = types["std_msgs/msg/Header"](stamp=msg.header.stamp, frame_id="lidar")
            cloud = types["sensor_msgs/msg/PointCloud2"](
                header=header, height=1, width=points.shape[1], fields=fields, is_bigendian=False,
                point_step=points.dtype.itemsize, row_step=points.dtype.itemsize * points.shape[1],
                data=np.frombuffer(points.tobytes(), np.uint8), is_dense=False)
            items.append((bag_time - 20_000_000, CLOUD_TOPIC, cloud))
    return _write_sorted(out, items)


def offline(tmp: Path, bag: Path, ckpts: tuple[Path, Path], settings: list[str], sparse: list[str]) -> Path:
    """``geodiff_bag process`` as a user runs it, in its own process (its default batch of 4 frames per engine
    call: in fp32 the engine still runs frames one at a time, as the node does)."""
    out = tmp / f"offline_{bag.name}"
    tool = BagTool(DOMAIN, tmp / f"{out.name}.log", "process", str(bag), str(out), "--image-topic", IMAGE_TOPIC,
                   "--depth-model", str(ckpts[0]), "--normals-model", str(ckpts[1]), "--device", ENGINE["device"],
                   "--dtype", ENGINE["dtype"], "--processing-res", str(ENGINE["processing_res"]), *sparse, *settings)
    assert tool.finish(300.0) == 0, tool.log()[-3000:]
    return out


def live(tmp: Path, bag: Path, ckpts: tuple[Path, Path], params: dict[str, Any], inputs: dict[str, str]) -> Path:
    """The node (its own process) fed by ``geodiff_bag play``, its outputs recorded by ``geodiff_bag record``."""
    os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = replay_env(DOMAIN)["FASTRTPS_DEFAULT_PROFILES_FILE"]
    node = NodeProcess(DOMAIN, {**ENGINE, "model_depth": str(ckpts[0]), "model_normals": str(ckpts[1]), **params},
                       tmp / f"node_{bag.name}.log", remaps={"__ns": NS})
    try:
        assert node.wait_for_log("processing frames", timeout=120.0), node.log()[-3000:]
        with open_bag(bag) as b:
            n = b.topics[IMAGE_TOPIC].count
        remaps = {topic: f"{NS}/{name}" for topic, name in inputs.items() if name}  # "": played as recorded
        # 0.1 s apart in the bags: 1 s apart here, so the newest-frame node processes every frame.
        rec = play_and_record(DOMAIN, tmp, bag, list(inputs), tuple(f"{NS}/{t}" for t in RECORDED), n,
                              remaps=remaps, rate=0.1, timeout=120.0)
    finally:
        node.stop()
    return rec


def assert_identical(offline_bag: Path, live_bag: Path, expect_metric: bool) -> None:
    off, on = read_bag(offline_bag), read_bag(live_bag)
    n = len(off["/depth/relative"])
    assert n >= 2
    for name in COMPARED:
        a = {stamp_ns(m.header): m for m in off.get(f"/{name}", [])}
        b = {stamp_ns(m.header): m for m in on.get(f"{NS}/{name}", [])}
        assert sorted(a) == sorted(b), f"{name}: offline frames {sorted(a)}, live {sorted(b)}"
        if expect_metric or name in ("depth/relative", "normals/image"):
            assert len(a) == n, f"{name}: {len(a)} of {n} frames"
        for stamp, msg in a.items():
            other = b[stamp]
            assert msg.header.frame_id == other.header.frame_id
            assert (msg.height, msg.width) == (other.height, other.width), name
            if name == "points":
                assert [(f.name, f.offset) for f in msg.fields] == [(f.name, f.offset) for f in other.fields]
                assert msg.point_step == other.point_step
            else:
                assert msg.encoding == other.encoding and msg.step == other.step, name
            same = bytes(np.asarray(msg.data, np.uint8)) == bytes(np.asarray(other.data, np.uint8))
            if not same and name != "points":
                diff = np.nanmax(np.abs(image_to_numpy(msg).astype(np.float64) - image_to_numpy(other)))
                pytest.fail(f"{name} at stamp {stamp}: offline and live differ (max {diff:.3g})")
            assert same, f"{name} at stamp {stamp}: offline and live clouds differ"


@pytest.fixture(scope="module")
def ckpts(tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> tuple[Path, Path]:
    return tiny_depth_ckpt, tiny_normals_ckpt


def test_tum_bag_with_lidar_like_depth(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data not present (the synthetic LiDAR test covers the same code)")
    bag = tum_with_lidar_like_depth(data / "bags" / "tum_fr2_desk_rgbd_mcap", tmp_path / "tum_sparse")
    settings = {"min_depth": 0.5, "max_depth": 1.8, "alignment.fixed_scale": 2.0}
    flags = ["--min-depth", "0.5", "--max-depth", "1.8", "--fixed-scale", "2.0"]
    off = offline(tmp_path, bag, ckpts, flags, ["--sparse-topic", SPARSE_TOPIC])
    on = live(tmp_path, bag, ckpts, settings, {IMAGE_TOPIC: "image", INFO_TOPIC: "camera_info",
                                                SPARSE_TOPIC: "sparse_depth"})
    assert_identical(off, on, expect_metric=True)  # a fit, or fixed_scale where the fit fails: metric each frame


def test_synthetic_bag_with_a_lidar_cloud_in_its_own_frame(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    src = write_synthetic_bag(tmp_path / "synth", frames=3, width=160, height=120, period_s=0.1)
    first = read_bag(offline(tmp_path, src, ckpts, [], []))  # the model's relative depth of each image
    relative = {stamp_ns(m.header): image_to_numpy(m).astype(np.float64) for m in first["/depth/relative"]}
    bag = with_lidar_cloud(src, relative, tmp_path / "synth_lidar")
    pose = [f"{v:.17g}" for v in LIDAR_POSE]
    settings = {"min_depth": 1.0, "max_depth": 3.0, "alignment.fixed_scale": 2.0, "sparse_points.frame_id": "lidar",
                "sparse_points.transform": [float(v) for v in LIDAR_POSE]}
    flags = ["--min-depth", "1.0", "--max-depth", "3.0", "--fixed-scale", "2.0"]
    off = offline(tmp_path, bag, ckpts, [*flags, "--sparse-frame", "lidar", "--sparse-transform", *pose],
                  ["--sparse-topic", CLOUD_TOPIC])
    on = live(tmp_path, bag, ckpts, settings, {IMAGE_TOPIC: "image", INFO_TOPIC: "camera_info",
                                                CLOUD_TOPIC: "sparse_points"})
    assert_identical(off, on, expect_metric=True)
    fitted = [m for m in read_bag(off)["/depth/image"]]
    metric = image_to_numpy(fitted[-1])
    ok = np.isfinite(metric)
    stamp = stamp_ns(fitted[-1].header)
    np.testing.assert_allclose(metric[ok], (S * relative[stamp] + T)[ok], rtol=1e-3)  # the fit, not fixed_scale
    assert 0.2 < ok.mean() < 0.999  # min/max depth cut some pixels


def test_synthetic_bag_with_a_lidar_cloud_placed_by_tf_static(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    """The LiDAR's pose on the bag's /tf_static, no extrinsic settings: geodiff_bag process reads it into a tf2
    buffer, the node gets it from the player's latched /tf_static, and both place the cloud alike."""
    pytest.importorskip("tf2_ros", reason="tf2_ros not installed (setup_venv.sh takes it from ../shared/ros/tf2)")
    src = write_synthetic_bag(tmp_path / "synth", frames=3, width=160, height=120, period_s=0.1)
    first = read_bag(offline(tmp_path, src, ckpts, [], []))
    relative = {stamp_ns(m.header): image_to_numpy(m).astype(np.float64) for m in first["/depth/relative"]}
    bag = with_lidar_cloud(src, relative, tmp_path / "synth_tf", tf_static=True)
    flags = ["--min-depth", "1.0", "--max-depth", "3.0"]
    off = offline(tmp_path, bag, ckpts, flags, ["--sparse-topic", CLOUD_TOPIC])
    on = live(tmp_path, bag, ckpts, {"min_depth": 1.0, "max_depth": 3.0},
              {IMAGE_TOPIC: "image", INFO_TOPIC: "camera_info", CLOUD_TOPIC: "sparse_points", "/tf_static": ""})
    assert_identical(off, on, expect_metric=True)
    metric = image_to_numpy(read_bag(off)["/depth/image"][-1])
    stamp = stamp_ns(read_bag(off)["/depth/image"][-1].header)
    ok = np.isfinite(metric)
    np.testing.assert_allclose(metric[ok], (S * relative[stamp] + T)[ok], rtol=1e-3)  # placed by the TF
