"""The first image may overtake the first CameraInfo (two topics, no order between them, e.g. a driver or a bag
player that publishes the image first): the node still publishes that frame's depth/camera_info and cloud.

A fresh node over real DDS (a tiny CPU checkpoint) that has never seen a CameraInfo gets an image, and the
matching CameraInfo only 0.2 s later. Before the fix the worker took the image at once, found no CameraInfo and
published the first frame without depth/camera_info and without a cloud (seen as a lost camera_info in the bag
replay and demo tests under load).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    header,
    module_domain_id,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.ros.conversions import numpy_to_image

W, H = 160, 120
FRAME = "camera_color_optical_frame"


def test_first_image_before_its_camera_info_still_gets_camera_info_and_cloud(tmp_path: Path,
                                                                               tiny_depth_ckpt: Path) -> None:
    domain = module_domain_id(59)
    node = NodeProcess(domain, {"model_depth": str(tiny_depth_ckpt), "model_normals": "", "device": "cpu",
                                "dtype": "fp32", "processing_res": 64, "alignment.fixed_scale": 2.0},
                       tmp_path / "node.log")
    col = Collector(domain)
    try:
        for topic, msg_type in (("depth/relative", Image), ("depth/camera_info", CameraInfo),
                                ("points", PointCloud2)):
            col.subscribe(msg_type, topic)
        pubs = {t: col.publisher(m, t) for t, m in (("image", Image), ("camera_info", CameraInfo))}
        if not col.wait_matched(pubs.values(), timeout=90.0):
            pytest.fail(f"the node never subscribed to its inputs; log:\n{node.log()[-3000:]}")
        rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
        stamp = 1_700_000_000_000_000_000
        hdr = header(stamp, FRAME)
        pubs["image"].publish(numpy_to_image(rgb, "rgb8", hdr))
        time.sleep(0.2)  # the CameraInfo of the same frame comes second
        pubs["camera_info"].publish(camera_info_msg(hdr, W, H, fx, fy, cx, cy))

        def this_frame(m: object) -> bool:
            return stamp_of(m) == stamp

        assert col.wait_for("depth/relative", 1, timeout=60.0, where=this_frame), node.log()[-3000:]
        info = col.wait_for("depth/camera_info", 1, timeout=5.0, where=this_frame)
        assert info, f"the first frame went out without depth/camera_info; log:\n{node.log()[-3000:]}"
        assert (info[0].width, info[0].height) == (W, H)
        assert col.wait_for("points", 1, timeout=5.0, where=this_frame), "no cloud for the first frame"
    finally:
        col.close()
        code, _ = node.stop()
    assert code == 0, f"exit code {code}; log:\n{node.log()[-3000:]}"
