"""PointCloud2 building/reading and sparse point projection (no DDS)."""

from __future__ import annotations

import array
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages (ros-jazzy-sensor-msgs) not installed")
from sensor_msgs.msg import PointCloud2, PointField

from geodiff_ros.geometry import PinholeIntrinsics, backproject
from geodiff_ros.ros.pointcloud import (
    PointCloudError,
    cloud_array,
    cloud_to_msg,
    cloud_xyz,
    pack_rgb,
    project_points_to_depth,
    read_cloud,
)


def _grid(h: int = 4, w: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(h, w, 3)).astype(np.float32)
    xyz[1, 2] = np.nan
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    return xyz, rgb, n / np.linalg.norm(n, axis=-1, keepdims=True)


@pytest.mark.parametrize(("with_rgb", "with_normals", "step", "names"), [
    (False, False, 12, ["x", "y", "z"]),
    (True, False, 16, ["x", "y", "z", "rgb"]),
    (True, True, 28, ["x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z"]),
])
def test_cloud_layout(with_rgb: bool, with_normals: bool, step: int, names: list[str]) -> None:
    xyz, rgb, n = _grid()
    msg = cloud_to_msg(cloud_array(xyz, rgb if with_rgb else None, n if with_normals else None))
    assert [f.name for f in msg.fields] == names
    assert [f.offset for f in msg.fields] == [4 * i for i in range(len(names))]
    assert all(f.datatype == PointField.FLOAT32 and f.count == 1 for f in msg.fields)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (4, 5, step, 5 * step)
    assert msg.is_dense is False and msg.is_bigendian is False
    assert isinstance(msg.data, array.array) and len(msg.data) == 4 * 5 * step


def test_cloud_round_trip_and_packed_rgb() -> None:
    xyz, rgb, n = _grid()
    pts = read_cloud(cloud_to_msg(cloud_array(xyz, rgb, n)))
    assert pts.shape == (4, 5)
    np.testing.assert_array_equal(np.stack([pts["x"], pts["y"], pts["z"]], -1), xyz)  # NaN in the same place
    np.testing.assert_array_equal(np.stack([pts["normal_x"], pts["normal_y"], pts["normal_z"]], -1), n)
    bits = pts["rgb"].view(np.uint32)
    np.testing.assert_array_equal(bits >> 16 & 0xFF, rgb[..., 0])
    np.testing.assert_array_equal(bits >> 8 & 0xFF, rgb[..., 1])
    np.testing.assert_array_equal(bits & 0xFF, rgb[..., 2])
    assert pack_rgb(np.array([1, 2, 3], np.uint8)).view(np.uint32) == 0x010203


