"""Input checks and preparation of issue 13 without DDS: header sizes and the pixel limit (bug 4), reduced
decoding, thin images (bug 12), malformed sparse clouds (bug 5), the K-fallback warning (bug 8) and rectification.

The node-level behaviour (frame dropped, WARN line, next frame processed) is in test_reliability_inputs.py.
"""

from __future__ import annotations

import io
import logging
import resource
import time

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages (ros-jazzy-sensor-msgs) not installed")
cv2 = pytest.importorskip("cv2", reason="opencv-python-headless not installed (requirements.txt)")
from ros_helpers import jpeg_announcing, png_bomb, test_scene  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, PointField  # noqa: E402

from geodiff_ros.engine.preprocess import MIN_PROCESSING_SIDE, processing_size_problem  # noqa: E402
from geodiff_ros.geometry import camera as camera_module  # noqa: E402
from geodiff_ros.geometry import intrinsics_from_camera_info  # noqa: E402
from geodiff_ros.geometry.rectify import CameraModel, Rectifier  # noqa: E402
from geodiff_ros.ros.conversions import (  # noqa: E402
    ImageConversionError,
    InputTooLarge,
    camera_info_with_size,
    compressed_image_size,
    decode_compressed,
)
from geodiff_ros.ros.pointcloud import PointCloudError, cloud_array, cloud_to_msg, cloud_xyz  # noqa: E402

LIMIT = 40_000_000  # the node's default max_input_pixels


def _encoded(rgb: np.ndarray, fmt: str, **kwargs: object) -> CompressedImage:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt.upper(), **kwargs)
    return CompressedImage(format=f"rgb8; {fmt} compressed rgb8", data=buf.getvalue())


# ------------------------------------------------------------------------------------------ sizes and the limit

@pytest.mark.parametrize(("fmt", "kwargs"), [("jpeg", {}), ("jpeg", {"progressive": True}),
                                             ("jpeg", {"exif": b"Exif\x00\x00" + bytes(3000)}), ("png", {})])
def test_header_size_matches_the_decoded_size(fmt: str, kwargs: dict) -> None:
    rgb = test_scene(203, 101)[0]
    msg = _encoded(rgb, fmt, **kwargs)
    assert compressed_image_size(msg.data) == (fmt, 203, 101)
    out, factor = decode_compressed(msg)
    assert factor == 1 and out.shape == (101, 203, 3) and out.dtype == np.uint8


def test_header_that_is_neither_jpeg_nor_png_is_refused() -> None:
    with pytest.raises(ImageConversionError, match="neither JPEG nor PNG"):
        compressed_image_size(b"GIF89a" + bytes(100))
    with pytest.raises(ImageConversionError, match="truncated"):
        compressed_image_size(jpeg_announcing(64, 64)[:20])


@pytest.mark.parametrize("bomb", ["jpeg_631_bytes", "png_bomb"])
def test_image_announcing_13000x13000_is_refused_from_its_header(bomb: str) -> None:
    """Bug 4: refused before anything is decoded: fast and without allocating the 169 MP picture."""
    data = jpeg_announcing(13000, 13000) if bomb == "jpeg_631_bytes" else png_bomb(13000, 13000)
    msg = CompressedImage(format="jpeg" if bomb.startswith("jpeg") else "png", data=data)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    t0 = time.monotonic()
    with pytest.raises(InputTooLarge) as err:
        decode_compressed(msg, LIMIT)
    assert time.monotonic() - t0 < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000  # < 100 MB (RGB: 507 MB)
    text = str(err.value)
    assert "13000x13000" in text and "max_input_pixels" in text and str(LIMIT) in text, text


def test_limit_zero_means_no_limit_and_limit_counts_pixels() -> None:
    msg = _encoded(test_scene(40, 30)[0], "png")
    assert decode_compressed(msg, 0)[0].shape == (30, 40, 3)
    assert decode_compressed(msg, 1200)[0].shape == (30, 40, 3)
    with pytest.raises(InputTooLarge) as err:
        decode_compressed(msg, 1199)
    # The sizes were printed as "40x30 = 0.0 MP, above max_input_pixels = 1199 (0.0 MP)".
    text = str(err.value)
    assert "40x30 = 1200 px (0.0012 MP), above max_input_pixels = 1199 (0.0012 MP)" in text, text
    assert "0.0 MP" not in text, text


