"""Bag replay through the real node: node, player and recorder are three processes talking over DDS.

The plain-pytest twin of test_launch_depth.py (which needs ROS 2 ``launch``, not installable here). The node runs
with a tiny CPU checkpoint; ``geodiff_bag play`` publishes a bag, ``geodiff_bag record`` stores the node's outputs,
and the recorded bag is checked: topics, types, encodings, stamps equal to the input stamps, cloud size, metric
alignment, exit codes.

The tiny model's relative depth is arbitrary, so metric alignment is checked in two passes: pass 1 records the
node's ``depth/relative`` for the bag's images; pass 2 replays the same images (later stamps) with a sparse depth
built as ``S * relative + T``, and the node's ``depth/image`` must then be exactly that (the engine is
deterministic for the same image).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from ros_helpers import (
    LoggedProcess,
    NodeProcess,
    module_domain_id,
    ros_env,
    run_dir,
    shared_data_dir,
)

from geodiff_ros.bag.storage import BagWriter, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image_fields
from geodiff_ros.ros.pointcloud import read_cloud

DOMAIN = module_domain_id(67)
S, T = 2.5, 0.8  # pass 2's sparse depth = S * relative + T
# The node runs in a namespace of its own and the player remaps the bag's topics into it: test runs of other
# checkouts on this machine may share our domain by chance, and must not feed or read our topics.
NS = f"/geodiff_replay_{os.getpid()}"
OUTPUTS = ("depth/relative", "depth/image", "depth/camera_info", "normals/image", "points")
NODE_PARAMS = {"device": "cpu", "dtype": "fp32", "processing_res": 64, "alignment.sparse_max_dt": 0.02}


def inputs_in(ns: str) -> dict[str, str]:
    """Bag topic -> the node's input topic in namespace ``ns``."""
    return {IMAGE_TOPIC: f"{ns}/image", INFO_TOPIC: f"{ns}/camera_info", DEPTH_TOPIC: f"{ns}/sparse_depth"}


def outputs_in(ns: str, names: tuple[str, ...] = OUTPUTS) -> tuple[str, ...]:
    return tuple(f"{ns}/{n}" for n in names)


def replay_env(domain: int) -> dict[str, str]:
    """ros_helpers.ros_env plus the profile variable Fast DDS 2.14 actually reads (big images, best effort)."""
    env = ros_env(domain)
    env["FASTRTPS_DEFAULT_PROFILES_FILE"] = env["FASTDDS_DEFAULT_PROFILES_FILE"]
    return env


