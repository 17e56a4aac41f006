"""Image / CompressedImage / CameraInfo conversion against hand-built messages (no DDS, no rclpy.init)."""

from __future__ import annotations

import array
import io
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages (ros-jazzy-sensor-msgs) not installed")
from ros_helpers import shared_data_dir
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from geodiff_ros.ros.conversions import (
    ImageConversionError,
    camera_info_with_size,
    compressed_to_rgb8,
    depth_to_metres,
    image_to_numpy,
    image_to_rgb8,
    numpy_to_image,
)


def _msg(encoding: str, width: int, height: int, step: int, data: bytes, big: bool = False) -> Image:
    msg = Image(encoding=encoding, width=width, height=height, step=step, is_bigendian=int(big))
    buf = array.array("B")
    buf.frombytes(data)
    msg.data = buf
    return msg


def _padded(rows: np.ndarray, step: int, fill: int = 0xAB) -> bytes:
    """Rows of raw bytes ``[H,row_bytes]`` padded to ``step`` with junk, as a driver with aligned rows sends."""
    h, row = rows.shape
    out = np.full((h, step), fill, dtype=np.uint8)
    out[:, :row] = rows
    return out.tobytes()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_rgb8_with_row_padding(rgb: np.ndarray) -> None:
    step = 7 * 3 + 11  # odd padding, not a multiple of the pixel size
    msg = _msg("rgb8", 7, 5, step, _padded(rgb.reshape(5, -1), step))
    np.testing.assert_array_equal(image_to_numpy(msg), rgb)
    np.testing.assert_array_equal(image_to_rgb8(msg), rgb)


def test_bgr_and_alpha_encodings_become_rgb(rgb: np.ndarray) -> None:
    alpha = np.full((5, 7, 1), 77, np.uint8)
    cases = {
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }
    for encoding, pixels in cases.items():
        ch = pixels.shape[2]
        msg = _msg(encoding, 7, 5, 7 * ch, pixels.tobytes())
        np.testing.assert_array_equal(image_to_numpy(msg), pixels, err_msg=encoding)
        np.testing.assert_array_equal(image_to_rgb8(msg), rgb, err_msg=encoding)


def test_mono8_becomes_grey_rgb() -> None:
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    msg = _msg("mono8", 4, 3, 6, _padded(mono, 6))
    out = image_to_rgb8(msg)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], mono)


@pytest.mark.parametrize("big", [False, True])
def test_16uc1_endianness_and_padding(big: bool) -> None:
    values = np.array([[0, 1, 258, 65535], [1000, 2, 3, 4]], dtype=np.uint16)
    order = ">" if big else "<"
    rows = values.astype(order + "u2").view(np.uint8).reshape(2, -1)
    msg = _msg("16UC1", 4, 2, 10, _padded(rows, 10), big=big)
    out = image_to_numpy(msg)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("big", [False, True])
def test_32fc1_endianness_with_padding(big: bool) -> None:
    values = np.array([[0.5, np.nan, -1.25], [3.0e3, np.inf, 7.0]], dtype=np.float32)
    rows = values.astype((">" if big else "<") + "f4").view(np.uint8).reshape(2, -1)
    msg = _msg("32FC1", 3, 2, 16, _padded(rows, 16), big=big)
    np.testing.assert_array_equal(image_to_numpy(msg), values)


def test_numpy_to_image_round_trip_and_fast_data_type() -> None:
    normals = np.random.default_rng(1).normal(size=(4, 6, 3)).astype(np.float32)
    depth = np.random.default_rng(2).random((4, 6)).astype(np.float32)
    for arr, enc, step in ((normals, "32FC3", 6 * 12), (depth, "32FC1", 6 * 4)):
        msg = numpy_to_image(arr, enc)
        assert (msg.encoding, msg.width, msg.height, msg.step, msg.is_bigendian) == (enc, 6, 4, step, 0)
        assert isinstance(msg.data, array.array)  # stored as is by rclpy (not the slow bytes setter)
        np.testing.assert_array_equal(image_to_numpy(msg), arr)


def test_numpy_to_image_rejects_wrong_channel_count() -> None:
    with pytest.raises(ImageConversionError, match="does not fit encoding"):
        numpy_to_image(np.zeros((4, 4, 3), np.float32), "32FC1")


