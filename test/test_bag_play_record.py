"""``geodiff_bag play`` and ``geodiff_bag record`` as subprocesses over real DDS (loopback, own domain).

A test-side rclpy node (ros_helpers.Collector) receives what the player publishes and publishes what the
recorder should store; the bytes on both sides must equal the bag's / the published messages' CDR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from ros_helpers import Collector, camera_info_msg, header, module_domain_id, ros_env, run_dir
from rosbags.interfaces import QosReliability
from rosbags.typesys import get_types_from_msg
from sensor_msgs.msg import CameraInfo, Image

from geodiff_ros.bag.storage import BagWriter, jazzy_typestore, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.ros.conversions import numpy_to_image

DOMAIN = module_domain_id(61)
# Test runs of other checkouts on this machine may share a domain by chance: keep our topic names our own.
NS = f"/bagtest_{os.getpid()}"
CAM, INFO, RATE, LOOP = f"{NS}/cam/image", f"{NS}/cam/camera_info", f"{NS}/rate/image", f"{NS}/loop/image"


def _env() -> dict[str, str]:
    env = ros_env(DOMAIN)
    # Fast DDS 2.14 (Jazzy) reads FASTRTPS_DEFAULT_PROFILES_FILE only: without it 640x480 best effort is lossy.
    env["FASTRTPS_DEFAULT_PROFILES_FILE"] = env["FASTDDS_DEFAULT_PROFILES_FILE"]
    return env


def _bag_tool(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "geodiff_ros.bag.cli", *args], cwd=run_dir(), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"geodiff_bag did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def col() -> Collector:
    os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = _env()["FASTRTPS_DEFAULT_PROFILES_FILE"]
    collector = Collector(DOMAIN, name="bag_play_record_test")
    yield collector
    collector.close()


@pytest.fixture(scope="module")
def vga_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 frames of 640x480 rgb8 (921 KB each, larger than Fast DDS's default 512 KB shared-memory segment)."""
    return write_synthetic_bag(tmp_path_factory.mktemp("vga") / "vga", frames=4, width=640, height=480)


def test_best_effort_play_loses_nothing_and_sends_the_bag_bytes(col: Collector, vga_bag: Path) -> None:
    raw_images: list[bytes] = []
    col.node.create_subscription(Image, CAM, raw_images.append,
                                 QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT), raw=True)
    col.subscribe(CameraInfo, INFO, reliable=False)
    proc = _bag_tool("play", str(vga_bag), "--qos", "best_effort", "--topics", IMAGE_TOPIC, INFO_TOPIC,
                     "--remap", f"{IMAGE_TOPIC}:={CAM}", f"{INFO_TOPIC}:={INFO}", "--wait-subscribers", "1",
                     "--wait-timeout", "20")
    code, out, err = _finish(proc)
    assert code == 0, err
    infos = col.wait_for(INFO, 4, timeout=10.0)
    deadline = time.monotonic() + 5.0
    while len(raw_images) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(raw_images) == 4 and len(infos) == 4, err  # nothing lost: the player waited for the subscription
    with open_bag(vga_bag) as bag:
        stored = [bytes(m.data) for m in bag.messages([IMAGE_TOPIC])]
        info0 = bag.deserialize(next(iter(bag.messages([INFO_TOPIC]))))
    assert raw_images == stored  # the bag's CDR went out unchanged (byte for byte, padding included)
    assert list(infos[0].k) == list(info0.k) and infos[0].header.frame_id == info0.header.frame_id
    assert CAM in out and "published" in out
    assert DEPTH_TOPIC not in out  # --topics left it out


def test_rate_and_loop(col: Collector, tmp_path: Path) -> None:
    bag = write_synthetic_bag(tmp_path / "b", frames=4, period_s=0.2)  # 0.6 s of bag time
    col.subscribe(Image, RATE)
    arrivals: list[float] = []
    proc = _bag_tool("play", str(bag), "--topics", IMAGE_TOPIC, "--remap", f"{IMAGE_TOPIC}:={RATE}",
                     "--rate", "0.5", "--wait-subscribers", "1")
    code, _, err = _finish(proc)
    assert code == 0, err
    msgs = col.wait_for(RATE, 4, timeout=5.0)
    assert len(msgs) == 4
    # at half speed the 0.6 s of bag time take 1.2 s; receive times are not kept by Collector, so replay again
    # with a probe that timestamps arrivals
    col.node.create_subscription(Image, LOOP, lambda _m: arrivals.append(time.monotonic()), 10)
    proc = _bag_tool("play", str(bag), "--topics", IMAGE_TOPIC, "--remap", f"{IMAGE_TOPIC}:={LOOP}",
                     "--rate", "0.5", "--loop", "--wait-subscribers", "1")
    deadline = time.monotonic() + 40.0
    while len(arrivals) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc, timeout=10.0)
    assert code == 0, err
    assert len(arrivals) >= 6  # more than one pass of 4 frames: it looped
    first_pass = arrivals[3] - arrivals[0]
    assert 0.9 < first_pass < 2.5, first_pass  # 0.6 s of bag time at rate 0.5 = 1.2 s
    assert "interrupted" in out


