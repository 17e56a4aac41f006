"""Reliability of the node against bad input (issue 4): images, CameraInfo, sparse depth and time jumps.

One node subprocess (tiny CPU checkpoint) over real DDS. Every case checks what the issue asks for: a clear log
line (WARN/ERROR naming the problem), the offending message dropped (no output carries its stamp), the node still
running and processing the next good frame, and nothing wrong published (no metric depth or cloud that a fault
could have corrupted).

Per-frame warnings are throttled per call site (5 s in the node). The node runs inside the test wrapper of
ros_helpers with a 1 s throttle so consecutive cases can each be checked for their own log line; throttling
itself is checked by a burst. Inputs are subscribed reliable here (``qos.input.reliability``), so DDS delivers
every test message, including the 8K frame that best-effort Fast DDS never reassembles (ros2-from-pypi.md).

The tiny model's relative depth is arbitrary: sparse depth is built from the node's own ``depth/relative`` for the
scene through a known ``z = s * r + t`` (the engine is deterministic), so a correct metric output is exactly that.
"""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import Log
from ros_helpers import (
    Collector,
    NodeProcess,
    call_service,
    camera_info_msg,
    diagnostics_of,
    header,
    jpeg_announcing,
    module_domain_id,
    node_remaps,
    png_bomb,
    process_stats,
    set_parameters,
    stamp_of,
    test_scene,
    wrapped_node_program,
)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from geodiff_ros.geometry import PinholeIntrinsics
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image
from geodiff_ros.ros.pointcloud import cloud_array, cloud_to_msg, read_cloud

W, H = 160, 120
FRAME = "camera_color_optical_frame"
NS, NAME = "/reliability_inputs", "geodiff_inputs"  # own names: immune to another run sharing the domain
THROTTLE_S = 1.0  # the wrapper's throttle for per-frame warnings (the node's own is 5 s)
S, T = 3.0, 0.5  # the affine map sparse = S * relative + T of the alignment cases
OUTPUTS = {"depth/relative": Image, "depth/image": Image, "depth/camera_info": CameraInfo,
           "normals/image": Image, "points": PointCloud2, "/diagnostics": DiagnosticArray, "/rosout": Log}
PER_FRAME = ("depth/relative", "depth/image", "depth/camera_info", "normals/image", "points")


@dataclass(repr=False)  # outputs hold whole images: pytest must not repr them in a failure report
class CaseResult:
    """What one case produced: outputs per stamp, the log written during the case, the stamps it used."""

    outputs: dict[int, dict[str, Any]]
    log: str
    stamps: dict[str, int]

    def __repr__(self) -> str:
        return f"CaseResult(stamps={self.stamps})"


