"""Sparse input cannot grow the node's memory without bound (real node over DDS).

The node keeps recent sparse messages for stamp matching. It kept the last 16 whatever their size, and
``max_input_pixels`` did not apply to them: 20 sparse_depth images of 4000x3000 32FC1 (48 MB each) raised its
resident memory by 794 MB. Now the kept messages are bounded by bytes too, and a message above ``max_input_pixels``
is dropped before any conversion, counted in /diagnostics (``sparse_dropped``) and reported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    header,
    latest_diagnostics,
    module_domain_id,
    node_remaps,
    process_stats,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, Image

from geodiff_ros.ros.conversions import numpy_to_image

DOMAIN = module_domain_id(75)
NS, NAME = f"/geodiff_sparse_{os.getpid()}", "geodiff_sparse"
W, H = 160, 120
T0 = 1_700_000_000_000_000_000


def _node(tmp: Path, ckpt: Path, **params: object) -> tuple[NodeProcess, Collector, dict[str, object]]:
    node = NodeProcess(DOMAIN, {"model_depth": str(ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32",
                                "processing_res": 64, "warmup_size": [0, 0], "qos.input.reliability": "reliable",
                                "diagnostics_period": 0.25, **params},
                       tmp / "geodiff.log", remaps=node_remaps(NS, NAME))
    col = Collector(DOMAIN, namespace=NS)
    col.subscribe(Image, "depth/relative")
    col.subscribe(DiagnosticArray, "/diagnostics")
    pubs = {"image": col.publisher(Image, "image"), "camera_info": col.publisher(CameraInfo, "camera_info"),
            "sparse_depth": col.publisher(Image, "sparse_depth", depth=2)}
    assert col.wait_matched(pubs.values(), timeout=90.0), node.log()[-3000:]
    return node, col, pubs


def _frame(col: Collector, pubs: dict[str, object], node: NodeProcess, stamp: int) -> None:
    rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
    hdr = header(stamp)
    pubs["camera_info"].publish(camera_info_msg(hdr, W, H, fx, fy, cx, cy))
    pubs["image"].publish(numpy_to_image(rgb, "rgb8", hdr))
    assert col.wait_for("depth/relative", 1, timeout=60.0, where=lambda m: stamp_of(m) == stamp), node.log()[-3000:]


def test_twenty_huge_sparse_depth_images_do_not_pile_up_in_memory(tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    node, col, pubs = _node(tmp_path, tiny_depth_ckpt)
    try:
        _frame(col, pubs, node, T0)  # engine loaded and warm: what stays is the sparse input
        time.sleep(1.0)
        before = process_stats(node.proc.pid)["rss_kb"]
        huge = np.full((3000, 4000), 2.0, np.float32)  # 48 MB of 32FC1, 12 MP: under max_input_pixels
        for k in range(20):
            pubs["sparse_depth"].publish(numpy_to_image(huge, "32FC1", header(T0 + (k + 1) * 10_000_000)))
            time.sleep(0.3)
        _frame(col, pubs, node, T0 + 1_000_000_000)  # the node kept up and still serves
        time.sleep(1.0)
        grown_mb = (process_stats(node.proc.pid)["rss_kb"] - before) / 1024
    finally:
        col.close()
        code, _ = node.stop()
    assert code == 0, node.log()[-3000:]
    assert grown_mb < 300, f"resident memory grew by {grown_mb:.0f} MB (16 kept x 48 MB = 768 MB before the bound)"


def test_a_sparse_image_above_max_input_pixels_is_dropped_counted_and_reported(tmp_path: Path,
                                                                              tiny_depth_ckpt: Path) -> None:
    node, col, pubs = _node(tmp_path, tiny_depth_ckpt, max_input_pixels=1_000_000)
    try:
        stamp = T0 + 5_000_000_000
        pubs["sparse_depth"].publish(numpy_to_image(np.full((1000, 2000), 2.0, np.float32), "32FC1",
                                                    header(stamp)))
        time.sleep(0.3)
        _frame(col, pubs, node, stamp)
        diag = latest_diagnostics(col, NAME, after=time.monotonic(), timeout=5.0)
        log = node.log()
    finally:
        col.close()
        node.stop()
    assert int(diag["sparse_dropped"]) == 1, diag
    assert "sparse input dropped" in log and "2000x1000" in log and "max_input_pixels" in log, log[-3000:]
