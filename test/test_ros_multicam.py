"""One geodiff node serving several cameras over real DDS (tiny CPU checkpoint).

Three cameras in one node: ``front`` and ``left`` are a synchronised stereo pair (same size, same stamps, 8 Hz),
``rear`` is smaller and slower. Each camera sees a different image, so a relative depth that went to the wrong
camera would not match that camera's reference (the same image processed alone: the engine is deterministic).
A second node serves two cameras of different sizes and rates configured from the command line.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    header,
    module_domain_id,
    set_parameters,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, Image

from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image

T0 = 1_700_000_000_000_000_000


@dataclass(frozen=True)
class Cam:
    name: str
    width: int
    height: int
    hz: float

    @property
    def frame_id(self) -> str:
        return f"{self.name}_optical_frame"


def _image_for(cam: Cam, variant: int) -> np.ndarray:
    """A distinct image per camera: the test scene at the camera's size, shifted/flipped per variant."""
    rgb = test_scene(cam.width, cam.height)[0]
    if variant == 1:
        rgb = rgb[:, ::-1]
    elif variant == 2:
        rgb = rgb[::-1]
    return np.ascontiguousarray(np.roll(rgb, 7 * variant, axis=1))


class Rig:
    """Publishers of several cameras on one test node; ``send`` publishes camera_info + image with a stamp."""

    def __init__(self, col: Collector, cams: list[Cam]) -> None:
        self.col = col
        self.cams = {c.name: c for c in cams}
        self.images = {c.name: _image_for(c, i) for i, c in enumerate(cams)}
        self.sent: dict[str, set[int]] = {c.name: set() for c in cams}
        self.img_pubs = {c.name: col.publisher(Image, f"{c.name}/image") for c in cams}
        self.info_pubs = {c.name: col.publisher(CameraInfo, f"{c.name}/camera_info") for c in cams}
        self._lock = threading.Lock()

    def send(self, name: str, stamp: int) -> None:
        cam = self.cams[name]
        hdr = header(stamp, cam.frame_id)
        f = 0.9 * cam.width
        self.info_pubs[name].publish(camera_info_msg(hdr, cam.width, cam.height, f, f, cam.width / 2, cam.height / 2))
        with self._lock:
            self.sent[name].add(stamp)
        self.img_pubs[name].publish(numpy_to_image(self.images[name], "rgb8", hdr))

    @contextmanager
    def streaming(self, groups: list[tuple[list[str], float]], seconds: float) -> Iterator[None]:
        """Each group (cameras, hz) is published from its own thread; cameras of a group share each stamp."""
        stop = threading.Event()

        def run(names: list[str], hz: float, offset: int) -> None:
            k = 0
            while not stop.is_set():
                stamp = T0 + offset + int(k * 1e9 / hz)
                for name in names:
                    self.send(name, stamp)
                k += 1
                stop.wait(1.0 / hz)

        threads = [threading.Thread(target=run, args=(names, hz, 1000 * (i + 1) + 10_000_000_000), daemon=True)
                   for i, (names, hz) in enumerate(groups)]
        for t in threads:
            t.start()
        try:
            time.sleep(seconds)
            yield
        finally:
            stop.set()
            for t in threads:
                t.join(2.0)


def _diag_by_name(col: Collector) -> dict[str, dict[str, Any]]:
    """Latest /diagnostics: status name -> {level, message, hardware_id, values}."""
    msgs = col.get("/diagnostics")
    assert msgs, "no /diagnostics"
    return {s.name: {"level": s.level, "message": s.message, "hardware_id": s.hardware_id,
                     "values": {kv.key: kv.value for kv in s.values}} for s in msgs[-1].status}


def _assert_metric(metric: np.ndarray, expected: np.ndarray, min_depth: float = 0.1) -> None:
    """Metric depth = the expected scaled relative depth, NaN exactly where that is below min_depth."""
    np.testing.assert_array_equal(np.isnan(metric), expected < min_depth)
    ok = ~np.isnan(metric)
    np.testing.assert_allclose(metric[ok], expected[ok], rtol=1e-5, atol=1e-5)


def _tiny(depth: Path, **extra: Any) -> dict[str, Any]:
    return {"model_depth": str(depth), "model_normals": "", "tasks": ["depth"], "device": "cpu", "dtype": "fp32",
            "processing_res": 64, "diagnostics_period": 0.3, **extra}


# ------------------------------------------------------------------------------------------- three cameras

THREE = [Cam("front", 160, 120, 8.0), Cam("left", 160, 120, 8.0), Cam("rear", 96, 72, 3.0)]
SCALES = {"front": 2.0, "left": 5.0}


