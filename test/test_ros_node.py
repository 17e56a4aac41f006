"""The geodiff node over real DDS: a subprocess with config/geodiff.yaml and a tiny CPU checkpoint.

A test node publishes Images + CameraInfo (+ sparse depth) built from a TUM RGB-D frame (a synthetic scene when
../shared/data is absent) and checks what a user would check: topics, encodings, sizes, stamps, frame_ids, the
cloud against depth_image_proc's formula, NaN handling, alignment to a known scale, parameters, diagnostics.

The tiny model's relative depth is arbitrary, so the alignment tests build the sparse depth from the node's own
``depth/relative`` output through a known affine map ``z = s * r + t``; the metric output must then be exactly
``s * r + t`` (the same image gives the same relative depth: the engine is deterministic).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    diagnostics_values,
    header,
    module_domain_id,
    set_parameters,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image
from geodiff_ros.ros.pointcloud import cloud_array, cloud_to_msg, read_cloud

W, H = 160, 120
FRAME = "camera_color_optical_frame"
OUTPUTS = {
    "depth/relative": Image, "depth/image": Image, "depth/camera_info": CameraInfo, "depth/image_vis": Image,
    "normals/image": Image, "normals/image_vis": Image, "points": PointCloud2, "/diagnostics": DiagnosticArray,
}


@dataclass
class Scenario:
    """The running node, the test-side node and the scene; ``frame()`` sends one frame and collects outputs."""

    node: NodeProcess
    col: Collector
    pubs: dict[str, Any]
    rgb: np.ndarray
    intr: PinholeIntrinsics
    stamp_ns: int = 1_700_000_000_000_000_000
    relative_cache: dict[int, np.ndarray] = field(default_factory=dict)

    def next_stamp(self, dt_s: float = 0.1) -> int:
        self.stamp_ns += int(dt_s * 1e9)
        return self.stamp_ns

    def frame(self, stamp: int, *, sparse: Any = None, info: Any = "default", image: Any = None,
              expect: tuple[str, ...] = ()) -> dict[str, Any]:
        """Publish (camera_info, sparse, image) with ``stamp``; return {topic: message with that stamp or None}.

        Waits for the always-published outputs plus ``expect``; other topics get a grace period, so an
        absent output means the node did not publish it for this frame.
        """
        hdr = header(stamp, FRAME)
        if info == "default":
            info = camera_info_msg(hdr, W, H, self.intr.fx, self.intr.fy, self.intr.cx, self.intr.cy)
        if info is not None:
            info.header = hdr
            self.pubs["camera_info"].publish(info)
        if sparse is not None:
            sparse.header = header(stamp, FRAME)
            topic = "sparse_points" if isinstance(sparse, PointCloud2) else "sparse_depth"
            self.pubs[topic].publish(sparse)
        time.sleep(0.1)  # inputs of other topics arrive before the image that needs them
        self.pubs["image"].publish(image if image is not None else numpy_to_image(self.rgb, "rgb8", hdr))
        out: dict[str, Any] = {}
        for topic in ("depth/relative", "normals/image", "normals/image_vis", "depth/image_vis", *expect):
            got = self.col.wait_for(topic, 1, timeout=30.0, where=lambda m: stamp_of(m) == stamp)
            assert got, f"no {topic} for stamp {stamp}; node log:\n{self.node.log()[-3000:]}"
            out[topic] = got[0]
        time.sleep(0.3)  # grace period for outputs that are not expected
        for topic in OUTPUTS:
            if topic not in out:
                out[topic] = next((m for m in self.col.get(topic) if hasattr(m, "header") and stamp_of(m) == stamp),
                                  None)
        return out

    def relative(self) -> np.ndarray:
        """The node's relative depth for the scene image (one frame without sparse depth)."""
        out = self.frame(self.next_stamp())
        return image_to_numpy(out["depth/relative"]).copy()


