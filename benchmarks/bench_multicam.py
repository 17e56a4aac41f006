"""Several cameras, one model: one multi-camera geodiff node against N single-camera nodes, over DDS.

For N in --cameras (default 1 2 4) the script streams N cameras at --hz (default 30 Hz, 640x480 rgb8, phases
spread over the frame period like free-running cameras) into
  multi:    ONE node with cameras [cam0..camN-1] (one model, frames of the cameras batched per engine call), and
  separate: N nodes with cameras [] in namespaces cam0..camN-1 (one model copy per camera, no batching),
on the same topics, and measures per camera: sustained output rate (depth/relative messages per second over the
measuring window), latency from the image stamp (set to the wall clock at publish) to reception of depth/relative
(p50 / p95), node drops; per run: GPU memory of the node processes (nvidia-smi) and their resident memory, and
frames per network pass from the multi node's /diagnostics. Prints a table and writes JSON naming the device.

The default model is the full-size Marigold / SD2 architecture with random weights (benchmarks/bench_engine.py
writes it once; speed and memory do not depend on the weights); --model-depth uses real ones. --tiny is the CPU
smoke test: tiny checkpoints, 160x120, processing_res 64, short windows. Every ROS process stays on loopback
(config/fastdds_localhost.xml) in its own ROS_DOMAIN_ID.

Camera rate out of the box: --tasks depth,normals (the second model, normals/* outputs and the
cloud's normals), per-stage p50/p95 from each node's /diagnostics (decode, engine, post, publish,
stamp_to_publish), the warm-up time and compiled stages from the node logs, and --startup: time from process
start to the first published frame with an empty compile cache (cold) and again with the cache it left (warm
restart), N times, and with --aot once more after geodiff_compile wrote AOT packages. Compiled kernels go to
--cache-dir (default: a fresh folder per invocation, so the first compiled start of an invocation is cold and later
runs re-use it, as a robot's per-user cache would).

  .venv/bin/python benchmarks/bench_multicam.py                 # GPU, fp16, optimize auto, processing_res 768
  .venv/bin/python benchmarks/bench_multicam.py --tiny          # CPU smoke test (about 2 minutes on 2 cores)
  .venv/bin/python benchmarks/bench_multicam.py --cameras 1 --modes separate --cloud --seconds 60   # 1-camera targets
  .venv/bin/python benchmarks/bench_multicam.py --startup 1 --aot --cameras 1 --modes separate      # cold, warm, AOT
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a checkout without installing the package

LOG = logging.getLogger("bench_multicam")
MODES = ("multi", "separate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4], help="camera counts to run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--hz", type=float, default=30.0, help="frame rate of every camera")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window per run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds streamed before measuring (after first output)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--processing-res", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimize", default="auto",
                   help="node parameter optimize (auto = the node's default: compile+graph on CUDA, none on CPU;\n"
                        "none, channels_last, graph, compile, compile+graph); compiled modes compile on activation\n"
                        "(~100 s cold): raise --startup-timeout")
    p.add_argument("--tasks", default="depth", choices=("depth", "depth,normals"),
                   help="models the nodes run (depth,normals: a second UNet, normals/* and the cloud's normals)")
    p.add_argument("--startup", type=int, default=0, metavar="N",
                   help="instead of throughput: start the nodes with an empty compile cache (cold), then N more\n"
                        "times on the cache it left (warm restart); report seconds to the first frame")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="TORCHINDUCTOR_CACHE_DIR of the nodes (default: a fresh folder per invocation); their\n"
                        "GEODIFF_AOT_DIR is <cache-dir>/aot (empty unless --aot)")
    p.add_argument("--aot", action="store_true",
                   help="start-up: (after the --startup starts, if any) run geodiff_compile for the models, size,\n"
                        "dtype and batch sizes, then start on its AOT packages (reports the compile time too)")
    p.add_argument("--cloud", action="store_true",
                   help="also subscribe to <cam>/points (raw CDR, no deserialisation) with alignment.fixed_scale\n"
                        "10 so the node builds the metric cloud; reports its rate and latency too")
    p.add_argument("--model-depth", default=None, help="depth model (hub id or folder); default random SD2 size")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / ".cache" / "bench_ckpt")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the nodes to load and answer")
    p.add_argument("--domain", type=int, default=60, help="first ROS_DOMAIN_ID (one per run, counting up)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/multicam_<dev>.json)")
    p.add_argument("--no-camera-info", action="store_true",
                   help="publish images only (halves the node's input callbacks; no depth/camera_info)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="OMP_NUM_THREADS / MKL_NUM_THREADS of every node process (torch intra-op threads);\n"
                        "0 = leave unset (torch uses one per core). On 2 cores the tiny model runs best with 1")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 160x120, short windows")
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.dtype, args.processing_res = "cpu", "fp32", 64
        args.startup_timeout = max(args.startup_timeout, 600.0) if "compile" in args.optimize else 120.0
        args.width, args.height = 160, 120
        args.seconds, args.warmup = min(args.seconds, 6.0), min(args.warmup, 2.0)
    return args


# ------------------------------------------------------------------------------------------- environment

def ros_env(domain: int) -> dict[str, str]:
    """Loopback-only DDS with the project's Fast DDS profile, own domain (COMMON.md / ros2-from-pypi.md)."""
    env = dict(os.environ)
    env.update({
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_LOCALHOST_ONLY": "1",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_localhost.xml"),
        "FASTRTPS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_localhost.xml"),  # Jazzy reads this name
        "ROS_DOMAIN_ID": str(domain), "PYTHONUNBUFFERED": "1", "RCUTILS_COLORIZED_OUTPUT": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    env.setdefault("ROS_LOG_DIR", str(Path(tempfile.gettempdir()) / "geodiff_bench_logs"))
    env.setdefault("HOME", tempfile.gettempdir())
    return env


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        props = torch.cuda.get_device_properties(index)
        info.update(card=torch.cuda.get_device_name(index), memory_gib=round(props.total_memory / 2**30, 1),
                    torch=torch.__version__, cuda=torch.version.cuda)
    else:
        info["card"] = f'CPU ({info["cpu"]}, {info["cpu_count"]} cores)'
    return info


