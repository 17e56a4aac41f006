"""Reliability under load: images at 30 Hz while the worker needs several frame periods per frame.

Latest-frame semantics: the worker always takes the newest frame, older ones are dropped and
counted, so latency stays bounded and nothing queues up. Measured from outside over DDS: send times of each
stamp, arrival times of ``depth/relative``, and the counters in /diagnostics. Inputs are subscribed reliable
(``qos.input.reliability``) so DDS itself loses nothing and the node's drop counter can be compared exactly with
the sent count (reader history of 1 s, see the fixture). The module ends with SIGTERM mid-frame.
"""

from __future__ import annotations

import bisect
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from diagnostic_msgs.msg import DiagnosticArray
from ros_helpers import (
    Collector,
    NodeProcess,
    child_pids,
    header,
    latest_diagnostics,
    module_domain_id,
    node_remaps,
    stamp_of,
    test_scene,
    threads_at_exit,
    wrapped_node_program,
)
from sensor_msgs.msg import Image

from geodiff_ros.ros.conversions import numpy_to_image

W, H = 160, 120
RATE_HZ = 30.0
STREAM_S = 8.0
PROCESSING_RES = 448  # ~0.6 s per frame on 2 CPU cores with the tiny model: ~20 frame periods
EXIT_BUDGET_S = 2.0
NS, NAME = "/reliability_load", "geodiff_load"  # own names: immune to another run sharing the domain


@dataclass
class Node:
    proc: NodeProcess
    col: Collector
    pub: object
    rgb: np.ndarray


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> Node:
    domain = module_domain_id(73)
    proc = NodeProcess(domain, {
        "model_depth": str(tiny_depth_ckpt), "model_normals": str(tiny_normals_ckpt), "device": "cpu",
        "dtype": "fp32", "processing_res": PROCESSING_RES, "diagnostics_period": 0.25,
        # Reliable with 1 s of reader history: on 2 busy cores the node's executor thread can stall for more than
        # the default 5 frames, and frames DDS overwrites in the reader queue never reach the node's counters.
        "qos.input.reliability": "reliable", "qos.input.depth": 30,
    }, tmp_path_factory.mktemp("load") / "geodiff.log", remaps=node_remaps(NS, NAME),
        program=wrapped_node_program())
    col = Collector(domain, namespace=NS)
    try:
        col.subscribe(Image, "depth/relative", depth=1000)
        col.subscribe(DiagnosticArray, "/diagnostics", depth=1000)
        pub = col.publisher(Image, "image", depth=10)
        if not col.wait_matched([pub], timeout=90.0):
            pytest.fail(f"the node never subscribed to image; log:\n{proc.log()[-3000:]}")
        yield Node(proc, col, pub, test_scene(W, H)[0])
    finally:
        col.close()
        proc.stop(signal.SIGKILL)


class Streamer:
    """Publishes the scene at ``RATE_HZ`` on a fixed schedule; records the send time of every stamp."""

    def __init__(self, node: Node, first_stamp: int) -> None:
        self.node = node
        self.sent: list[tuple[int, float]] = []  # (stamp, time.monotonic() right after publish)
        self._stamp = first_stamp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period = 1.0 / RATE_HZ
        t_next = time.monotonic()
        while not self._stop.is_set():
            self._stamp += int(period * 1e9)
            self.node.pub.publish(numpy_to_image(self.node.rgb, "rgb8", header(self._stamp)))
            self.sent.append((self._stamp, time.monotonic()))
            t_next += period
            time.sleep(max(t_next - time.monotonic(), 0.0))

    def __enter__(self) -> Streamer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _settled_diagnostics(col: Collector, received: int, timeout: float = 20.0) -> dict[str, str]:
    """/diagnostics once every received frame is accounted for (processed, dropped or bad)."""
    deadline = time.monotonic() + timeout
    values: dict[str, str] = {}
    while time.monotonic() < deadline:
        values = latest_diagnostics(col, NAME, time.monotonic(), timeout=5.0)
        done = sum(int(values[k]) for k in ("processed", "dropped", "bad_input"))
        if int(values["received"]) >= received and done >= int(values["received"]):
            return values
    return values


