"""Shared helpers for the DDS tests of the ROS layer: environment, the node as a subprocess, a collector node.

Every process that calls ``rclpy.init()`` runs on loopback only with the project's Fast DDS profile (COMMON.md,
ros2-from-pypi.md); each test module passes its own ``ROS_DOMAIN_ID`` so modules never see each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FASTDDS_PROFILE = REPO / "config" / "fastdds_localhost.xml"
PARAMS_FILE = REPO / "config" / "geodiff.yaml"


def is_install_under_test() -> bool:
    """True when the suite tests the installed package (``colcon test``; conftest decides), False in a checkout."""
    return os.environ.get("GEODIFF_TEST_INSTALLED") == "1"


def source_pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH for a subprocess: the source folder first in a checkout, unchanged when testing the install."""
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not is_install_under_test() and str(REPO) not in parts:
        parts.insert(0, str(REPO))
    return os.pathsep.join(parts)


def run_dir() -> Path:
    """Working directory of ``python -m geodiff_ros...`` subprocesses: ``-m`` imports from it first, so the source
    folder only in a checkout."""
    return REPO if not is_install_under_test() else Path(tempfile.gettempdir())


def launch_file(name: str) -> Path:
    """The launch file under test: the installed one (share/geodiff_ros/launch) when testing the install, else
    the checkout's."""
    if is_install_under_test():
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("geodiff_ros")) / "launch" / name
    return REPO / "launch" / name


# console_scripts of setup.py: launch_ros starts executables from <prefix>/lib/geodiff_ros/.
CONSOLE_SCRIPTS = {"geodiff_node": "geodiff_ros.ros.process", "geodiff_bag": "geodiff_ros.bag.cli",
                   "geodiff_demo": "geodiff_ros.cli.demo", "geodiff_predict": "geodiff_ros.cli.predict"}


def checkout_ament_prefix(folder: Path) -> Path:
    """An ament prefix in ``folder`` whose geodiff_ros is this checkout: share/geodiff_ros links the files of
    launch/, config/ and rviz/, lib/geodiff_ros holds the executables (this interpreter). Put first on
    AMENT_PREFIX_PATH, ``ros2 launch geodiff_ros ...`` then runs the checkout's files, not a stale install."""
    share = folder / "share" / "geodiff_ros"
    for sub in ("launch", "config", "rviz"):  # folders of links: ros2 launch's file search does not enter links
        (share / sub).mkdir(parents=True)
        for path in (REPO / sub).iterdir():
            (share / sub / path.name).symlink_to(path)
    (share / "package.xml").symlink_to(REPO / "package.xml")
    index = folder / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / "geodiff_ros").write_text("")
    lib = folder / "lib" / "geodiff_ros"
    lib.mkdir(parents=True)
    for exe, module in CONSOLE_SCRIPTS.items():
        script = lib / exe
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
        script.chmod(0o755)
    return folder


def package_prefix_env(domain_id: int, folder: Path) -> dict[str, str]:
    """ros_env for ``ros2 launch geodiff_ros ...`` / ``ros2 run``: the package under test first in the ament index
    (the checkout through :func:`checkout_ament_prefix`, or the install when testing it)."""
    env = ros_env(domain_id)
    if not is_install_under_test():
        prefix = checkout_ament_prefix(folder)
        env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (str(prefix), env.get("AMENT_PREFIX_PATH", "")) if p)
    return env


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ``$GEODIFF_SHARED_DATA``), None if absent."""
    env = os.environ.get("GEODIFF_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if (path / "manifest.json").is_file() else None


def ros_env(domain_id: int) -> dict[str, str]:
    """Environment for a ROS subprocess: loopback discovery, big SHM segment, own domain, logs in /tmp."""
    env = dict(os.environ)
    env.update({
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOCALHOST_ONLY": "1",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),
        "FASTRTPS_DEFAULT_PROFILES_FILE": str(FASTDDS_PROFILE),  # the name Jazzy's Fast DDS 2.14 reads
        "ROS_DOMAIN_ID": str(domain_id),
        "PYTHONPATH": source_pythonpath(env),
        "PYTHONUNBUFFERED": "1",
        "RCUTILS_COLORIZED_OUTPUT": "0",
    })
    env.setdefault("ROS_LOG_DIR", str(Path(tempfile.gettempdir()) / "geodiff_ros_test_logs"))
    env.setdefault("HOME", tempfile.gettempdir())
    return env


def apply_ros_env(domain_id: int) -> None:
    """Set the same variables in this process (before ``rclpy.init``), so the test's own node matches."""
    for key, value in ros_env(domain_id).items():
        if key.startswith(("ROS_", "FASTDDS_", "FASTRTPS_", "RCUTILS_")) or key == "HOME":
            os.environ[key] = value