def checkpoints(args: argparse.Namespace) -> dict[str, str]:
    """Task -> model folder the nodes load: given, tiny, or random full-size weights (bench_engine's writer)."""
    tasks = args.tasks.split(",")
    if args.model_depth and tasks == ["depth"]:
        return {"depth": args.model_depth}
    if args.tiny:
        from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

        root = Path(tempfile.mkdtemp(prefix="bench_multicam_ckpt_"))
        return {task: str(write_tiny_checkpoint(root / f"tiny-e2e-ft-{task}", task)) for task in tasks}
    import torch
    from bench_engine import write_checkpoints

    # Both tasks at once, whatever this run needs: bench_engine rewrites the whole set when one is missing, so a
    # depth-only run followed by a depth+normals run would write the 2 GB depth model twice.
    folders = write_checkpoints(args.ckpt_dir, ["depth", "normals"], tiny=False, device=torch.device(args.device))
    return {task: str(folders[task]) for task in tasks}


def gpu_memory_mib(pids: Sequence[int]) -> float | None:
    """GPU memory used by these processes (nvidia-smi per-process accounting); None without a GPU tool."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    used = {int(a): float(b) for a, b in (line.split(",") for line in out.strip().splitlines() if "," in line)}
    return sum(used.get(pid, 0.0) for pid in pids)


def rss_mib(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1]) / 1024.0
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------------------- one run

class Harness:
    """Camera publishers and output subscribers on one rclpy node in its own context (a background executor)."""

    def __init__(self, domain: int, names: list[str], width: int, height: int, cloud: bool = False) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rclpy.signals import SignalHandlerOptions
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2

        from geodiff_ros.ros.conversions import numpy_to_image

        for key, value in ros_env(domain).items():
            if key.startswith(("ROS_", "FASTDDS_", "FASTRTPS_")):
                os.environ[key] = value
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node("bench_multicam", context=self.context)
        self.names = names
        self.lock = threading.Lock()
        self.recv: dict[str, list[tuple[float, int]]] = {n: [] for n in names}  # (receive wall s, stamp ns)
        self.recv_cloud: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
        self.sent: dict[str, int] = dict.fromkeys(names, 0)
        self.diag: dict[str, dict[str, str]] = {}
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        rng = np.random.default_rng(0)
        self.images, self.infos, self.pubs, self.info_pubs = {}, {}, {}, {}
        for name in names:
            # A textured frame per camera (noise + gradient), built once; only the stamp changes per publish.
            rgb = (rng.integers(0, 64, (height, width, 3)) + np.linspace(0, 190, width)[None, :, None]).astype(np.uint8)
            self.images[name] = numpy_to_image(rgb, "rgb8")
            self.images[name].header.frame_id = f"{name}_optical_frame"
            info = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
            f = 0.9 * width
            info.k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
            info.p = [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
            info.header.frame_id = f"{name}_optical_frame"
            self.infos[name] = info
            self.pubs[name] = self.node.create_publisher(Image, f"/{name}/image", qos_profile_sensor_data)
            self.info_pubs[name] = self.node.create_publisher(CameraInfo, f"/{name}/camera_info",
                                                              qos_profile_sensor_data)
            self.node.create_subscription(Image, f"/{name}/depth/relative",
                                          lambda msg, n=name: self._on_output(n, msg), reliable)
            if cloud:  # raw bytes: a 4.9 MB cloud is not turned into Python objects at 30 Hz
                self.node.create_subscription(PointCloud2, f"/{name}/points",
                                              lambda data, n=name: self._on_cloud(n, data), reliable, raw=True)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, reliable)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_forever, daemon=True)
        self._spin.start()
        self._stop = threading.Event()
        self._pub_thread: threading.Thread | None = None

    def _spin_forever(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # noqa: BLE001 - context shut down by close()
            pass

    def _on_output(self, name: str, msg: Any) -> None:
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self.lock:
            self.recv[name].append((time.time(), stamp))

    def _on_cloud(self, name: str, data: bytes) -> None:
        # CDR: 4-byte encapsulation header, then header.stamp (int32 sec, uint32 nanosec), little-endian on x86.
        sec, nanosec = struct.unpack_from("<iI", data, 4)
        with self.lock:
            self.recv_cloud[name].append((time.time(), sec * 1_000_000_000 + nanosec))

    def _on_diag(self, msg: Any) -> None:
        with self.lock:
            for status in msg.status:
                self.diag[status.name] = {kv.key: kv.value for kv in status.values}

    def start_streaming(self, hz: float, camera_info: bool = True) -> None:
        """Publish every camera at ``hz`` with phases spread over the period (free-running cameras)."""
        period = 1.0 / hz
        n = len(self.names)

        def run() -> None:
            t0 = time.monotonic()
            k = 0
            while not self._stop.is_set():
                for i, name in enumerate(self.names):
                    due = t0 + k * period + i * period / n
                    delay = due - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    stamp = time.time_ns()
                    img, info = self.images[name], self.infos[name]
                    img.header.stamp.sec, img.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
                    info.header.stamp = img.header.stamp
                    if camera_info:
                        self.info_pubs[name].publish(info)
                    self.pubs[name].publish(img)
                    self.sent[name] += 1
                k += 1

        self._pub_thread = threading.Thread(target=run, daemon=True)
        self._pub_thread.start()

    def optimised(self) -> bool:
        """Whether every node says it serves its optimised path for every frame shape it met (/diagnostics key
        ``optimised``: serve while compiling); a node that does not report it counts as optimised."""
        with self.lock:
            flags = [v["optimised"] for v in self.diag.values() if "optimised" in v]
        return all(flag in ("true", "n/a") for flag in flags)

    def wait_optimised(self, timeout: float, procs: Sequence[subprocess.Popen]) -> bool:
        """Until every node serves its optimised (compiled) path, then one more output from every camera (a frame
        of the optimised path); False after ``timeout`` or when a node exits."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.diag.clear()
        while time.monotonic() < deadline:
            if self.diag and self.optimised():
                with self.lock:
                    counts = {n: len(v) for n, v in self.recv.items()}
                while time.monotonic() < deadline:
                    with self.lock:
                        if all(len(self.recv[n]) > counts[n] for n in self.names):
                            return True
                    time.sleep(0.02)
                return False
            if any(p.poll() is not None for p in procs):
                return False
            time.sleep(0.1)
        return False

    def wait_ready(self, timeout: float, procs: Sequence[subprocess.Popen]) -> bool:
        """Until every camera produced an output (models loaded, endpoints matched)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(self.recv[n] for n in self.names):
                    return True
            if any(p.poll() is not None for p in procs):
                return False
            time.sleep(0.1)
        return False

    def window(self, seconds: float) -> tuple[dict[str, list[tuple[float, int]]], dict[str, int], float,
                                              dict[str, list[tuple[float, int]]]]:
        """Outputs (relative depth, clouds) received and frames sent during the next ``seconds``."""
        with self.lock:
            start_recv = {n: len(v) for n, v in self.recv.items()}
            start_cloud = {n: len(v) for n, v in self.recv_cloud.items()}
            start_sent = dict(self.sent)
        t0 = time.time()
        time.sleep(seconds)
        with self.lock:
            got = {n: list(v[start_recv[n]:]) for n, v in self.recv.items()}
            clouds = {n: list(v[start_cloud[n]:]) for n, v in self.recv_cloud.items()}
            sent = {n: self.sent[n] - start_sent[n] for n in self.names}
        return got, sent, time.time() - t0, clouds

    def close(self) -> None:
        import rclpy

        self._stop.set()
        if self._pub_thread is not None:
            self._pub_thread.join(2.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._spin.join(2.0)


def start_nodes(mode: str, names: list[str], args: argparse.Namespace, models: dict[str, str], domain: int,
                log_dir: Path, tag: str = "") -> list[subprocess.Popen]:
    normals = models.get("normals", "''")
    common = ["-p", f'model_depth:={models["depth"]}', "-p", f"model_normals:={normals}",
              "-p", f'tasks:=[{",".join(models)}]', "-p", f"warmup_size:=[{args.width},{args.height}]",
              "-p", f"device:={args.device}", "-p", f"dtype:={args.dtype}",
              "-p", f"processing_res:={args.processing_res}", "-p", f"batch_size:={args.batch_size}",
              "-p", "diagnostics_period:=1.0", "-p", "local_files_only:=true", "-p", f"optimize:={args.optimize}"]
    if args.cloud:
        common += ["-p", "alignment.fixed_scale:=10.0"]  # metric depth (and so the cloud) without sparse input
    base = [sys.executable, "-m", "geodiff_ros.ros.process", "--ros-args", "--params-file",
            str(REPO / "config" / "geodiff.yaml"), *common]
    if mode == "multi":
        cmds = [(f"multi{len(names)}{tag}", [*base, "-p", f'cameras:=[{",".join(names)}]'])]
    else:
        cmds = [(f"sep{len(names)}_{n}{tag}", [*base, "-r", f"__ns:=/{n}", "-r", f"__node:=geodiff_{n}"])
                for n in names]
    env = ros_env(domain)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir)
    env["GEODIFF_AOT_DIR"] = str(args.cache_dir / "aot")  # never a user's packages from ~/.cache
    if args.torch_threads > 0:  # read when torch loads, so it must be in the child's environment
        env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
    procs = []
    for name, cmd in cmds:
        log = open(log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log_dir / f"{name}.log"  # type: ignore[attr-defined]
        procs.append(proc)
    return procs


WARMUP_RE = re.compile(r"ready: warm-up at \S+ \(batch [^)]*\) took ([0-9.]+) s")
STAGE_RE = re.compile(r"warm-up (\d+)/(\d+) (.+): ([0-9.]+) s")
LOAD_RE = re.compile(r"loaded in (.+?)\s*$", re.MULTILINE)
BUILT_RE = re.compile(r"built (\S+) batch (\d+) for \S+ in ([0-9.]+) s")
SWITCH_RE = re.compile(r"(\S+, batch \d+: now serving \S+ \([0-9.]+ s after the builder started\))")


def warmup_report(procs: Sequence[subprocess.Popen]) -> dict[str, Any]:
    """Warm-up seconds and the slowest warm-up stages, from the node logs (engine/startup.py logs each stage)."""
    seconds, stages = [], []
    for proc in procs:
        text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        seconds += [float(m) for m in WARMUP_RE.findall(text)]
        stages += [(m[2], float(m[3])) for m in STAGE_RE.findall(text)]
    out: dict[str, Any] = {"warmup_s": max(seconds) if seconds else None}
    if stages:
        out["warmup_stages_s"] = {label: t for label, t in sorted(stages, key=lambda x: -x[1])[:8]}
    texts = [Path(proc.log_path).read_text(errors="replace") for proc in procs]  # type: ignore[attr-defined]
    loads = [m for text in texts for m in LOAD_RE.findall(text)]
    if loads:
        out["engine_load"] = loads[:4]  # the engine's own breakdown, per node (core.py logs it)
    built = [m for text in texts for m in BUILT_RE.findall(text)]
    if built:
        out["built_steps_s"] = {f"{label} batch {b}": float(t) for label, b, t in built[:16]}
    switches = [m for text in texts for m in SWITCH_RE.findall(text)]
    if switches:
        out["switches"] = switches[:8]
    crashes = [line for text in texts for line in text.splitlines() if "AOT package" in line and "not used" in line]
    if crashes:
        out["aot_not_used"] = crashes[:4]
    return out


def stop_nodes(procs: Sequence[subprocess.Popen]) -> list[int | None]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(10.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def stream_until_warm(harness: Harness, procs: Sequence[subprocess.Popen], args: argparse.Namespace,
                      row: dict[str, Any], log_dir: Path, camera_info: bool = True) -> bool:
    """Stream every camera at ``args.hz``, wait for each one's first output (``row['startup_s']``), then stream
    ``args.warmup`` seconds more. False, with ``row['error']``, when not every camera had output within
    ``args.startup_timeout``."""
    harness.start_streaming(args.hz, camera_info=camera_info)
    t_start = time.monotonic()
    if not harness.wait_ready(args.startup_timeout, procs):
        row["error"] = f"no output from every camera within {args.startup_timeout:.0f} s (logs in {log_dir})"
        return False
    row["startup_s"] = round(time.monotonic() - t_start, 1)
    if harness.wait_optimised(args.startup_timeout, procs):  # measure the optimised path, not the eager one
        row["full_speed_s"] = round(time.monotonic() - t_start, 1)
    else:
        row["full_speed_error"] = f"not serving the optimised path within {args.startup_timeout:.0f} s"
    time.sleep(args.warmup)
    return True


def camera_rates(names: Sequence[str], got: dict[str, list[tuple[float, int]]], sent: dict[str, int],
                 span: float) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Per camera over a measuring window (Harness.window): frames sent and outputs received per second, latency
    p50 / p95 in ms from the image stamp to reception; and every camera's latencies together."""
    per_cam: dict[str, dict[str, Any]] = {}
    all_lat: list[float] = []
    for name in names:
        lat_ms = [(t - s * 1e-9) * 1e3 for t, s in got[name]]
        all_lat += lat_ms
        per_cam[name] = {"input_hz": sent[name] / span, "output_hz": len(got[name]) / span,
                         "latency_p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms else None,
                         "latency_p95_ms": float(np.percentile(lat_ms, 95)) if lat_ms else None}
    return per_cam, all_lat


