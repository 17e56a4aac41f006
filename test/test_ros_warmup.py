"""Start-up with a compiled engine and ``startup_mode: wait_compiled``: the node warms up (torch.compile) in its
worker on activation before serving, stays responsive meanwhile, and a restart re-uses the compiled kernels kept in
TORCHINDUCTOR_CACHE_DIR. (The default, serving while compiling, is test_ros_serving.py.)

CPU, tiny checkpoint, ``optimize=compile``: inductor compiles C++ kernels with the system compiler, so a cold
warm-up takes a minute or two on 2 cores, which is the window in which the node must answer services. Skips
where torch.compile cannot build kernels (no C++ compiler).
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.srv import GetState
from ros_helpers import (
    Collector,
    NodeProcess,
    call_service,
    header,
    module_domain_id,
    node_remaps,
    set_parameters,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import Image

from geodiff_ros.ros.conversions import numpy_to_image

NS, NAME = "/warmup", "geodiff_warmup"
W, H = 160, 120
ANSWER_S = 5.0  # a service call must be answered this fast while the worker compiles (compile: minutes)
WARMUP_RE = re.compile(r"ready: warm-up at 160x120 \(batch 1\) took ([0-9.]+) s")

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


def _kernels(cache: Path) -> set[str]:
    """Compiled kernel libraries in an inductor cache (relative paths)."""
    return {str(p.relative_to(cache)) for p in cache.rglob("*.so")}


def _start(domain: int, ckpt: Path, cache: Path, log: Path) -> NodeProcess:
    return NodeProcess(domain, {
        "model_depth": str(ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32", "processing_res": 64,
        "optimize": "compile", "startup_mode": "wait_compiled", "warmup_size": [W, H],
        "qos.input.reliability": "reliable", "diagnostics_period": 0.5,
    }, log, remaps=node_remaps(NS, NAME), extra_env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})


def test_compiled_node_answers_while_compiling_and_reuses_kernels_after_restart(
        tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    domain = module_domain_id(89)
    cache = tmp_path / "inductor"
    node = _start(domain, tiny_depth_ckpt, cache, tmp_path / "first.log")
    col = Collector(domain, namespace=NS)
    answers: list[float] = []
    try:
        col.subscribe(Image, "depth/relative")
        col.subscribe(DiagnosticArray, "/diagnostics")
        pub = col.publisher(Image, "image", depth=5)
        assert node.wait_for_log("active: listening on", timeout=90.0), node.log()[-3000:]
        # While it compiles: lifecycle and parameter services answer, and camera frames are accepted.
        stamps = []
        while "processing frames" not in node.log() and node.proc.poll() is None:
            t0 = time.monotonic()
            state = call_service(col, GetState, f"{NS}/{NAME}/get_state", GetState.Request(), timeout=30.0)
            result = set_parameters(col, f"{NS}/{NAME}", {"cloud_stride": 1 + len(answers) % 2}, timeout=30.0)[0]
            answers.append(time.monotonic() - t0)
            assert state.current_state.label == "active" and result.successful
            stamps.append(1_700_000_000_000_000_000 + len(stamps) * 10_000_000)
            pub.publish(numpy_to_image(test_scene(W, H)[0], "rgb8", header(stamps[-1])))
            time.sleep(0.5)
        first = WARMUP_RE.search(node.log())
        assert first, f"no warm-up line; log:\n{node.log()[-3000:]}"
        assert len(answers) >= 3, f"the warm-up took {first.group(1)} s: too short to check responsiveness"
        assert max(answers) < ANSWER_S, f"services answered in up to {max(answers):.1f} s while compiling"
        warming = [st for m in col.get("/diagnostics") for st in m.status if st.name.startswith(f"{NAME}:")]
        assert any("warming up" in st.message for st in warming), [st.message for st in warming]
        # The compile's progress, stage by stage, with the time so far.
        progress = [st.message for st in warming if re.search(r"compiling \(stage \d+ of \d+: .+, \d+ s\)",
                                                               st.message)]
        assert progress, [st.message for st in warming]
        # The newest frame sent during the warm-up is processed once it is over (newest-frame mailbox).
        assert col.wait_for("depth/relative", 1, timeout=60.0, where=lambda m: stamp_of(m) == stamps[-1]), \
            node.log()[-3000:]
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
        assert code == 0, node.log()[-3000:]
    finally:
        col.close()
        node.stop(signal.SIGKILL)
    kernels = _kernels(cache)
    assert kernels, f"torch.compile left no kernels in TORCHINDUCTOR_CACHE_DIR {cache}"

    # Restart on the same cache: every kernel is re-used, none is compiled again.
    again = _start(domain, tiny_depth_ckpt, cache, tmp_path / "second.log")
    try:
        assert again.wait_for_log("processing frames", timeout=300.0), again.log()[-3000:]
        second = WARMUP_RE.search(again.log())
        assert second, again.log()[-3000:]
    finally:
        code, _ = again.stop(signal.SIGINT, timeout=10.0)
    assert code == 0, again.log()[-3000:]
    assert _kernels(cache) == kernels, f"recompiled after restart: {sorted(_kernels(cache) - kernels)}"
    logging.getLogger(__name__).info(
        "warm-up: cold %s s, restart on the kept cache %s s; %d service round trips while compiling, slowest %.2f s",
        first.group(1), second.group(1), len(answers), max(answers))
