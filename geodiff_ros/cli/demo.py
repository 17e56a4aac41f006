"""geodiff_demo: the geodiff node end to end on a recorded bag (or a live camera), with a summary.

Steps:
  1. Loopback DDS settings for this process and its children, unless the user set them.
  2. Input: ``--bag`` (default: the shared TUM RGB-D bag beside the checkout, else a small synthetic bag written
     into the output folder) or ``--live`` topics.
  3. The real node (``python -m geodiff_ros.ros.process`` with ``config/geodiff.yaml``) starts as a subprocess; if its
     model cannot be loaded the demo prints the engine's message (how to supply the weights) and exits 1.
  4. A recorder subscribes to the node's outputs; the player publishes the bag, turning the depth camera into
     sparse metric depth (``--sparse-fraction``, 2 % by default) so the metric alignment has something to fit.
  5. Once every played frame came back (or the node went quiet), the node gets SIGINT; the outputs are in an mcap
     bag and a table shows topics, counts, encodings, metric scale, accuracy on the held-out depth and latency.

``--tiny`` runs the same path on generated tiny checkpoints on the CPU: the plumbing, not the model quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag
from geodiff_ros.engine.config import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DEPTH_HUB_ID,
    DTYPE_CHOICES,
    NORMALS_HUB_ID,
    processing_res_argument,
)
from geodiff_ros.ros.environment import ensure_ros_env, share_file

if TYPE_CHECKING:  # rclpy is imported only once the environment is set (main)
    from geodiff_ros.bag.live import Recorder

__all__ = ["main"]

LOG = logging.getLogger("geodiff_demo")

_PKG_ROOT = Path(__file__).resolve().parents[2]  # folder holding the geodiff_ros package (repo root in a checkout)
SPARSE_TOPIC = "/geodiff_demo/sparse_depth"
OUTPUTS = ("/depth/relative", "/depth/image", "/depth/camera_info", "/normals/image", "/points")


# ------------------------------------------------------------------------------------------------ environment


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PKG_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_COLORIZED_OUTPUT"] = "0"
    return env


def _shared_bag() -> Path | None:
    """The shared TUM bag: $GEODIFF_SHARED_DATA, else ../shared/data beside the checkout (seen from the working
    directory, since an installed copy of this module lives inside the venv, or from the source tree)."""
    env = os.environ.get("GEODIFF_SHARED_DATA")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "data", _PKG_ROOT.parent / "shared" / "data"]
    for data in candidates:
        bag = data / "bags" / "tum_fr2_desk_rgbd_mcap"
        if (bag / "metadata.yaml").is_file():
            return bag
    return None


# ------------------------------------------------------------------------------------------------ node process


def _cdr_stamp(data: bytes) -> int:
    """Header stamp (ns) of a serialized message that starts with std_msgs/Header (CDR little endian)."""
    sec, nsec = struct.unpack_from("<iI", data, 4)
    return sec * 1_000_000_000 + nsec


class _NodeProcess:
    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, env=_child_env(), stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_active(self, timeout: float) -> str:
        """'active', 'exited' or 'timeout'."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "processing frames" in self.log():  # logged after the warm-up (warmup_size)
                return "active"
            if self.proc.poll() is not None:
                return "exited"
            time.sleep(0.2)
        return "timeout"

    def stop(self, timeout: float = 10.0) -> tuple[int | None, float]:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                return None, time.monotonic() - t0
        self._log.close()
        return self.proc.returncode, time.monotonic() - t0