def test_duck_typed_message_with_numpy_data(rgb: np.ndarray) -> None:
    """rosbags deserialises ``data`` as a numpy uint8 array; the same functions must work on it."""
    msg = SimpleNamespace(encoding="bgr8", width=7, height=5, step=21, is_bigendian=0,
                          data=np.frombuffer(rgb[:, :, ::-1].tobytes(), np.uint8))
    np.testing.assert_array_equal(image_to_rgb8(msg), rgb)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"encoding": "nv21"}, "unsupported image encoding"),
    ({"step": 20}, "shorter than one row"),
    ({"data": bytes(21 * 4)}, "truncated"),
    ({"width": 0, "step": 0, "data": b""}, "zero size"),
])
def test_bad_messages_raise_clear_errors(kwargs: dict, match: str) -> None:
    fields = {"encoding": "rgb8", "width": 7, "height": 5, "step": 21, "data": bytes(21 * 5)}
    fields.update(kwargs)
    msg = _msg(fields["encoding"], fields["width"], 5, fields["step"], fields["data"])
    with pytest.raises(ImageConversionError, match=match):
        image_to_numpy(msg)


def _quadrants(height: int = 24, width: int = 32) -> np.ndarray:
    """A known picture: four flat colours, one a quadrant, ``[H,W,3]`` uint8 RGB."""
    rgb = np.empty((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    rgb[:h, :w], rgb[:h, w:] = (200, 40, 30), (30, 180, 60)
    rgb[h:, :w], rgb[h:, w:] = (40, 60, 210), (230, 220, 90)
    return rgb


def _inside_quadrants(arr: np.ndarray, margin: int = 2) -> np.ndarray:
    """Pixels at least ``margin`` from the picture's edges and the quadrant borders (where interpolation mixes)."""
    h, w = arr.shape[0] // 2, arr.shape[1] // 2
    keep = np.ones(arr.shape[:2], bool)
    for axis, mid in ((0, h), (1, w)):
        index = np.arange(arr.shape[axis])
        near = (index < margin) | (index >= arr.shape[axis] - margin) | (np.abs(index - mid + 0.5) < margin)
        keep &= ~near[:, None] if axis == 0 else ~near[None, :]
    return arr[keep]


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8"])
def test_bayer_input_is_demosaiced_to_the_known_picture(encoding: str) -> None:
    """Each site of the mosaic keeps one channel of the known picture, as the sensor named by the encoding (top-left
    2x2 block) sees it; demosaicing gives the picture back away from the colour edges (it was refused as "not a
    colour encoding"). A pattern mapped to the wrong OpenCV code swaps red and blue or mixes in green."""
    rgb = _quadrants()
    pattern = encoding.removeprefix("bayer_").removesuffix("8")  # e.g. rggb
    mosaic = np.empty(rgb.shape[:2], np.uint8)
    for (dy, dx), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern, strict=True):
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    out = image_to_rgb8(_msg(encoding, 32, 24, 32, mosaic.tobytes()))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(_inside_quadrants(out), _inside_quadrants(rgb), atol=1)


def _bt601_yuv(rgb: np.ndarray) -> np.ndarray:
    """Y, U (Cb), V (Cr) of RGB by ITU-R BT.601, video range (Y 16..235): what YUV 4:2:2 cameras send."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return np.rint(np.stack([y, u, v], axis=-1)).astype(np.uint8)


@pytest.mark.parametrize(("encoding", "order"), [("uyvy", "UYVY"), ("yuv422", "UYVY"), ("yuyv", "YUYV"),
                                                 ("yuv422_yuy2", "YUYV")])
def test_yuv422_input_is_converted_to_the_known_picture(encoding: str, order: str) -> None:
    """Packed 4:2:2 (two bytes a pixel, each pixel pair sharing U and V) of a known picture, in the byte order the
    encoding names, with row padding: converted back to that picture within BT.601 rounding (it was refused)."""
    rgb = _quadrants()
    yuv = _bt601_yuv(rgb)  # [H,W,3]; the quadrants are 16 px wide, so each pixel pair has one U and one V
    packed = np.empty((24, 32, 2), np.uint8)
    first, second = (0, 1) if order == "YUYV" else (1, 0)  # Y's byte within each 2-byte pixel
    packed[:, :, first] = yuv[:, :, 0]
    packed[:, 0::2, second] = yuv[:, 0::2, 1]  # U on the pair's first pixel
    packed[:, 1::2, second] = yuv[:, 0::2, 2]  # V on its second
    out = image_to_rgb8(_msg(encoding, 32, 24, 70, _padded(packed.reshape(24, 64), 70)))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out.astype(int), rgb.astype(int), atol=2)


def test_yuv422_of_odd_width_names_the_problem() -> None:
    with pytest.raises(ImageConversionError, match="width must be even"):
        image_to_rgb8(_msg("uyvy", 7, 2, 14, bytes(28)))


def test_colour_encodings_still_unsupported_say_so() -> None:
    for encoding in ("nv21", "bayer_rggb16", "rgb16"):
        with pytest.raises(ImageConversionError, match=rf"{encoding}' is not supported as camera input.*uyvy"):
            image_to_rgb8(_msg(encoding, 2, 2, 12, bytes(24)))


def test_depth_image_is_not_a_colour_input() -> None:
    msg = numpy_to_image(np.ones((2, 2), np.float32), "32FC1")
    with pytest.raises(ImageConversionError, match="not a colour encoding"):
        image_to_rgb8(msg)


def test_depth_to_metres_marks_missing_as_nan() -> None:
    mm = np.array([[0, 1500], [65535, 1]], np.uint16)
    out = depth_to_metres(numpy_to_image(mm, "16UC1"))
    np.testing.assert_allclose(out, [[np.nan, 1.5], [65.535, 0.001]], rtol=1e-6)
    m = np.array([[0.0, 2.0], [np.inf, np.nan]], np.float32)
    np.testing.assert_array_equal(depth_to_metres(numpy_to_image(m, "32FC1")),
                                  [[np.nan, 2.0], [np.nan, np.nan]])
    with pytest.raises(ImageConversionError, match="REP 118"):
        depth_to_metres(numpy_to_image(np.zeros((2, 2), np.uint8), "mono8"))


def _compressed(rgb: np.ndarray, fmt: str) -> CompressedImage:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    msg = CompressedImage(format=f"rgb8; {fmt} compressed rgb8")
    msg.data = array.array("B", buf.getvalue())
    return msg


def test_compressed_png_is_lossless_and_jpeg_close() -> None:
    v, u = np.mgrid[0:32, 0:48]
    rgb = np.stack([u * 5, v * 7, (u + v) * 2], axis=-1).astype(np.uint8)  # smooth, JPEG-friendly
    np.testing.assert_array_equal(compressed_to_rgb8(_compressed(rgb, "png")), rgb)
    jpg = compressed_to_rgb8(_compressed(rgb, "jpeg"))
    assert jpg.shape == rgb.shape
    assert np.abs(jpg.astype(int) - rgb).mean() < 3.0


def test_compressed_garbage_raises() -> None:
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", b"not an image at all")
    with pytest.raises(ImageConversionError, match="cannot decode"):
        compressed_to_rgb8(msg)
    with pytest.raises(ImageConversionError, match="no data"):
        compressed_to_rgb8(CompressedImage(format="jpeg"))


def test_camera_info_with_size_folds_binning_roi_and_scales() -> None:
    info = CameraInfo(width=640, height=480, binning_x=2, binning_y=2, distortion_model="plumb_bob")
    info.k = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
    info.p = [500.0, 0.0, 320.0, 0.0, 0.0, 510.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.roi.x_offset, info.roi.y_offset, info.roi.width, info.roi.height = 100, 40, 400, 300
    # Binned ROI image is 200x150; publish at 400x300 (x2 per axis).
    out = camera_info_with_size(info, info.header, 400, 300)
    p = np.asarray(out.p).reshape(3, 4)
    assert (out.width, out.height, out.binning_x, out.roi.width) == (400, 300, 0, 0)
    np.testing.assert_allclose([p[0, 0], p[1, 1], p[0, 2], p[1, 2]],
                               [500.0, 510.0, (320 - 100) / 2 * 2, (240 - 40) / 2 * 2])
    np.testing.assert_allclose(np.asarray(out.k).reshape(3, 3)[0, 2], 220.0)


def test_rosbags_messages_from_shared_bag_convert() -> None:
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data is absent (set GEODIFF_SHARED_DATA to run this)")
    rosbags_highlevel = pytest.importorskip("rosbags.highlevel")
    seen = set()
    with rosbags_highlevel.AnyReader([data / "bags" / "tum_fr2_desk_rgbd_mcap"]) as reader:
        for conn, _, raw in reader.messages():
            if conn.msgtype != "sensor_msgs/msg/Image":
                continue
            msg = reader.deserialize(raw, conn.msgtype)
            if msg.encoding == "16UC1":
                depth = depth_to_metres(msg)
                assert depth.shape == (msg.height, msg.width)
                finite = depth[np.isfinite(depth)]
                assert 0.3 < np.median(finite) < 5.0  # TUM desk: metres, not millimetres
            else:
                assert image_to_rgb8(msg).shape == (msg.height, msg.width, 3)
            seen.add(msg.encoding)
    assert "16UC1" in seen and len(seen) == 2