def _params_file(folder: Path, extra: dict[str, Any]) -> Path:
    """config/geodiff.yaml with ``extra`` merged in (nested dicts), as a user's own params file would be."""
    from ros_helpers import PARAMS_FILE

    tree = yaml.safe_load(PARAMS_FILE.read_text())
    params = tree["/**"]["ros__parameters"]
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path) -> Iterator[tuple[NodeProcess, Rig]]:
    """The node with its cameras and per-camera fixed scales from a params file, and the test rig."""
    domain = module_domain_id(71)
    folder = tmp_path_factory.mktemp("multicam")
    params = _params_file(folder, {
        "cameras": [c.name for c in THREE], "batch_window_s": 0.05,
        "camera": {name: {"alignment": {"fixed_scale": scale}} for name, scale in SCALES.items()},
    })
    node = NodeProcess(domain, _tiny(tiny_depth_ckpt), folder / "node.log", params_file=params)
    col = Collector(domain)
    try:
        col.subscribe(DiagnosticArray, "/diagnostics")
        for cam in THREE:
            col.subscribe(Image, f"{cam.name}/depth/relative", depth=200)
            col.subscribe(Image, f"{cam.name}/depth/image", depth=200)
            col.subscribe(CameraInfo, f"{cam.name}/depth/camera_info", depth=200)
        rig = Rig(col, THREE)
        if not col.wait_matched([*rig.img_pubs.values(), *rig.info_pubs.values()], timeout=90.0):
            pytest.fail(f"the node never subscribed to the cameras; log:\n{node.log()[-3000:]}")
        yield node, rig
    finally:
        col.close()
        code, _ = node.stop()
        assert code == 0, f"exit code {code}; log:\n{node.log()[-3000:]}"


def _references(node: NodeProcess, rig: Rig) -> dict[str, np.ndarray]:
    """Each camera's relative depth for its image, sent alone (no batching), one camera at a time."""
    refs = {}
    for k, name in enumerate(rig.cams):
        stamp = T0 + k
        rig.send(name, stamp)
        got = rig.col.wait_for(f"{name}/depth/relative", 1, timeout=30.0, where=lambda m, s=stamp: stamp_of(m) == s)
        assert got, f"no {name}/depth/relative; log:\n{node.log()[-3000:]}"
        refs[name] = image_to_numpy(got[0]).copy()
    return refs


def test_outputs_never_mix_cameras_and_frames_are_batched(three: tuple[NodeProcess, Rig]) -> None:
    node, rig = three
    refs = _references(node, rig)
    # The stereo pair sees different images of the same size: a swapped output would be caught by content.
    assert np.abs(refs["front"] - refs["left"]).max() > 0.05
    rig.col.clear()
    with rig.streaming([(["front", "left"], 8.0), (["rear"], 3.0)], seconds=4.0):
        pass
    time.sleep(1.0)  # the last frames drain
    for name, cam in rig.cams.items():
        rel = rig.col.get(f"{name}/depth/relative")
        sent = {s for s in rig.sent[name] if s >= T0 + 10_000_000_000}
        assert len(rel) >= 0.4 * len(sent) >= 4, f"{name}: {len(rel)} outputs for {len(sent)} frames\n" + \
            node.log()[-2000:]
        for msg in rel:
            # Header copied from this camera's own input: its frame_id and one of its stamps, its size.
            assert msg.header.frame_id == cam.frame_id, (name, msg.header.frame_id)
            assert stamp_of(msg) in sent, (name, stamp_of(msg))
            assert (msg.width, msg.height) == (cam.width, cam.height)
            np.testing.assert_allclose(image_to_numpy(msg), refs[name], atol=1e-3, err_msg=name)
        infos = rig.col.get(f"{name}/depth/camera_info")
        assert infos and all((i.width, i.height, i.header.frame_id) == (cam.width, cam.height, cam.frame_id)
                             for i in infos)
        # Per-camera alignment state: each camera's fixed scale, and none for rear.
        metric = rig.col.get(f"{name}/depth/image")
        if name in SCALES:
            by_stamp = {stamp_of(m): m for m in rel}
            assert metric, name
            for m in metric:
                assert m.header.frame_id == cam.frame_id
                _assert_metric(image_to_numpy(m), SCALES[name] * image_to_numpy(by_stamp[stamp_of(m)]))
        else:
            assert not metric, "rear has no scale and must not publish metric depth"
    time.sleep(0.7)  # a fresh /diagnostics (period 0.3 s)
    diag = _diag_by_name(rig.col)
    sched = diag["geodiff: scheduler"]["values"]
    frames, passes = int(sched["frames"]), int(sched["network_passes"])
    # Batching happened: the stereo pair's frames shared network passes.
    assert passes < frames and int(sched["max_batch"]) >= 2 and int(sched["batched_frames"]) >= 4, sched
    for name in rig.cams:
        status = diag[f"geodiff: {name}"]
        assert status["hardware_id"] == f"{name}@cpu" and status["values"]["camera"] == name
        assert int(status["values"]["processed"]) >= 4