def _pipeline_counts(data: bytes) -> dict[str, int]:
    """Frame counters (received, processed, dropped, bad_input) from a serialized /diagnostics message."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import deserialize_message

    out: dict[str, int] = {}
    for status in deserialize_message(data, DiagnosticArray).status:
        if status.name.endswith("pipeline"):
            for kv in status.values:
                if kv.key in ("received", "processed", "dropped", "bad_input") and kv.value.isdigit():
                    out[kv.key] = int(kv.value)
    return out


def _configure_error(log: str) -> str:
    for line in log.splitlines():
        if "configure failed" in line or "cannot start" in line:
            return line.split("]: ", 1)[-1]
    return "\n".join(log.splitlines()[-15:])


# ------------------------------------------------------------------------------------------------ summary


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _summarise(out_bag: Path, ns: str, dense: dict[int, np.ndarray], sent: dict[int, float],
               received: dict[int, float], kept_masks: dict[int, np.ndarray]) -> dict[str, Any]:
    """Read the recorded outputs back: per-topic table, metric scale, accuracy on held-out depth, latency."""
    from geodiff_ros.bag.storage import open_bag
    from geodiff_ros.ros.conversions import image_to_numpy

    topics: dict[str, dict[str, Any]] = {}
    relative: dict[int, np.ndarray] = {}
    metric: dict[int, np.ndarray] = {}
    with open_bag(out_bag) as bag:
        for raw in bag.messages():
            msg = bag.deserialize(raw)
            row = topics.setdefault(raw.topic, {"type": raw.msgtype, "count": 0, "encodings": set(), "size": ""})
            row["count"] += 1
            stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
            if raw.msgtype == "sensor_msgs/msg/Image":
                row["encodings"].add(msg.encoding)
                row["size"] = f"{msg.width}x{msg.height}"
                if raw.topic == f"{ns}/depth/relative":
                    relative[stamp] = image_to_numpy(msg)
                elif raw.topic == f"{ns}/depth/image":
                    metric[stamp] = image_to_numpy(msg)
            elif raw.msgtype == "sensor_msgs/msg/PointCloud2":
                row["encodings"].add(",".join(f.name for f in msg.fields))
                row["size"] = f"{msg.width}x{msg.height} pts"
            elif raw.msgtype == "sensor_msgs/msg/CameraInfo":
                row["size"] = f"{msg.width}x{msg.height}"
    scales, absrel, delta1 = [], [], []
    for stamp, depth in metric.items():
        rel = relative.get(stamp)
        ok = np.isfinite(depth)
        if rel is not None and ok.sum() > 10:
            a = np.stack([rel[ok], np.ones(int(ok.sum()))], axis=1)
            scales.append(float(np.linalg.lstsq(a, depth[ok], rcond=None)[0][0]))  # depth = s * relative + t
        gt = dense.get(stamp)
        if gt is not None:
            held = np.isfinite(gt) & (gt > 0) & ok & ~kept_masks.get(stamp, np.zeros_like(ok))
            if held.any():
                ratio = depth[held] / gt[held]
                absrel.append(float(np.mean(np.abs(depth[held] - gt[held]) / gt[held])))
                delta1.append(float(np.mean(np.maximum(ratio, 1.0 / ratio) < 1.25)))
    latency = [received[s] - sent[s] for s in received if s in sent]
    for row in topics.values():
        row["encodings"] = " ".join(sorted(row["encodings"]))
    return {
        "topics": topics,
        "frames_sent": len(sent),
        "frames_out": len(relative),
        "frames_metric": len(metric),
        "scale_median": float(np.median(scales)) if scales else None,
        "absrel_heldout": float(np.mean(absrel)) if absrel else None,
        "delta1_heldout": float(np.mean(delta1)) if delta1 else None,
        "latency_p50_s": _percentile(latency, 50),
        "latency_p95_s": _percentile(latency, 95),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from geodiff_ros.bag.report import format_table as _table
    from geodiff_ros.bag.report import print_out as _out

    rows = [[t, r["type"].split("/")[-1], str(r["count"]), r["encodings"], r["size"]]
            for t, r in sorted(summary["topics"].items())]
    _out("\n" + _table(rows, ["topic", "type", "count", "encoding / fields", "size"]))

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)

    dropped = summary.get("node_counts", {}).get("dropped", 0)
    played = f'{summary["frames_sent"]} played, ' if not summary.get("live") else ""
    drops = f", {dropped} dropped by the busy node (newest-frame policy; slow the bag with --rate)" if dropped else ""
    _out(f'frames: {played}{summary["frames_out"]} processed, {summary["frames_metric"]} metric{drops}')
    counts = summary.get("node_counts", {})
    _out("the node's last /diagnostics: " + ", ".join(f"{k} {counts[k]}" for k in ("received", "processed",
                                                                                 "dropped", "bad_input")
                                                      if k in counts))
    _out(f'metric scale s (median; depth in m = s * relative + t): {fmt(summary["scale_median"], ".3f")}')
    _out(f'held-out depth camera pixels: AbsRel {fmt(summary["absrel_heldout"], ".3f")}, '
         f'delta1 {fmt(summary["delta1_heldout"], ".3f")}')
    _out(f'latency image -> depth/relative: p50 {fmt(summary["latency_p50_s"], ".3f")} s, '
         f'p95 {fmt(summary["latency_p95_s"], ".3f")} s')
    _out(f'node exit code {summary.get("node_exit")} after SIGINT ({fmt(summary.get("node_stop_s"), ".2f")} s)')
    _out(f'outputs: {summary["bag"]}')
    if summary.get("tiny"):
        _out("(--tiny: random tiny weights, so depth values and accuracy are meaningless; the plumbing is real)")


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodiff_demo", description=__doc__.split("\n")[0],
        epilog="Default input: ../shared/data/bags/tum_fr2_desk_rgbd_mcap beside the checkout (or "
               "$GEODIFF_SHARED_DATA), else a synthetic bag. Exit 0 when frames came back and the node exited 0.")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--bag", type=Path, help="recorded bag to play (directory or .mcap / .db3)")
    src.add_argument("--live", action="store_true", help="use live topics instead of a bag")
    parser.add_argument("--namespace", default="",
                        help="run the node and its topics in this namespace (several demos side by side)")
    parser.add_argument("--image-topic", default=IMAGE_TOPIC)
    parser.add_argument("--camera-info-topic", default=INFO_TOPIC)
    parser.add_argument("--depth-topic", default=DEPTH_TOPIC,
                        help='depth image turned into sparse depth for the metric fit ("" = relative only)')
    parser.add_argument("--sparse-fraction", type=float, default=0.02,
                        help="fraction of depth pixels kept as sparse input (default 0.02, LiDAR-like)")
    parser.add_argument("--depth-model", default=None, help=f"hub id or folder (default {DEPTH_HUB_ID})")
    parser.add_argument("--normals-model", default=None, help=f"hub id or folder (default {NORMALS_HUB_ID})")
    parser.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=f"default {DEFAULT_DTYPE}")
    parser.add_argument("--processing-res", type=processing_res_argument, default=None,
                        help=f"default {DEFAULT_PROCESSING_RES} (256 with --tiny)")
    parser.add_argument("--allow-cpu-fallback", action="store_true")
    parser.add_argument("--local-files-only", action="store_true", help="never download weights")
    parser.add_argument("--tiny", action="store_true",
                        help="generated tiny checkpoints on the CPU: shows the plumbing in seconds")
    parser.add_argument("--rate", type=float, default=1.0, help="bag playback rate")
    parser.add_argument("--loops", type=int, default=1, help="play the bag this many times")
    parser.add_argument("--duration", type=float, default=20.0, help="--live: seconds to record")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default ./geodiff_demo_<time>)")
    parser.add_argument("--startup-timeout", type=float, default=None,
                        help="seconds to wait for the model to load (default 120, 600 for hub weights)")
    return parser


def _wait_other_outputs(recorder: Recorder, topics: list[str], stop: threading.Event, timeout: float = 5.0) -> None:
    """Wait until every output topic seen so far has as many messages as depth/relative (the node publishes a
    frame's topics one after the other, and a loaded machine delivers the last frame's camera_info or cloud
    later than its depth), or until ``timeout``: a topic may legitimately skip frames (no metric fit)."""
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while not stop.is_set() and time.monotonic() < deadline:
        counts = recorder.counts
        n = counts.get(topics[0], 0)
        if all(counts.get(t, 0) >= n for t in topics if counts.get(t, 0) > 0):
            return
        time.sleep(0.1)


def _wait_node_counts(counts: dict[str, int], outputs: int, played: int, stop: threading.Event,
                      timeout: float = 5.0) -> None:
    """Wait (at most ``timeout``) for a /diagnostics message that counts every frame seen: the node publishes it
    once per diagnostics_period (1 s), so the one in hand when the last output arrives predates that frame."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if counts.get("processed", 0) >= outputs and counts.get("received", 0) >= played:
            return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Console entry ``geodiff_demo``; 0 on success, 1 if the node failed or nothing came back, 2 bad input."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    from geodiff_ros.bag.storage import BagError

    try:
        return _run(args)
    except BagError as err:
        LOG.error("%s", err)
        return 2