@dataclass(repr=False)
class Scenario:
    node: NodeProcess
    col: Collector
    pubs: dict[str, Any]
    rgb: np.ndarray
    intr: PinholeIntrinsics
    stamp_ns: int = 1_700_000_000_000_000_000
    last_case_t: float = 0.0
    cases: dict[str, CaseResult] = field(default_factory=dict)
    _relative: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Scenario(cases={list(self.cases)})"

    # ---------------------------------------------------------------- stamps and publishing

    def fresh_stamp(self, gap_s: float = 5.0) -> int:
        """A stamp ``gap_s`` after every stamp used so far: older alignment state has expired by then."""
        self.stamp_ns += int(gap_s * 1e9)
        return self.stamp_ns

    def info(self, stamp: int) -> CameraInfo:
        i = self.intr
        return camera_info_msg(header(stamp, FRAME), W, H, i.fx, i.fy, i.cx, i.cy)

    def good_image(self, stamp: int) -> Image:
        return numpy_to_image(self.rgb, "rgb8", header(stamp, FRAME))

    def publish(self, stamp: int, image: Any = None, info: Any = "default", sparse: Any = None,
                sparse_stamp: int | None = None) -> None:
        """camera_info and sparse depth first (they must be there when the image is processed), then the image."""
        if info == "default":
            info = self.info(stamp)
        if info is not None:
            info.header = header(stamp, FRAME)
            self.pubs["camera_info"].publish(info)
        if sparse is not None:
            sparse.header = header(stamp if sparse_stamp is None else sparse_stamp, FRAME)
            self.pubs["sparse_depth"].publish(sparse)
        if info is not None or sparse is not None:
            time.sleep(0.1)
        self.pubs["image"].publish(self.good_image(stamp) if image is None else image)

    def collect(self, stamp: int, expect: tuple[str, ...] = ("depth/relative", "normals/image"),
                timeout: float = 30.0, since: float = 0.0) -> dict[str, Any]:
        """{topic: output with ``stamp`` that arrived after monotonic ``since``, or None}; waits for ``expect``,
        then a grace period for the rest. ``since`` tells apart two frames with one stamp (sim time reset)."""
        def find(topic: str) -> Any:
            return next((m for t, m in self.col.get_timed(topic) if t > since and stamp_of(m) == stamp), None)

        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout  # shared: a frame that is never processed costs one timeout
        for topic in expect:
            out[topic] = find(topic)
            while out[topic] is None and time.monotonic() < deadline:
                time.sleep(0.02)
                out[topic] = find(topic)
        time.sleep(0.3)
        for topic in PER_FRAME:
            if out.get(topic) is None:
                out[topic] = find(topic)
        return out

    def frame(self, stamp: int, expect: tuple[str, ...] = ("depth/relative", "normals/image"),
              **kwargs: Any) -> dict[str, Any]:
        since = time.monotonic()
        self.publish(stamp, **kwargs)
        return self.collect(stamp, expect, since=since)

    # ---------------------------------------------------------------- cases

    def run_case(self, name: str, body: Callable[[Scenario], tuple[dict[int, dict[str, Any]], dict[str, int]]]
                 ) -> CaseResult:
        """Run ``body`` once (behaviour and log tests of one case share the run), spaced past the log throttle."""
        if name not in self.cases:
            wait = self.last_case_t + THROTTLE_S + 0.2 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            mark = len(self.node.log())
            outputs, stamps = body(self)
            time.sleep(0.2)  # log lines of the last frame reach the file
            self.cases[name] = CaseResult(outputs, self.node.log_since(mark), stamps)
            self.last_case_t = time.monotonic()
        assert self.node.proc.poll() is None, f"node exited ({self.node.proc.returncode}):\n{self.node.log()[-3000:]}"
        return self.cases[name]

    def relative(self) -> np.ndarray:
        """The node's relative depth for the scene image (computed once)."""
        if self._relative is None:
            out = self.frame(self.fresh_stamp())
            assert out["depth/relative"] is not None, self.node.log()[-3000:]
            self._relative = image_to_numpy(out["depth/relative"]).copy()
        return self._relative

    def sparse(self, scale: float = S, shift: float = T, step: int = 5) -> np.ndarray:
        """Sparse metric depth [H,W] (NaN = none) on every ``step``-th pixel: scale * relative + shift."""
        mask = np.zeros((H, W), bool)
        mask[::step, ::step] = True
        return np.where(mask, scale * self.relative() + shift, np.nan).astype(np.float32)

    def wait_diag(self, key: str, at_least: int, timeout: float = 60.0) -> int:
        """Integer /diagnostics value ``key`` once a message published from now on shows it >= ``at_least``."""
        deadline = time.monotonic() + timeout
        t = time.monotonic()
        while True:
            value = int(self.diagnostics_after(t)[key])
            if value >= at_least or time.monotonic() > deadline:
                return value
            t = time.monotonic()

    def diagnostics_after(self, t: float, timeout: float = 5.0) -> dict[str, str]:
        """Values of the first /diagnostics that arrived after monotonic time ``t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = diagnostics_of(self.col, NAME, t)
            if later:
                return later[0]
            time.sleep(0.05)
        raise AssertionError("no /diagnostics message")


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> Scenario:
    domain = module_domain_id(71)
    log = tmp_path_factory.mktemp("node") / "geodiff.log"
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cpu",
        "dtype": "fp32", "processing_res": 64, "qos.input.reliability": "reliable",
        "alignment.ema_alpha": 1.0, "alignment.sparse_max_dt": 0.02, "alignment.max_fallback_age_s": 1.0,
        "diagnostics_period": 0.3,
    }, log, remaps=node_remaps(NS, NAME), program=wrapped_node_program(),
        extra_env={"GEODIFF_TEST_LOG_THROTTLE_S": str(THROTTLE_S)})
    col = Collector(domain, namespace=NS)
    try:
        for topic, msg_type in OUTPUTS.items():
            col.subscribe(msg_type, topic)
        pubs = {t: col.publisher(m, t, depth=2) for t, m in (("image", Image), ("camera_info", CameraInfo),
                                                             ("sparse_depth", Image), ("sparse_points", PointCloud2))}
        if not col.wait_matched(pubs.values(), timeout=90.0):
            pytest.fail(f"the node never subscribed to its inputs; log:\n{node.log()[-3000:]}")
        rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
        yield Scenario(node, col, pubs, rgb, PinholeIntrinsics(fx, fy, cx, cy, W, H))
    finally:
        col.close()
        code, _ = node.stop()
        assert code == 0, f"exit code {code}; log:\n{node.log()[-3000:]}"


# -------------------------------------------------------------------------------------------------- checks

def warn_lines(log: str) -> list[str]:
    """WARN / ERROR / FATAL lines of a node log slice."""
    return [ln for ln in log.splitlines() if re.match(r"\[(WARN|ERROR|FATAL)\]", ln)]


def assert_logged(log: str, pattern: str) -> None:
    """A WARN/ERROR line matches ``pattern`` (case-insensitive): the user sees what is wrong."""
    lines = warn_lines(log)
    assert any(re.search(pattern, ln, re.IGNORECASE) for ln in lines), (
        f"no WARN/ERROR line matching {pattern!r}; warnings were:\n" + "\n".join(lines))


def assert_good(out: dict[str, Any], scn: Scenario) -> None:
    """A correctly processed frame: relative depth in [0,1] and normals, both WxH with the input frame_id."""
    rel, nrm = out["depth/relative"], out["normals/image"]
    assert rel is not None and nrm is not None, f"good frame not processed; log:\n{scn.node.log()[-3000:]}"
    assert (rel.encoding, rel.width, rel.height, rel.header.frame_id) == ("32FC1", W, H, FRAME)
    assert (nrm.encoding, nrm.width, nrm.height, nrm.header.frame_id) == ("32FC3", W, H, FRAME)
    r = image_to_numpy(rel)
    assert np.isfinite(r).all() and r.min() >= 0.0 and r.max() <= 1.0
    norms = np.linalg.norm(image_to_numpy(nrm), axis=-1)
    # Unit at the processing size; bilinear resizing back to WxH shortens them a little (spec A.1-15).
    assert np.isfinite(norms).all() and norms.max() <= 1.0 + 1e-3 and 0.9 < float(np.median(norms)) <= 1.0 + 1e-3


def assert_nothing_for(out: dict[str, Any]) -> None:
    published = [t for t in PER_FRAME if out[t] is not None]
    assert not published, f"outputs published for a dropped message: {published}"


def assert_metric(out: dict[str, Any], scale: float, shift: float) -> None:
    assert out["depth/image"] is not None, "no metric depth"
    np.testing.assert_allclose(image_to_numpy(out["depth/image"]),
                               scale * image_to_numpy(out["depth/relative"]) + shift, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------------------------- bad images

def _with(msg: Image, **fields: Any) -> Image:
    for key, value in fields.items():
        setattr(msg, key, value)
    return msg


def _bad_images(rgb: np.ndarray) -> dict[str, tuple[Callable[[int], Image], str]]:
    """name -> (message factory for a stamp, pattern its log line must match)."""
    def base(stamp: int) -> Image:
        return numpy_to_image(rgb, "rgb8", header(stamp, FRAME))

    return {
        "bayer_rggb16": (lambda s: _with(base(s), encoding="bayer_rggb16", step=W * 2, data=bytes(W * H * 2)),
                         r"bayer_rggb16' is not supported"),
        "16UC3": (lambda s: _with(base(s), encoding="16UC3", step=W * 6, data=bytes(W * H * 6)), r"16UC3"),
        "nv21": (lambda s: _with(base(s), encoding="nv21", step=W, data=bytes(W * H * 3 // 2)),
                 r"nv21' is not supported"),
        "step_short": (lambda s: _with(base(s), step=W * 3 - 3, data=bytes((W * 3 - 3) * H)), r"step"),
        "data_short": (lambda s: _with(base(s), data=bytes(W * 3 * (H - 1))), r"truncated|short"),
        "zero_width": (lambda s: _with(base(s), width=0, step=0, data=b""), rf"zero|\b0x{H}\b"),
        "zero_height": (lambda s: _with(base(s), height=0, data=b""), rf"zero|\b{W}x0\b"),
        # Issue 13, bug 12: was torch's "Kernel size can't be greater than actual input size".
        "thin_100000x1": (lambda s: numpy_to_image(np.zeros((1, 100000, 3), np.uint8), "rgb8", header(s, FRAME)),
                          r"100000x1 .*at least \d+ px"),
    }


@pytest.mark.parametrize("case", list(_bad_images(np.zeros((1, 1, 3), np.uint8))))
def test_bad_image_is_dropped_logged_and_the_next_frame_processed(scn: Scenario, case: str) -> None:
    make, pattern = _bad_images(scn.rgb)[case]

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        before = scn.wait_diag("bad_input", 0)
        scn.publish(bad, image=make(bad), info=None)
        scn.wait_diag("bad_input", before + 1)  # taken and refused before the good frame can replace it
        out_good = scn.frame(good)
        after = scn.wait_diag("bad_input", 0)
        return {bad: scn.collect(bad, expect=()), good: out_good}, {"bad": bad, "good": good,
                                                                     "bad_input_delta": after - before}

    res = scn.run_case(f"image:{case}", body)
    assert_nothing_for(res.outputs[res.stamps["bad"]])
    assert_good(res.outputs[res.stamps["good"]], scn)
    assert res.stamps["bad_input_delta"] == 1, "the dropped frame is counted once in /diagnostics bad_input"
    assert_logged(res.log, pattern)


def test_repeated_bad_images_log_once_per_throttle_period(scn: Scenario) -> None:
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        stamps = [scn.fresh_stamp(0.05) for _ in range(6)]
        for stamp in stamps:  # 6 bad frames within 0.6 s, each taken by the worker (decode fails at once)
            scn.publish(stamp, image=_with(scn.good_image(stamp), encoding="nv21", step=W,
                                           data=bytes(W * H * 3 // 2)), info=None)
            time.sleep(0.1)
        good = scn.fresh_stamp(0.1)
        return {good: scn.frame(good)}, {"good": good}

    res = scn.run_case("throttle", body)
    assert_good(res.outputs[res.stamps["good"]], scn)
    lines = [ln for ln in warn_lines(res.log) if "nv21" in ln]
    assert len(lines) == 1, "expected one throttled warning for 6 bad frames in 0.6 s, got:\n" + "\n".join(lines)


def _camera_native(rgb: np.ndarray, encoding: str, stamp: int) -> Image:
    """The scene as a camera sends it natively: a Bayer mosaic (RGGB) or packed UYVY (BT.601, video range)."""
    if encoding == "bayer_rggb8":
        raw = np.empty(rgb.shape[:2], np.uint8)
        for (dy, dx), channel in zip(((0, 0), (0, 1), (1, 0), (1, 1)), (0, 1, 1, 2), strict=True):
            raw[dy::2, dx::2] = rgb[dy::2, dx::2, channel]
    else:
        import cv2

        raw = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY)  # [H,W,2]
    msg = numpy_to_image(rgb, "rgb8", header(stamp, FRAME))
    return _with(msg, encoding=encoding, step=raw[0].nbytes, data=raw.tobytes())  # step: one row's bytes


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "uyvy"])
def test_camera_native_encodings_are_processed(scn: Scenario, encoding: str) -> None:
    """Bayer and YUV 4:2:2 frames were dropped as "not a colour encoding"; now converted (OpenCV) and processed,
    nothing counted as bad input, and the relative depth is close to that of the same scene sent as rgb8."""
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        native, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        before = scn.wait_diag("bad_input", 0)
        out_native = scn.frame(native, image=_camera_native(scn.rgb, encoding, native))
        out_good = scn.frame(good)
        after = scn.wait_diag("bad_input", 0)
        return {native: out_native, good: out_good}, {"native": native, "good": good, "bad_input": after - before}

    res = scn.run_case(f"native:{encoding}", body)
    native, good = res.outputs[res.stamps["native"]], res.outputs[res.stamps["good"]]
    assert_good(native, scn)
    assert res.stamps["bad_input"] == 0
    diff = np.abs(image_to_numpy(native["depth/relative"]) - image_to_numpy(good["depth/relative"]))
    assert float(np.median(diff)) < 0.05, float(np.median(diff))


def test_8k_frame_is_processed_or_refused_without_crashing(scn: Scenario) -> None:
    """7680x4320 rgb8 (99.5 MB): delivered here only because inputs are reliable (best effort never reassembles
    it over Fast DDS UDP). The node must either publish correct 8K outputs or log a refusal naming the size."""
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        big, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        rng = np.random.default_rng(0)
        small = scn.rgb[rng.integers(0, H, 4320 // 8)][:, rng.integers(0, W, 7680 // 8)]
        rgb8k = np.ascontiguousarray(np.repeat(np.repeat(small, 8, axis=0), 8, axis=1))  # [4320,7680,3]
        received = scn.wait_diag("received", 0)
        scn.publish(big, image=numpy_to_image(rgb8k, "rgb8", header(big, FRAME)), info=None)
        del rgb8k
        assert scn.wait_diag("received", received + 1) == received + 1, "the 8K frame never reached the node"
        time.sleep(0.5)  # the worker has taken it: the good frame cannot replace it in the mailbox
        scn.publish(good)
        out_good = scn.collect(good, timeout=240.0)  # processed after the 8K frame (one worker, in order)
        return {big: scn.collect(big, expect=()), good: out_good}, {"big": big, "good": good}

    try:
        res = scn.run_case("8k", body)
        out = res.outputs[res.stamps["big"]]
        if out["depth/relative"] is not None:
            rel = out["depth/relative"]
            assert (rel.width, rel.height, rel.encoding) == (7680, 4320, "32FC1")
            r = image_to_numpy(rel)
            assert np.isfinite(r).all() and r.min() >= 0.0 and r.max() <= 1.0
            nrm = out["normals/image"]
            assert nrm is not None and (nrm.width, nrm.height, nrm.encoding) == (7680, 4320, "32FC3")
            del rel, r, nrm
        else:
            assert_logged(res.log, r"7680")
            assert_nothing_for(out)
        del out
        assert_good(res.outputs[res.stamps["good"]], scn)
    finally:  # ~0.7 GB of 8K messages: not kept for the other cases
        scn.cases.pop("8k", None)
        scn.col.clear()


# -------------------------------------------------------------------------------------------------- CameraInfo

def _bad_infos(scn: Scenario) -> dict[str, tuple[Callable[[], CameraInfo], str]]:
    i = scn.intr

    def zero() -> CameraInfo:
        info = scn.info(0)
        info.k, info.p = [0.0] * 9, [0.0] * 12
        return info

    def nan_p() -> CameraInfo:
        info = scn.info(0)
        p = list(info.p)
        p[0] = math.nan
        info.p = p
        return info

    return {
        "size_mismatch": (lambda: camera_info_msg(header(0), 2 * W, 2 * H, 2 * i.fx, 2 * i.fy, 2 * i.cx, 2 * i.cy),
                          rf"{2 * W}x{2 * H}"),
        "all_zero_k_p": (zero, r"uncalibrated|zero"),
        "nan_in_p": (nan_p, r"nan|non-finite|finite"),
    }


@pytest.mark.parametrize("case", ["size_mismatch", "all_zero_k_p", "nan_in_p"])
def test_bad_camera_info_gives_depth_but_no_cloud(scn: Scenario, case: str) -> None:
    make, pattern = _bad_infos(scn)[case]
    sparse = scn.sparse()

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        out_bad = scn.frame(bad, expect=("depth/relative", "normals/image", "depth/image"), info=make(),
                            sparse=numpy_to_image(sparse, "32FC1"))
        out_good = scn.frame(good, expect=("depth/relative", "normals/image", "depth/image", "points",
                                           "depth/camera_info"), sparse=numpy_to_image(sparse, "32FC1"))
        return {bad: out_bad, good: out_good}, {"bad": bad, "good": good}

    res = scn.run_case(f"info:{case}", body)
    out = res.outputs[res.stamps["bad"]]
    assert_good(out, scn)
    assert_metric(out, S, T)  # depth does not need the intrinsics
    assert out["points"] is None and out["depth/camera_info"] is None  # nothing built from the bad CameraInfo
    good = res.outputs[res.stamps["good"]]
    assert good["points"] is not None and good["depth/camera_info"] is not None, "cloud back with a good CameraInfo"
    assert_logged(res.log, pattern)


# -------------------------------------------------------------------------------------------------- sparse depth

def _unusable_sparse(scn: Scenario) -> dict[str, tuple[Callable[[], Image], str]]:
    sparse = scn.sparse()
    return {
        "encoding_rgb8": (lambda: numpy_to_image(np.zeros((H, W, 3), np.uint8), "rgb8"), r"rgb8"),
        "zero_size": (lambda: _with(numpy_to_image(sparse, "32FC1"), width=0, step=0, data=b""), r"zero|0x"),
        # Another aspect ratio cannot be the image's pixel grid (e.g. depth not aligned to colour).
        "other_aspect": (lambda: numpy_to_image(np.ascontiguousarray(sparse[:, :H]), "32FC1"), rf"{H}x{H}"),
    }


def _sparse_case(kind: str) -> Callable[[Scenario], tuple[dict[int, dict[str, Any]], dict[str, int]]]:
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        make, _ = _unusable_sparse(scn)[kind]
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        scn.publish(bad, sparse=make())
        out_bad = scn.collect(bad, timeout=10.0)  # processed within ~1 s when it is processed at all
        out_good = scn.frame(good, expect=("depth/relative", "normals/image", "depth/image"),
                             sparse=numpy_to_image(scn.sparse(), "32FC1"))
        return {bad: out_bad, good: out_good}, {"bad": bad, "good": good}
    return body




@pytest.mark.parametrize("case", [
    "encoding_rgb8",
    "zero_size",
    "other_aspect",
])
def test_unusable_sparse_depth_is_ignored_and_the_image_still_processed(scn: Scenario, case: str) -> None:
    res = scn.run_case(f"sparse:{case}", _sparse_case(case))
    out = res.outputs[res.stamps["bad"]]
    assert_good(out, scn)  # the camera frame is fine: only the sparse message is dropped
    assert out["depth/image"] is None and out["points"] is None  # no metric scale from a bad message
    assert_metric(res.outputs[res.stamps["good"]], S, T)


@pytest.mark.parametrize("case", [
    "encoding_rgb8", "zero_size",
    "other_aspect",
])
def test_unusable_sparse_depth_is_logged(scn: Scenario, case: str) -> None:
    res = scn.run_case(f"sparse:{case}", _sparse_case(case))
    assert_logged(res.log, _unusable_sparse(scn)[case][1])


def test_sparse_nan_inf_negative_values_are_ignored(scn: Scenario) -> None:
    """REP 117: NaN/inf are "no measurement"; negative depth is invalid. The fit uses the valid pixels only."""
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        sparse = scn.sparse()
        holes = np.zeros((H, W), bool)
        holes[2::5, ::5] = True  # pixels that were empty (NaN) get invalid codes
        codes = np.array([np.nan, np.inf, -np.inf, -1.0, -5.0], np.float32)
        sparse[holes] = codes[np.arange(int(holes.sum())) % codes.size]
        stamp = scn.fresh_stamp()
        out = scn.frame(stamp, expect=("depth/relative", "normals/image", "depth/image"),
                        sparse=numpy_to_image(sparse, "32FC1"))
        return {stamp: out}, {"frame": stamp}

    res = scn.run_case("sparse:invalid_values", body)
    out = res.outputs[res.stamps["frame"]]
    assert_good(out, scn)
    assert_metric(out, S, T)
    depth = image_to_numpy(out["depth/image"])
    assert not np.isinf(depth).any() and not (depth <= 0).any()


def test_all_invalid_sparse_depth_gives_relative_only(scn: Scenario) -> None:
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        invalid = np.where(np.indices((H, W)).sum(0) % 2 == 0, np.nan, -2.0).astype(np.float32)
        invalid[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
        stamp = scn.fresh_stamp()
        return {stamp: scn.frame(stamp, sparse=numpy_to_image(invalid, "32FC1"))}, {"frame": stamp}

    res = scn.run_case("sparse:all_invalid", body)
    out = res.outputs[res.stamps["frame"]]
    assert_good(out, scn)
    assert out["depth/image"] is None and out["points"] is None
    assert_logged(res.log, r"no metric fit|too few|valid")


def _far_stamp(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    stamp = scn.fresh_stamp()
    out = scn.frame(stamp, sparse=numpy_to_image(scn.sparse(), "32FC1"), sparse_stamp=stamp - 10 * 10**9)
    return {stamp: out}, {"frame": stamp}


def test_sparse_depth_far_from_any_image_is_not_used(scn: Scenario) -> None:
    res = scn.run_case("sparse:far_stamp", _far_stamp)
    out = res.outputs[res.stamps["frame"]]
    assert_good(out, scn)
    assert out["depth/image"] is None and out["points"] is None


def test_sparse_depth_far_from_any_image_is_logged(scn: Scenario) -> None:
    res = scn.run_case("sparse:far_stamp", _far_stamp)
    assert_logged(res.log, r"sparse_max_dt")


def _gap(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    fit = scn.fresh_stamp()
    out_fit = scn.frame(fit, expect=("depth/relative", "normals/image", "depth/image"),
                        sparse=numpy_to_image(scn.sparse(), "32FC1"))
    held = fit + int(0.5e9)  # within alignment.max_fallback_age_s = 1.0: last fit reused
    out_held = scn.frame(held, expect=("depth/relative", "normals/image", "depth/image"))
    expired = fit + int(2.5e9)  # beyond it: relative depth only
    out_expired = scn.frame(expired)
    scn.stamp_ns = max(scn.stamp_ns, expired)
    return ({fit: out_fit, held: out_held, expired: out_expired},
            {"fit": fit, "held": held, "expired": expired})


def test_frames_without_sparse_depth_fall_back_then_go_relative_only(scn: Scenario) -> None:
    res = scn.run_case("sparse:gap", _gap)
    fit, held, expired = (res.outputs[res.stamps[k]] for k in ("fit", "held", "expired"))
    assert_metric(fit, S, T)
    assert_metric(held, S, T)  # fallback: the last fit, same scale
    assert_good(expired, scn)
    assert expired["depth/image"] is None and expired["points"] is None


def test_frames_without_sparse_depth_are_logged(scn: Scenario) -> None:
    res = scn.run_case("sparse:gap", _gap)
    assert any(re.search(r"sparse", ln, re.IGNORECASE) and re.search(r"relative|metric", ln, re.IGNORECASE)
               for ln in warn_lines(res.log)), "no warning that metric depth stopped:\n" + res.log[-2000:]


# -------------------------------------------------------------------------------------------------- issue 13

def _cloud_of(scn: Scenario, sparse: np.ndarray) -> PointCloud2:
    """The valid pixels of a sparse depth map as optical-frame points (they project back onto those pixels)."""
    v, u = np.nonzero(np.isfinite(sparse))
    z = sparse[v, u]
    i = scn.intr
    xyz = np.stack([(u - i.cx) * z / i.fx, (v - i.cy) * z / i.fy, z], axis=-1).astype(np.float32)
    return cloud_to_msg(cloud_array(xyz[None]))  # [1,N] unorganized


def _broken_cloud(msg: PointCloud2, kind: str) -> PointCloud2:
    fields = list(msg.fields)
    if kind == "offset_beyond_point_step":
        fields[2].offset = 40
    elif kind == "point_step_0":
        msg.point_step = 0
    elif kind == "duplicate_field":
        fields[1].name = "x"
    elif kind == "huge_count":
        fields[0].count = 1_000_000_000
    elif kind == "row_step_short":  # a malformed header: a row shorter than its points
        msg.row_step = msg.point_step * msg.width - 1
    elif kind == "data_short":  # a well-formed header, data cut short
        msg.data = bytes(msg.data)[: len(msg.data) // 2]
    msg.fields = fields
    return msg


def _bad_points_case(kind: str) -> Callable[[Scenario], tuple[dict[int, dict[str, Any]], dict[str, int]]]:
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        outputs = {}
        for stamp, broken in ((bad, True), (good, False)):
            cloud = _cloud_of(scn, scn.sparse())
            if broken:
                cloud = _broken_cloud(cloud, kind)
            cloud.header = header(stamp, FRAME)
            since = time.monotonic()
            scn.pubs["sparse_points"].publish(cloud)
            scn.publish(stamp)  # camera_info, then the image
            expect = ("depth/relative", "normals/image") + (() if broken else ("depth/image",))
            outputs[stamp] = scn.collect(stamp, expect, since=since)
        return outputs, {"bad": bad, "good": good}
    return body


# kind -> what its WARN says besides "sparse input ignored" (a short row_step is a malformed header, not short data)
MALFORMED_CLOUDS = {"offset_beyond_point_step": r"PointField 'z' spans bytes 40\.\.44",
                    "point_step_0": r"point_step 0", "duplicate_field": r"listed twice", "huge_count": r"spans bytes",
                    "row_step_short": r"header is malformed: row_step \d+ B is smaller than width x point_step",
                    "data_short": r"data is too short: \d+ B, but row_step x height = .*truncated"}


@pytest.mark.parametrize("kind", list(MALFORMED_CLOUDS))
def test_malformed_sparse_points_are_ignored_and_the_image_processed(scn: Scenario, kind: str) -> None:
    """Issue 13, bug 5: a ValueError from numpy used to escape and drop the camera frame."""
    res = scn.run_case(f"points:{kind}", _bad_points_case(kind))
    out = res.outputs[res.stamps["bad"]]
    assert_good(out, scn)
    assert out["depth/image"] is None and out["points"] is None  # no metric scale from a broken cloud
    assert_metric(res.outputs[res.stamps["good"]], S, T)  # a valid cloud right after is used
    assert_logged(res.log, r"sparse input ignored.*" + MALFORMED_CLOUDS[kind])


def _wrong_units(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    fit = scn.fresh_stamp()
    out_fit = scn.frame(fit, expect=("depth/relative", "normals/image", "depth/image"),
                        sparse=numpy_to_image(scn.sparse(), "32FC1"))
    wrong = fit + int(0.3e9)  # within alignment.max_fallback_age_s = 1.0 of the good fit
    out_wrong = scn.frame(wrong, expect=("depth/relative", "normals/image", "depth/image"),
                          sparse=numpy_to_image(scn.sparse() * 1e6, "32FC1"))  # micrometres sent as metres
    scn.stamp_ns = max(scn.stamp_ns, wrong)
    return {fit: out_fit, wrong: out_wrong}, {"fit": fit, "wrong": wrong}


def test_sparse_depth_in_wrong_units_is_rejected_and_the_last_fit_kept(scn: Scenario) -> None:
    """Issue 13, bug 11: the x1e6 fit was accepted and made every metric pixel NaN for max_fallback_age_s."""
    res = scn.run_case("sparse:wrong_units", _wrong_units)
    assert_metric(res.outputs[res.stamps["fit"]], S, T)
    assert_metric(res.outputs[res.stamps["wrong"]], S, T)  # the good fit is reused; nothing all-NaN
    assert_logged(res.log, r"wrong units.*max_depth|max_depth.*wrong units")


def _mm16(metres: np.ndarray, per_metre: float = 1000.0) -> Image:
    """16UC1 sparse depth holding ``metres * per_metre`` (1000: millimetres as REP 118 asks; 100: centimetres)."""
    return numpy_to_image(np.nan_to_num(np.rint(metres * per_metre), nan=0.0).astype(np.uint16), "16UC1")


def _centimetres(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    """A sensor in millimetres, then the same view from it in centimetres (a driver restarted with other units)."""
    expect = ("depth/relative", "normals/image", "depth/image")
    mm = scn.fresh_stamp()
    out_mm = scn.frame(mm, expect=expect, sparse=_mm16(scn.sparse()))
    cm = mm + int(0.3e9)  # within alignment.max_fallback_age_s = 1.0
    out_cm = scn.frame(cm, expect=expect, sparse=_mm16(scn.sparse(), per_metre=100.0))
    scn.stamp_ns = max(scn.stamp_ns, cm)
    diag = scn.diagnostics_after(time.monotonic())
    return {mm: out_mm, cm: {**out_cm, "diag": diag}}, {"mm": mm, "cm": cm}


def test_centimetres_sent_as_millimetres_are_caught_when_the_view_did_not_change(scn: Scenario) -> None:
    """16UC1 centimetres read as millimetres are 10x too small and fitted without a word before; now a fit whose
    scale jumps by a unit factor against the last good fit of the same view is refused (WARN naming the units), the
    last good fit serves on, and /diagnostics shows the sparse depth range received."""
    res = scn.run_case("sparse:centimetres", _centimetres)
    assert_metric(res.outputs[res.stamps["mm"]], S, T)
    out = res.outputs[res.stamps["cm"]]
    assert_metric(out, S, T)  # the millimetre fit, not one 10x too small
    assert_logged(res.log, r"0\.1x off.*units.*16UC1 must be millimetres")
    sparse = scn.sparse()
    ok = np.isfinite(sparse)
    lo, hi = np.percentile(np.rint(sparse[ok] * 100.0) / 1000.0, (5.0, 95.0))  # what the node receives, metres
    assert float(out["diag"]["sparse_depth_p5_m"]) == pytest.approx(lo, rel=1e-3)
    assert float(out["diag"]["sparse_depth_p95_m"]) == pytest.approx(hi, rel=1e-3)


def _close_range_and_scene_change(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    """A real tabletop 0.12-0.22 m away (consistent millimetres from the start), then another view ten times
    farther (its scale jumps by 10, as a unit error's would, but the view changed)."""
    expect = ("depth/relative", "normals/image", "depth/image")
    near = scn.fresh_stamp()
    out_near = scn.frame(near, expect=expect, sparse=_mm16(scn.sparse(scale=0.1, shift=0.12)))
    other = np.ascontiguousarray(scn.rgb[::-1, ::-1])  # another view: the model's relative depth differs
    look = near + int(0.2e9)
    first = scn.frame(look, image=numpy_to_image(other, "rgb8", header(look, FRAME)))  # its relative depth
    rel = image_to_numpy(first["depth/relative"]).astype(np.float64)
    sparse = np.full(rel.shape, np.nan, np.float32)
    sparse[::5, ::5] = 1.0 * rel[::5, ::5] + 1.2
    far = look + int(0.2e9)
    out_far = scn.frame(far, expect=expect, image=numpy_to_image(other, "rgb8", header(far, FRAME)),
                        sparse=_mm16(sparse))
    scn.stamp_ns = max(scn.stamp_ns, far)
    return {near: out_near, far: out_far}, {"near": near, "far": far}


def test_a_close_range_scene_and_a_real_tenfold_scene_change_raise_no_units_alarm(scn: Scenario) -> None:
    res = scn.run_case("sparse:close_range", _close_range_and_scene_change)
    assert_metric(res.outputs[res.stamps["near"]], 0.1, 0.12)  # 0.12..0.22 m: a tabletop, fitted
    assert_metric(res.outputs[res.stamps["far"]], 1.0, 1.2)  # ten times the scale, another view: fitted
    assert not any("off:" in line and "units" in line for line in warn_lines(res.log)), res.log[-3000:]


def test_camera_info_without_p_and_a_new_k_every_frame_warns_once(scn: Scenario) -> None:
    """Issue 13, bug 8: every new K logged an unthrottled warning (and grew an unbounded set)."""
    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        outputs = {}
        for n in range(6):
            stamp = scn.fresh_stamp(0.2)
            info = scn.info(stamp)
            k = list(info.k)
            k[0] += 0.5 * n + 0.25
            k[4] += 0.5 * n + 0.25
            info.k, info.p = k, [0.0] * 12
            outputs[stamp] = scn.frame(stamp, info=info)
        return outputs, {}

    res = scn.run_case("info:k_only_changing", body)
    for out in res.outputs.values():
        assert_good(out, scn)
    lines = [ln for ln in res.log.splitlines() if "P is unset" in ln]
    assert len(lines) == 1, "expected one (throttled) warning for 6 new K values:\n" + "\n".join(lines)
    # Through the node's ROS logger: a WARN line with its name, and on /rosout (it went to bare stderr, via
    # Python logging, so rqt_console and a /rosout recorder never saw it).
    assert re.match(rf"\[WARN\] \[[\d.]+\] \[{NS[1:]}\.{NAME}\]: CameraInfo P is unset", lines[0]), lines[0]
    deadline = time.monotonic() + 5.0
    while not (rosout := [m for m in scn.col.get("/rosout") if "P is unset" in m.msg]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rosout) == 1, [m.msg for m in rosout]
    assert rosout[0].name == f"{NS[1:]}.{NAME}" and rosout[0].level == Log.WARN, rosout[0]


def _set(scn: Scenario, **values: Any) -> None:
    results = set_parameters(scn.col, f"{NS}/{NAME}", {k.replace("__", "."): v for k, v in values.items()})
    assert all(r.successful for r in results), [r.reason for r in results]


def test_raw_image_above_max_input_pixels_is_dropped_naming_the_parameter(scn: Scenario) -> None:
    """Issue 13, bug 4 (raw input): width x height from the message, checked before conversion."""
    limit = W * H - 1

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        before = scn.wait_diag("bad_input", 0)
        _set(scn, max_input_pixels=limit)
        try:
            scn.publish(bad, info=None)
            scn.wait_diag("bad_input", before + 1)
        finally:
            _set(scn, max_input_pixels=40_000_000)
        out_good = scn.frame(good)
        return {bad: scn.collect(bad, expect=()), good: out_good}, {"bad": bad, "good": good}

    res = scn.run_case("limit:raw", body)
    assert_nothing_for(res.outputs[res.stamps["bad"]])
    assert_good(res.outputs[res.stamps["good"]], scn)
    assert_logged(res.log, rf"{W}x{H} .*max_input_pixels = {limit}")
    # Exact counts: the sizes read "0.0 MP, above max_input_pixels = 19199 (0.0 MP)" for a limit this small.
    assert_logged(res.log, rf"{W}x{H} = {W * H} px \(0.0192 MP\), above max_input_pixels = {limit} \(0.0192 MP\)")
    assert "0.0 MP" not in res.log


def _expected_rectified(rgb: np.ndarray, info: CameraInfo) -> np.ndarray:
    """The image rectified the way image_geometry does it (OpenCV maps, bilinear, black border)."""
    import cv2

    k = np.asarray(info.k, np.float64).reshape(3, 3)
    p = np.asarray(info.p, np.float64).reshape(3, 4)[:, :3]
    m1, m2 = cv2.initUndistortRectifyMap(k, np.asarray(info.d, np.float64), np.eye(3), p, (W, H), cv2.CV_16SC2)
    return cv2.remap(rgb, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_rectify_processes_the_rectified_image_and_publishes_its_camera_info(scn: Scenario) -> None:
    """rectify: true with a distorted CameraInfo: the cloud's colours are the rectified image (what the network
    saw) and depth/camera_info describes it (D = 0, R = I, K = P)."""
    distortion = [-0.25, 0.07, 0.001, -0.001, 0.0]

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        stamp = scn.fresh_stamp()
        info = scn.info(stamp)
        info.d = distortion
        _set(scn, rectify=True, alignment__fixed_scale=2.0)  # fixed scale: a cloud without sparse depth
        try:
            out = scn.frame(stamp, expect=("depth/relative", "normals/image", "depth/camera_info", "points"),
                            info=info)
        finally:
            _set(scn, rectify=False, alignment__fixed_scale=0.0)
        return {stamp: out}, {"frame": stamp}

    res = scn.run_case("rectify", body)
    out = res.outputs[res.stamps["frame"]]
    assert_good(out, scn)
    info_out = out["depth/camera_info"]
    assert info_out is not None and out["points"] is not None, scn.node.log()[-3000:]
    p = np.asarray(info_out.p).reshape(3, 4)
    assert not np.any(info_out.d) and np.allclose(np.asarray(info_out.r).reshape(3, 3), np.eye(3))
    np.testing.assert_allclose(np.asarray(info_out.k).reshape(3, 3), p[:, :3])
    packed = read_cloud(out["points"])["rgb"].view(np.uint32).reshape(H, W)
    colours = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.uint8)
    distorted = scn.info(0)
    distorted.d = distortion
    expected = _expected_rectified(scn.rgb, distorted)
    np.testing.assert_array_equal(colours, expected)
    assert np.abs(colours.astype(int) - scn.rgb).mean() > 5.0  # and that is not the raw image


def test_depth_encoding_16uc1_publishes_millimetres(scn: Scenario) -> None:
    """depth_encoding: 16UC1 (REP 118, for consumers that take only 16-bit depth): depth/image in rounded
    millimetres, 0 where the metric depth is invalid; switched at runtime, back to 32FC1 metres after."""

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        mm_stamp, m_stamp = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        _set(scn, depth_encoding="16UC1", alignment__fixed_scale=30.0, max_depth=25.0)
        try:
            out_mm = scn.frame(mm_stamp, expect=("depth/relative", "normals/image", "depth/image"))
        finally:
            _set(scn, depth_encoding="32FC1", alignment__fixed_scale=0.0, max_depth=100.0)
        _set(scn, alignment__fixed_scale=30.0, max_depth=25.0)
        try:
            out_m = scn.frame(m_stamp, expect=("depth/relative", "normals/image", "depth/image"))
        finally:
            _set(scn, alignment__fixed_scale=0.0, max_depth=100.0)
        return {mm_stamp: out_mm, m_stamp: out_m}, {"mm": mm_stamp, "m": m_stamp}

    res = scn.run_case("depth_encoding", body)
    out_mm, out_m = res.outputs[res.stamps["mm"]], res.outputs[res.stamps["m"]]
    assert out_mm["depth/image"] is not None and out_m["depth/image"] is not None, scn.node.log()[-3000:]
    assert out_mm["depth/image"].encoding == "16UC1" and out_m["depth/image"].encoding == "32FC1"
    mm = image_to_numpy(out_mm["depth/image"])
    metres = np.float32(30.0) * image_to_numpy(out_mm["depth/relative"]).astype(np.float32)  # fixed scale, shift 0
    valid = (metres > 0.1) & (metres <= 25.0)
    assert valid.any() and (~valid).any(), "the frame should have depths on both sides of max_depth"
    np.testing.assert_array_equal(mm[valid], np.rint(metres[valid].astype(np.float64) * 1000.0).astype(np.uint16))
    assert not mm[~valid].any()  # invalid -> 0
    assert out_mm["depth/image"].step == 2 * out_mm["depth/image"].width


LIDAR_POSE = [0.1, -0.3, 0.05, *np.round(np.array([0.2, -0.1, 0.3, 0.9]) / np.linalg.norm([0.2, -0.1, 0.3, 0.9]),
                                          12)]  # the "lidar" frame's pose in the camera optical frame


def _lidar_cloud(scn: Scenario, stamp: int) -> PointCloud2:
    """The scene's sparse points expressed in a "lidar" frame (inverse of LIDAR_POSE), stamped ``stamp``."""
    from geodiff_ros.geometry.transform import RigidTransform

    optical = read_cloud(_cloud_of(scn, scn.sparse())).reshape(-1)
    xyz = np.stack([optical["x"], optical["y"], optical["z"]], -1).astype(np.float64)  # [N,3] camera frame
    pose = RigidTransform(LIDAR_POSE)
    lidar = (xyz - pose.translation) @ pose.rotation  # R^T (p - t): camera -> lidar
    cloud = cloud_to_msg(cloud_array(lidar.astype(np.float32)[None]))
    cloud.header = header(stamp, "lidar")
    return cloud


def test_sparse_points_in_a_lidar_frame_use_the_static_extrinsic(scn: Scenario) -> None:
    """A cloud in its own frame: without sparse_points.frame_id/transform it is ignored with a WARN that names
    both parameters (and the frame is processed); with them it gives the metric fit, as in the image frame."""

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        unknown, known = scn.fresh_stamp(), scn.fresh_stamp()
        outputs = {}
        for stamp in (unknown, known):
            if stamp == known:
                _set(scn, sparse_points__frame_id="lidar", sparse_points__transform=LIDAR_POSE)
            try:
                since = time.monotonic()
                scn.pubs["sparse_points"].publish(_lidar_cloud(scn, stamp))
                scn.publish(stamp)
                expect = ("depth/relative", "normals/image") + (("depth/image",) if stamp == known else ())
                outputs[stamp] = scn.collect(stamp, expect, since=since)
            finally:
                if stamp == known:
                    _set(scn, sparse_points__frame_id="", sparse_points__transform=[0.0] * 6 + [1.0])
        return outputs, {"unknown": unknown, "known": known}

    res = scn.run_case("points:lidar_frame", body)
    out = res.outputs[res.stamps["unknown"]]
    assert_good(out, scn)
    assert out["depth/image"] is None
    assert_logged(res.log, r"frame 'lidar'.*sparse_points\.frame_id.*sparse_points\.transform.*tf2_echo")
    assert_metric(res.outputs[res.stamps["known"]], S, T)


def test_a_transform_that_is_not_one_is_refused_naming_the_format(scn: Scenario) -> None:
    for bad in ([0.0] * 7, [0.0, 0.0, 1.0]):
        (result,) = set_parameters(scn.col, f"{NS}/{NAME}", {"sparse_points.transform": bad})
        assert not result.successful and "[x, y, z, qx, qy, qz, qw]" in result.reason, result.reason


# -------------------------------------------------------------------------------------------------- time jumps

def _backwards(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    fit = scn.fresh_stamp()
    out_fit = scn.frame(fit, expect=("depth/relative", "normals/image", "depth/image"),
                        sparse=numpy_to_image(scn.sparse(), "32FC1"))
    back = fit - 60 * 10**9  # bag loop: stamps restart a minute earlier
    out_back = scn.frame(back)
    refit = back + int(0.1e9)
    out_refit = scn.frame(refit, expect=("depth/relative", "normals/image", "depth/image"),
                          sparse=numpy_to_image(scn.sparse(5.0, 1.0), "32FC1"))
    return ({fit: out_fit, back: out_back, refit: out_refit}, {"fit": fit, "back": back, "refit": refit})


def test_time_going_backwards_resets_alignment_and_processing_continues(scn: Scenario) -> None:
    res = scn.run_case("time:backwards", _backwards)
    fit, back, refit = (res.outputs[res.stamps[k]] for k in ("fit", "back", "refit"))
    assert_metric(fit, S, T)
    assert_good(back, scn)
    # The fit from "the future" is not carried across the jump (within the 1 s fallback it would be).
    assert back["depth/image"] is None
    assert_metric(refit, 5.0, 1.0)  # a new fit after the jump is used as is


def test_time_going_backwards_is_logged(scn: Scenario) -> None:
    res = scn.run_case("time:backwards", _backwards)
    assert_logged(res.log, r"backwards|jump")


def _sim_reset(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    """Run 1 has sparse depth at t0 and t1; the simulator resets to t0 (new scene); run 2 has its own sparse
    depth only from t1 on."""
    t0 = scn.fresh_stamp()
    t1 = t0 + 10**9
    run1 = [scn.frame(t, expect=("depth/relative", "normals/image", "depth/image"),
                      sparse=numpy_to_image(scn.sparse(), "32FC1")) for t in (t0, t1)]
    reset = scn.frame(t0)  # no sparse depth of run 2 yet
    again = scn.frame(t1, expect=("depth/relative", "normals/image", "depth/image"),
                      sparse=numpy_to_image(scn.sparse(5.0, 1.0), "32FC1"))
    scn.stamp_ns = max(scn.stamp_ns, t1)
    return {0: run1[0], 1: run1[1], 2: reset, 3: again}, {}


def test_sim_time_reset_prefers_the_new_runs_sparse_depth(scn: Scenario) -> None:
    res = scn.run_case("time:sim_reset", _sim_reset)
    assert_metric(res.outputs[1], S, T)
    assert_metric(res.outputs[3], 5.0, 1.0)  # run 2's sparse depth at t1, not run 1's at the same stamp


def test_sim_time_reset_does_not_reuse_sparse_depth_of_the_previous_run(scn: Scenario) -> None:
    res = scn.run_case("time:sim_reset", _sim_reset)
    out = res.outputs[2]
    assert_good(out, scn)
    assert out["depth/image"] is None, "the frame after the reset was scaled with the previous run's sparse depth"


# -------------------------------------------------------------------------------------------------- compressed

def _jpeg(rgb: np.ndarray, stamp: int) -> CompressedImage:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=90)
    msg = CompressedImage(format="rgb8; jpeg compressed rgb8")
    msg.header = header(stamp, FRAME)
    msg.data = buf.getvalue()
    return msg


def _lifecycle(scn: Scenario, *transitions: int) -> None:
    for transition in transitions:
        req = ChangeState.Request()
        req.transition.id = transition
        res = call_service(scn.col, ChangeState, f"{NS}/{NAME}/change_state", req, timeout=60.0)
        assert res.success, f"transition {transition} failed; log:\n{scn.node.log()[-3000:]}"


def _set_transport(scn: Scenario, transport: str) -> None:
    _lifecycle(scn, Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP)
    (res,) = set_parameters(scn.col, f"{NS}/{NAME}", {"input_transport": transport})
    assert res.successful, res.reason
    _lifecycle(scn, Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE)


@pytest.fixture(scope="module")
def compressed(scn: Scenario) -> Any:
    """The node switched to input_transport compressed through the lifecycle for the tests below (they run last),
    and back to raw at the end of the module; yields the image/compressed publisher."""
    pub = scn.col.publisher(CompressedImage, "image/compressed", depth=2)
    mark = len(scn.node.log())
    _set_transport(scn, "compressed")
    try:
        assert Collector.wait_matched([pub], timeout=30.0)
        # Until the activation warm-up is over, a newer frame replaces an older one in the one-slot mailbox: a
        # case's bad frame would never be looked at.
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            log = scn.node.log_since(mark)
            if "processing frames" in log[log.find("(compressed, "):]:
                break
            time.sleep(0.1)
        yield pub
    finally:
        _set_transport(scn, "raw")


def test_corrupt_jpeg_is_dropped_logged_and_the_next_frame_processed(scn: Scenario, compressed: Any) -> None:
    pub = compressed

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        truncated, garbage, good = scn.fresh_stamp(), scn.fresh_stamp(0.1), scn.fresh_stamp(0.1)
        msg = _jpeg(scn.rgb, truncated)
        msg.data = bytes(msg.data)[: len(msg.data) // 2]  # cut mid-scan
        pub.publish(msg)
        time.sleep(0.5)
        msg = _jpeg(scn.rgb, garbage)
        data = bytearray(msg.data)
        data[200:] = np.random.default_rng(1).integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
        msg.data = bytes(data)  # JPEG header, random entropy-coded data
        pub.publish(msg)
        time.sleep(0.5)
        pub.publish(_jpeg(scn.rgb, good))
        out_good = scn.collect(good)
        return ({truncated: scn.collect(truncated, expect=()), garbage: scn.collect(garbage, expect=()),
                 good: out_good}, {"truncated": truncated, "garbage": garbage, "good": good})

    res = scn.run_case("jpeg", body)
    assert_nothing_for(res.outputs[res.stamps["truncated"]])
    garbage = res.outputs[res.stamps["garbage"]]
    if garbage["depth/relative"] is not None:
        # Random entropy-coded data can still decode to a (noisy) picture: then it is a valid image.
        assert_good(garbage, scn)
    good = res.outputs[res.stamps["good"]]
    assert_good(good, scn)
    assert_logged(res.log, r"decode|jpeg|truncated")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _corrupt_frames(rgb: np.ndarray) -> dict[str, tuple[str, bytes, str]]:
    """name -> (format, data, what the WARN must quote from the decoder). Each passes the header checks (size
    within max_input_pixels) and only the decoder can tell it is broken."""
    jpeg = bytes(_jpeg(rgb, 0).data)
    png = _png(rgb)
    idat = png.index(b"IDAT") + 4
    garbled = bytearray(png)
    garbled[idat + 2:idat + 200] = np.random.default_rng(3).integers(0, 256, 198, dtype=np.uint8).tobytes()
    return {
        # A 631-byte JPEG announcing 6300x6300 (39.7 MP, under the 40 MP limit): an almost blank picture was
        # published, libjpeg's "Corrupt JPEG data" on stderr the only trace.
        "jpeg_631_bytes_6300x6300": ("jpeg", jpeg_announcing(6300, 6300), r"Corrupt JPEG data"),
        # Cut mid-scan, then closed with an end-of-image marker: the missing part came out grey.
        "jpeg_cut_then_closed": ("jpeg", jpeg[: len(jpeg) // 2] + b"\xff\xd9", r"Corrupt JPEG data"),
        "png_truncated": ("png", png[: len(png) // 2], r"image file is truncated"),
        "png_garbled_idat": ("png", bytes(garbled), r"broken data stream|decoder error|invalid"),
    }


@pytest.mark.parametrize("case", list(_corrupt_frames(np.zeros((8, 8, 3), np.uint8))))
def test_corrupt_compressed_frame_is_bad_input_with_the_decoders_message(scn: Scenario, compressed: Any,
                                                                         case: str) -> None:
    """The decoder's own error (libjpeg-turbo warnings stop the decode; Pillow raises on truncated or broken PNG
    data), not a guess from the pixels: the frame is dropped and counted in bad_input, the WARN quotes the decoder,
    and no decoder message reaches raw stderr (libjpeg's and libpng's used to)."""
    fmt, data, pattern = _corrupt_frames(scn.rgb)[case]

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        before = scn.wait_diag("bad_input", 0)
        msg = CompressedImage(format=f"rgb8; {fmt} compressed rgb8", data=data)
        msg.header = header(bad, FRAME)
        compressed.publish(msg)
        counted = scn.wait_diag("bad_input", before + 1, timeout=30.0) - before
        compressed.publish(_jpeg(scn.rgb, good))
        out_good = scn.collect(good)
        return {bad: scn.collect(bad, expect=()), good: out_good}, {"bad": bad, "good": good, "counted": counted}

    res = scn.run_case(f"corrupt:{case}", body)
    assert_nothing_for(res.outputs[res.stamps["bad"]])
    assert res.stamps["counted"] == 1, "the corrupt frame is counted once in /diagnostics bad_input"
    assert_good(res.outputs[res.stamps["good"]], scn)
    assert_logged(res.log, rf"dropped a frame: cannot decode compressed {fmt.upper()} .*({pattern})")
    decoders = r"Corrupt JPEG|premature end|libpng|grfmt_|PNG input buffer|IDAT"  # libjpeg, libpng, OpenCV's log
    raw = [ln for ln in res.log.splitlines() if re.search(decoders, ln) and not ln.startswith("[WARN]")]
    assert not raw, "decoder messages on raw stderr:\n" + "\n".join(raw)


class RssPeak:
    """Peak resident memory of a process, sampled every 20 ms while in the ``with`` block (kB above the start)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.start, self.peak = pid, process_stats(pid)["rss_kb"], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, process_stats(self.pid)["rss_kb"] - self.start)
            except (OSError, StopIteration):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1.0)


# 14000x14000 for the PNG: also above Pillow's own bomb limit (179 MP), so the pre-fix node refused it quickly
# (with Pillow's error, not naming max_input_pixels) instead of spending gigabytes on a shared test machine.
BOMBS = {"jpeg_631_bytes_13000x13000": ("jpeg", lambda: jpeg_announcing(13000, 13000), "13000x13000"),
         "png_14000x14000": ("png", lambda: png_bomb(14000, 14000), "14000x14000")}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_compressed_bomb_is_dropped_from_its_header(scn: Scenario, compressed: Any, bomb: str) -> None:
    """Issue 13, bug 4: a 631-byte JPEG announcing 13000x13000 took the node from 0.5 to 6-10 GB for 20-40 s.
    Now it is refused from the header: no memory spent, a WARN naming the limit and the parameter."""
    fmt, make, size = BOMBS[bomb]
    data = make()

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        bad, good = scn.fresh_stamp(), scn.fresh_stamp(0.1)
        before = scn.wait_diag("bad_input", 0)
        msg = CompressedImage(format=f"rgb8; {fmt} compressed rgb8", data=data)
        msg.header = header(bad, FRAME)
        with RssPeak(scn.node.proc.pid) as rss:
            compressed.publish(msg)
            scn.wait_diag("bad_input", before + 1, timeout=120.0)
        compressed.publish(_jpeg(scn.rgb, good))
        out_good = scn.collect(good)
        return {bad: scn.collect(bad, expect=()), good: out_good}, {"bad": bad, "good": good, "rss_kb": rss.peak}

    res = scn.run_case(f"bomb:{bomb}", body)
    assert_nothing_for(res.outputs[res.stamps["bad"]])
    assert_good(res.outputs[res.stamps["good"]], scn)
    assert_logged(res.log, rf"{size} .*max_input_pixels = 40000000")
    assert res.stamps["rss_kb"] < 150_000, f'node memory rose by {res.stamps["rss_kb"] / 1e3:.0f} MB'


def test_large_compressed_input_is_decoded_reduced_with_its_camera_info(scn: Scenario, compressed: Any) -> None:
    """reduce_large_input: a 640x480 JPEG at processing_res 64 (>= 4x) is decoded at 1/4 (160x120, still >= 2x
    processing_res); the outputs have that size and depth/camera_info is the CameraInfo scaled by exactly 1/4."""
    rgb, _, (fx, fy, cx, cy) = test_scene(640, 480)

    def body(scn: Scenario) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
        stamp = scn.fresh_stamp()
        since = time.monotonic()
        scn.pubs["camera_info"].publish(camera_info_msg(header(stamp, FRAME), 640, 480, fx, fy, cx, cy))
        time.sleep(0.1)
        compressed.publish(_jpeg(rgb, stamp))
        return {stamp: scn.collect(stamp, ("depth/relative", "depth/camera_info"), since=since)}, {"frame": stamp}

    res = scn.run_case("reduced", body)
    out = res.outputs[res.stamps["frame"]]
    rel, info = out["depth/relative"], out["depth/camera_info"]
    assert rel is not None and info is not None, scn.node.log()[-3000:]
    assert (rel.width, rel.height) == (160, 120) and (info.width, info.height) == (160, 120)
    np.testing.assert_allclose(np.asarray(info.p).reshape(3, 4)[:2, :3],
                               [[fx / 4, 0.0, cx / 4], [0.0, fy / 4, cy / 4]], rtol=1e-9)
