"""The node as a process: compressed input, manual lifecycle, clean exit on SIGINT/SIGTERM while processing,
and start-up failures that exit with a clear message instead of hanging."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_helpers import (
    Collector,
    NodeProcess,
    call_service,
    camera_info_msg,
    header,
    module_domain_id,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image

W, H = 320, 240  # larger than the other DDS tests so a frame is still being processed when the signal lands
EXIT_BUDGET_S = 2.0


def _tiny_params(depth: Path, normals: Path, **extra: object) -> dict[str, object]:
    return {"model_depth": str(depth), "model_normals": str(normals), "device": "cpu", "dtype": "fp32",
            "processing_res": 64, **extra}


def _jpeg(rgb: np.ndarray, stamp: int) -> CompressedImage:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=90)
    msg = CompressedImage(format="rgb8; jpeg compressed rgb8")
    msg.header = header(stamp)
    msg.data = buf.getvalue()
    return msg


@contextmanager
def _streaming(col: Collector, topic: str, make_msg, info_pub=None, hz: float = 20.0) -> Iterator[None]:
    """Publish frames at ``hz`` in a background thread while the body runs (the node is kept busy)."""
    pub = col.publisher(CompressedImage if "compressed" in topic else Image, topic)
    assert col.wait_matched([pub], timeout=90.0), f"nobody subscribed to {topic}"
    stop = threading.Event()

    def run() -> None:
        stamp = 1_700_000_000_000_000_000
        while not stop.is_set():
            stamp += int(1e9 / hz)
            if info_pub is not None:
                info_pub.publish(camera_info_msg(header(stamp), W, H, 250.0, 250.0, W / 2, H / 2))
            pub.publish(make_msg(stamp))
            time.sleep(1.0 / hz)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2.0)


@pytest.fixture(scope="module")
def domain() -> int:
    return module_domain_id(53)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return test_scene(W, H)[0]


def test_compressed_input_then_sigint_while_processing(tmp_path: Path, domain: int, scene: np.ndarray,
                                                       tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    # reduce_large_input off: 320x240 is over 4x the tiny processing_res (64), so the JPEG would be decoded at half
    # size by design (test_reliability_inputs covers that); this test checks the full-size compressed path.
    params = _tiny_params(tiny_depth_ckpt, tiny_normals_ckpt, input_transport="compressed", reduce_large_input=False)
    node = NodeProcess(domain, params, tmp_path / "node.log", remaps={"image": "/cam/color"})
    col = Collector(domain)
    try:
        col.subscribe(Image, "depth/relative")
        # image:=/cam/color remaps the base name; the compressed topic follows it like image_transport's.
        with _streaming(col, "/cam/color/compressed", lambda stamp: _jpeg(scene, stamp)):
            got = col.wait_for("depth/relative", 3, timeout=60.0)
            assert len(got) >= 3, node.log()[-3000:]
            assert (got[0].width, got[0].height, got[0].encoding) == (W, H, "32FC1")
            assert np.isfinite(image_to_numpy(got[-1])).all()
            code, elapsed = node.stop(signal.SIGINT)
    finally:
        col.close()
        node.stop(signal.SIGKILL)
    assert code == 0, node.log()[-3000:]
    assert elapsed < EXIT_BUDGET_S, f"SIGINT exit took {elapsed:.2f} s"


def test_manual_lifecycle_then_sigterm_while_processing(tmp_path: Path, domain: int, scene: np.ndarray,
                                                        tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    node = NodeProcess(domain, _tiny_params(tiny_depth_ckpt, tiny_normals_ckpt, autostart=False),
                       tmp_path / "node.log")
    col = Collector(domain)
    try:
        col.subscribe(Image, "depth/relative")
        state = call_service(col, GetState, "/geodiff/get_state", GetState.Request(), timeout=60.0)
        assert state.current_state.label == "unconfigured"  # autostart:=false leaves it to the user
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            req = ChangeState.Request()
            req.transition.id = transition
            assert call_service(col, ChangeState, "/geodiff/change_state", req, timeout=60.0).success
        state = call_service(col, GetState, "/geodiff/get_state", GetState.Request())
        assert state.current_state.label == "active"
        info_pub = col.publisher(CameraInfo, "camera_info")
        with _streaming(col, "image", lambda stamp: numpy_to_image(scene, "rgb8", header(stamp)), info_pub):
            assert len(col.wait_for("depth/relative", 3, timeout=60.0)) >= 3, node.log()[-3000:]
            code, elapsed = node.stop(signal.SIGTERM)
    finally:
        col.close()
        node.stop(signal.SIGKILL)
    assert code == 0, node.log()[-3000:]
    assert elapsed < EXIT_BUDGET_S, f"SIGTERM exit took {elapsed:.2f} s"


def test_missing_model_fails_configure_and_exits_1_naming_the_fix(tmp_path: Path, domain: int) -> None:
    missing = tmp_path / "no_such_model"
    node = NodeProcess(domain, {"model_depth": str(missing), "model_normals": "", "device": "cpu",
                                "dtype": "fp32", "local_files_only": True}, tmp_path / "node.log")
    try:
        code = node.proc.wait(90.0)
    finally:
        node.stop(signal.SIGKILL)
    log = node.log()
    assert code == 1, log[-3000:]
    assert "configure failed" in log and str(missing) in log, log[-3000:]


@pytest.mark.parametrize(("params", "text"), [
    ({"dtype": "fp64"}, "'fp64' is not one of"),
    ({"cloud_stride": 0}, "cloud_stride"),
    # a camera's depth range from the params file, checked against itself and the node-wide values as when set
    # later (before: a camera with min 5 and max 1 started, every metric pixel of it NaN)
    ({"cameras": ["front"], "camera.front.min_depth": 5.0, "camera.front.max_depth": 1.0},
     "camera front: min_depth (5.0) must be smaller than max_depth (1.0)"),
], ids=["dtype", "cloud_stride", "camera_depth_range"])
def test_invalid_parameter_at_startup_exits_2(tmp_path: Path, domain: int, params: dict[str, object],
                                              text: str) -> None:
    node = NodeProcess(domain, {**params, "device": "cpu"}, tmp_path / "node.log")
    try:
        code = node.proc.wait(60.0)
    finally:
        node.stop(signal.SIGKILL)
    log = node.log()
    assert code == 2, log[-3000:]
    assert "cannot start" in log and text in log, log[-3000:]