def _sparse_mask(step: int = 5) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[::step, ::step] = True
    return mask


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> Scenario:
    domain = module_domain_id(37)
    log = tmp_path_factory.mktemp("node") / "geodiff.log"
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cpu",
        "dtype": "fp32", "processing_res": 64, "alignment.ema_alpha": 1.0, "alignment.sparse_max_dt": 0.02,
        "diagnostics_period": 0.3,
    }, log)
    col = Collector(domain)
    try:
        for topic, msg_type in OUTPUTS.items():
            col.subscribe(msg_type, topic)
        pubs = {t: col.publisher(m, t) for t, m in (("image", Image), ("camera_info", CameraInfo),
                                                    ("sparse_depth", Image), ("sparse_points", PointCloud2))}
        if not col.wait_matched(pubs.values(), timeout=90.0):
            pytest.fail(f"the node never subscribed to its inputs; log:\n{node.log()[-3000:]}")
        rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
        yield Scenario(node, col, pubs, rgb, PinholeIntrinsics(fx, fy, cx, cy, W, H))
    finally:
        col.close()
        code, elapsed = node.stop()
        assert code == 0, f"exit code {code}; log:\n{node.log()[-3000:]}"


def test_relative_outputs_without_sparse_depth(scn: Scenario) -> None:
    stamp = scn.next_stamp()
    out = scn.frame(stamp, expect=("depth/camera_info",))
    rel, nrm = out["depth/relative"], out["normals/image"]
    for msg, enc in ((rel, "32FC1"), (nrm, "32FC3"), (out["depth/image_vis"], "rgb8"),
                     (out["normals/image_vis"], "rgb8")):
        assert msg is not None
        assert (msg.encoding, msg.width, msg.height, msg.header.frame_id) == (enc, W, H, FRAME)
    r = image_to_numpy(rel)
    assert np.isfinite(r).all() and r.min() >= 0.0 and r.max() <= 1.0 and r.std() > 1e-3
    n = np.linalg.norm(image_to_numpy(nrm), axis=-1)
    assert 0.9 < float(np.median(n)) < 1.1  # unit normals
    info = out["depth/camera_info"]
    assert info is not None and (info.width, info.height) == (W, H)
    np.testing.assert_allclose(np.asarray(info.p)[[0, 5, 2, 6]], [scn.intr.fx, scn.intr.fy, scn.intr.cx, scn.intr.cy])
    # No metric scale known: no metric depth and no cloud, never relative depth labelled as metres.
    assert out["depth/image"] is None and out["points"] is None


def test_metric_depth_aligned_to_sparse_32fc1(scn: Scenario) -> None:
    rel = scn.relative()
    s, t = 3.0, 0.5
    sparse = np.where(_sparse_mask(), s * rel + t, np.nan).astype(np.float32)
    out = scn.frame(scn.next_stamp(), sparse=numpy_to_image(sparse, "32FC1"), expect=("depth/image",))
    assert out["depth/image"] is not None, scn.node.log()[-2000:]
    depth = image_to_numpy(out["depth/image"])
    assert out["depth/image"].encoding == "32FC1" and out["depth/image"].header.frame_id == FRAME
    np.testing.assert_allclose(depth, s * image_to_numpy(out["depth/relative"]) + t, rtol=1e-3, atol=1e-3)