@pytest.mark.parametrize("big", [False, True])
def test_read_cloud_with_padding_like_depth_image_proc(big: bool) -> None:
    """depth_image_proc pads xyz to 16 B per point; rows may also be padded (row_step > width * point_step)."""
    order = ">" if big else "<"
    pts = np.array([[(1.0, 2.0, 3.0), (4.0, 5.0, np.nan)]], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    raw = np.zeros((1, 40), np.uint8)  # point_step 16, row_step 40 (8 B row padding)
    for i in range(2):
        raw[0, 16 * i:16 * i + 12] = np.array(list(pts[0, i]), dtype=order + "f4").view(np.uint8)
    msg = PointCloud2(height=1, width=2, point_step=16, row_step=40, is_bigendian=big, is_dense=False)
    msg.fields = [PointField(name=c, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, c in enumerate("xyz")]
    msg.data = array.array("B", raw.tobytes())
    np.testing.assert_array_equal(cloud_xyz(msg), [[1.0, 2.0, 3.0], [4.0, 5.0, np.nan]])


def test_read_cloud_rejects_truncated_and_missing_xyz() -> None:
    msg = cloud_to_msg(cloud_array(*_grid()[:1]))
    msg.data = array.array("B", bytes(10))
    with pytest.raises(PointCloudError, match=r"data is too short: 10 B, but row_step x height = .* truncated"):
        read_cloud(msg)
    only_x = PointCloud2(height=1, width=1, point_step=4, row_step=4)
    only_x.fields = [PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1)]
    only_x.data = array.array("B", bytes(4))
    with pytest.raises(PointCloudError, match="x, y and z are required"):
        cloud_xyz(only_x)


def test_row_step_shorter_than_a_row_is_a_malformed_header_not_short_data() -> None:
    """The warning read as if the data were short ("data has N B; need row_step x height"), though no data size
    fixes a row_step smaller than width x point_step: the header contradicts itself."""
    msg = cloud_to_msg(cloud_array(*_grid()[:1]))
    msg.row_step = msg.width * msg.point_step - 4
    with pytest.raises(PointCloudError) as err:
        read_cloud(msg)
    text = str(err.value)
    assert "header is malformed" in text and "row_step" in text and "smaller than width x point_step" in text, text
    assert "short" not in text and "truncated" not in text, text


def test_projection_inverts_backprojection_and_keeps_nearest() -> None:
    intr = PinholeIntrinsics(fx=100.0, fy=90.0, cx=31.5, cy=20.0, width=64, height=48)
    rng = np.random.default_rng(3)
    depth = rng.uniform(1.0, 5.0, (48, 64)).astype(np.float32)
    depth[rng.random((48, 64)) < 0.8] = np.nan  # sparse, like LiDAR
    xyz = backproject(depth, intr).reshape(-1, 3)
    # A farther point behind pixel (10, 12) must lose to the nearer one (z-buffer).
    far = np.array([[(12 - intr.cx) / intr.fx * 9.0, (10 - intr.cy) / intr.fy * 9.0, 9.0]], np.float32)
    depth[10, 12] = 2.0
    near = np.array([[(12 - intr.cx) / intr.fx * 2.0, (10 - intr.cy) / intr.fy * 2.0, 2.0]], np.float32)
    out = project_points_to_depth(np.concatenate([xyz, far, near]), intr.fx, intr.fy, intr.cx, intr.cy, 64, 48)
    np.testing.assert_allclose(out, depth, rtol=1e-5)


def test_vga_cloud_builds_fast() -> None:
    """No per-point Python work: a 640x480 cloud with colour and normals is built in well under a second."""
    xyz = np.random.default_rng(0).random((480, 640, 3), dtype=np.float32)
    rgb = np.zeros((480, 640, 3), np.uint8)
    t0 = time.perf_counter()
    msg = cloud_to_msg(cloud_array(xyz, rgb, xyz))
    elapsed = time.perf_counter() - t0
    assert len(msg.data) == 480 * 640 * 28
    assert elapsed < 0.5, f"building a VGA cloud took {elapsed:.2f} s"


def test_kitti_cloud_through_messages_puts_the_road_at_camera_height() -> None:
    """The node's message path on real data: CameraInfo (KITTI P2, with its Tx) + a 32FC1 LiDAR depth Image ->
    intrinsics -> back-projection -> PointCloud2 -> read back. The road lies ~1.65 m below the camera."""
    import json

    from PIL import Image as PILImage
    from ros_helpers import shared_data_dir
    from sensor_msgs.msg import CameraInfo

    from geodiff_ros.ros.conversions import depth_to_metres, intrinsics_from_msg, numpy_to_image

    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data is absent (set GEODIFF_SHARED_DATA to run this)")
    entries = [e for e in json.loads((data / "manifest.json").read_text()) if e["set"] == "kitti_object_lidar"]
    heights = []
    for e in entries:
        calib = (data / e["rgb"]).parent.parent / "calib" / (Path(e["rgb"]).stem + ".txt")
        p2 = next(line for line in calib.read_text().splitlines() if line.startswith("P2:")).split()[1:]
        info = CameraInfo(width=e["width"], height=e["height"], distortion_model="plumb_bob")
        info.p = [float(v) for v in p2]
        info.k = [info.p[0], 0.0, info.p[2], 0.0, info.p[5], info.p[6], 0.0, 0.0, 1.0]
        raw = np.asarray(PILImage.open(data / e["depth"]), dtype=np.float32) / e["depth_scale"]  # 0 = none
        depth = depth_to_metres(numpy_to_image(raw, "32FC1"))
        intr = intrinsics_from_msg(info)
        pts = read_cloud(cloud_to_msg(cloud_array(backproject(depth, intr))))  # [H,W] organized, NaN invalid
        assert pts.shape == depth.shape
        h, w = depth.shape
        patch = pts[3 * h // 4:, w // 3:2 * w // 3].reshape(-1)
        xyz = np.stack([patch["x"], patch["y"], patch["z"]], -1)
        xyz = xyz[np.isfinite(xyz).all(axis=1)]
        road = xyz[(xyz[:, 1] > 1.0) & (xyz[:, 1] < 2.5) & (xyz[:, 2] < 20.0)]
        assert len(road) > 200
        heights.append(float(np.median(road[:, 1])))
    assert np.mean(heights) == pytest.approx(1.65, abs=0.05), heights


def test_sensor_msgs_py_reads_the_node_cloud_as_ours_does() -> None:
    """A ROS user's ``sensor_msgs_py.point_cloud2.read_points`` gets the same points and fields from the node's
    cloud (xyz + rgb + normals, NaN for invalid pixels) as ``read_cloud``; and ``create_cloud`` builds the same
    bytes (the measured tie that keeps ``cloud_to_msg``)."""
    point_cloud2 = pytest.importorskip("sensor_msgs_py.point_cloud2",
                                       reason="sensor_msgs_py not installed (setup_venv.sh: ../shared/ros/tf2)")
    rng = np.random.default_rng(3)
    xyz = rng.random((6, 8, 3), dtype=np.float32)
    xyz[2, 3] = np.nan
    points = cloud_array(xyz, rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), rng.random((6, 8, 3)))  # [H,W]
    msg = cloud_to_msg(points)
    theirs = point_cloud2.read_points(msg)  # flat: its reshape_organized_cloud gives [width,height] (upstream)
    assert (msg.height, msg.width) == (6, 8) and theirs.dtype.names == points.dtype.names
    assert np.array_equal(theirs.view(np.uint8), read_cloud(msg).reshape(-1).view(np.uint8))
    built = point_cloud2.create_cloud(msg.header, msg.fields, points.reshape(-1))
    assert bytes(built.data) == bytes(msg.data) and built.point_step == msg.point_step
