"""Faults: weights missing at start, inference raising CUDA out-of-memory, ``cuda`` without a GPU.

Start-up faults must end the process with exit code 1 and a log line that names the fix; a fault during inference
drops that frame only. The out-of-memory error is simulated by the test wrapper of ros_helpers (no hook in product
code): ``GeoDiffEngine.predict`` raises ``torch.cuda.OutOfMemoryError`` for frames marked with ``OOM_MARKER`` in
their top-left pixel. The GPU is hidden with ``CUDA_VISIBLE_DEVICES=''`` so the device cases behave the same on a
machine that has one.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    OOM_MARKER,
    Collector,
    NodeProcess,
    diagnostics_of,
    header,
    module_domain_id,
    node_remaps,
    stamp_of,
    test_scene,
    wrapped_node_program,
)
from sensor_msgs.msg import Image

from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image

W, H = 64, 48
NS, NAME = "/reliability_faults", "geodiff_faults"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def domain() -> int:
    return module_domain_id(83)


def _run_to_exit(domain: int, params: dict[str, object], log: Path, timeout: float = 90.0) -> tuple[int, str]:
    node = NodeProcess(domain, params, log, remaps=node_remaps(NS, NAME), extra_env=NO_GPU)
    try:
        code = node.proc.wait(timeout)
    finally:
        node.stop(signal.SIGKILL)
    return code, node.log()


def test_weights_missing_at_start_exit_1_naming_the_fix(tmp_path: Path, domain: int, tiny_depth_ckpt: Path) -> None:
    """A checkpoint folder whose UNet weights file is gone (an interrupted download)."""
    broken = tmp_path / "tiny-e2e-ft-depth"
    shutil.copytree(tiny_depth_ckpt, broken)
    weights = list((broken / "unet").glob("*.safetensors")) + list((broken / "unet").glob("*.bin"))
    assert weights
    for path in weights:
        path.unlink()
    code, log = _run_to_exit(domain, {"model_depth": str(broken), "model_normals": "", "device": "cpu",
                                      "dtype": "fp32", "local_files_only": True}, tmp_path / "node.log")
    assert code == 1, log[-3000:]
    errors = [ln for ln in log.splitlines() if re.match(r"\[(ERROR|FATAL)\]", ln)]
    line = next((ln for ln in errors if "configure failed" in ln), "")
    assert str(broken) in line, f"the error does not name the checkpoint folder:\n{log[-3000:]}"
    assert re.search(r"download|model_depth", line), f"the error does not say how to fix it: {line}"


def test_cuda_without_gpu_exit_1_naming_allow_cpu_fallback(tmp_path: Path, domain: int,
                                                           tiny_depth_ckpt: Path) -> None:
    code, log = _run_to_exit(domain, {"model_depth": str(tiny_depth_ckpt), "model_normals": "", "device": "cuda",
                                      "dtype": "fp32", "allow_cpu_fallback": False}, tmp_path / "node.log")
    assert code == 1, log[-3000:]
    line = next((ln for ln in log.splitlines() if "configure failed" in ln), "")
    assert "cuda" in line and "allow_cpu_fallback" in line, f"unclear device error:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def oom_node(tmp_path_factory: pytest.TempPathFactory, domain: int, tiny_depth_ckpt: Path,
             tiny_normals_ckpt: Path):
    """device cuda with allow_cpu_fallback on a machine without a (visible) GPU, OOM injected by the wrapper."""
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cuda",
        "allow_cpu_fallback": True, "dtype": "fp32", "processing_res": 64, "qos.input.reliability": "reliable",
        "diagnostics_period": 0.25,
    }, tmp_path_factory.mktemp("oom") / "geodiff.log", remaps=node_remaps(NS, NAME),
        program=wrapped_node_program(), extra_env={**NO_GPU, "GEODIFF_TEST_OOM_ON_MARKER": "1"})
    col = Collector(domain, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative")
        col.subscribe(Image, "normals/image")
        col.subscribe(DiagnosticArray, "/diagnostics")
        pub = col.publisher(Image, "image", depth=5)
        if not col.wait_matched([pub], timeout=90.0):
            pytest.fail(f"the node never subscribed; log:\n{node.log()[-3000:]}")
        yield node, col, pub
    finally:
        col.close()
        code, _ = node.stop()
        assert code == 0, node.log()[-3000:]


def test_cuda_falls_back_to_cpu_when_allowed(oom_node) -> None:
    node, col, pub = oom_node
    rgb = test_scene(W, H)[0]
    pub.publish(numpy_to_image(rgb, "rgb8", header(1_600_000_000_000_000_000)))
    assert col.wait_for("depth/relative", 1, timeout=60.0), node.log()[-3000:]
    log = node.log()
    assert re.search(r"falling back to the CPU", log, re.IGNORECASE), log[-3000:]
    assert re.search(r"engine ready: .* on cpu", log), log[-3000:]


def test_warm_up_out_of_memory_logs_the_fix_and_serves(tmp_path: Path, domain: int, tiny_depth_ckpt: Path) -> None:
    """The activation warm-up (warmup_size) fails: error naming warmup_size, then camera frames are processed."""
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32",
        "processing_res": 64, "qos.input.reliability": "reliable", "warmup_size": [96, 72],
    }, tmp_path / "geodiff.log", remaps=node_remaps(NS, NAME), program=wrapped_node_program(),
        extra_env={**NO_GPU, "GEODIFF_TEST_OOM_ON_WIDTH": "96"})
    col = Collector(domain, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative")
        pub = col.publisher(Image, "image", depth=5)
        assert col.wait_matched([pub], timeout=90.0), node.log()[-3000:]
        assert node.wait_for_log("processing frames", timeout=60.0), node.log()[-3000:]
        line = next((ln for ln in node.log().splitlines() if "warm-up" in ln), "")
        assert line.startswith("[ERROR]") and "96x72" in line and "out of memory" in line.lower(), line
        assert "warmup_size" in line, f"the error does not say how to avoid it: {line}"
        stamp = 1_600_000_002_000_000_000
        pub.publish(numpy_to_image(test_scene(W, H)[0], "rgb8", header(stamp)))
        assert col.wait_for("depth/relative", 1, timeout=30.0, where=lambda m: stamp_of(m) == stamp), \
            node.log()[-3000:]
    finally:
        col.close()
        code, _ = node.stop()
    assert code == 0, node.log()[-3000:]


def _bad_input(col: Collector, after: float, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    value = -1
    while time.monotonic() < deadline:
        got = diagnostics_of(col, NAME, after)
        if got:
            value = int(got[-1]["bad_input"])
            if value >= at_least:
                return value
        time.sleep(0.05)
    return value


def test_inference_out_of_memory_drops_that_frame_logs_and_continues(oom_node) -> None:
    node, col, pub = oom_node
    rgb = test_scene(W, H)[0]
    marked = rgb.copy()
    marked[0, 0] = OOM_MARKER
    failed = _bad_input(col, time.monotonic(), 0)
    mark = len(node.log())
    stamps = {}
    for i, kind in enumerate(["ok", "oom", "ok", "oom", "oom", "ok"]):
        stamp = 1_600_000_001_000_000_000 + i * 100_000_000
        stamps[stamp] = kind
        pub.publish(numpy_to_image(marked if kind == "oom" else rgb, "rgb8", header(stamp)))
        if kind == "ok":
            got = col.wait_for("depth/relative", 1, timeout=30.0, where=lambda m, s=stamp: stamp_of(m) == s)
            assert got, f"frame {i} after an out-of-memory error was not processed; log:\n{node.log()[-3000:]}"
        else:
            failed += 1
            assert _bad_input(col, time.monotonic(), failed) == failed, f"frame {i}: failure not counted"
    time.sleep(0.3)
    assert node.proc.poll() is None
    published = {stamp_of(m) for m in col.get("depth/relative")} | {stamp_of(m) for m in col.get("normals/image")}
    assert {s for s, k in stamps.items() if k == "ok"} <= published
    assert not {s for s, k in stamps.items() if k == "oom"} & published, "outputs published for a failed frame"
    last_ok = max(s for s, k in stamps.items() if k == "ok")
    rel = next(m for m in col.get("depth/relative") if stamp_of(m) == last_ok)
    r = image_to_numpy(rel)
    assert np.isfinite(r).all() and 0.0 <= r.min() and r.max() <= 1.0
    errors = [ln for ln in node.log()[mark:].splitlines() if re.match(r"\[(WARN|ERROR)\]", ln)]
    assert any(re.search(r"out of memory", ln, re.IGNORECASE) for ln in errors), "\n".join(errors)