def test_sparse_16uc1_mm_at_half_resolution(scn: Scenario) -> None:
    rel = scn.relative()
    s, t = 2.0, 0.8
    half = np.zeros((H // 2, W // 2), np.uint16)  # a depth sensor at half the camera resolution, 0 = none
    half[::3, ::3] = np.rint((s * rel[::2, ::2] + t) * 1000.0)[::3, ::3]
    out = scn.frame(scn.next_stamp(), sparse=numpy_to_image(half, "16UC1"), expect=("depth/image",))
    assert out["depth/image"] is not None, scn.node.log()[-2000:]
    np.testing.assert_allclose(image_to_numpy(out["depth/image"]), s * rel + t, rtol=2e-3, atol=2e-3)


def test_sparse_points_projected_with_camera_info(scn: Scenario) -> None:
    rel = scn.relative()
    s, t = 4.0, 1.0
    xyz = backproject(np.where(_sparse_mask(4), s * rel + t, np.nan).astype(np.float32), scn.intr)
    pts = xyz.reshape(-1, 3)
    cloud = cloud_to_msg(cloud_array(pts[np.isfinite(pts).all(axis=1)][None]))  # unorganized, optical frame
    out = scn.frame(scn.next_stamp(), sparse=cloud, expect=("depth/image",))
    assert out["depth/image"] is not None, scn.node.log()[-2000:]
    np.testing.assert_allclose(image_to_numpy(out["depth/image"]), s * rel + t, rtol=1e-3, atol=1e-3)


def test_fallback_to_last_fit_then_no_metric_after_max_age(scn: Scenario) -> None:
    rel = scn.relative()
    s, t = 3.0, 0.5
    sparse = numpy_to_image(np.where(_sparse_mask(), s * rel + t, np.nan).astype(np.float32), "32FC1")
    assert scn.frame(scn.next_stamp(), sparse=sparse, expect=("depth/image",))["depth/image"] is not None
    # No sparse depth: the last fit is reused (max_fallback_age_s 2.0).
    held = scn.frame(scn.next_stamp(0.5), expect=("depth/image",))
    assert held["depth/image"] is not None
    np.testing.assert_allclose(image_to_numpy(held["depth/image"]), s * rel + t, rtol=1e-3, atol=1e-3)
    expired = scn.frame(scn.next_stamp(3.0))
    assert expired["depth/image"] is None and expired["depth/relative"] is not None


def test_cloud_equals_depth_image_proc_formula_with_nan(scn: Scenario) -> None:
    rel = scn.relative()
    s, t = 3.0, 0.5
    cut = float(np.percentile(s * rel + t, 70))  # the farthest 30 % of pixels become NaN through max_depth
    assert all(r.successful for r in set_parameters(scn.col, "/geodiff", {"max_depth": cut}))
    try:
        sparse = numpy_to_image(np.where(_sparse_mask(), s * rel + t, np.nan).astype(np.float32), "32FC1")
        out = scn.frame(scn.next_stamp(), sparse=sparse, expect=("depth/image", "points"))
    finally:
        set_parameters(scn.col, "/geodiff", {"max_depth": 100.0})
    depth = image_to_numpy(out["depth/image"])
    nan = np.isnan(depth)
    assert 0.2 < nan.mean() < 0.4
    cloud = out["points"]
    assert cloud is not None, scn.node.log()[-2000:]
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z"]
    assert (cloud.height, cloud.width, cloud.is_dense, cloud.header.frame_id) == (H, W, False, FRAME)
    pts = read_cloud(cloud)
    p = np.asarray(out["depth/camera_info"].p).reshape(3, 4)
    fx, fy, cx, cy = p[0, 0], p[1, 1], p[0, 2], p[1, 2]
    v, u = np.mgrid[0:H, 0:W]
    # depth_image_proc: X = (u - cx) * Z / fx, Y = (v - cy) * Z / fy, Z = depth; NaN for invalid.
    np.testing.assert_allclose(pts["z"], depth, rtol=1e-6)
    np.testing.assert_allclose(pts["x"], (u - cx) * depth / fx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pts["y"], (v - cy) * depth / fy, rtol=1e-5, atol=1e-6)
    assert np.isnan(pts["x"][nan]).all() and np.isnan(pts["y"][nan]).all()
    bits = pts["rgb"].view(np.uint32)
    np.testing.assert_array_equal(np.stack([bits >> 16 & 255, bits >> 8 & 255, bits & 255], -1), scn.rgb)
    normals = image_to_numpy(out["normals/image"])
    np.testing.assert_array_equal(np.stack([pts["normal_x"], pts["normal_y"], pts["normal_z"]], -1), normals)


def test_runtime_parameters_stride_and_rejections(scn: Scenario) -> None:
    results = set_parameters(scn.col, "/geodiff", {"cloud_stride": 2})
    assert results[0].successful
    try:
        rel = scn.relative()
        sparse = numpy_to_image(np.where(_sparse_mask(), 3.0 * rel + 0.5, np.nan).astype(np.float32), "32FC1")
        out = scn.frame(scn.next_stamp(), sparse=sparse, expect=("depth/image", "points"))
        cloud = out["points"]
        assert cloud is not None and (cloud.height, cloud.width) == (H // 2, W // 2)
        np.testing.assert_allclose(read_cloud(cloud)["z"], image_to_numpy(out["depth/image"])[::2, ::2])
    finally:
        set_parameters(scn.col, "/geodiff", {"cloud_stride": 1})
    for values, text in (({"cloud_stride": 0}, ""), ({"min_depth": 500.0}, "smaller than max_depth"),
                         ({"model_depth": "/elsewhere"}, "cleanup"), ({"alignment.method": "svd"}, "not one of")):
        (res,) = set_parameters(scn.col, "/geodiff", values)
        assert not res.successful, values
        assert text in res.reason, res.reason


def test_bad_input_is_dropped_and_the_node_keeps_running(scn: Scenario) -> None:
    bad_encoding = numpy_to_image(scn.rgb, "rgb8", header(scn.next_stamp(), FRAME))
    bad_encoding.encoding = "yuv422"
    truncated = numpy_to_image(scn.rgb, "rgb8", header(scn.next_stamp(), FRAME))
    truncated.data = truncated.data[: len(truncated.data) // 2]
    for msg in (bad_encoding, truncated):
        scn.pubs["image"].publish(msg)
        time.sleep(0.3)
    out = scn.frame(scn.next_stamp())  # a good frame afterwards is processed normally
    assert out["depth/relative"] is not None
    assert scn.node.proc.poll() is None
    assert "dropped a frame" in scn.node.log()


def test_camera_info_of_another_size_gives_depth_but_no_cloud(scn: Scenario) -> None:
    rel = scn.relative()
    wrong = camera_info_msg(header(0), 2 * W, 2 * H, 2 * scn.intr.fx, 2 * scn.intr.fy, 2 * scn.intr.cx,
                            2 * scn.intr.cy)
    sparse = numpy_to_image(np.where(_sparse_mask(), 3.0 * rel + 0.5, np.nan).astype(np.float32), "32FC1")
    out = scn.frame(scn.next_stamp(), sparse=sparse, info=wrong, expect=("depth/image",))
    time.sleep(0.5)
    assert out["depth/image"] is not None and out["depth/relative"] is not None
    assert out["points"] is None and out["depth/camera_info"] is None
    assert "no cloud" in scn.node.log()


def test_diagnostics_report_rates_latency_and_alignment(scn: Scenario) -> None:
    rel = scn.relative()
    sparse = numpy_to_image(np.where(_sparse_mask(), 3.0 * rel + 0.5, np.nan).astype(np.float32), "32FC1")
    stamp = scn.next_stamp()
    scn.frame(stamp, sparse=sparse, expect=("depth/image",))
    time.sleep(0.8)  # diagnostics_period 0.3 s
    msgs = scn.col.get("/diagnostics")
    assert msgs, "no /diagnostics"
    status = msgs[-1].status[0]
    assert status.name.startswith("geodiff") and status.hardware_id == "cpu"
    values = diagnostics_values(msgs[-1])
    for key in ("input_rate_hz", "output_rate_hz", "dropped", "latency_p50_ms", "latency_p95_ms",
                "alignment_inliers", "alignment_scale", "alignment_residual_rel"):
        assert key in values, key
    assert int(values["received"]) >= 2 and int(values["processed"]) >= 2
    assert math.isfinite(float(values["latency_p50_ms"])) and float(values["latency_p95_ms"]) >= float(
        values["latency_p50_ms"])
    assert values["alignment_source"] == "fit"
    assert float(values["alignment_scale"]) == pytest.approx(3.0, rel=1e-3)
    assert int(values["alignment_inliers"]) == int(_sparse_mask().sum())