def rate_summary(per_cam: dict[str, dict[str, Any]], all_lat: list[float]) -> dict[str, Any]:
    """A run's row figures from camera_rates: mean and slowest output rate, mean input rate, latency p50 / p95."""
    rates = [c["output_hz"] for c in per_cam.values()]
    return {
        "output_hz_mean": float(np.mean(rates)), "output_hz_min": float(np.min(rates)),
        "input_hz_mean": float(np.mean([c["input_hz"] for c in per_cam.values()])),
        "latency_p50_ms": float(np.percentile(all_lat, 50)) if all_lat else None,
        "latency_p95_ms": float(np.percentile(all_lat, 95)) if all_lat else None,
    }


def run_one(mode: str, n: int, args: argparse.Namespace, models: dict[str, str], domain: int,
            log_dir: Path) -> dict[str, Any]:
    names = [f"cam{i}" for i in range(n)]
    harness = Harness(domain, names, args.width, args.height, cloud=args.cloud)
    procs = start_nodes(mode, names, args, models, domain, log_dir)
    row: dict[str, Any] = {"mode": mode, "cameras": n, "processes": len(procs), "tasks": args.tasks}
    try:
        if not stream_until_warm(harness, procs, args, row, log_dir, camera_info=not args.no_camera_info):
            return row
        got, sent, span, clouds = harness.window(args.seconds)
        pids = [p.pid for p in procs]
        row["gpu_mem_mib"] = gpu_memory_mib(pids) if args.device.startswith("cuda") else None
        row["rss_mib"] = round(rss_mib(pids), 1)
        time.sleep(1.2)  # one more /diagnostics period
        with harness.lock:
            diag = dict(harness.diag)
    finally:
        harness.close()
        row["exit_codes"] = stop_nodes(procs)
        row.update(warmup_report(procs))
    per_cam, all_lat = camera_rates(names, got, sent, span)
    all_cloud: list[float] = []
    for name in names:
        if args.cloud:
            cloud_ms = [(t - s * 1e-9) * 1e3 for t, s in clouds[name]]
            all_cloud += cloud_ms
            per_cam[name].update({
                "cloud_hz": len(clouds[name]) / span,
                "cloud_latency_p50_ms": float(np.percentile(cloud_ms, 50)) if cloud_ms else None,
                "cloud_latency_p95_ms": float(np.percentile(cloud_ms, 95)) if cloud_ms else None})
    row.update({"per_camera": per_cam, **rate_summary(per_cam, all_lat)})
    if args.cloud:
        row.update({
            "cloud_hz_min": float(min(c["cloud_hz"] for c in per_cam.values())),
            "cloud_latency_p50_ms": float(np.percentile(all_cloud, 50)) if all_cloud else None,
            "cloud_latency_p95_ms": float(np.percentile(all_cloud, 95)) if all_cloud else None,
        })
    for name in names:  # the node's own counters: frames it received, dropped (mailbox overwrite), processed
        status = next((v for k, v in diag.items() if k.endswith(f": {name}") or k == f"geodiff_{name}: pipeline"),
                      None)
        if status:
            per_cam[name].update({k: int(status[k]) for k in ("received", "dropped", "processed")})
            per_cam[name]["stages_ms"] = {k[:-3]: float(v) for k, v in status.items()
                                          if k.endswith(("_p50_ms", "_p95_ms")) and not k.startswith("latency")}
    stages = [c["stages_ms"] for c in per_cam.values() if "stages_ms" in c]
    if stages:  # worst camera per stage: the bottleneck a user would look for
        row["stages_ms"] = {k: max(st.get(k, float("nan")) for st in stages) for k in stages[0]}
    sched = next((v for k, v in diag.items() if k.endswith(": scheduler")), None)
    if sched:
        row["frames_per_pass"] = float(sched["frames_per_pass"])
        row["max_batch"] = int(sched["max_batch"])
    return row