def stamp_ns(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


class BagTool(LoggedProcess):
    """``python -m geodiff_ros.bag.cli ...`` with its output in a log file (polled for readiness)."""

    poll_s = 0.05

    def __init__(self, domain: int, log: Path, *args: str) -> None:
        super().__init__([sys.executable, "-m", "geodiff_ros.bag.cli", *args], log, replay_env(domain), run_dir())

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._log.close()
            pytest.fail(f"{self.proc.args[3]} did not finish in {timeout} s; log:\n{self.log_path.read_text()[-3000:]}")
        self._log.close()
        return code


def play_and_record(domain: int, tmp: Path, bag: Path, play_topics: list[str], record_topics: tuple[str, ...],
                    count: int, remaps: dict[str, str] | None = None, timeout: float = 90.0,
                    player_cmd: list[str] | None = None, rate: float = 1.0) -> Path:
    """Start a recorder (stops itself after ``count`` messages per topic), play ``bag``, return the recorded bag.

    ``player_cmd`` replaces geodiff_bag play (e.g. ``ros2 bag play`` where rosbag2 exists).
    """
    out = tmp / f"rec_{bag.name}_{len(list(tmp.iterdir()))}"
    rec = BagTool(domain, tmp / f"{out.name}_recorder.log", "record", str(out), "--topics", *record_topics,
                  "--count", str(count))
    # 'matched': the recorder's subscriptions have met the node's publishers, so no output is lost to discovery.
    assert rec.wait_log("matched ", len(record_topics), timeout=30.0), f"recorder not ready:\n{rec.log()}"
    if player_cmd is None:
        args = ["play", str(bag), "--topics", *play_topics, "--wait-subscribers", "1", "--wait-timeout", "30",
                "--rate", str(rate)]
        if remaps:
            args += ["--remap", *(f"{a}:={b}" for a, b in remaps.items())]
        player = BagTool(domain, tmp / f"{out.name}_player.log", *args)
        assert player.finish(timeout) == 0, f"player failed:\n{player.log()}"
    else:
        subprocess.run(player_cmd, env=replay_env(domain), check=True, timeout=timeout)
    assert rec.finish(timeout) == 0, f"recorder failed:\n{rec.log()}"
    return out


def read_bag(path: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    with open_bag(path) as bag:
        for raw in bag.messages():
            out.setdefault(raw.topic, []).append(bag.deserialize(raw))
    return out


def sparse_bag(src: Path, relative: dict[int, np.ndarray], out: Path, shift_s: float, step: int = 4) -> Path:
    """Images and camera_info of ``src`` with stamps + ``shift_s``, and a 32FC1 sparse depth S * relative + T
    (every ``step``-th pixel) published 20 ms before each image (the node matches sparse by stamp)."""
    shift = int(shift_s * 1e9)
    with open_bag(src) as bag, BagWriter(out) as writer:
        types = writer.typestore.types
        for raw in bag.messages([IMAGE_TOPIC, INFO_TOPIC]):
            msg = bag.deserialize(raw)
            old = stamp_ns(msg)
            new = old + shift
            msg.header.stamp = types["builtin_interfaces/msg/Time"](sec=new // 1_000_000_000,
                                                                      nanosec=new % 1_000_000_000)
            writer.write_msg(raw.topic, raw.timestamp + shift, msg)
            if raw.topic == IMAGE_TOPIC:
                rel = relative[old]  # [H,W]
                sparse = np.full(rel.shape, np.nan, np.float32)
                sparse[::step, ::step] = S * rel[::step, ::step] + T
                fields = numpy_to_image_fields(sparse, "32FC1")
                fields["data"] = np.frombuffer(fields["data"], np.uint8)
                writer.write_msg(DEPTH_TOPIC, raw.timestamp + shift - 20_000_000,
                                 types["sensor_msgs/msg/Image"](header=msg.header, **fields))
    return out


def check_two_pass(domain: int, tmp: Path, bag: Path, ns: str, player_cmd: Any = None) -> None:
    """The whole scenario against a node running in namespace ``ns``; ``player_cmd(bag, remaps)`` -> argv
    replaces geodiff_bag play."""
    with open_bag(bag) as b:
        n = b.topics[IMAGE_TOPIC].count
        inputs = [b.deserialize(m) for m in b.messages([IMAGE_TOPIC])]
    remaps = inputs_in(ns)
    rel_topic, depth_topic, info_topic, normals_topic, points_topic = outputs_in(ns)
    # Pass 1: relative depth of each image.
    pass1 = {k: v for k, v in remaps.items() if k != DEPTH_TOPIC}
    cmd = player_cmd(bag, pass1) if player_cmd else None
    rec1 = read_bag(play_and_record(domain, tmp, bag, [IMAGE_TOPIC, INFO_TOPIC], (rel_topic,), n, remaps=pass1,
                                    player_cmd=cmd))
    relative = {stamp_ns(m): image_to_numpy(m).copy() for m in rec1[rel_topic]}
    assert sorted(relative) == sorted(stamp_ns(m) for m in inputs)  # every frame, with the input stamps
    # Pass 2: sparse depth = S * relative + T -> metric depth must be exactly that.
    bag2 = sparse_bag(bag, relative, tmp / f"{bag.name}_sparse", shift_s=100.0)
    cmd = player_cmd(bag2, remaps) if player_cmd else None
    rec2 = read_bag(play_and_record(domain, tmp, bag2, [IMAGE_TOPIC, INFO_TOPIC, DEPTH_TOPIC], outputs_in(ns), n,
                                    remaps=remaps, player_cmd=cmd))
    for topic in outputs_in(ns):
        assert len(rec2[topic]) == n, f"{topic}: {len(rec2[topic])} of {n}"
    want = {stamp_ns(m) + 100_000_000_000: m for m in inputs}
    for topic in outputs_in(ns):
        for msg in rec2[topic]:
            assert stamp_ns(msg) in want and msg.header.frame_id == want[stamp_ns(msg)].header.frame_id
    assert {m.encoding for m in rec2[rel_topic] + rec2[depth_topic]} == {"32FC1"}
    assert {m.encoding for m in rec2[normals_topic]} == {"32FC3"}
    depth = {stamp_ns(m): image_to_numpy(m) for m in rec2[depth_topic]}
    for stamp, metric in depth.items():
        expected = S * relative[stamp - 100_000_000_000] + T
        ok = np.isfinite(metric)
        assert ok.mean() > 0.95
        np.testing.assert_allclose(metric[ok], expected[ok], rtol=1e-3, atol=1e-3)  # metric alignment
    for cloud in rec2[points_topic]:
        img = want[stamp_ns(cloud)]
        assert (cloud.height, cloud.width) == (img.height, img.width)  # organized, one point per pixel
        pts = read_cloud(cloud)
        np.testing.assert_allclose(pts["z"], depth[stamp_ns(cloud)], equal_nan=True)
    for info in rec2[info_topic]:
        assert (info.width, info.height) == (want[stamp_ns(info)].width, want[stamp_ns(info)].height)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> NodeProcess:
    os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = replay_env(DOMAIN)["FASTRTPS_DEFAULT_PROFILES_FILE"]
    proc = NodeProcess(DOMAIN, {**NODE_PARAMS, "model_depth": str(tiny_depth_ckpt),
                                "model_normals": str(tiny_normals_ckpt)},
                       tmp_path_factory.mktemp("node") / "geodiff.log", remaps={"__ns": NS})
    if not proc.wait_for_log("processing frames", timeout=120.0):  # active and warmed up
        proc.stop()
        pytest.fail(f"node did not become active; log:\n{proc.log()[-3000:]}")
    yield proc
    proc.stop()


def test_synthetic_bag_two_pass_metric_replay(node: NodeProcess, tmp_path: Path) -> None:
    # Frames 1 s apart: the node keeps only the newest frame while busy (by design), and on 2 loaded CPU cores
    # its first, warm-up frame can take longer than a camera period; every frame must come back here.
    bag = write_synthetic_bag(tmp_path / "synth", frames=3, width=160, height=120, period_s=1.0)
    check_two_pass(DOMAIN, tmp_path, bag, NS)
    assert node.proc.poll() is None, node.log()[-2000:]


def test_shared_tum_sqlite3_bag_replays(node: NodeProcess, tmp_path: Path) -> None:
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data not present (the synthetic bag test covers the scenario)")
    bag = data / "bags" / "tum_fr2_desk_rgbd_sqlite3"
    topics = outputs_in(NS, ("depth/relative", "normals/image", "depth/camera_info"))
    remaps = {k: v for k, v in inputs_in(NS).items() if k != DEPTH_TOPIC}
    rec = read_bag(play_and_record(DOMAIN, tmp_path, bag, [IMAGE_TOPIC, INFO_TOPIC], topics, 2, remaps=remaps,
                                   rate=0.1))  # 0.1 s apart in the bag: 1 s apart here (newest-frame policy)
    with open_bag(bag) as b:
        stamps = sorted(stamp_ns(b.deserialize(m)) for m in b.messages([IMAGE_TOPIC]))
    for topic in topics:
        assert sorted(stamp_ns(m) for m in rec[topic]) == stamps  # both 640x480 frames, input stamps
        assert all((m.width, m.height) == (640, 480) for m in rec[topic])


def test_node_exits_cleanly_after_replay(node: NodeProcess) -> None:
    assert node.proc.poll() is None, f"node died during the replays; log:\n{node.log()[-3000:]}"
    code, elapsed = node.stop(signal.SIGINT)
    assert code == 0 and elapsed < 2.0, f"exit {code} after {elapsed:.2f} s; log:\n{node.log()[-2000:]}"
