"""The node's worker threads over real DDS: parameter changes and lifecycle transitions during engine calls, the
pipelined engine and post-processing threads.

The node runs inside the test wrapper (ros_helpers) with ``GEODIFF_TEST_PREDICT_DELAY_S``: every engine call sleeps
first, as on a slow GPU, so a parameter change or a lifecycle transition lands *during* an engine call every time,
not by chance. The wrapper also prints how many engine calls run at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_helpers import (
    Collector,
    NodeProcess,
    call_service,
    camera_info_msg,
    header,
    latest_diagnostics,
    module_domain_id,
    node_remaps,
    predicts_at_once,
    process_stats,
    set_parameters,
    stamp_of,
    test_scene,
    wrapped_node_program,
)
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.engine import EngineConfig, GeoDiffEngine
from geodiff_ros.geometry import (
    PinholeIntrinsics,
    TemporalAligner,
    apply_alignment,
    backproject,
    fit_scale_shift,
)
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image
from geodiff_ros.ros.pointcloud import cloud_array
from geodiff_ros.visualize import colorize_depth, normals_to_rgb

NS, NAME = "/worker", "geodiff_worker"
W, H = 160, 120
T0 = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def domain() -> int:
    return module_domain_id(53)


@dataclass
class Stream:
    """Publishes the test scene at ``hz`` with increasing stamps; ``sent`` maps stamp -> monotonic send time."""

    col: Collector
    hz: float

    def __post_init__(self) -> None:
        self.pub = self.col.publisher(Image, "image", depth=5)
        self.rgb = test_scene(W, H)[0]
        self.sent: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        k = 0
        while not self._stop.wait(1.0 / self.hz):
            stamp = T0 + k * 10_000_000
            k += 1
            with self._lock:
                self.sent[stamp] = time.monotonic()
            self.pub.publish(numpy_to_image(self.rgb, "rgb8", header(stamp)))

    def sent_after(self, t: float) -> set[int]:
        with self._lock:
            return {s for s, sent in self.sent.items() if sent > t}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _start(domain: int, ckpt: Path, log: Path, delay_s: float, **params: object) -> NodeProcess:
    return NodeProcess(domain, {
        "model_depth": str(ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32", "processing_res": 64,
        "warmup_size": [0, 0], "qos.input.reliability": "reliable", "diagnostics_period": 0.25, **params,
    }, log, remaps=node_remaps(NS, NAME), program=wrapped_node_program(),
        extra_env={"GEODIFF_TEST_PREDICT_DELAY_S": str(delay_s)})


@pytest.fixture
def col(domain: int) -> Iterator[Collector]:
    collector = Collector(domain, namespace=NS)
    try:
        yield collector
    finally:
        collector.close()


def _scale_of(col: Collector, stamp: int) -> float | None:
    """metric / relative depth of one output frame (fixed scale: the same on every pixel), None if not both."""
    rel = next((m for m in col.get("depth/relative") if stamp_of(m) == stamp), None)
    metric = next((m for m in col.get("depth/image") if stamp_of(m) == stamp), None)
    if rel is None or metric is None:
        return None
    r, z = image_to_numpy(rel), image_to_numpy(metric)
    ok = np.isfinite(z) & (r > 0.05)
    return float(np.median(z[ok] / r[ok]))


def test_alignment_parameter_applies_to_the_next_frame(tmp_path: Path, domain: int, col: Collector,
                                                       tiny_depth_ckpt: Path) -> None:
    """``ros2 param set alignment.fixed_scale`` during an engine call was applied one change late
    (the worker rebuilt the aligner from the settings it had read before the call)."""
    node = _start(domain, tiny_depth_ckpt, tmp_path / "geodiff.log", delay_s=0.4, **{
        "alignment.fixed_scale": 1.5, "min_depth": 0.01})
    col.subscribe(Image, "depth/relative")
    col.subscribe(Image, "depth/image")
    col.subscribe(DiagnosticArray, "/diagnostics")
    stream = Stream(col, hz=10.0)
    try:
        assert col.wait_matched([stream.pub], timeout=90.0), node.log()[-3000:]
        stream.start()
        assert col.wait_for("depth/image", 1, timeout=60.0), node.log()[-3000:]
        for scale in (1.6, 1.7, 1.8):  # each change lands during an engine call (0.4 s of every ~0.4 s)
            (res,) = set_parameters(col, f"{NS}/{NAME}", {"alignment.fixed_scale": scale})
            assert res.successful, res.reason
            after = time.monotonic()
            deadline = after + 20.0
            scales: dict[int, float] = {}
            while len(scales) < 2 and time.monotonic() < deadline:  # two frames sent after the change
                for stamp in sorted(stream.sent_after(after)):
                    got = _scale_of(col, stamp)
                    if got is not None:
                        scales[stamp] = got
                time.sleep(0.05)
            assert len(scales) >= 2, node.log()[-3000:]
            assert all(v == pytest.approx(scale, rel=1e-4) for v in scales.values()), \
                f"set alignment.fixed_scale {scale}, frames after it use {sorted(set(scales.values()))}"
            diag = latest_diagnostics(col, NAME, after=time.monotonic(), timeout=5.0)
            assert float(diag["alignment_scale"]) == pytest.approx(scale, rel=1e-4), diag
    finally:
        stream.stop()
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
    assert code == 0, node.log()[-3000:]


def _transition(col: Collector, node: NodeProcess, transition: int) -> None:
    req = ChangeState.Request()
    req.transition.id = transition
    res = call_service(col, ChangeState, f"{NS}/{NAME}/change_state", req, timeout=30.0)
    assert res.success, f"transition {transition} failed; log:\n{node.log()[-3000:]}"


def test_deactivate_activate_during_engine_calls_keeps_one_worker(tmp_path: Path, domain: int, col: Collector,
                                                                  tiny_depth_ckpt: Path) -> None:
    """Deactivate used to give up waiting for a busy worker after 1.5 s and activate started another one;
    6 cycles left 7 workers inferring at once. Expected: one engine call at a time, no thread growth, and frames
    flow again after the last activation."""
    node = _start(domain, tiny_depth_ckpt, tmp_path / "geodiff.log", delay_s=2.5)
    col.subscribe(Image, "depth/relative")
    stream = Stream(col, hz=5.0)
    try:
        assert col.wait_matched([stream.pub], timeout=90.0), node.log()[-3000:]
        stream.start()
        assert col.wait_for("depth/relative", 1, timeout=60.0), node.log()[-3000:]
        threads_before = process_stats(node.proc.pid)["threads"]
        for _ in range(6):
            time.sleep(0.6)  # the worker has taken a frame: an engine call (2.5 s) is running
            _transition(col, node, Transition.TRANSITION_DEACTIVATE)
            _transition(col, node, Transition.TRANSITION_ACTIVATE)
        after = time.monotonic()
        assert col.wait_for("depth/relative", 1, timeout=30.0,
                            where=lambda m: stamp_of(m) in stream.sent_after(after)), node.log()[-3000:]
        time.sleep(3.0)  # any leftover worker would be inside an engine call by now
        threads_after = process_stats(node.proc.pid)["threads"]
    finally:
        stream.stop()
        code, elapsed = node.stop(signal.SIGINT, timeout=10.0)
    log = node.log()
    assert code == 0 and elapsed < 2.5, (code, elapsed, log[-3000:])
    at_once = predicts_at_once(log)
    assert at_once and max(at_once) == 1, f"engine calls running at once: {at_once}"
    assert threads_after <= threads_before, f"threads {threads_before} -> {threads_after} after 6 cycles"


def test_activate_after_cleanup_mid_frame_never_waits_for_the_engine(tmp_path: Path, domain: int, col: Collector,
                                                                    tiny_depth_ckpt: Path) -> None:
    """cleanup during a long engine call leaves that call to finish on its own; the following configure and
    activate return at once (activate used to wait for the old frame: 19.4 s measured), services and /diagnostics
    keep answering meanwhile, the new pipeline starts only after the old engine call (never two at once), and
    frames flow again afterwards."""
    delay = 8.0
    node = _start(domain, tiny_depth_ckpt, tmp_path / "geodiff.log", delay_s=delay)
    col.subscribe(Image, "depth/relative")
    col.subscribe(DiagnosticArray, "/diagnostics")
    stream = Stream(col, hz=5.0)
    try:
        assert col.wait_matched([stream.pub], timeout=90.0), node.log()[-3000:]
        stream.start()
        assert node.wait_for_log("GEODIFF_TEST_PREDICT_ACTIVE 1", timeout=60.0), node.log()[-3000:]
        time.sleep(0.5)  # inside the engine call (8 s)
        _transition(col, node, Transition.TRANSITION_DEACTIVATE)
        _transition(col, node, Transition.TRANSITION_CLEANUP)
        _transition(col, node, Transition.TRANSITION_CONFIGURE)
        t0 = time.monotonic()
        _transition(col, node, Transition.TRANSITION_ACTIVATE)
        activate_s = time.monotonic() - t0
        t1 = time.monotonic()
        state = call_service(col, GetState, f"{NS}/{NAME}/get_state", GetState.Request(), timeout=10.0)
        get_state_s = time.monotonic() - t1
        diag = latest_diagnostics(col, NAME, after=time.monotonic(), timeout=3.0)
        after = time.monotonic()
        assert col.wait_for("depth/relative", 1, timeout=60.0,
                            where=lambda m: stamp_of(m) in stream.sent_after(after)), node.log()[-3000:]
    finally:
        stream.stop()
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
    log = node.log()
    assert activate_s < 1.0, f"activate took {activate_s:.1f} s"
    assert get_state_s < 1.0 and state.current_state.label == "active", (get_state_s, state)
    assert diag["state"].startswith("waiting for the previous activation's frame"), diag
    assert code == 0, log[-3000:]
    at_once = predicts_at_once(log)
    assert at_once and max(at_once) == 1, f"engine calls running at once: {at_once}"


def test_pipelined_outputs_equal_the_serial_computation(tmp_path: Path, domain: int, col: Collector,
                                                        tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    """The node post-processes in torch on another thread; every output must still be exactly what the
    serial numpy computation gives for the node's own relative depth and normals (geometry.apply_alignment,
    visualize.colorize_depth / normals_to_rgb, backproject + pointcloud.cloud_array), and the relative depth what
    the engine gives for the image."""
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cpu",
        "dtype": "fp32", "processing_res": 64, "warmup_size": [0, 0], "qos.input.reliability": "reliable",
        "alignment.ema_alpha": 1.0, "alignment.sparse_max_dt": 0.02, "max_depth": 3.0,
    }, tmp_path / "geodiff.log", remaps=node_remaps(NS, NAME))
    topics = {"depth/relative": Image, "depth/image": Image, "depth/image_vis": Image, "normals/image": Image,
              "normals/image_vis": Image, "points": PointCloud2}
    for topic, msg_type in topics.items():
        col.subscribe(msg_type, topic)
    pubs = {"image": col.publisher(Image, "image"), "camera_info": col.publisher(CameraInfo, "camera_info"),
            "sparse_depth": col.publisher(Image, "sparse_depth")}
    rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
    intr = PinholeIntrinsics(fx, fy, cx, cy, W, H)

    def frame(stamp: int, sparse: np.ndarray | None = None) -> dict[str, object]:
        pubs["camera_info"].publish(camera_info_msg(header(stamp), W, H, fx, fy, cx, cy))
        if sparse is not None:
            pubs["sparse_depth"].publish(numpy_to_image(sparse, "32FC1", header(stamp)))
        time.sleep(0.1)
        pubs["image"].publish(numpy_to_image(rgb, "rgb8", header(stamp)))
        wanted = ("depth/image", "points") if sparse is not None else ("depth/relative",)
        for topic in wanted:
            assert col.wait_for(topic, 1, timeout=30.0, where=lambda m: stamp_of(m) == stamp), node.log()[-3000:]
        time.sleep(0.3)
        return {t: next((m for m in col.get(t) if stamp_of(m) == stamp), None) for t in topics}

    try:
        assert col.wait_matched(pubs.values(), timeout=90.0), node.log()[-3000:]
        rel0 = image_to_numpy(frame(T0)["depth/relative"]).copy()
        mask = np.zeros((H, W), bool)
        mask[::5, ::5] = True
        sparse = np.where(mask, 3.0 * rel0 + 0.5, np.nan).astype(np.float32)
        out = frame(T0 + 50_000_000, sparse)
    finally:
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
    assert code == 0, node.log()[-3000:]

    rel = image_to_numpy(out["depth/relative"])
    normals = image_to_numpy(out["normals/image"])
    engine = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=str(tiny_normals_ckpt),
                                        device="cpu", dtype="fp32", processing_res=64))
    pred = engine.predict(rgb)
    np.testing.assert_allclose(rel, pred.depth[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(normals, pred.normals[0], rtol=0, atol=1e-6)
    fit = fit_scale_shift(rel, sparse, method="ransac", min_points=20, min_inlier_ratio=0.3,
                          inlier_threshold_rel=0.1)
    state = TemporalAligner(ema_alpha=1.0).update(fit, (T0 + 50_000_000) * 1e-9)
    metric = apply_alignment(rel, state.scale, state.shift, 0.1, 3.0)
    assert np.isnan(metric).any() and np.isfinite(metric).any()  # max_depth cuts part of the scene
    np.testing.assert_array_equal(image_to_numpy(out["depth/image"]), metric)
    np.testing.assert_array_equal(image_to_numpy(out["depth/image_vis"]), colorize_depth(metric))
    np.testing.assert_array_equal(image_to_numpy(out["normals/image_vis"]), normals_to_rgb(normals))
    cloud = cloud_array(backproject(metric, intr), rgb, normals)
    points = out["points"]
    assert [f.name for f in points.fields] == list(cloud.dtype.names)
    assert bytes(points.data) == cloud.tobytes()


def test_frames_never_pile_up_behind_a_slow_engine(tmp_path: Path, domain: int, col: Collector,
                                                    tiny_depth_ckpt: Path) -> None:
    """With a camera 6x faster than the engine, what is published stays fresh: every output is at most
    three engine calls old (one in the engine, one handed to the post thread, one in the mailbox), at most three
    arrive after the camera stops, and every received frame is accounted for as processed or dropped."""
    delay = 0.3
    node = _start(domain, tiny_depth_ckpt, tmp_path / "geodiff.log", delay_s=delay)
    col.subscribe(Image, "depth/relative")
    col.subscribe(DiagnosticArray, "/diagnostics")
    stream = Stream(col, hz=20.0)
    try:
        assert col.wait_matched([stream.pub], timeout=90.0), node.log()[-3000:]
        stream.start()
        assert col.wait_for("depth/relative", 1, timeout=60.0), node.log()[-3000:]
        time.sleep(4.0)
        stream.stop()
        stopped = time.monotonic()
        time.sleep(6 * delay + 1.0)
        diag = latest_diagnostics(col, NAME, after=time.monotonic(), timeout=5.0)
    finally:
        stream.stop()
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
    assert code == 0, node.log()[-3000:]
    timed = col.get_timed("depth/relative")
    ages = [arrival - stream.sent[stamp_of(m)] for arrival, m in timed]
    assert max(ages) < 3 * delay + 0.5, f"outputs up to {max(ages):.2f} s old (engine call {delay} s)"
    after_stop = [arrival for arrival, _ in timed if arrival > stopped]
    assert len(after_stop) <= 3, f"{len(after_stop)} outputs after the camera stopped"
    received, processed, dropped = (int(diag[k]) for k in ("received", "processed", "dropped"))
    assert processed == len(timed) and received == processed + dropped, diag
    assert dropped > processed, diag  # the camera outpaced the engine, and the newest frames were the ones kept