def test_30hz_on_a_slow_worker_newest_frame_bounded_latency_exact_drops(node: Node) -> None:
    col = node.col
    # Warm-up frame (first inference is slower), then the counters before the stream.
    first = 1_700_000_000_000_000_000
    node.pub.publish(numpy_to_image(node.rgb, "rgb8", header(first)))
    assert col.wait_for("depth/relative", 1, timeout=60.0), node.proc.log()[-3000:]
    before = _settled_diagnostics(col, 1)
    n_out_before = len(col.get("depth/relative"))

    with Streamer(node, first + 10**9) as stream:
        time.sleep(STREAM_S)
    t_stop = time.monotonic()
    sent = list(stream.sent)
    send_time = dict(sent)
    after = _settled_diagnostics(col, int(before["received"]) + len(sent))
    time.sleep(0.5)  # the last output (published before the counters settled) reaches us
    outs = [(t, stamp_of(m)) for t, m in col.get_timed("depth/relative")[n_out_before:]]
    log = node.proc.log()[-3000:]
    assert len(outs) >= 5, f"only {len(outs)} outputs in {STREAM_S} s; log:\n{log}"

    # Exact accounting: every sent frame was received (reliable), then either published or counted as dropped.
    delta = {k: int(after[k]) - int(before[k]) for k in ("received", "processed", "dropped", "bad_input")}
    assert delta["received"] == len(sent), f'DDS delivered {delta["received"]} of {len(sent)} frames'
    assert delta["bad_input"] == 0
    assert len(outs) == delta["processed"], "published count differs from the processed counter"
    assert len(outs) + delta["dropped"] == len(sent), f'published {len(outs)} + dropped {delta["dropped"]} != ' \
        f'sent {len(sent)}'
    assert delta["dropped"] > len(sent) // 2, "the worker was not slower than the stream: nothing tested"

    # Newest frame: after publishing frame k the worker takes the frame that arrived last. From outside, the
    # next processed frame is the newest one sent before frame k's output arrived, while a FIFO would take the
    # frame after frame k, sent about one processing time (gap) earlier; the last frame sent is the last processed.
    gaps = [b[0] - a[0] for a, b in zip(outs, outs[1:], strict=False)]
    gap = statistics.median(gaps)  # ~ processing time per frame
    send_times = [t for _, t in sent]
    offsets = []  # send time of the next processed frame - send time of the newest frame sent before output k
    for (t_k, _), (_, s_next) in zip(outs, outs[1:], strict=False):
        newest = send_times[bisect.bisect_right(send_times, t_k) - 1]
        assert send_time[s_next] <= t_k + 0.1, "a frame sent after the output was taken before it"
        offsets.append(send_time[s_next] - newest)
    # The worker is pipelined (engine thread + post thread): the engine takes the next frame as soon as it has
    # finished frame k, before frame k's output is published, and DDS delivery and our own receipt lag on 2 busy
    # cores. So a single output that reaches us late shifts one offset by that lag (CI saw one offset of -1.9 gaps
    # among 13 zeros). An old-frame policy (a FIFO, or keeping the first frame) shifts every offset by about one
    # processing time: most offsets must be within 0.7 gap of the newest frame.
    stale = [off for off in offsets if off < -0.7 * gap]
    assert len(stale) <= max(1, len(offsets) // 5), (
        f"send time of the next processed frame relative to the newest one sent before the previous output: "
        f"{offsets} (processing ~{gap:.3f} s/frame); about one processing time earlier means an old frame")
    assert statistics.median(offsets) >= -0.1, f"the next processed frame is usually not the newest: {offsets}"
    assert outs[-1][1] == sent[-1][0], "the last frame sent was not the last one processed"

    # Bounded latency that does not grow; nothing left queued once the stream stops.
    latency = [t - send_time[s] for t, s in outs]
    # Typical frame: waits at most about one processing time, then is processed. Single frames are slowed by the
    # other processes on 2 cores (seen in full-suite runs: one frame at 2.3 s and one at 3.2 s, gap 0.6-0.8 s), so
    # the bound is on the 90th percentile; a FIFO queue fails it and the trend (latency grows ~gap per frame).
    assert statistics.median(latency) <= 2.0 * gap + 0.3, f"median latency {statistics.median(latency):.3f} s"
    p90 = sorted(latency)[int(0.9 * (len(latency) - 1))]
    assert p90 <= 3.0 * gap + 0.5, f"p90 latency {p90:.3f} s > 3 x {gap:.3f} s + 0.5 s: {latency}"
    third = max(1, len(latency) // 3)
    assert statistics.median(latency[-third:]) <= statistics.median(latency[:third]) + gap, (
        f"latency grows over the stream: {latency}")
    # No queue: the newest-frame check above bounds each frame's wait by the executor lag; a FIFO's wait grows
    # with every frame. And once the stream stops at most the frame in progress and the newest one follow.
    late = [t for t, _ in outs if t > t_stop]
    assert len(late) <= 2, f"{len(late)} outputs after the stream stopped: frames were queued"
    assert all(t <= t_stop + 2.5 * gap + 0.3 for t in late)


def test_sigterm_under_load_exits_0_within_2s_without_threads_left(node: Node) -> None:
    """Runs last (stops the module's node). The signal lands while a frame is being processed."""
    n0 = len(node.col.get("depth/relative"))
    with Streamer(node, 1_800_000_000_000_000_000):
        assert len(node.col.wait_for("depth/relative", n0 + 2, timeout=60.0)) >= n0 + 2
        n1 = len(node.col.get("depth/relative"))
        assert len(node.col.wait_for("depth/relative", n1 + 1, timeout=30.0)) > n1
        time.sleep(0.1)  # the worker took the next frame right after that output: it is mid-inference now
        children = child_pids(node.proc.proc.pid)
        code, elapsed = node.proc.stop(signal.SIGTERM, timeout=10.0)
    log = node.proc.log()
    assert code == 0, f"exit code {code}; log:\n{log[-3000:]}"
    assert elapsed < EXIT_BUDGET_S, f"SIGTERM exit took {elapsed:.2f} s"
    threads = threads_at_exit(log)
    assert threads is not None, f"the node did not exit through its shutdown path; log:\n{log[-3000:]}"
    assert not [t for t in threads if t.startswith("geodiff")], f"node threads still running at exit: {threads}"
    assert all(not Path(f"/proc/{c}").exists() for c in children), "child processes outlived the node"
