"""Start-up of a compiled node (engine/serving.py through ros/worker.py): it publishes from the first camera frame
while it compiles, says what serves and what is compiling in /diagnostics, and switches to the compiled path; a
restart on geodiff_compile's AOT packages serves even when one of them is a library that crashes whatever loads it.

CPU, tiny checkpoint, ``optimize=compile`` (inductor builds C++ kernels with the system compiler: minutes on 2
cores). Skips without a C++ compiler.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from aot_helpers import crashing_library, replace_library
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import Collector, NodeProcess, header, module_domain_id, node_remaps, stamp_of, test_scene
from sensor_msgs.msg import Image

from geodiff_ros.ros.conversions import numpy_to_image

NS, NAME = "/serving", "geodiff_serving"
W, H = 160, 120

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


def _start(domain: int, ckpt: Path, tmp: Path, log: str, aot: Path) -> NodeProcess:
    return NodeProcess(domain, {
        "model_depth": str(ckpt), "model_normals": "", "device": "cpu", "dtype": "fp32", "processing_res": 64,
        "optimize": "compile", "warmup_size": [W, H], "qos.input.reliability": "reliable", "diagnostics_period": 0.5,
    }, tmp / log, remaps=node_remaps(NS, NAME),
        extra_env={"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "GEODIFF_AOT_DIR": str(aot)})


class _Camera:
    """Publishes a frame every 0.25 s (new stamps) until stopped."""

    def __init__(self, col: Collector) -> None:
        self.pub = col.publisher(Image, "image", depth=5)
        self.stamps: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rgb = test_scene(W, H)[0]
        while not self._stop.wait(0.25):
            self.stamps.append(1_700_000_000_000_000_000 + len(self.stamps) * 10_000_000)
            self.pub.publish(numpy_to_image(rgb, "rgb8", header(self.stamps[-1])))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _values(msg: DiagnosticArray) -> list[dict[str, str]]:
    return [{kv.key: kv.value for kv in st.values} | {"message": st.message}
            for st in msg.status if st.name.startswith(f"{NAME}:")]


def test_compiled_node_publishes_while_compiling_then_switches(tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    domain = module_domain_id(91)
    node = _start(domain, tiny_depth_ckpt, tmp_path, "node.log", tmp_path / "no-packages")
    col = Collector(domain, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative")
        col.subscribe(DiagnosticArray, "/diagnostics")
        assert node.wait_for_log("active: listening on", timeout=120.0), node.log()[-3000:]
        camera = _Camera(col)
        # Published from the first frames, long before a cold compile on the CPU could finish (minutes).
        early = col.wait_for("depth/relative", 3, timeout=90.0)
        assert len(early) >= 3, node.log()[-3000:]
        deadline = time.monotonic() + 120.0
        compiling: list[dict[str, str]] = []
        while not compiling and time.monotonic() < deadline:  # the builder first waits for inductor's workers
            statuses = [v for m in col.get("/diagnostics") for v in _values(m)]
            compiling = [v for v in statuses if re.match(r"serving eager, compiling \S+ batch 1 \(\d+ of \d+, \d+ s\)",
                                                         v.get("serving", ""))]
            time.sleep(0.5)
        assert compiling and all(v["optimised"] == "false" for v in compiling), statuses[-3:]
        assert "now serving" not in node.log()  # really served before the switch
        assert any("compiling" in v["message"] for v in compiling)  # the status message says it too
        # Then the compiled path (and no more eager frames): diagnostics flip, the log says when.
        deadline = time.monotonic() + 900.0
        while time.monotonic() < deadline and node.proc.poll() is None:
            if any(v.get("optimised") == "true" for m in col.get("/diagnostics")[-4:] for v in _values(m)):
                break
            time.sleep(1.0)
        assert "batch 1: now serving compiled" in node.log(), node.log()[-3000:]
        switched = camera.stamps[-1]  # a frame sent after the switch comes back
        assert col.wait_for("depth/relative", 1, timeout=60.0, where=lambda m: stamp_of(m) > switched), \
            node.log()[-3000:]
        camera.stop()
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
        assert code == 0, node.log()[-3000:]
    finally:
        col.close()
        node.stop(signal.SIGKILL)


def test_node_on_aot_packages_serves_even_with_a_crashing_package(tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    """A node started on a cache with geodiff_compile's packages loads them (no crash: each is checked in a child
    process first); the UNet's package is a library that kills whatever loads it, and the node still publishes,
    logs why that package is not used, and exits cleanly."""
    aot = tmp_path / "aot"
    done = subprocess.run([sys.executable, "-m", "geodiff_ros.cli.compile", "--model-depth", str(tiny_depth_ckpt),
                           "--model-normals", "", "--device", "cpu", "--dtype", "fp32", "--processing-res", "64",
                           "--size", f"{W}x{H}", "--optimize", "compile", "--out", str(aot)],
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile")})
    assert done.returncode == 0, done.stderr[-3000:]
    packages = {__import__("json").loads(p.with_suffix(".json").read_text())["stage"]: p for p in aot.glob("*.pt2")}
    assert set(packages) == {"vae-encoder[shared]", "unet[depth]", "vae-decoder[shared]"}, packages
    replace_library(packages["unet[depth]"], crashing_library(tmp_path))

    domain = module_domain_id(92)
    node = _start(domain, tiny_depth_ckpt, tmp_path, "aot.log", aot)
    col = Collector(domain, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative")
        assert node.wait_for_log("active: listening on", timeout=120.0), node.log()[-3000:]
        camera = _Camera(col)
        assert len(col.wait_for("depth/relative", 3, timeout=120.0)) >= 3, node.log()[-3000:]
        assert node.wait_for_log("compiles as usual", timeout=180.0), node.log()[-3000:]
        log = node.log()
        assert re.search(r"AOT package \S+unet\S+ not used \(its check in a child process failed \(killed by "
                         r"SIGSEGV", log), log[-3000:]
        assert "loaded AOT package vae-encoder" in log, log[-3000:]
        assert node.proc.poll() is None
        camera.stop()
        code, _ = node.stop(signal.SIGINT, timeout=10.0)
        assert code == 0, node.log()[-3000:]
    finally:
        col.close()
        node.stop(signal.SIGKILL)
