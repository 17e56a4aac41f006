"""A small synthetic RGB-D bag (colour, 16UC1 depth, CameraInfo) with the topic names of the shared TUM bag.

The demo plays it when the shared data is absent; the tests and benchmarks use it as a recording whose geometry is
known (floor, wall, box).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DEPTH_TOPIC", "IMAGE_TOPIC", "INFO_TOPIC", "write_synthetic_bag"]

# Topics of the shared TUM bag (RealSense-style names); the synthetic bag uses the same ones.
IMAGE_TOPIC = "/camera/color/image_raw"
INFO_TOPIC = "/camera/color/camera_info"
DEPTH_TOPIC = "/camera/aligned_depth_to_color/image_raw"


def write_synthetic_bag(path: Path, frames: int = 4, width: int = 160, height: int = 120,
                        storage: str = "mcap", period_s: float = 0.1) -> Path:
    """A small RGB-D bag (colour rgb8, 16UC1 mm depth, CameraInfo) of a textured room, topic names as the TUM bag.

    Floor plane 1.2 m below the camera, a back wall at 4 m and a box at 2 m; the camera moves sideways 2 cm a
    frame so frames differ. Used when the shared data is absent, and by the tests.
    """
    from geodiff_ros.bag.storage import BagWriter

    fx = fy = 0.8 * width
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    with BagWriter(path, storage=storage) as writer:
        types = writer.typestore.types
        header_t, time_t = types["std_msgs/msg/Header"], types["builtin_interfaces/msg/Time"]
        image_t, info_t = types["sensor_msgs/msg/Image"], types["sensor_msgs/msg/CameraInfo"]
        roi_t = types["sensor_msgs/msg/RegionOfInterest"]
        for i in range(frames):
            shift = 0.02 * i
            with np.errstate(divide="ignore"):
                floor = np.where(v > cy, 1.2 * fy / np.maximum(v - cy, 1e-3), np.inf)
            depth = np.minimum(np.full((height, width), 4.0, np.float32), floor)  # [H,W] metres
            x_at_2m = (u - cx) * 2.0 / fx + shift
            y_at_2m = (v - cy) * 2.0 / fy
            box = (np.abs(x_at_2m - 0.3) < 0.35) & (y_at_2m > 0.2) & (y_at_2m < 1.2)
            depth = np.where(box, np.minimum(depth, 2.0), depth).astype(np.float32)
            check = (((u + 40 * shift * fx) // 8 + v // 8) % 2).astype(np.float32)
            shade = np.clip(1.0 - depth / 5.0, 0.1, 1.0)
            rgb = np.stack([200 * shade * (0.5 + 0.5 * check), 120 * shade + 80 * box, 90 + 100 * check], axis=-1)
            mm = np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)
            mm[(u.astype(int) * 7 + v.astype(int) * 3) % 29 == 0] = 0  # dropouts, like a real depth camera
            stamp_ns = 1_700_000_000_000_000_000 + int(i * period_s * 1e9)
            sec, nsec = divmod(stamp_ns, 1_000_000_000)
            header = header_t(stamp=time_t(sec=sec, nanosec=nsec), frame_id="camera_color_optical_frame")
            img = image_t(header=header, height=height, width=width, encoding="rgb8", is_bigendian=0,
                          step=width * 3, data=rgb.astype(np.uint8).reshape(-1))
            dep = image_t(header=header, height=height, width=width, encoding="16UC1", is_bigendian=0,
                          step=width * 2, data=mm.reshape(-1).view(np.uint8))
            info = info_t(header=header, height=height, width=width, distortion_model="plumb_bob",
                          d=np.zeros(5), k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], float),
                          r=np.eye(3).reshape(-1), p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], float),
                          binning_x=0, binning_y=0,
                          roi=roi_t(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
            writer.write_msg(IMAGE_TOPIC, stamp_ns, img)
            writer.write_msg(INFO_TOPIC, stamp_ns, info)
            writer.write_msg(DEPTH_TOPIC, stamp_ns, dep)
    return path
