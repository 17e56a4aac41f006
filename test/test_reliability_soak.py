"""Soak: 10,000 small frames as fast as the node takes them; no growth in memory, threads or fds.

Every 10th frame comes with a CameraInfo and sparse depth, and ``depth/image`` and ``points`` have a subscriber,
so decode, inference, alignment, the cloud and all publishers run many times. Frames go out in batches as fast
as the node takes them: before the next batch the sender waits for the node's ``received`` counter (/diagnostics
at 10 Hz) to catch up, so the reader history (reliable, 50) never overflows, the node gets every frame and only
its own latest-frame mailbox drops them. Resident memory (VmRSS), threads
(/proc/<pid>/task) and file descriptors (/proc/<pid>/fd) of the node process are read after a warm-up and at the
end. The module ends with SIGINT under load.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    Collector,
    NodeProcess,
    camera_info_msg,
    child_pids,
    header,
    latest_diagnostics,
    module_domain_id,
    node_remaps,
    process_stats,
    stamp_of,
    test_scene,
    threads_at_exit,
    wrapped_node_program,
)
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image

pytestmark = pytest.mark.soak

W, H = 32, 24
N_FRAMES = 10_000
WARMUP = 1_000
BATCH = 30  # frames per batch; at most BATCH + MAX_BEHIND are queued in the node's reader history of 50
MAX_BEHIND = 10  # frames sent but not yet taken by the node when the next batch starts
MAX_RSS_GROWTH_MB = 50.0
NS, NAME = "/reliability_soak", "geodiff_soak"
EXIT_BUDGET_S = 2.0

@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path):
    domain = module_domain_id(79)
    node = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cpu",
        "dtype": "fp32", "processing_res": 16, "qos.input.reliability": "reliable", "qos.input.depth": 50,
        "alignment.sparse_max_dt": 0.02, "diagnostics_period": 0.1,
    }, tmp_path_factory.mktemp("soak") / "geodiff.log", remaps=node_remaps(NS, NAME),
        program=wrapped_node_program())
    col = Collector(domain, namespace=NS)
    try:
        for topic, msg_type in (("depth/relative", Image), ("depth/image", Image), ("points", PointCloud2)):
            col.subscribe(msg_type, topic, depth=5)
        col.subscribe(DiagnosticArray, "/diagnostics", depth=5)
        pubs = {t: col.publisher(m, t, depth=50) for t, m in (("image", Image), ("camera_info", CameraInfo),
                                                              ("sparse_depth", Image))}
        if not col.wait_matched(pubs.values(), timeout=90.0):
            pytest.fail(f"the node never subscribed; log:\n{node.log()[-3000:]}")
        yield node, col, pubs
    finally:
        col.close()
        node.stop(signal.SIGKILL)


def test_soak_10k_frames_no_growth_in_memory_threads_or_fds(soak) -> None:
    node, col, pubs = soak
    rgb, _, (fx, fy, cx, cy) = test_scene(W, H)
    pid = node.proc.pid
    stamp0 = 1_700_000_000_000_000_000

    # The node's relative depth for this (fixed) image, so the sparse depth gives a real metric fit.
    pubs["image"].publish(numpy_to_image(rgb, "rgb8", header(stamp0)))
    first = col.wait_for("depth/relative", 1, timeout=60.0)
    assert first, node.log()[-3000:]
    mask = np.zeros((H, W), bool)
    mask[::2, ::2] = True
    sparse = numpy_to_image(np.where(mask, 3.0 * image_to_numpy(first[0]) + 0.5, np.nan).astype(np.float32),
                            "32FC1")

    samples: list[tuple[int, dict[str, int]]] = []
    t0 = time.monotonic()
    for i in range(1, N_FRAMES):
        stamp = stamp0 + i * 10_000_000  # 100 Hz stamps
        hdr = header(stamp)
        if i % 10 == 0:
            pubs["camera_info"].publish(camera_info_msg(hdr, W, H, fx, fy, cx, cy))
            sparse.header = hdr
            pubs["sparse_depth"].publish(sparse)
        pubs["image"].publish(numpy_to_image(rgb, "rgb8", hdr))
        if i % BATCH == 0:  # frames 0..i sent: wait until the node has taken all but MAX_BEHIND of them
            deadline = time.monotonic() + 30.0
            while int(latest_diagnostics(col, NAME, 0.0, timeout=10.0)["received"]) < i + 1 - MAX_BEHIND:
                assert time.monotonic() < deadline, f"the node stopped taking frames at {i}; {node.log()[-2000:]}"
                time.sleep(0.01)
        if i == WARMUP or i % 2000 == 0:
            samples.append((i, process_stats(pid)))
    send_s = time.monotonic() - t0
    time.sleep(1.5)  # the last frames are processed; the worker is idle
    samples.append((N_FRAMES, process_stats(pid)))
    diag = latest_diagnostics(col, NAME, time.monotonic(), timeout=10.0)

    warm = dict(samples)[WARMUP]
    end = samples[-1][1]
    trace = ", ".join(f'{i}: {s["rss_kb"] / 1024:.0f} MB/{s["threads"]} thr/{s["fds"]} fd' for i, s in samples)
    assert node.proc.poll() is None, node.log()[-3000:]
    assert (end["rss_kb"] - warm["rss_kb"]) / 1024 < MAX_RSS_GROWTH_MB, f"resident memory grew: {trace}"
    assert end["threads"] <= warm["threads"], f"threads grew: {trace}"
    assert end["fds"] <= warm["fds"], f"file descriptors grew: {trace}"
    # Every frame reached the node and is accounted for; the pipeline really ran, with metric output and clouds.
    counts = {k: int(diag[k]) for k in ("received", "processed", "dropped", "bad_input", "metric_frames")}
    assert counts["received"] == N_FRAMES, (counts, send_s)
    assert counts["processed"] + counts["dropped"] == counts["received"] and counts["bad_input"] == 0, counts
    assert counts["processed"] >= 100 and counts["metric_frames"] >= 10, counts
    assert col.get("points"), "no cloud published during the soak"
    assert stamp_of(col.get("depth/relative")[-1]) == stamp0 + (N_FRAMES - 1) * 10_000_000  # the newest, last


def test_sigint_under_load_exits_0_within_2s_without_threads_left(soak) -> None:
    """Runs last (stops the module's node): frames keep coming while SIGINT lands during inference."""
    node, col, pubs = soak
    rgb = test_scene(W, H)[0]
    stop = threading.Event()

    def stream() -> None:
        stamp = 1_800_000_000_000_000_000
        while not stop.is_set():
            stamp += 10_000_000
            pubs["image"].publish(numpy_to_image(rgb, "rgb8", header(stamp)))
            time.sleep(0.005)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        n0 = len(col.get("depth/relative"))
        assert len(col.wait_for("depth/relative", n0 + 3, timeout=30.0)) >= n0 + 3, node.log()[-3000:]
        children = child_pids(node.proc.pid)
        code, elapsed = node.stop(signal.SIGINT, timeout=10.0)
    finally:
        stop.set()
        thread.join(2.0)
    log = node.log()
    assert code == 0, f"exit code {code}; log:\n{log[-3000:]}"
    assert elapsed < EXIT_BUDGET_S, f"SIGINT exit took {elapsed:.2f} s"
    threads = threads_at_exit(log)
    assert threads is not None, f"the node did not exit through its shutdown path; log:\n{log[-3000:]}"
    assert not [t for t in threads if t.startswith("geodiff")], f"node threads still running at exit: {threads}"
    assert all(not Path(f"/proc/{c}").exists() for c in children), "child processes outlived the node"