def test_a_silent_camera_does_not_stall_the_others(three: tuple[NodeProcess, Rig]) -> None:
    node, rig = three
    rig.col.clear()
    rig.sent = {name: set() for name in rig.cams}
    with rig.streaming([(["front"], 8.0), (["rear"], 3.0)], seconds=3.0):  # left stays silent
        pass
    time.sleep(1.0)
    for name in ("front", "rear"):
        got = rig.col.get(f"{name}/depth/relative")
        assert len(got) >= 0.5 * len(rig.sent[name]) >= 4, f"{name}: {len(got)}/{len(rig.sent[name])}"
    assert not rig.col.get("left/depth/relative")
    diag = _diag_by_name(rig.col)
    front = diag["geodiff: front"]["values"]
    assert float(front["output_rate_hz"]) > 2.0, front
    # The silent camera reports no input while the others run.
    assert float(diag["geodiff: left"]["values"]["input_rate_hz"]) == 0.0


def test_per_camera_parameter_at_runtime_changes_only_that_camera(three: tuple[NodeProcess, Rig]) -> None:
    node, rig = three
    (res,) = set_parameters(rig.col, "/geodiff", {"camera.left.alignment.fixed_scale": 7.0})
    assert res.successful, res.reason
    (bad,) = set_parameters(rig.col, "/geodiff", {"camera.front.max_depth": -1.0})
    assert not bad.successful and "camera.front.max_depth" in bad.reason
    # A LiDAR's extrinsic differs per camera: a float-array override, validated like the node-wide one.
    (tf,) = set_parameters(rig.col, "/geodiff", {"camera.left.sparse_points.transform": [0.0] * 6 + [1.0]})
    assert tf.successful, tf.reason
    (bad_tf,) = set_parameters(rig.col, "/geodiff", {"camera.left.sparse_points.transform": [0.0] * 7})
    assert not bad_tf.successful and "camera.left.sparse_points.transform" in bad_tf.reason, bad_tf.reason
    try:
        stamp = T0 + 50_000_000_000
        rig.col.clear()
        for name in ("front", "left"):
            rig.send(name, stamp)
        for name, scale in (("front", 2.0), ("left", 7.0)):
            where = lambda m: stamp_of(m) == stamp  # noqa: E731
            rel = rig.col.wait_for(f"{name}/depth/relative", 1, timeout=20.0, where=where)
            met = rig.col.wait_for(f"{name}/depth/image", 1, timeout=20.0, where=where)
            assert rel and met, node.log()[-2000:]
            _assert_metric(image_to_numpy(met[0]), scale * image_to_numpy(rel[0]))
    finally:
        set_parameters(rig.col, "/geodiff", {"camera.left.alignment.fixed_scale": SCALES["left"]})


# ---------------------------------------------------------------------------------------------- two cameras

def test_two_cameras_of_different_sizes_and_rates_from_the_command_line(tmp_path: Path,
                                                                          tiny_depth_ckpt: Path) -> None:
    domain = module_domain_id(73)
    cams = [Cam("wide", 200, 100, 10.0), Cam("tall", 72, 128, 4.0)]
    node = NodeProcess(domain, _tiny(tiny_depth_ckpt, cameras=[c.name for c in cams]), tmp_path / "node.log",
                       remaps={"tall/image": "/robot/tall_cam/color/image_raw"})
    col = Collector(domain)
    try:
        for cam in cams:
            col.subscribe(Image, f"{cam.name}/depth/relative", depth=200)
        rig = Rig(col, cams)
        # A remapped camera input: the node listens where the robot's driver publishes.
        rig.img_pubs["tall"] = col.publisher(Image, "/robot/tall_cam/color/image_raw")
        if not col.wait_matched([*rig.img_pubs.values(), *rig.info_pubs.values()], timeout=90.0):
            pytest.fail(f"the node never subscribed; log:\n{node.log()[-3000:]}")
        with rig.streaming([(["wide"], 10.0), (["tall"], 4.0)], seconds=3.0):
            pass
        time.sleep(1.0)
        for cam in cams:
            got = col.get(f"{cam.name}/depth/relative")
            assert len(got) >= 0.4 * len(rig.sent[cam.name]) >= 4, (cam.name, len(got), node.log()[-2000:])
            assert all((m.width, m.height, m.header.frame_id) == (cam.width, cam.height, cam.frame_id)
                       and stamp_of(m) in rig.sent[cam.name] for m in got)
    finally:
        col.close()
        code, _ = node.stop()
    assert code == 0, node.log()[-3000:]


def test_invalid_camera_list_exits_2_naming_the_fix(tmp_path: Path) -> None:
    node = NodeProcess(module_domain_id(73), {"cameras": ["front", "front"], "device": "cpu"}, tmp_path / "n.log")
    try:
        code = node.proc.wait(60.0)
    finally:
        node.stop(signal.SIGKILL)
    log = node.log()
    assert code == 2 and "cannot start" in log and "given twice" in log, log[-2000:]