def run_startup(mode: str, n: int, args: argparse.Namespace, models: dict[str, str], domain: int,
                log_dir: Path) -> list[dict[str, Any]]:
    """Seconds from process start to every camera's first frame: once on an empty compile cache (cold), then
    ``args.startup`` times on the cache that start left (warm restart)."""
    names = [f"cam{i}" for i in range(n)]
    rows = []
    attempts = (["cold"] + ["warm"] * args.startup if args.startup else []) + (["aot"] if args.aot else [])
    if args.startup:
        shutil.rmtree(args.cache_dir, ignore_errors=True)  # the first start is cold
    for attempt, cache in enumerate(attempts):
        aot_compile_s = aot_compile(args, models, n, log_dir) if cache == "aot" else None
        harness = Harness(domain, names, args.width, args.height, cloud=False)
        t0 = time.monotonic()
        procs = start_nodes(mode, names, args, models, domain, log_dir, tag=f"_start{attempt}")
        row: dict[str, Any] = {"kind": "startup", "mode": mode, "cameras": n, "tasks": args.tasks,
                               "cache": cache, "attempt": attempt}
        if aot_compile_s is not None:
            row["aot_compile_s"] = aot_compile_s
        try:
            harness.start_streaming(args.hz, camera_info=not args.no_camera_info)
            if harness.wait_ready(args.startup_timeout, procs):
                row["first_frame_s"] = round(time.monotonic() - t0, 1)
                if harness.wait_optimised(max(1.0, args.startup_timeout - (time.monotonic() - t0)), procs):
                    row["full_speed_s"] = round(time.monotonic() - t0, 1)
                else:
                    row["full_speed_error"] = "not serving the optimised path within the start-up timeout"
            else:
                row["error"] = f"no output from every camera within {args.startup_timeout:.0f} s (logs in {log_dir})"
        finally:
            harness.close()
            row["exit_codes"] = stop_nodes(procs)
            row.update(warmup_report(procs))
        LOG.info("  %s", row)
        rows.append(row)
    return rows