@pytest.mark.parametrize(("fmt", "size", "keep", "factor", "shape"), [
    ("jpeg", (640, 480), 128, 4, (120, 160)),
    ("jpeg", (641, 481), 160, 4, (121, 161)),  # libjpeg rounds up
    ("png", (641, 481), 160, 4, (120, 160)),  # PNG is shrunk after decoding (area average): rounds down
    ("jpeg", (640, 480), 400, 1, (480, 640)),  # not far above: full size
    ("jpeg", (640, 480), 0, 1, (480, 640)),  # off
])
def test_reduced_decoding(fmt: str, size: tuple[int, int], keep: int, factor: int, shape: tuple[int, int]) -> None:
    rgb = test_scene(*size)[0]
    out, got = decode_compressed(_encoded(rgb, fmt), keep_long_edge=keep)
    assert got == factor and out.shape == (*shape, 3)
    if factor > 1:  # the same picture, each pixel factor x factor source pixels: compare with an area average
        h, w = size[1] // factor, size[0] // factor
        ref = cv2.resize(rgb[:h * factor, :w * factor], (w, h), interpolation=cv2.INTER_AREA)
        assert np.abs(out[:h, :w].astype(int) - ref).mean() < 6.0


def _corrupt(kind: str) -> CompressedImage:
    rgb = test_scene(160, 120)[0]
    data = bytes(_encoded(rgb, "png" if kind.startswith("png") else "jpeg").data)
    if kind == "jpeg_631_bytes_6300x6300":
        data = jpeg_announcing(6300, 6300)
    elif kind == "jpeg_cut_then_closed":
        data = data[: len(data) // 2] + b"\xff\xd9"
    elif kind == "jpeg_cut":
        data = data[: len(data) // 2]
    elif kind == "png_truncated":
        data = data[: len(data) // 2]
    elif kind == "png_garbled_idat":
        at = data.index(b"IDAT") + 6
        data = data[:at] + bytes(np.random.default_rng(3).integers(0, 256, 198, dtype=np.uint8)) + data[at + 198:]
    elif kind == "png_bad_header_crc":
        data = data[:29] + bytes([data[29] ^ 0xFF]) + data[30:]  # IHDR's checksum
    return CompressedImage(format=kind.split("_")[0], data=data)


@pytest.mark.parametrize(("kind", "reason"), [
    ("jpeg_631_bytes_6300x6300", "Corrupt JPEG data: premature end of data segment"),
    ("jpeg_cut_then_closed", "Corrupt JPEG data: premature end of data segment"),
    ("jpeg_cut", "Premature end of JPEG file"),
    ("png_truncated", "image file is truncated"),
    ("png_garbled_idat", "broken data stream"),
    ("png_bad_header_crc", "broken PNG file"),
])
@pytest.mark.parametrize("keep", [0, 40])  # full size, and reduced (1/8 for the 6300x6300 one, 1/2 for the others)
def test_corrupt_data_is_refused_with_the_decoders_message_and_nothing_on_stderr(
        kind: str, reason: str, keep: int, capfd: pytest.CaptureFixture[str]) -> None:
    """The decoders' own error: libjpeg-turbo's warning stops the JPEG decode (OpenCV and Pillow returned a picture,
    grey where data was missing, and libjpeg printed to stderr); Pillow raises on broken PNG data (OpenCV refused
    it without a reason and printed libpng's). Nothing reaches the process's stderr (fd 2)."""
    with pytest.raises(ImageConversionError) as err:
        decode_compressed(_corrupt(kind), LIMIT, keep_long_edge=keep)
    text = str(err.value)
    assert "cannot decode compressed" in text and "corrupt or truncated data" in text and reason in text, text
    out, errors = capfd.readouterr()
    assert not errors and not out, (out, errors)


def test_png_modes_decode_to_rgb() -> None:
    """Pillow decodes PNG now: grey, 16-bit grey (high byte), palette and alpha PNGs give the RGB OpenCV gave."""
    from PIL import Image as PILImage

    rgb = test_scene(40, 30)[0]
    grey16 = (rgb[:, :, 1].astype(np.uint16) << 8) | 0x7F  # [H,W] 16-bit, high byte = the green channel
    images = {"L": (PILImage.fromarray(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2)),
              "I;16": (PILImage.fromarray(grey16), np.repeat(rgb[:, :, 1:2], 3, axis=2)),
              "RGBA": (PILImage.fromarray(np.dstack([rgb, np.full((30, 40), 7, np.uint8)])), rgb),
              "P": (PILImage.fromarray(rgb).quantize(16), None)}
    for mode, (image, expected) in images.items():
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out, _ = decode_compressed(CompressedImage(format="png", data=buf.getvalue()))
        if expected is None:  # palette: the palette's colours
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(out, expected, err_msg=mode)
        with_cv2 = cv2.cvtColor(cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR),
                                cv2.COLOR_BGR2RGB)
        assert np.abs(out.astype(int) - with_cv2).max() <= 1, mode  # OpenCV rounds 16 to 8 bits


def test_camera_info_of_a_reduced_decode_scales_exactly_by_the_factor() -> None:
    info = CameraInfo(width=641, height=481, distortion_model="plumb_bob")
    info.k = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
    info.p = [500.0, 0.0, 320.0, 0.0, 0.0, 510.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    out = camera_info_with_size(info, info.header, 161, 121, scale=0.25)  # ceil(641/4) x ceil(481/4)
    np.testing.assert_allclose(np.asarray(out.p).reshape(3, 4)[:2, :3], [[125.0, 0.0, 80.0], [0.0, 127.5, 60.0]])
    assert (out.width, out.height) == (161, 121)


# ------------------------------------------------------------------------------------------ thin images (bug 12)

def test_thin_image_problem_names_the_size_and_the_minimum() -> None:
    text = processing_size_problem(1, 100000, 768)
    assert text is not None and "100000x1" in text and f"{MIN_PROCESSING_SIDE} px" in text and "1042 px" in text
    assert processing_size_problem(1042, 100000, 768) is None  # the minimum it names is enough
    assert processing_size_problem(480, 640, 768) is None
    assert processing_size_problem(7, 640, 0) is not None and processing_size_problem(8, 8, 0) is None


# ------------------------------------------------------------------------------------------ sparse clouds (bug 5)

def _cloud(mutate: str) -> object:
    xyz = np.ones((2, 3, 3), np.float32)
    msg = cloud_to_msg(cloud_array(xyz))
    if mutate == "offset_beyond_point_step":
        msg.fields[2].offset = 40
    elif mutate == "point_step_0":
        msg.point_step = 0
    elif mutate == "duplicate_field":
        msg.fields[1].name = "x"
    elif mutate == "huge_count":
        msg.fields[0].count = 1_000_000_000
    elif mutate == "unknown_datatype":
        msg.fields[0].datatype = 42
    return msg


@pytest.mark.parametrize("mutate", ["offset_beyond_point_step", "point_step_0", "duplicate_field", "huge_count",
                                    "unknown_datatype"])
def test_malformed_cloud_layout_raises_point_cloud_error(mutate: str) -> None:
    with pytest.raises(PointCloudError):
        cloud_xyz(_cloud(mutate))


def test_well_formed_cloud_still_reads() -> None:
    assert cloud_xyz(_cloud("none")).shape == (6, 3)
    msg = _cloud("none")
    msg.fields.append(PointField(name="pad", offset=12, datatype=PointField.FLOAT32, count=0))  # count 0 = 1
    msg.point_step = 16
    msg.row_step = 16 * msg.width
    msg.data = bytes(16 * 6)
    assert cloud_xyz(msg).shape == (6, 3)


# ------------------------------------------------------------------------------------------ K fallback (bug 8)

def test_k_fallback_warning_is_bounded_and_throttled(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A CameraInfo without P whose K changes every frame: one warning, a bounded memory of K values."""
    warnings = camera_module._KFallbackWarnings(size=64, period_s=30.0)
    monkeypatch.setattr(camera_module, "_k_fallback_warnings", warnings)
    caplog.set_level(logging.WARNING, logger=camera_module.__name__)
    for i in range(2000):
        fx = 500.0 + i * 1e-3
        intrinsics_from_camera_info([fx, 0, 320, 0, fx, 240, 0, 0, 1], [0.0] * 12, 640, 480)
    lines = [r for r in caplog.records if "P is unset" in r.getMessage()]
    assert len(lines) == 1
    assert len(warnings._seen) <= 64


def test_k_fallback_warning_goes_to_the_given_logger(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The node passes its ROS logger (``warn``), so the warning reaches /rosout, not Python logging's stderr."""
    monkeypatch.setattr(camera_module, "_k_fallback_warnings", camera_module._KFallbackWarnings())
    caplog.set_level(logging.WARNING, logger=camera_module.__name__)
    received: list[str] = []
    intrinsics_from_camera_info([500, 0, 320, 0, 500, 240, 0, 0, 1], [0.0] * 12, 640, 480, warn=received.append)
    assert len(received) == 1 and "P is unset" in received[0]
    assert not caplog.records


# ------------------------------------------------------------------------------------------ rectification

def _distort(x: np.ndarray, y: np.ndarray, d: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """plumb_bob (Brown-Conrady) on normalised coordinates, written out (not OpenCV's code)."""
    k1, k2, p1, p2, k3 = d
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 ** 3
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def test_rectify_moves_points_to_where_the_pinhole_model_p_puts_them() -> None:
    """Blobs drawn where a distorted lens images known rays land, after rectification, at P's pinhole projection
    of those rays (within 0.3 px), while in the raw image the outer ones are pixels off."""
    w, h, f = 320, 240, 260.0
    k = [f, 0.0, 159.5, 0.0, f, 119.5, 0.0, 0.0, 1.0]
    d = [-0.28, 0.08, 0.0005, -0.0004, 0.0]
    new_f, new_c = 230.0, (160.0, 118.0)  # P differs from K, as camera_calibration computes it
    p = [new_f, 0.0, new_c[0], 0.0, 0.0, new_f, new_c[1], 0.0, 0.0, 0.0, 1.0, 0.0]
    model = CameraModel(w, h, "plumb_bob", tuple(d), tuple(k), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), tuple(p))
    assert model.needs_rectification()
    rays = [(x, y) for x in (-0.55, -0.25, 0.0, 0.3, 0.55) for y in (-0.4, 0.0, 0.4)]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    raw = np.zeros((h, w), np.float64)
    for x, y in rays:
        xd, yd = _distort(np.array(x), np.array(y), d)
        raw += np.exp(-((u - (f * xd + 159.5)) ** 2 + (v - (f * yd + 119.5)) ** 2) / (2 * 1.5 ** 2))
    raw_u8 = np.clip(raw * 255, 0, 255).astype(np.uint8)
    rect = Rectifier()(np.repeat(raw_u8[:, :, None], 3, axis=2), model)[:, :, 0].astype(np.float64)

    def centroid(img: np.ndarray, cu: float, cv: float) -> tuple[float, float]:
        u0, v0 = round(cu), round(cv)
        win = img[v0 - 5:v0 + 6, u0 - 5:u0 + 6]
        vv, uu = np.mgrid[v0 - 5:v0 + 6, u0 - 5:u0 + 6]
        return float((win * uu).sum() / win.sum()), float((win * vv).sum() / win.sum())

    worst_rect, worst_raw = 0.0, 0.0
    for x, y in rays:
        ideal = (new_f * x + new_c[0], new_f * y + new_c[1])
        got = centroid(rect, *ideal)
        worst_rect = max(worst_rect, float(np.hypot(got[0] - ideal[0], got[1] - ideal[1])))
        xd, yd = _distort(np.array(x), np.array(y), d)
        worst_raw = max(worst_raw, float(np.hypot(f * xd + 159.5 - ideal[0], f * yd + 119.5 - ideal[1])))
    assert worst_rect < 0.3, f"rectified blobs off by up to {worst_rect:.2f} px"
    assert worst_raw > 5.0  # the test would notice a no-op


def test_rectified_model_and_no_op_cases() -> None:
    k = (300.0, 0.0, 160.0, 0.0, 300.0, 120.0, 0.0, 0.0, 1.0)
    p = (300.0, 0.0, 160.0, 0.0, 0.0, 300.0, 120.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    eye = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert not CameraModel(320, 240, "plumb_bob", (0.0,) * 5, k, eye, p).needs_rectification()
    assert not CameraModel(320, 240, "", (), k, (0.0,) * 9, (0.0,) * 12).needs_rectification()  # R, P unset
    distorted = CameraModel(320, 240, "plumb_bob", (-0.2, 0.0, 0.0, 0.0, 0.0), k, eye, (0.0,) * 12)
    rect = distorted.rectified()
    assert rect.d == (0.0,) * 5 and rect.r == eye and rect.k == k and rect.p == p  # P unset: from K
    img = np.full((240, 320, 3), 200, np.uint8)
    out = Rectifier()(img, distorted)
    assert out.shape == img.shape and out[120, 160, 0] == 200
    with pytest.raises(camera_module.InvalidCameraInfo, match="not be rectified|cannot be rectified"):
        Rectifier()(img, CameraModel(320, 240, "fancy_lens", (0.1,), k, eye, p))
