"""``ros2 launch geodiff_ros ...`` as a user runs it in a terminal: real launch, real ``ros2`` CLI, Ctrl-C.

Each launch runs in a process group of its own, like a terminal's foreground job; Ctrl-C is SIGINT to that whole
group (launch and every node get it). Checked: the node's topics (rclpy) while a bag plays through it
(``ros2 run geodiff_ros geodiff_bag play``), parameters with ``ros2 param get --no-daemon``, then that every process
exits 0 and none is left behind. Needs ROS 2 launch and the ``ros2`` CLI (a ROS 2 install, or ``scripts/setup_venv.sh
--dev`` with ``../shared/ros/wheels`` beside the checkout); skipped with the reason otherwise.

In a checkout, ``ros2 launch geodiff_ros`` finds this checkout's launch/config/rviz files (a temporary ament prefix,
ros_helpers.checkout_ament_prefix); under ``colcon test`` it finds the install.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
for _module in ("launch_ros", "ros2launch", "ros2param"):
    pytest.importorskip(_module, reason=f"{_module} not installed: ROS 2 launch and the ros2 CLI are not on PyPI; "
                                        "scripts/setup_venv.sh --dev installs them from ../shared/ros/wheels when "
                                        "that folder is beside the checkout (a ROS 2 install has them)")

from ros_helpers import (  # noqa: E402
    Collector,
    LoggedProcess,
    camera_info_msg,
    header,
    module_domain_id,
    package_prefix_env,
    stamp_of,
    test_scene,
)
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from geodiff_ros.bag.storage import open_bag  # noqa: E402
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag  # noqa: E402
from geodiff_ros.ros.conversions import image_to_numpy, numpy_to_image  # noqa: E402
from geodiff_ros.ros.launch_support import rviz2_missing  # noqa: E402

DOMAIN = module_domain_id(41)
NS = f"/geodiff_launch_cli_{os.getpid()}"  # our own topics even if another run shares the domain
_STARTED = re.compile(r"\[INFO\] \[([\w.-]+)\]: process started with pid \[(\d+)\]")


def _exe(name: str) -> str:
    """A ROS CLI executable: on PATH, or beside this interpreter (a venv not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"`{name}` not found on PATH")
    return found