def aot_compile(args: argparse.Namespace, models: dict[str, str], n: int, log_dir: Path) -> float | None:
    """Run geodiff_compile as a user would (a separate process) for the nodes' settings; seconds it took."""
    batches = [1] if n == 1 else list(range(1, min(args.batch_size, n) + 1))
    cmd = [sys.executable, "-m", "geodiff_ros.cli.compile", "--model-depth", models["depth"],
           "--model-normals", models.get("normals", ""), "--device", args.device, "--dtype", args.dtype,
           "--processing-res", str(args.processing_res), "--size", f"{args.width}x{args.height}",
           "--batch-sizes", *map(str, batches), "--optimize", "compile" if args.device == "cpu" else "compile+graph",
           "--local-files-only", "--out", str(args.cache_dir / "aot")]
    env = ros_env(0)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir)
    t0 = time.monotonic()
    with open(log_dir / f"geodiff_compile_{n}.log", "wb") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        LOG.error("geodiff_compile failed (exit %d): %s", code, log_dir / f"geodiff_compile_{n}.log")
        return None
    return round(time.monotonic() - t0, 1)


# ------------------------------------------------------------------------------------------- report

def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; '-' for a figure a run did not measure (None)."""
    return "-" if value is None else format(value, spec)


def _markdown(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def table(result: dict[str, Any]) -> str:
    head = ["mode", "cams", "tasks", "in Hz/cam", "out Hz/cam (mean)", "out Hz/cam (min)", "p50 ms", "p95 ms",
            "GPU MiB", "RSS MiB", "frames/pass", "cloud Hz (min)", "cloud p95 ms", "engine p50/p95 ms",
            "post p50/p95 ms", "publish p50/p95 ms", "first out s", "full speed s"]
    rows = [head]
    starts = [head[:3] + ["cache", "first frame s", "full speed s", "slowest build step", "geodiff_compile s"]]
    for r in result["runs"]:
        if r.get("kind") == "startup":
            slow = max((r.get("built_steps_s") or r.get("warmup_stages_s") or {"-": 0.0}).items(),
                       key=lambda kv: kv[1])
            starts.append([r["mode"], str(r["cameras"]), r["tasks"], r["cache"],
                           r.get("error") or fmt(r.get("first_frame_s"), ".1f"), fmt(r.get("full_speed_s"), ".1f"),
                           f"{slow[0]} {slow[1]:.1f} s" if slow[0] != "-" else "-", fmt(r.get("aot_compile_s"), ".0f")])
            continue
        if "error" in r:
            rows.append([r["mode"], str(r["cameras"]), r.get("tasks", "depth"), r["error"], *[""] * (len(head) - 4)])
            continue
        st = r.get("stages_ms", {})

        def pair(stage: str, st: dict[str, float] = st) -> str:
            return f"{fmt(st.get(stage + '_p50'), '.1f')}/{fmt(st.get(stage + '_p95'), '.1f')}"

        rows.append([r["mode"], str(r["cameras"]), r.get("tasks", "depth"), fmt(r["input_hz_mean"], ".1f"),
                     fmt(r["output_hz_mean"], ".1f"), fmt(r["output_hz_min"], ".1f"), fmt(r["latency_p50_ms"], ".0f"),
                     fmt(r["latency_p95_ms"], ".0f"), fmt(r["gpu_mem_mib"], ".0f"), fmt(r["rss_mib"], ".0f"),
                     fmt(r.get("frames_per_pass"), ".2f"), fmt(r.get("cloud_hz_min"), ".1f"),
                     fmt(r.get("cloud_latency_p95_ms"), ".0f"), pair("engine"), pair("post"), pair("publish"),
                     fmt(r.get("startup_s"), ".1f"), fmt(r.get("full_speed_s"), ".1f")])
    s = result["settings"]
    title = (f"{result['device']['card']}: {s['width']}x{s['height']} @ {s['hz']:g} Hz per camera, "
             f"processing_res {s['processing_res']}, {s['dtype']}, optimize {s.get('optimize', 'none')}, "
             f"batch_size {s['batch_size']}, torch threads {s.get('torch_threads') or 'default'}, "
             f"{s['seconds']:g} s window")
    lines = [title]
    if len(rows) > 1:
        lines += _markdown(rows)
    if len(starts) > 1:
        lines += ["", "start-up to the first published frame (process start -> every camera has output):",
                  *_markdown(starts)]
    return "\n".join(lines)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as the JSON's ``settings`` (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def result_path(args: argparse.Namespace, device: dict[str, Any], stem: str) -> Path:
    """--out, else benchmarks/results/<stem>_<card>[_tiny].json (card from device_info); its folder made."""
    card = device["card"].split(" (")[0].replace(" ", "_").lower()
    out = args.out or REPO / "benchmarks" / "results" / f'{stem}_{card}{"_tiny" if args.tiny else ""}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_result(out: Path, result: dict[str, Any]) -> None:
    out.write_text(json.dumps(result, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = checkpoints(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_multicam_"))
    if args.cache_dir is None:
        args.cache_dir = Path(tempfile.mkdtemp(prefix="bench_multicam_inductor_"))
    result: dict[str, Any] = {"device": device_info(args.device), "settings": settings_of(args), "models": models,
                              "runs": []}
    out = result_path(args, result["device"], "multicam")
    domain = args.domain
    for n in args.cameras:
        for mode in args.modes:
            if args.startup or args.aot:
                LOG.info("start-up: %s, %d camera(s), %d warm restart(s)%s", mode, n, args.startup,
                         ", AOT" if args.aot else "")
                result["runs"] += run_startup(mode, n, args, models, domain, log_dir)
            else:
                LOG.info("run: %s, %d camera(s)", mode, n)
                row = run_one(mode, n, args, models, domain, log_dir)
                LOG.info("  %s", {k: v for k, v in row.items() if k != "per_camera"})
                result["runs"].append(row)
            write_result(out, result)  # after every row: a cut-off run keeps it
            domain = domain + 1 if domain < 100 else 1
    text = table(result)
    print(text)
    result["table"] = text
    write_result(out, result)
    LOG.info("wrote %s (node logs in %s)", out, log_dir)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