def test_clock_publishes_the_bag_time(col: Collector, tmp_path: Path) -> None:
    """--clock: /clock runs through the bag's time span (use_sim_time nodes see the recorded stamps as now)."""
    from rosgraph_msgs.msg import Clock

    bag = write_synthetic_bag(tmp_path / "c", frames=5, period_s=0.25)  # 1 s of bag time
    with open_bag(bag) as b:
        times = [m.timestamp for m in b.messages([IMAGE_TOPIC])]
    ticks: list[int] = []
    col.node.create_subscription(
        Clock, "/clock", lambda m: ticks.append(m.clock.sec * 1_000_000_000 + m.clock.nanosec),
        QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT))  # as rclpy's TimeSource subscribes
    col.subscribe(Image, f"{NS}/clock/image")
    proc = _bag_tool("play", str(bag), "--topics", IMAGE_TOPIC, "--remap", f"{IMAGE_TOPIC}:={NS}/clock/image",
                     "--clock", "20", "--wait-subscribers", "1", "--wait-timeout", "20")
    code, _, err = _finish(proc)
    assert code == 0, err
    time.sleep(0.3)
    assert len(ticks) >= 10, f"{len(ticks)} /clock messages for 1 s of bag played at 20 Hz"
    assert ticks == sorted(ticks), "bag time went backwards within one pass"
    assert times[0] <= ticks[0] < times[0] + 200_000_000
    assert times[-1] - 200_000_000 < ticks[-1] < times[-1] + 500_000_000  # flush: a little past the last message
    code, _, err = _finish(_bag_tool("play", str(bag), "--clock", "-5"))
    assert code == 2 and "clock rate" in err


def test_unknown_types_are_skipped_or_refused(col: Collector, tmp_path: Path) -> None:
    store = jazzy_typestore()
    store.register(get_types_from_msg("uint32 a\n", "geodiff_test_msgs/msg/Blob"))
    bag = tmp_path / "blob"
    with BagWriter(bag, typestore=store) as w:
        w.write_msg("/blob", 1, store.types["geodiff_test_msgs/msg/Blob"](a=1))
        w.write_msg("/status", 2, store.types["std_msgs/msg/String"](data="ok"))
    code, out, err = _finish(_bag_tool("play", str(bag)))
    assert code == 0, err
    assert "not playing /blob" in err and "geodiff_test_msgs/msg/Blob is not installed" in err
    assert "/status" in out
    code, _, err = _finish(_bag_tool("play", str(bag), "--topics", "/blob"))
    assert code == 2 and "install its package" in err


def test_play_input_errors_exit_2(tmp_path: Path) -> None:
    bag = write_synthetic_bag(tmp_path / "b", frames=1)
    code, _, err = _finish(_bag_tool("play", str(bag), "--topics", "/nope"))
    assert code == 2 and "/nope" in err and IMAGE_TOPIC in err  # names what the bag has
    code, _, err = _finish(_bag_tool("play", str(tmp_path / "missing")))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize(("storage", "stop"), [("sqlite3", "count"), ("mcap", "sigint")])
def test_record_stores_what_was_published(col: Collector, tmp_path: Path, storage: str, stop: str) -> None:
    image_topic, info_topic = f"{NS}/rec_{storage}/image", f"{NS}/rec_{storage}/camera_info"
    pub_img = col.publisher(Image, image_topic, reliable=False)  # a best-effort camera
    pub_info = col.publisher(CameraInfo, info_topic)
    out = tmp_path / "rec"
    args = ["record", str(out), "--topics", image_topic, info_topic, "--storage", storage]
    proc = _bag_tool(*args, *(["--count", "3"] if stop == "count" else []))
    assert Collector.wait_matched([pub_img, pub_info], timeout=30.0), "the recorder never subscribed"
    time.sleep(0.3)
    sent = {image_topic: [], info_topic: []}
    import numpy as np

    for i in range(3):
        hdr = header(1_700_000_000_000_000_000 + i * 100_000_000)
        img = numpy_to_image(np.full((48, 64, 3), 10 * i, np.uint8), "rgb8", hdr)
        info = camera_info_msg(hdr, 64, 48, 50.0, 50.0, 31.5, 23.5)
        pub_img.publish(img)
        pub_info.publish(info)
        sent[image_topic].append(img)
        sent[info_topic].append(info)
        time.sleep(0.05)
    if stop == "sigint":
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
    code, text, err = _finish(proc, timeout=30.0)
    assert code == 0, err
    assert (out / "metadata.yaml").is_file()  # closed properly in both cases
    with open_bag(out) as bag:
        assert bag.storage == storage
        got = {t: [deserialize_message(bytes(m.data), cls) for m in bag.messages([t])]
               for t, cls in ((image_topic, Image), (info_topic, CameraInfo))}
        assert bag.topics[image_topic].msgtype == "sensor_msgs/msg/Image"
        assert bag.topics[image_topic].qos[0].reliability == QosReliability.BEST_EFFORT  # the offered QoS
        assert bag.topics[info_topic].qos[0].reliability == QosReliability.RELIABLE
    assert got == sent  # CDR padding bytes may differ between serializations; the messages are equal
    assert image_topic in text and "recorded" in text


def test_two_players_at_once_have_distinct_node_names(col: Collector, tmp_path: Path) -> None:
    """Both players were named geodiff_bag_player: ROS warned about the duplicate and their logs and services
    mixed. Each process now names its node uniquely."""
    bag = write_synthetic_bag(tmp_path / "b", frames=2, period_s=0.2)
    topic = f"{NS}/two/image"
    procs = [_bag_tool("play", str(bag), "--topics", IMAGE_TOPIC, "--remap", f"{IMAGE_TOPIC}:={topic}", "--loop")
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 30.0
        players: list[str] = []
        while time.monotonic() < deadline:
            players = [n for n, _ in col.node.get_node_names_and_namespaces() if n.startswith("geodiff_bag_player")]
            if len(players) >= 2 or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
    finally:
        results = []
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            results.append(_finish(proc, timeout=10.0))
    assert len(players) == 2 and len(set(players)) == 2, players
    for code, _, err in results:
        assert code == 0, err
        assert "same name" not in err, err  # rcl: "... multiple nodes with the same name ..."
