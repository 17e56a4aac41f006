"""Without tf2_ros (a fresh clone without ../shared, or a ROS install without ros-jazzy-tf2-ros) the node still runs:
a cloud that needs TF is skipped with a message saying how to install tf2_ros, and the static extrinsic parameters
still place clouds. The node runs with ``tf2_ros`` made unimportable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from ros_helpers import Collector, NodeProcess, camera_info_msg, header, module_domain_id, node_remaps, stamp_of
from ros_helpers import test_scene as scene
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.ros.conversions import numpy_to_image
from geodiff_ros.ros.pointcloud import cloud_array, cloud_to_msg

DOMAIN = module_domain_id(74)
NS, NAME = f"/geodiff_notf_{os.getpid()}", "geodiff_notf"
W, H = 160, 120
WITHOUT_TF2 = ["-c", "import sys; sys.modules['tf2_ros'] = None  # as if not installed\n"
               "from geodiff_ros.ros.process import main; raise SystemExit(main())"]


def test_without_tf2_ros_a_cloud_in_another_frame_says_how_to_install_it(tmp_path: Path,
                                                                          tiny_depth_ckpt: Path) -> None:
    node = NodeProcess(DOMAIN, {"model_depth": str(tiny_depth_ckpt), "model_normals": "", "device": "cpu",
                                "dtype": "fp32", "processing_res": 64, "warmup_size": [0, 0],
                                "qos.input.reliability": "reliable"},
                       tmp_path / "geodiff.log", remaps=node_remaps(NS, NAME), program=WITHOUT_TF2)
    col = Collector(DOMAIN, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative")
        col.subscribe(Image, "depth/image")
        pubs = [col.publisher(Image, "image"), col.publisher(CameraInfo, "camera_info"),
                col.publisher(PointCloud2, "sparse_points")]
        assert col.wait_matched(pubs, timeout=90.0), node.log()[-3000:]
        rgb, depth, (fx, fy, cx, cy) = scene(W, H)
        pts = np.stack(np.meshgrid(np.linspace(-1, 1, 20), np.linspace(-0.5, 0.5, 10)), -1).reshape(-1, 2)
        xyz = np.c_[np.full(len(pts), 2.0), pts].astype(np.float32)  # ahead of the lidar: x forward
        stamps = [1_700_000_000_000_000_000 + k * 100_000_000 for k in range(2)]
        for stamp in stamps:
            cloud = cloud_to_msg(cloud_array(xyz[None]))
            cloud.header = header(stamp, "lidar")
            pubs[2].publish(cloud)
            time.sleep(0.05)
            hdr = header(stamp)
            pubs[1].publish(camera_info_msg(hdr, W, H, fx, fy, cx, cy))
            pubs[0].publish(numpy_to_image(rgb, "rgb8", hdr))
            assert col.wait_for("depth/relative", 1, timeout=60.0, where=lambda m, s=stamp: stamp_of(m) == s), \
                node.log()[-3000:]  # the frame goes out
        log = node.log()
        assert "tf2_ros is not installed" in log and "ros-jazzy-tf2-ros" in log and "sparse_points.frame_id" in log
        assert not col.get("depth/image")
    finally:
        col.close()
        code, _ = node.stop()
    assert code == 0, node.log()[-3000:]