def _group_members(pgid: int) -> list[int]:
    """Processes in process group ``pgid`` (Linux /proc): after launch exits, any left is an orphan."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields[0]: state, fields[2]: process group
            pids.append(int(stat.parent.name))
    return pids


class RosLaunch(LoggedProcess):
    """``ros2 launch geodiff_ros FILE args...`` in its own process group, output in a log file."""

    def __init__(self, env: dict[str, str], log: Path, launch_file: str, **args: str) -> None:
        cmd = [_exe("ros2"), "launch", "geodiff_ros", launch_file, *(f"{k}:={v}" for k, v in args.items())]
        super().__init__(cmd, log, env, log.parent,
                         start_new_session=True)  # its own group and session, like a terminal job

    def started(self) -> dict[str, int]:
        """Launched process name (geodiff_node-1, ...) -> pid, from launch's own log lines."""
        return {name: int(pid) for name, pid in _STARTED.findall(self.log())}

    def ctrl_c(self, timeout: float = 20.0) -> int | None:
        """SIGINT to the whole group, as a terminal sends it; launch's exit code (None: still running)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill whatever of the group is still there (only after a failed check) and close the log."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def _assert_clean_exit(run: RosLaunch, code: int | None, processes: int) -> None:
    """Launch exited 0, each of its ``processes`` finished cleanly (exit 0), and nothing of the group is left."""
    log = run.log()
    started = run.started()
    assert code == 0, f"ros2 launch exit {code}; log:\n{log[-4000:]}"
    assert len(started) == processes, f"{started}; log:\n{log[-4000:]}"
    for name, pid in started.items():
        assert f"[{name}]: process has finished cleanly [pid {pid}]" in log, f"{name} did not exit 0:\n{log[-4000:]}"
    assert "process has died" not in log and "Traceback" not in log, log[-4000:]
    time.sleep(0.5)
    assert not _group_members(run.proc.pid), f"left behind: {_group_members(run.proc.pid)}\n{log[-4000:]}"


def _ros2(env: dict[str, str], *args: str) -> str:
    """``ros2 ARGS`` (no daemon) output; it must succeed."""
    out = subprocess.run([_exe("ros2"), *args, "--no-daemon", "--spin-time", "3"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def _params(env: dict[str, str], node: str) -> dict:
    """Every parameter of ``node`` (``ros2 param dump``), nested as in a params file."""
    return yaml.safe_load(_ros2(env, "param", "dump", node))[node]["ros__parameters"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return package_prefix_env(DOMAIN, tmp_path / "prefix")


@pytest.fixture
def col() -> Iterator[Collector]:
    collector = Collector(DOMAIN)
    yield collector
    collector.close()


def test_depth_launch_plays_a_bag_then_ctrl_c_exits_every_process_0(env: dict[str, str], col: Collector,
                                                                     tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    """Launch arguments reach the node typed (processing_res 64 an integer), a user's params file applies on top
    of the shipped one, CPU fallback shows in ``ros2 param get device``, no normals topic without normals."""
    bag = write_synthetic_bag(tmp_path / "synth", frames=3, width=160, height=120, period_s=1.0)
    user_params = tmp_path / "mine.yaml"
    user_params.write_text("/**:\n  ros__parameters:\n    diagnostics_period: 0.5\n    cpu_threads: 1\n")
    inputs = {IMAGE_TOPIC: f"{NS}/image", INFO_TOPIC: f"{NS}/camera_info", DEPTH_TOPIC: f"{NS}/sparse_depth"}
    for topic in ("depth/relative", "depth/image"):
        col.subscribe(Image, f"{NS}/{topic}")
    col.subscribe(CameraInfo, f"{NS}/depth/camera_info")
    run = RosLaunch(env, tmp_path / "launch.log", "depth.launch.py", namespace=NS, image=inputs[IMAGE_TOPIC],
                    camera_info=inputs[INFO_TOPIC], sparse_depth=inputs[DEPTH_TOPIC], params_file=str(user_params),
                    model=str(tiny_depth_ckpt), model_normals="none", device="cuda", allow_cpu_fallback="true",
                    dtype="fp32", processing_res="64", fixed_scale="2.0")
    try:
        assert run.wait_log("processing frames"), f"node never became active:\n{run.log()[-4000:]}"
        play = subprocess.run(
            [_exe("ros2"), "run", "geodiff_ros", "geodiff_bag", "play", str(bag), "--topics", *inputs,
             "--remap", *(f"{a}:={b}" for a, b in inputs.items()), "--wait-subscribers", "1", "--wait-timeout", "60"],
            env=env, capture_output=True, text=True, timeout=120)
        assert play.returncode == 0, play.stdout + play.stderr
        relative = col.wait_for(f"{NS}/depth/relative", 3, timeout=30.0)
        with_stamps = sorted(stamp_of(m) for m in relative)
        with open_bag(bag) as b:
            want = sorted(stamp_of(b.deserialize(m)) for m in b.messages([IMAGE_TOPIC]))
        assert with_stamps == want, f"{with_stamps} != {want}\n{run.log()[-3000:]}"
        # The tiny random model does not order depth like the bag's, so no fit: fixed_scale:= gives the metres.
        metric = col.wait_for(f"{NS}/depth/image", 3, timeout=10.0)
        assert len(metric) == 3 and {m.encoding for m in metric} == {"32FC1"}, run.log()[-3000:]
        by_stamp = {stamp_of(m): image_to_numpy(m) for m in relative}
        for msg in metric:
            depth = image_to_numpy(msg)
            ok = np.isfinite(depth)
            assert ok.any()
            np.testing.assert_allclose(depth[ok], 2.0 * by_stamp[stamp_of(msg)][ok], rtol=1e-5)
        topics = {name for name, _ in col.node.get_topic_names_and_types()}
        assert f"{NS}/depth/relative" in topics
        assert not [t for t in topics if t.startswith(f"{NS}/normals")], f"normals advertised: {sorted(topics)}"
        node = f"{NS}/geodiff"
        assert _ros2(env, "param", "get", node, "device") == "String value is: cpu"  # in use after the fallback
        params = _params(env, node)
        assert params["processing_res"] == 64 and params["dtype"] == "fp32"  # launch arguments, typed
        assert params["diagnostics_period"] == 0.5 and params["cpu_threads"] == 1  # the user's file on top
        assert params["alignment"]["method"] == "ransac" and params["warmup_size"] == [640, 480]  # shipped file
        _assert_clean_exit(run, run.ctrl_c(), processes=1)
    finally:
        run.close()


def test_multi_gpu_launch_on_the_cpu_serves_each_camera_then_ctrl_c_exits_every_process_0(
        env: dict[str, str], col: Collector, tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    cams = ("front", "left")
    for cam in cams:
        col.subscribe(Image, f"{NS}/{cam}/depth/relative")
    run = RosLaunch(env, tmp_path / "launch.log", "multi_gpu.launch.py", cameras=f'[{",".join(cams)}]',
                    num_gpus="2", device="cpu", namespace=NS, model=str(tiny_depth_ckpt), model_normals="none",
                    dtype="fp32", processing_res="64", cpu_threads="1")
    try:
        assert run.wait_log("processing frames", count=2), f"nodes never became active:\n{run.log()[-4000:]}"
        rgb, _, (fx, fy, cx, cy) = test_scene(96, 64)
        image_pubs = {cam: col.publisher(Image, f"{NS}/{cam}/image", reliable=False) for cam in cams}
        info_pubs = {cam: col.publisher(CameraInfo, f"{NS}/{cam}/camera_info", reliable=False) for cam in cams}
        assert Collector.wait_matched([*image_pubs.values(), *info_pubs.values()]), run.log()[-3000:]
        for k in range(3):
            for cam in cams:
                h = header(1_700_000_000_000_000_000 + k * 500_000_000, f"{cam}_optical_frame")
                info_pubs[cam].publish(camera_info_msg(h, 96, 64, fx, fy, cx, cy))
                image_pubs[cam].publish(numpy_to_image(rgb, "rgb8", h))
            time.sleep(0.5)
        for cam in cams:
            got = col.wait_for(f"{NS}/{cam}/depth/relative", 1, timeout=30.0)
            assert got and got[0].header.frame_id == f"{cam}_optical_frame", f"{cam}:\n{run.log()[-3000:]}"
        assert _ros2(env, "param", "get", f"{NS}/geodiff_gpu1", "device") == "String value is: cpu"
        _assert_clean_exit(run, run.ctrl_c(), processes=2)
    finally:
        run.close()


@pytest.mark.parametrize(("launch_file", "args"), [("depth.launch.py", {}),
                                                   ("multi_gpu.launch.py", {"cameras": "[front]", "device": "cpu"})])
def test_rviz_without_rviz2_stops_launch_before_anything_starts(env: dict[str, str], tmp_path: Path,
                                                                 tiny_depth_ckpt: Path, launch_file: str,
                                                                 args: dict[str, str]) -> None:
    """Bug: rviz:=true without rviz2 made launch exit 1 half-way, leaving the node running as an orphan."""
    if rviz2_missing() is None:
        pytest.skip("rviz2 is installed here: the missing-rviz2 path cannot be exercised")
    run = RosLaunch(env, tmp_path / "launch.log", launch_file, rviz="true", namespace=NS,
                    model=str(tiny_depth_ckpt), **args)
    try:
        code = run.wait(60.0)
        time.sleep(1.0)  # an orphan would be starting now
        log = run.log()
        assert code not in (None, 0), log
        assert "rviz2" in log and "not installed" in log and "without rviz:=true" in log, log
        assert not run.started(), f"started although launch failed: {run.started()}\n{log}"
        assert not _group_members(run.proc.pid), f"left behind: {_group_members(run.proc.pid)}"
    finally:
        run.close()


def test_parameter_errors_name_the_launch_argument(env: dict[str, str], tmp_path: Path,
                                                   tiny_depth_ckpt: Path) -> None:
    """A ros2 launch user is told which launch argument to change, not only the parameter's name."""
    run = RosLaunch(env, tmp_path / "bad_res.log", "depth.launch.py", namespace=NS, model=str(tiny_depth_ckpt),
                    processing_res="12", device="cpu")
    try:
        # The node exits 2; launch ends with exit code 1 (it was 0: a script saw success) and says why.
        assert run.wait(60.0) == 1, run.log()
        assert "processing_res=12 must be a multiple of 8" in run.log() and "processing_res:=" in run.log(), run.log()
        assert "geodiff_node-1 exited with code 2 (invalid parameters" in run.log(), run.log()
    finally:
        run.close()
    run = RosLaunch(env, tmp_path / "bad_model.log", "depth.launch.py", namespace=NS,
                    model=str(tmp_path / "no_such_model"), model_normals="none", device="cpu", dtype="fp32")
    try:
        assert run.wait(90.0) == 1, run.log()  # node exit 1 (configure failed); launch exited 0 before
        assert "configure failed" in run.log() and "model:=" in run.log(), run.log()
        assert "geodiff_node-1 exited with code 1 (configure failed" in run.log(), run.log()
    finally:
        run.close()
    run = RosLaunch(env, tmp_path / "bad_type.log", "depth.launch.py", processing_res="large")
    try:
        assert run.wait(60.0) not in (None, 0)
        assert "processing_res:='large': parameter processing_res takes an integer" in run.log(), run.log()
        assert not run.started()
    finally:
        run.close()
    run = RosLaunch(env, tmp_path / "bad_bool.log", "depth.launch.py", rviz="maybe")
    try:
        assert run.wait(60.0) not in (None, 0)
        assert "rviz:='maybe' is not a boolean: use true or false" in run.log(), run.log()
        assert not run.started()
    finally:
        run.close()