def _run(args: argparse.Namespace) -> int:
    # 1. Environment: loopback DDS for us and the node.
    changed = ensure_ros_env()
    if changed:
        LOG.info("DDS kept on this machine: %s", " ".join(f"{k}={v}" for k, v in changed.items()))
    out_dir = args.out or Path.cwd() / time.strftime("geodiff_demo_%Y%m%d_%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_bag = out_dir / "outputs"
    if out_bag.exists():
        from geodiff_ros.bag.storage import BagError

        msg = f"{out_bag} exists; pass a new --out folder"
        raise BagError(msg)

    # 2. Input.
    bag_path = None
    if not args.live:
        bag_path = args.bag or _shared_bag()
        if bag_path is None:
            bag_path = out_dir / "synthetic_input"
            if not bag_path.exists():
                LOG.info("shared TUM bag not found: writing a synthetic RGB-D bag to %s", bag_path)
                write_synthetic_bag(bag_path)
        LOG.info("input bag: %s", bag_path)
        from geodiff_ros.bag.storage import open_bag

        with open_bag(bag_path) as bag:  # topic names checked before the model loads
            bag.select([t for t in (args.image_topic, args.camera_info_topic, args.depth_topic) if t])

    # 3. Model settings and the node.
    depth_model = args.depth_model or DEPTH_HUB_ID
    normals_model = args.normals_model or NORMALS_HUB_ID
    device, dtype = args.device or DEFAULT_DEVICE, args.dtype or DEFAULT_DTYPE
    processing_res = args.processing_res if args.processing_res is not None else DEFAULT_PROCESSING_RES
    if args.tiny:
        from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

        ckpt = out_dir / "tiny_checkpoints"
        if args.depth_model is None:
            depth_model = str(ckpt / "depth") if (ckpt / "depth" / "model_index.json").is_file() else str(
                write_tiny_checkpoint(ckpt / "depth", "depth"))
        if args.normals_model is None:
            normals_model = str(ckpt / "normals") if (ckpt / "normals" / "model_index.json").is_file() else str(
                write_tiny_checkpoint(ckpt / "normals", "normals"))
        device, dtype = args.device or "cpu", args.dtype or "fp32"
        processing_res = args.processing_res if args.processing_res is not None else 256
    params_file = share_file("config", "geodiff.yaml")
    cmd = [sys.executable, "-m", "geodiff_ros.ros.process", "--ros-args"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    for name, value in (("model_depth", depth_model), ("model_normals", normals_model), ("device", device),
                        ("dtype", dtype), ("processing_res", processing_res),
                        ("allow_cpu_fallback", str(args.allow_cpu_fallback).lower()),
                        ("local_files_only", str(args.local_files_only).lower())):
        cmd += ["-p", f"{name}:={value}"]
    # Inputs: live topics as they are; a bag's topics are remapped by the player onto the node's inputs.
    ns = "/" + args.namespace.strip("/") if args.namespace.strip("/") else ""
    use_depth = bool(args.depth_topic)
    if bag_path is not None and ns:
        image_in, info_in, sparse_in = f"{ns}/image", f"{ns}/camera_info", f"{ns}/sparse_depth"
    elif bag_path is not None:
        image_in, info_in, sparse_in = args.image_topic, args.camera_info_topic, SPARSE_TOPIC
    else:
        image_in, info_in, sparse_in = args.image_topic, args.camera_info_topic, args.depth_topic
    if ns:
        cmd += ["-r", f"__ns:={ns}"]
    cmd += ["-r", f"image:={image_in}", "-r", f"camera_info:={info_in}"]
    if use_depth:
        cmd += ["-r", f"sparse_depth:={sparse_in}"]
    LOG.info("starting the node: depth=%s normals=%s device=%s dtype=%s processing_res=%s", depth_model,
             normals_model, device, dtype, processing_res)
    node_proc = _NodeProcess(cmd, out_dir / "node.log")
    timeout = args.startup_timeout or (120.0 if args.tiny or Path(depth_model).exists() else 600.0)
    state = node_proc.wait_active(timeout)
    if state != "active":
        code, _ = node_proc.stop()
        reason = _configure_error(node_proc.log()) if state == "exited" else f"not active after {timeout:.0f} s"
        LOG.error("the node did not start (exit code %s): %s", code, reason)
        if state == "exited":
            sys.stderr.write(
                "\nTo supply the weights: run once with network access (they download to the Hugging Face cache, "
                "~/.cache/huggingface), or pass local folders in hub layout with --depth-model / --normals-model. "
                "Without a GPU add --device cpu or --allow-cpu-fallback (slow). Try the plumbing with --tiny.\n"
                f"Node log: {node_proc.log_path}\n")
        return 1

    # 4. Recorder (outputs) and player (inputs) in this process, over real DDS.
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from geodiff_ros.bag.live import Player, PlayOptions, Recorder
    from geodiff_ros.bag.process import sparse_depth_image
    from geodiff_ros.bag.storage import BagWriter, open_bag
    from geodiff_ros.ros.conversions import depth_to_metres, numpy_to_image_fields

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    context = rclpy.context.Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("geodiff_demo", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    received: dict[int, float] = {}
    sent: dict[int, float] = {}
    dense: dict[int, np.ndarray] = {}
    kept_masks: dict[int, np.ndarray] = {}
    writer = BagWriter(out_bag, storage="mcap")
    node_counts: dict[str, int] = {}

    def on_output(topic: str, data: bytes) -> None:
        if topic == f"{ns}/depth/relative":  # latency probe on the raw bytes
            received.setdefault(_cdr_stamp(data), time.monotonic())
        elif topic == "/diagnostics":  # the node's own frame counters say when it is done
            node_counts.update(_pipeline_counts(data))

    recorder = Recorder(node, writer, [ns + o for o in OUTPUTS] + ["/diagnostics"], on_message=on_output)
    spinner.start()
    play_stats = None
    try:
        if not recorder.wait_subscribed(15.0):
            LOG.warning("no publisher seen for %s yet (depth/image appears with the first metric frame)",
                        ", ".join(recorder.pending))
        if bag_path is not None:
            with open_bag(bag_path) as bag:
                topics = [args.image_topic, args.camera_info_topic] + ([args.depth_topic] if use_depth else [])
                bag.select(topics)

                def sparsify(raw: Any) -> bytes:
                    msg = bag.deserialize(raw)
                    stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
                    mm = sparse_depth_image(msg, args.sparse_fraction, seed=stamp % (2**32))  # [H,W] uint16
                    dense[stamp] = depth_to_metres(msg)
                    kept_masks[stamp] = mm > 0
                    fields = numpy_to_image_fields(mm, "16UC1")
                    fields["data"] = np.frombuffer(fields["data"], np.uint8)
                    out = bag.typestore.types["sensor_msgs/msg/Image"](header=msg.header, **fields)
                    return bytes(bag.typestore.serialize_cdr(out, "sensor_msgs/msg/Image"))

                def on_publish(topic: str, raw: Any) -> None:
                    if topic == image_in:
                        sent.setdefault(_cdr_stamp(bytes(raw.data[:12])), time.monotonic())

                opts = PlayOptions(rate=args.rate, loop=args.loops > 1, max_loops=max(1, args.loops), topics=topics,
                                   remaps={args.image_topic: image_in, args.camera_info_topic: info_in,
                                           **({args.depth_topic: sparse_in} if use_depth else {})},
                                   wait_subscribers=1, wait_timeout=15.0,
                                   transforms={args.depth_topic: sparsify} if use_depth else {},
                                   on_publish=on_publish)
                player = Player(node, bag, opts)
                play_stats = player.play(stop)
                player.close()
            # 5. Wait for the node to catch up: every frame back, or its counters say the rest were dropped
            #    (newest-frame policy while busy), or no news for a while.
            last_n, last_change = -1, time.monotonic()
            while not stop.is_set():
                n = len(received)
                handled = sum(node_counts.get(k, 0) for k in ("processed", "dropped", "bad_input"))
                if n >= len(sent) or (node_counts.get("received", 0) >= len(sent) and handled >= len(sent)
                                      and n >= node_counts.get("processed", 0)):
                    break
                if n != last_n:
                    last_n, last_change = n, time.monotonic()
                if time.monotonic() - last_change > 60.0:
                    LOG.warning("no output for 60 s: %d of %d frames came back", n, len(sent))
                    break
                time.sleep(0.1)
            _wait_other_outputs(recorder, [ns + o for o in OUTPUTS], stop)
            _wait_node_counts(node_counts, len(received), len(sent), stop)
        else:
            LOG.info("recording the node outputs for %.0f s (live topics %s)", args.duration, args.image_topic)
            stop.wait(args.duration)
    finally:
        recorder.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        node_code, node_stop_s = node_proc.stop()

    summary = _summarise(out_bag, ns, dense, sent, received, kept_masks)
    summary.update({"node_counts": dict(node_counts), "node_exit": node_code, "node_stop_s": node_stop_s,
                    "bag": str(out_bag),
                    "input": str(bag_path) if bag_path else f"live {args.image_topic}", "tiny": args.tiny,
                    "node_log": str(node_proc.log_path), "namespace": ns, "live": bag_path is None,
                    "play_damage": play_stats.damage if play_stats else None})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    if play_stats is not None and play_stats.damage:
        LOG.warning("input bag damaged: %s", play_stats.damage)
    if bag_path is None and summary["frames_out"] == 0:
        LOG.error("no output recorded: is a camera publishing %s?", args.image_topic)
        return 1
    if summary["frames_out"] == 0 or node_code != 0:
        LOG.error("the demo failed: %d frames processed, node exit code %s (log: %s)", summary["frames_out"],
                  node_code, node_proc.log_path)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