def _param_arg(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = json.dumps(list(value))
    elif value == "":
        text = "''"  # rcl cannot parse an empty override; YAML's empty string
    else:
        text = str(value)
    return f"{name}:={text}"


class LoggedProcess:
    """A subprocess whose stdout and stderr go to one log file, read back (and polled) while it runs.

    The log file, not a pipe: a child that writes more than a pipe holds never blocks, and the whole output is
    there for the failure message.
    """

    poll_s = 0.1  # how often wait_log re-reads the log

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path,
                 **popen_kwargs: Any) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     **popen_kwargs)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 120.0) -> bool:
        """True once ``text`` is in the log ``count`` times; stops waiting early when the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(self.poll_s)
        return self.log().count(text) >= count


class NodeProcess(LoggedProcess):
    """The geodiff node started as ``python -m geodiff_ros.ros.process`` with the config file and overrides."""

    def __init__(self, domain_id: int, params: dict[str, Any], log_path: Path,
                 remaps: dict[str, str] | None = None, params_file: Path | None = PARAMS_FILE,
                 program: list[str] | None = None, extra_env: dict[str, str] | None = None) -> None:
        """``program`` replaces ``-m geodiff_ros.ros.process`` (e.g. :func:`wrapped_node_program`); ``extra_env`` is
        added to the ROS environment of the subprocess."""
        cmd = [sys.executable, *(program or ["-m", "geodiff_ros.ros.process"]), "--ros-args"]
        if params_file is not None:
            cmd += ["--params-file", str(params_file)]
        for name, value in params.items():
            cmd += ["-p", _param_arg(name, value)]
        for src, dst in (remaps or {}).items():
            cmd += ["-r", f"{src}:={dst}"]
        env = ros_env(domain_id)
        env.update(extra_env or {})
        super().__init__(cmd, log_path, env, run_dir())  # the log is closed in stop()

    def log_since(self, mark: int) -> str:
        """Log text written after ``mark`` (a previous ``len(self.log())``)."""
        return self.log()[mark:]

    def wait_for_log(self, text: str, timeout: float) -> bool:
        return self.wait_log(text, 1, timeout)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5.0) -> tuple[int | None, float]:
        """Send ``sig`` and wait; returns (exit code or None if it had to be killed, seconds to exit)."""
        if self.proc.poll() is not None:
            self._log.close()
            return self.proc.returncode, 0.0
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        elapsed = time.monotonic() - t0
        self._log.close()
        return code, elapsed


class Collector:
    """A test-side rclpy node: publishers for the node's inputs, subscriptions that record its outputs.

    Spun by a SingleThreadedExecutor in a background thread; messages land in ``self.msgs[topic]``.
    """

    def __init__(self, domain_id: int, name: str = "geodiff_test", namespace: str = "") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        apply_ros_env(domain_id)
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context, namespace=namespace)  # relative topics in it
        self.msgs: dict[str, list[Any]] = defaultdict(list)
        self.arrivals: dict[str, list[float]] = defaultdict(list)  # time.monotonic() of each message in msgs
        self._lock = threading.Lock()
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self._executor.spin()
        except (ExternalShutdownException, Exception):  # noqa: BLE001 - context shut down by close()
            pass

    def subscribe(self, msg_type: Any, topic: str, reliable: bool = True, depth: int = 50) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)

        def store(msg: Any, topic: str = topic) -> None:
            now = time.monotonic()
            with self._lock:
                self.msgs[topic].append(msg)
                self.arrivals[topic].append(now)

        self.node.create_subscription(msg_type, topic, store, qos)

    def publisher(self, msg_type: Any, topic: str, reliable: bool = True, depth: int = 10) -> Any:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        return self.node.create_publisher(msg_type, topic, qos)

    def get(self, topic: str) -> list[Any]:
        with self._lock:
            return list(self.msgs[topic])

    def get_timed(self, topic: str) -> list[tuple[float, Any]]:
        """(arrival time.monotonic(), message) pairs of ``topic`` in arrival order."""
        with self._lock:
            return list(zip(self.arrivals[topic], self.msgs[topic], strict=True))

    def clear(self) -> None:
        with self._lock:
            self.msgs.clear()
            self.arrivals.clear()

    def wait_for(self, topic: str, count: int = 1, timeout: float = 20.0,
                 where: Callable[[Any], bool] | None = None) -> list[Any]:
        """Messages on ``topic`` (those passing ``where``) once ``count`` arrived, or what came before timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.get(topic) if where is None or where(m)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    @staticmethod
    def wait_matched(publishers: Iterable[Any], timeout: float = 30.0) -> bool:
        """Wait until every publisher has a subscriber (DDS drops messages sent before matching)."""
        pubs = list(publishers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() > 0 for p in pubs):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        import rclpy

        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


