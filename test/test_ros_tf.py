"""A LiDAR's extrinsic from TF, over real DDS with real tf2 (the wheels in ../shared/ros/tf2; skipped without them).

The node runs a tiny depth model on the CPU. Its relative depth of the test image is recorded first; every later
frame republishes that image with a LiDAR-like cloud whose points lie at the depth ``S * relative + T`` and are
expressed in a ``lidar`` frame. The node's metric depth is then exactly ``S * relative + T`` when, and only when,
the cloud was brought into the camera's optical frame with the right transform.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
pytest.importorskip("tf2_ros", reason="tf2_ros not installed (scripts/setup_venv.sh takes it from ../shared/ros/tf2)")
from geometry_msgs.msg import TransformStamped
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    header,
    latest_diagnostics,
    module_domain_id,
    node_remaps,
    set_parameters,
    stamp_of,
    test_scene,
)
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image
from geodiff_ros.ros.pointcloud import cloud_array, cloud_to_msg, project_points_to_depth

DOMAIN = module_domain_id(73)
NS, NAME = f"/geodiff_tf_{os.getpid()}", "geodiff_tf"
W, H = 160, 120
OPTICAL = "camera_color_optical_frame"
S, T = 2.5, 0.8
BASE_ROT = Rotation.from_euler("xyz", [-90.0, 0.0, -90.0], degrees=True)  # lidar: x forward, y left, z up
LIDAR_POSE = [0.05, -0.2, 0.1, *BASE_ROT.as_quat()]  # pose of "lidar" in the optical frame
T0 = 1_700_000_000_000_000_000


def transform_msg(pose: list[float], stamp_ns: int, parent: str = OPTICAL, child: str = "lidar") -> TransformStamped:
    msg = TransformStamped()
    msg.header = header(stamp_ns, parent)
    msg.child_frame_id = child
    t, q = msg.transform.translation, msg.transform.rotation
    t.x, t.y, t.z = pose[:3]
    q.x, q.y, q.z, q.w = pose[3:]
    return msg


class Rig:
    """The node, a test node publishing the inputs (and TF), and the recorded outputs."""

    def __init__(self, tmp: Path, ckpt: Path) -> None:
        import tf2_ros

        self.node = NodeProcess(DOMAIN, {
            "model_depth": str(ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32", "processing_res": 64,
            "warmup_size": [0, 0], "qos.input.reliability": "reliable", "diagnostics_period": 0.25,
            "alignment.ema_alpha": 1.0,  # each frame's own fit: frames with equal inputs give equal outputs
        }, tmp / "geodiff.log", remaps=node_remaps(NS, NAME))
        self.col = Collector(DOMAIN, namespace=NS)
        self.col.subscribe(Image, "depth/relative")
        self.col.subscribe(Image, "depth/image")
        from diagnostic_msgs.msg import DiagnosticArray

        self.col.subscribe(DiagnosticArray, "/diagnostics")
        self.pubs = {"image": self.col.publisher(Image, "image"),
                     "camera_info": self.col.publisher(CameraInfo, "camera_info"),
                     "sparse_points": self.col.publisher(PointCloud2, "sparse_points")}
        self.static_tf = tf2_ros.StaticTransformBroadcaster(self.col.node)
        self.tf = tf2_ros.TransformBroadcaster(self.col.node)
        self.rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
        self.intr = PinholeIntrinsics(fx, fy, cx, cy, W, H)
        self.k = (fx, fy, cx, cy)
        self.stamp = T0
        self.relative: np.ndarray | None = None

    def close(self) -> None:
        self.col.close()
        self.node.stop()

    def start(self) -> None:
        assert self.col.wait_matched(self.pubs.values(), timeout=90.0), self.node.log()[-3000:]
        stamp = self.next_stamp()
        self.publish_image(stamp)
        got = self.col.wait_for("depth/relative", 1, timeout=60.0, where=lambda m: stamp_of(m) == stamp)
        assert got, self.node.log()[-3000:]
        self.relative = image_to_numpy(got[0]).astype(np.float64)  # [H,W]

    def next_stamp(self) -> int:
        self.stamp += 100_000_000
        return self.stamp

    def truth(self) -> np.ndarray:
        return S * self.relative + T  # [H,W] metres

    def optical_points(self) -> np.ndarray:
        """The LiDAR-like points (every 3rd pixel of the true depth) in the optical frame, [N,3]."""
        return backproject(self.truth(), self.intr, stride=3).reshape(-1, 3)

    def publish_image(self, stamp: int) -> None:
        hdr = header(stamp, OPTICAL)
        info = camera_info_msg(hdr, W, H, *self.k)
        self.pubs["camera_info"].publish(info)
        self.pubs["image"].publish(numpy_to_image(self.rgb, "rgb8", hdr))

    def publish_frame(self, stamp: int, pose: list[float] | None, frame: str = "lidar") -> None:
        """A cloud of the true points seen from ``frame`` at ``pose`` (None: in the optical frame), then the image."""
        xyz = self.optical_points()
        if pose is not None:
            p = RigidTransform(pose)
            xyz = (xyz - p.translation) @ p.rotation  # R^T (p - t): optical -> lidar
        cloud = cloud_to_msg(cloud_array(xyz.astype(np.float32)[None]))
        cloud.header = header(stamp, frame)
        self.pubs["sparse_points"].publish(cloud)
        time.sleep(0.05)
        self.publish_image(stamp)

    def output(self, topic: str, stamp: int, timeout: float = 30.0) -> Image | None:
        got = self.col.wait_for(topic, 1, timeout=timeout, where=lambda m: stamp_of(m) == stamp)
        return got[0] if got else None


@pytest.fixture
def rig(tmp_path: Path, tiny_depth_ckpt: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, tiny_depth_ckpt)
    try:
        r.start()
        yield r
    finally:
        r.close()


def assert_truth(rig: Rig, depth: Image) -> np.ndarray:
    metric = image_to_numpy(depth)
    ok = np.isfinite(metric)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(metric[ok], rig.truth()[ok], rtol=1e-3)
    return metric


def test_static_tf_gives_the_fit_of_the_same_extrinsic_given_as_parameters(rig: Rig) -> None:
    rig.static_tf.sendTransform(transform_msg(LIDAR_POSE, 0))
    via_tf = rig.next_stamp()
    rig.publish_frame(via_tf, LIDAR_POSE)
    depth_tf = rig.output("depth/image", via_tf)
    assert depth_tf is not None, rig.node.log()[-3000:]
    results = set_parameters(rig.col, f"{NS}/{NAME}", {"sparse_points.frame_id": "lidar",
                                                       "sparse_points.transform": list(LIDAR_POSE)})
    assert all(r.successful for r in results), [r.reason for r in results]
    via_params = rig.next_stamp()
    rig.publish_frame(via_params, LIDAR_POSE)
    depth_params = rig.output("depth/image", via_params)
    assert depth_params is not None, rig.node.log()[-3000:]
    assert bytes(depth_tf.data) == bytes(depth_params.data)  # bit for bit
    assert_truth(rig, depth_tf)


def test_moving_mount_uses_the_transform_interpolated_at_the_cloud_stamp(rig: Rig) -> None:
    """The LiDAR turns about its z axis at 1 rad/s, TF at 10 Hz; the cloud is stamped halfway between two
    transforms, so only the interpolated pose (slerp at the cloud's stamp) puts its points on the right pixels."""
    yaw_rate = 1.0  # rad/s

    def pose_at(stamp: int) -> list[float]:
        yaw = yaw_rate * (stamp - T0) * 1e-9
        rot = BASE_ROT * Rotation.from_euler("z", yaw)
        return [*LIDAR_POSE[:3], *rot.as_quat()]

    before = rig.next_stamp()
    middle = before + 50_000_000
    after = before + 100_000_000
    rig.stamp = after
    for stamp in (before - 100_000_000, before, after):  # 10 Hz, the one after the cloud included
        rig.tf.sendTransform(transform_msg(pose_at(stamp), stamp))
    time.sleep(0.2)
    rig.publish_frame(middle, pose_at(middle))
    depth = rig.output("depth/image", middle)
    assert depth is not None, rig.node.log()[-3000:]
    assert_truth(rig, depth)
    # The hand computation: the published points (the optical points seen from the pose at the cloud's stamp)
    # brought back through the interpolated pose land on these pixels; the node's fit used exactly as many sparse
    # points (one per pixel hit). Through the transform of the TF stamp before the cloud they land elsewhere.
    mid = RigidTransform(pose_at(middle))
    published = (rig.optical_points() - mid.translation) @ mid.rotation  # [N,3] lidar frame
    hand = project_points_to_depth(mid.apply(published), *rig.k, W, H)
    wrong = project_points_to_depth(RigidTransform(pose_at(before)).apply(published), *rig.k, W, H)
    assert not np.array_equal(np.isfinite(hand), np.isfinite(wrong))  # the check below tells the two apart
    diag = latest_diagnostics(rig.col, NAME, after=time.monotonic(), timeout=5.0)
    assert int(diag["alignment_points"]) == int(np.isfinite(hand).sum()), diag


def test_a_missing_transform_costs_no_frame_warns_once_and_the_fit_starts_when_it_arrives(rig: Rig) -> None:
    mark = len(rig.node.log())
    missing = []
    for _ in range(4):
        stamp = rig.next_stamp()
        missing.append(stamp)
        rig.publish_frame(stamp, LIDAR_POSE)
        assert rig.output("depth/relative", stamp) is not None, rig.node.log()[-3000:]  # the frame still goes out
    assert all(rig.output("depth/image", s, timeout=0.5) is None for s in missing)  # no fit, no fixed scale
    log = rig.node.log_since(mark)
    assert log.count("no transform between them") == 1, log  # one throttled WARN for 4 frames
    assert "'lidar'" in log and f"'{OPTICAL}'" in log and "static_transform_publisher" in log, log
    rig.static_tf.sendTransform(transform_msg(LIDAR_POSE, 0))  # arrives late
    time.sleep(0.3)
    late = rig.next_stamp()
    rig.publish_frame(late, LIDAR_POSE)
    depth = rig.output("depth/image", late)
    assert depth is not None, rig.node.log()[-3000:]
    assert_truth(rig, depth)
    assert not math.isnan(float(latest_diagnostics(rig.col, NAME, after=time.monotonic(), timeout=5.0)
                                ["alignment_scale"]))