def test_multi_gpu_launch_ends_when_one_node_fails(env: dict[str, str], tmp_path: Path,
                                                  tiny_depth_ckpt: Path) -> None:
    """One of two nodes cannot start (its camera's override has the wrong type: exit 2): launch stops the other
    node and exits 1, nothing left running (it kept the healthy node running, and exited 0 once that was stopped)."""
    user_params = tmp_path / "mine.yaml"
    user_params.write_text('/**:\n  ros__parameters:\n    camera.front.max_depth: "far"\n')
    run = RosLaunch(env, tmp_path / "launch.log", "multi_gpu.launch.py", cameras="[front,left]", num_gpus="2",
                    device="cpu", namespace=NS, model=str(tiny_depth_ckpt), model_normals="none", dtype="fp32",
                    processing_res="64", cpu_threads="1", params_file=str(user_params))
    try:
        code = run.wait(90.0)
        log = run.log()
        assert code == 1, f"ros2 launch exit {code}; log:\n{log[-4000:]}"
        started = run.started()
        assert len(started) == 2, log[-4000:]
        failed = re.search(r"(geodiff_node-\d) exited with code 2 \(invalid parameters", log)
        assert failed, log[-4000:]
        healthy = next(name for name in started if name != failed.group(1))
        assert f"[{healthy}]: process has finished cleanly [pid {started[healthy]}]" in log, log[-4000:]
        time.sleep(0.5)
        assert not _group_members(run.proc.pid), f"left behind: {_group_members(run.proc.pid)}\n{log[-4000:]}"
    finally:
        run.close()


def test_launch_test_runs_the_launch_testing_file(env: dict[str, str], tmp_path: Path) -> None:
    """``launch_test test/test_launch_depth.py`` loads the file outside pytest (it failed: No module named
    'ros_helpers'); --show-args loads it and builds its launch description without running it."""
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("geodiff_launch_test_*"))
    out = subprocess.run([_exe("launch_test"), "--show-args", str(Path(__file__).with_name("test_launch_depth.py"))],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No module named" not in out.stdout + out.stderr
    assert "'params_file'" in out.stdout, out.stdout  # depth.launch.py's arguments, through the include
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("geodiff_launch_test_*")) == before  # nothing left