# ---------------------------------------------------------------------------------------------- test scenes

def test_scene(width: int = 160, height: int = 120) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """(rgb [H,W,3] uint8, depth [H,W] metres with 0 = none, (fx, fy, cx, cy)) at the requested size.

    A TUM RGB-D frame from ``../shared/data`` when present (resized, intrinsics scaled per axis), else a synthetic
    room: a floor plane and a back wall, textured so the model sees structure.
    """
    data = shared_data_dir()
    if data is not None:
        from PIL import Image as PILImage

        folder = data / "indoor" / "tum_fr2_desk_slambook2"
        intr = json.loads((folder / "intrinsics.json").read_text())
        rgb_im = PILImage.open(folder / "1.png").convert("RGB")
        dep_im = PILImage.open(folder / "1_depth.png")
        w0, h0 = rgb_im.size
        rgb = np.asarray(rgb_im.resize((width, height), PILImage.BILINEAR))
        depth = np.asarray(dep_im.resize((width, height), PILImage.NEAREST)).astype(np.float32) / 5000.0
        sx, sy = width / w0, height / h0
        fx, fy, cx, cy = (float(intr[k]) for k in ("fx", "fy", "cx", "cy"))
        return rgb, depth, (fx * sx, fy * sy, cx * sx, cy * sy)
    fx = fy = 0.8 * width
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    wall = np.full((height, width), 4.0, np.float32)
    with np.errstate(divide="ignore"):
        floor = np.where(v > cy, 1.2 * fy / np.maximum(v - cy, 1e-3), np.inf).astype(np.float32)  # camera 1.2 m up
    depth = np.minimum(wall, floor)
    check = ((u // 8 + v // 8) % 2).astype(np.float32)
    shade = np.clip(1.0 - depth / 5.0, 0.1, 1.0)
    rgb = np.stack([200 * shade * (0.5 + 0.5 * check), 120 * shade, 90 + 100 * check], axis=-1)
    return rgb.astype(np.uint8), depth, (fx, fy, cx, cy)


test_scene.__test__ = False  # not a pytest test despite the name


def camera_info_msg(header: Any, width: int, height: int, fx: float, fy: float, cx: float, cy: float) -> Any:
    """A plumb_bob CameraInfo with K = P[:3,:3] (rectified monocular camera)."""
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo()
    info.header = header
    info.width, info.height = width, height
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def header(stamp_ns: int, frame_id: str = "camera_color_optical_frame") -> Any:
    from std_msgs.msg import Header

    h = Header()
    h.stamp.sec, h.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    h.frame_id = frame_id
    return h


def stamp_of(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def module_domain_id(offset: int) -> int:
    """A ROS domain for one test module: distinct per module (offset) and, via the pid-based base that
    conftest sets, between concurrent test runs. Range 1..100."""
    base = int(os.environ.get("ROS_DOMAIN_ID", "0") or 0)
    return (base + offset) % 100 + 1


def call_service(collector: Collector, srv_type: Any, name: str, request: Any, timeout: float = 10.0) -> Any:
    """Call a service from the collector node and return the response (its executor completes the future)."""
    client = collector.node.create_client(srv_type, name)
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f"service {name} not available")
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not future.done():
            raise TimeoutError(f"service {name} did not answer within {timeout} s")
        return future.result()
    finally:
        collector.node.destroy_client(client)


def set_parameters(collector: Collector, node_name: str, values: dict[str, Any], timeout: float = 10.0) -> list[Any]:
    """Call ``<node>/set_parameters`` (what ``ros2 param set`` does); one SetParametersResult per value."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    req = SetParameters.Request()
    req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
    return list(call_service(collector, SetParameters, f"{node_name}/set_parameters", req, timeout).results)


def node_remaps(namespace: str, name: str) -> dict[str, str]:
    """Remaps that run the node as ``<namespace>/<name>``: its topics, services and /diagnostics status name are
    then its own even if another test run happens to share the ROS domain."""
    return {"__ns": namespace, "__node": name}


def diagnostics_of(col: Collector, node_name: str, after: float = 0.0) -> list[dict[str, str]]:
    """Values of the pipeline statuses (those with frame counters) named ``<node_name>: ...`` in the /diagnostics
    messages that arrived after monotonic ``after``, oldest first."""
    out = []
    for t, msg in col.get_timed("/diagnostics"):
        if t > after:
            for st in msg.status:
                values = {kv.key: kv.value for kv in st.values}
                if st.name.startswith(f"{node_name}:") and "received" in values:
                    out.append(values)
    return out


def latest_diagnostics(col: Collector, node_name: str, after: float, timeout: float) -> dict[str, str]:
    """The newest pipeline status values of ``node_name`` that arrived after monotonic ``after``, waiting up to
    ``timeout`` seconds for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = diagnostics_of(col, node_name, after)
        if got:
            return got[-1]
        time.sleep(0.05)
    raise AssertionError(f"no /diagnostics from {node_name} within {timeout} s")


def diagnostics_values(msg: Any) -> dict[str, str]:
    """key -> value of the first status in a DiagnosticArray."""
    return {kv.key: kv.value for kv in msg.status[0].values}


# ---------------------------------------------------------------------------------------------- reliability

# The node run through a small test-only wrapper (``python -c``), so the reliability tests can inject faults and
# observe shutdown without any hook in product code. Controlled by environment variables of the subprocess:
#   GEODIFF_TEST_LOG_THROTTLE_S  shorter throttle for per-frame warnings, so consecutive fault cases each log
#   GEODIFF_TEST_OOM_ON_MARKER=1 GeoDiffEngine.predict raises torch.cuda.OutOfMemoryError for a frame whose
#                                top-left pixel is OOM_MARKER (so a test chooses exactly which frames fail)
#   GEODIFF_TEST_OOM_ON_WIDTH=N  ... and for every frame N pixels wide (e.g. the warm-up frame, warmup_size)
#   GEODIFF_TEST_LOAD_BUSY_S=N   GeoDiffEngine() first busy-loops N s holding the GIL (weights from a slow disk);
#                                prints GEODIFF_TEST_LOAD_BUSY when it starts
#   GEODIFF_TEST_PREDICT_DELAY_S=S  GeoDiffEngine.predict sleeps S seconds first (a slow GPU, deterministically), and
#                                prints ``GEODIFF_TEST_PREDICT_ACTIVE n`` (calls running at once) whenever one starts
# and it always prints ``GEODIFF_TEST_THREADS_AT_EXIT [names]`` (threads still alive) right before the process
# exits, so a test can check that no worker thread was left behind.
OOM_MARKER = (255, 0, 255)
_WRAPPER = r"""
import importlib, json, os, sys, threading
OOM_MARKER = (255, 0, 255)
import geodiff_ros.ros.process as process_mod

throttle = os.environ.get('GEODIFF_TEST_LOG_THROTTLE_S')
if throttle:
    patched = []
    for name in ('geodiff_ros.ros.worker', 'geodiff_ros.ros.camera'):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ('_THROTTLE_S', 'THROTTLE_S'):
            if hasattr(mod, attr):
                setattr(mod, attr, float(throttle))
                patched.append(f'{name}.{attr}')
    if not patched:
        raise SystemExit('test wrapper: no log throttle constant found in geodiff_ros.ros.worker/camera; '
                         'update _WRAPPER in test/ros_helpers.py')

oom_width = int(os.environ.get('GEODIFF_TEST_OOM_ON_WIDTH') or -1)
if os.environ.get('GEODIFF_TEST_OOM_ON_MARKER') or oom_width > 0:
    import numpy as np
    import torch
    from geodiff_ros.engine import GeoDiffEngine

    real_predict = GeoDiffEngine.predict

    def predict(self, images, *args, **kwargs):
        frames = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        if any(tuple(np.asarray(f)[0, 0, :3].tolist()) == OOM_MARKER or np.asarray(f).shape[1] == oom_width
               for f in frames):
            raise torch.cuda.OutOfMemoryError(
                'CUDA out of memory. Tried to allocate 2.00 GiB (simulated by the test wrapper)')
        return real_predict(self, images, *args, **kwargs)

    GeoDiffEngine.predict = predict

load_busy_s = float(os.environ.get('GEODIFF_TEST_LOAD_BUSY_S') or 0)
if load_busy_s > 0:
    import time
    from geodiff_ros.engine import GeoDiffEngine

    real_init = GeoDiffEngine.__init__

    def slow_init(self, *args, **kwargs):
        sys.stderr.write('GEODIFF_TEST_LOAD_BUSY\n')
        sys.stderr.flush()
        end = time.monotonic() + load_busy_s
        while time.monotonic() < end:
            sum(range(1000))
        real_init(self, *args, **kwargs)

    GeoDiffEngine.__init__ = slow_init
delay = float(os.environ.get('GEODIFF_TEST_PREDICT_DELAY_S') or 0.0)
if delay > 0.0:
    import time
    from geodiff_ros.engine import GeoDiffEngine

    slow_inner = GeoDiffEngine.predict
    active = [0]
    active_lock = threading.Lock()

    def slow_predict(self, *args, **kwargs):
        with active_lock:
            active[0] += 1
            sys.stderr.write(f'GEODIFF_TEST_PREDICT_ACTIVE {active[0]}\n')
            sys.stderr.flush()
        try:
            time.sleep(delay)
            return slow_inner(self, *args, **kwargs)
        finally:
            with active_lock:
                active[0] -= 1

    GeoDiffEngine.predict = slow_predict

real_exit = os._exit


def report_and_exit(code):
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive())
    sys.stderr.write(f'GEODIFF_TEST_THREADS_AT_EXIT {json.dumps(alive)}\n')
    sys.stderr.flush()
    real_exit(code)


os._exit = report_and_exit
code = process_mod.main()
report_and_exit(int(code or 0))
"""


def wrapped_node_program() -> list[str]:
    """``program`` argument of :class:`NodeProcess` that runs ``process.main()`` inside the test wrapper."""
    return ["-c", _WRAPPER]


def predicts_at_once(log: str) -> list[int]:
    """``GEODIFF_TEST_PREDICT_ACTIVE`` values in a wrapper log: engine calls running at once, one per call."""
    return [int(line.split()[1]) for line in log.splitlines() if line.startswith("GEODIFF_TEST_PREDICT_ACTIVE ")]


def threads_at_exit(log: str) -> list[str] | None:
    """Thread names the wrapper reported alive at exit (main thread excluded), None if it never reported."""
    for line in reversed(log.splitlines()):
        if line.startswith("GEODIFF_TEST_THREADS_AT_EXIT "):
            return list(json.loads(line.split(" ", 1)[1]))
    return None


def process_stats(pid: int) -> dict[str, int]:
    """Resident memory (kB, VmRSS), thread count and open file descriptors of a live process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {
        "rss_kb": rss,
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), to check that a node leaves no process behind."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------- hostile images

def jpeg_announcing(width: int, height: int) -> bytes:
    """A few hundred bytes of JPEG whose frame header announces ``width x height`` (a tiny JPEG with its size
    patched: the scan data is far too short, so a decoder that trusts the header allocates the full size first)."""
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk to the start-of-frame segment
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 7] = height.to_bytes(2, "big")
    data[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(data)


def png_bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width x height``, all one value: zlib packs it ~1000:1 (13000x13000 in ~170 kB)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + one grey byte per pixel
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- launch files

class _Recorder:
    """Stand-ins for the ROS launch classes: each records its constructor arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self, context: dict[str, str]) -> str:
        return context[self.name]


def load_launch_with_stand_ins(path: Path, monkeypatch: Any, share: str = "/opt/share/geodiff_ros") -> Any:
    """Execute a launch file with stand-in launch / launch_ros / ament_index modules (no ROS launch needed):
    its actions record their arguments. ``share`` is what get_package_share_directory returns."""
    import types

    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.conditions", "launch.event_handlers", "launch.substitutions",
        "launch_ros", "launch_ros.actions", "ament_index_python", "ament_index_python.packages")}
    mods["launch"].LaunchDescription = lambda entities: list(entities)
    for name in ("DeclareLaunchArgument", "OpaqueFunction", "LogInfo", "RegisterEventHandler"):
        setattr(mods["launch.actions"], name, type(name, (_Recorder,), {}))
    mods["launch.conditions"].IfCondition = _Recorder
    mods["launch.event_handlers"].OnShutdown = type("OnShutdown", (_Recorder,), {})
    mods["launch.event_handlers"].OnProcessExit = type("OnProcessExit", (_Recorder,), {})
    mods["launch.substitutions"].LaunchConfiguration = _LaunchConfiguration
    mods["launch_ros.actions"].Node = type("Node", (_Recorder,), {})
    mods["ament_index_python.packages"].get_package_share_directory = lambda pkg: share
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    source = path.read_text()
    module = types.ModuleType(path.stem.replace(".", "_"))
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def run_launch_with_stand_ins(module: Any, **args: str) -> tuple[dict[str, Any], list[Any]]:
    """Declared arguments (name -> default) and the actions the OpaqueFunction returns for ``args``."""
    entities = module.generate_launch_description()
    declared = {e.args[0]: e.kwargs.get("default_value") for e in entities if type(e).__name__ ==
                "DeclareLaunchArgument"}
    unknown = set(args) - set(declared)
    assert not unknown, f"not launch arguments: {unknown}"
    context = {**{k: v for k, v in declared.items() if v is not None}, **args}
    (opaque,) = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    return declared, opaque.kwargs["function"](context)
