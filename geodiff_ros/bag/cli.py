"""``geodiff_bag``: play, record, inspect, process and export ROS 2 bags without rosbag2 (``ros2 bag`` is not on PyPI).

  geodiff_bag info BAG
  geodiff_bag play BAG [--rate F] [--loop] [--topics T ...] [--remap FROM:=TO ...] [--qos reliable|best_effort]
                       [--wait-subscribers N --wait-timeout S] [--clock [HZ]]
  geodiff_bag record OUT --topics T ... [--storage mcap|sqlite3] [--qos ...] [--duration S] [--count N]
  geodiff_bag process IN OUT --image-topic T [--camera-info-topic T] [--sparse-topic T] [--sparse-frame F
                       --sparse-transform X Y Z QX QY QZ QW] [--depth-model M]
                       [--normals-model M] [--tiny] [--device D | --devices D1,D2,...] [--dtype D]
                       [--optimize MODE] [--processing-res N]
  geodiff_bag export BAG OUT_DIR --image-topic T --depth-topic T [--camera-info-topic T] [--max-dt S]
                       [--every N] [--set NAME]

Exit codes: 0 done; 1 runtime failure (model not loadable, DDS error); 2 bad arguments or unusable input (missing
bag or topic, unknown type, output exists); 3 the input bag is damaged: everything before the damage was
played / processed / exported and the message says where reading stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from geodiff_ros.bag.report import format_table, print_out
from geodiff_ros.bag.storage import Bag, BagError, BagWriter, open_bag
from geodiff_ros.engine.config import (
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DEPTH_HUB_ID,
    DTYPE_CHOICES,
    NORMALS_HUB_ID,
    optimize_problem,
    processing_res_argument,
)

__all__ = ["main"]

LOG = logging.getLogger("geodiff_bag")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3


def _remaps(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            msg = f"--remap {item!r} must look like /from:=/to"
            raise BagError(msg)
        out[src] = dst
    return out


# ------------------------------------------------------------------------------------------------ info


def cmd_info(args: argparse.Namespace) -> int:
    """Topics, types, counts and QoS of a bag (reads the whole bag when it is damaged)."""
    with open_bag(args.bag) as bag:
        rows = []
        for meta in bag.topics.values():
            rel = ",".join(sorted({q.reliability.name.lower() for q in meta.qos})) or "-"
            problem = bag.type_problem(meta.msgtype)
            rows.append([meta.name, meta.msgtype, str(meta.count) if meta.count >= 0 else "?", rel,
                         "ok" if problem is None else f"unknown type: {problem}"])
        print_out(f"bag: {bag.path}  storage: {bag.storage}")
        if bag.salvaged:
            n = sum(1 for _ in bag.messages())
            print_out(f'DAMAGED: {bag.salvaged}\n  readable messages: {n}; {bag.damage or "no further damage found"}')
        print_out(format_table(rows, ["topic", "type", "count", "offered QoS", "decode"]))
        return EXIT_DAMAGED if bag.salvaged else EXIT_OK


# ------------------------------------------------------------------------------------------------ ROS set-up


def _init_ros(name: str) -> tuple[Any, Any, threading.Event]:
    """rclpy context + node with our own SIGINT/SIGTERM handling (a stop event), so files are always closed.

    The node name gets this process's id and a random suffix, as ros2cli names its nodes: two players or
    recorders at once must not share a name (ROS warns, and their logs and services would mix).
    """
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from geodiff_ros.ros.environment import ensure_ros_env

    ensure_ros_env()
    stop = threading.Event()

    def on_signal(_sig: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    context = rclpy.context.Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(f"{name}_{os.getpid()}_{secrets.token_hex(2)}", context=context)
    return context, node, stop


def _shutdown_ros(context: Any, node: Any) -> None:
    import rclpy

    node.destroy_node()
    rclpy.try_shutdown(context=context)


# ------------------------------------------------------------------------------------------------ play


def cmd_play(args: argparse.Namespace) -> int:
    """Publish a bag's messages (raw CDR) with their recorded timing."""
    from geodiff_ros.bag.live import Player, PlayOptions

    opts = PlayOptions(rate=args.rate, loop=args.loop, topics=args.topics, remaps=_remaps(args.remap or []),
                       qos=args.qos, wait_subscribers=args.wait_subscribers, wait_timeout=args.wait_timeout,
                       clock_hz=args.clock)
    with open_bag(args.bag) as bag:
        context, node, stop = _init_ros("geodiff_bag_player")
        try:
            player = Player(node, bag, opts)
            LOG.info("playing %s: %s", bag.path, ", ".join(player.out_topic(n) for n in player.pubs))
            stats = player.play(stop)
            player.close()
        finally:
            _shutdown_ros(context, node)
    rows = [[topic, str(n)] for topic, n in stats.published.items()]
    print_out(format_table(rows, ["topic", "published"]))
    print_out(f'{sum(stats.published.values())} messages in {stats.seconds:.2f} s'
              f'{", interrupted" if stats.stopped else ""}; loops: {stats.loops}')
    for topic, why in stats.skipped_topics.items():
        print_out(f"skipped {topic}: {why}")
    if stats.damage:
        print_out(f"bag damaged: {stats.damage}")
        return EXIT_DAMAGED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ record


def cmd_record(args: argparse.Namespace) -> int:
    """Subscribe raw to topics and write them to a new bag until Ctrl-C / SIGTERM, --duration or --count."""
    from rclpy.executors import SingleThreadedExecutor

    from geodiff_ros.bag.live import Recorder

    writer = BagWriter(args.out, storage=args.storage)
    context, node, stop = _init_ros("geodiff_bag_recorder")
    recorder = None
    try:
        recorder = Recorder(node, writer, args.topics, qos=args.qos)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        LOG.info("recording to %s (%s); Ctrl-C to stop", writer.path, args.storage)
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        warned = False
        t0 = time.monotonic()
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
            if deadline is not None and time.monotonic() > deadline:
                break
            counts = recorder.counts
            if args.count > 0 and not recorder.pending and all(counts.get(t, 0) >= args.count
                                                               for t in recorder.subscribed):
                break
            if recorder.pending and not warned and time.monotonic() - t0 > 5.0:
                LOG.warning("no publisher yet on: %s (still waiting)", ", ".join(recorder.pending))
                warned = True
        executor.shutdown(timeout_sec=1.0)
    finally:
        if recorder is not None:
            recorder.close()
        else:
            writer.close()
        _shutdown_ros(context, node)
    rows = [[t, writer.types.get(t, "?"), str(n)] for t, n in writer.counts.items()]
    print_out(format_table(rows, ["topic", "type", "recorded"]))
    print_out(f"bag: {writer.path}")
    if recorder is not None:
        for topic in recorder.pending:
            print_out(f"never published: {topic}")
        for topic, why in recorder.errors.items():
            print_out(f"not recorded {topic}: {why}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ process


def build_engine(args: argparse.Namespace) -> Any:
    """GeoDiffEngine from the CLI flags; ``--tiny`` writes tiny checkpoints to a temporary folder (CPU plumbing)."""
    from geodiff_ros.engine import GeoDiffEngine

    return GeoDiffEngine(engine_config(args))


def engine_config(args: argparse.Namespace) -> Any:
    """EngineConfig from the CLI flags (tiny checkpoints written once here, so every worker loads the same)."""
    from geodiff_ros.engine import EngineConfig

    depth, normals = args.depth_model, args.normals_model
    device, dtype = args.device, args.dtype
    if args.tiny:
        from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

        root = Path(tempfile.mkdtemp(prefix="geodiff_tiny_"))
        depth = str(write_tiny_checkpoint(root / "tiny-depth", "depth")) if depth else None
        normals = str(write_tiny_checkpoint(root / "tiny-normals", "normals")) if normals else None
        device = device or "cpu"
        dtype = dtype or "fp32"
        LOG.info("--tiny: random tiny checkpoints in %s (plumbing only, the outputs are meaningless)", root)
    return EngineConfig(depth_model=depth or None, normals_model=normals or None, device=device or "cuda",
                        dtype=dtype or DEFAULT_DTYPE, processing_res=args.processing_res,
                        allow_cpu_fallback=args.allow_cpu_fallback, local_files_only=args.local_files_only,
                        batch_size=args.batch_size, optimize=args.optimize)


def _median(values: list[float]) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[len(s) // 2]:.4g}"


def cmd_process(args: argparse.Namespace) -> int:
    """Offline inference over a bag's image topic into a new bag (originals + depth, normals, points)."""
    from tqdm import tqdm

    from geodiff_ros.bag.parallel import EnginePool, WorkerError, parse_devices, process_bag_parallel
    from geodiff_ros.bag.process import TRANSFORM_FORMAT, ProcessOptions, process_bag
    from geodiff_ros.engine import GeoDiffError

    opts = ProcessOptions(
        image_topic=args.image_topic, camera_info_topic=args.camera_info_topic, sparse_topic=args.sparse_topic,
        sparse_fraction=args.sparse_fraction, output_namespace=args.output_namespace, visualize=args.vis,
        batch_size=args.batch_size, settings=frame_settings_from_args(args, TRANSFORM_FORMAT))
    opts.frame_settings()  # a bad setting exits 2 before the model loads
    problem = optimize_problem(args.optimize, "--optimize")
    if problem:
        raise BagError(problem)
    if Path(args.out).exists():
        msg = f"output bag {args.out} exists; choose a new path or delete it first (bags are never overwritten)"
        raise BagError(msg)
    if args.devices is not None:
        if args.device is not None:
            msg = "give either --device or --devices, not both"
            raise BagError(msg)
        try:
            devices = parse_devices(args.devices)
        except ValueError as err:
            raise BagError(str(err)) from err
        args.device = devices[0]
    bag: Bag = open_bag(args.bag)
    try:
        bag.select([t for t in (args.image_topic, args.camera_info_topic, args.sparse_topic) if t])  # before loading
        total = bag.topics[args.image_topic].count if args.image_topic in bag.topics else 0
        if args.devices is not None and len(devices) > 1:  # one worker process per device (bag.parallel)
            try:
                with EnginePool(engine_config(args), devices) as pool, \
                        BagWriter(args.out, storage=args.storage, typestore=bag.typestore) as writer, \
                        tqdm(total=total if total > 0 else None, unit="frame", desc="geodiff", disable=None) as bar:
                    summary = process_bag_parallel(bag, writer, pool, opts, progress=bar.update)
            except WorkerError as err:
                LOG.error("%s", err)
                return EXIT_FAILED
        else:
            try:
                engine = build_engine(args)
            except GeoDiffError as err:
                LOG.error("cannot load the model: %s", err)
                return EXIT_FAILED
            with BagWriter(args.out, storage=args.storage, typestore=bag.typestore) as writer, \
                    tqdm(total=total if total > 0 else None, unit="frame", desc="geodiff", disable=None) as bar:
                summary = process_bag(bag, writer, engine, opts, progress=bar.update)
            summary.devices = [str(engine.device)]
    finally:
        bag.close()
    rows = [[t, str(n), "copied"] for t, n in summary.passthrough.items()]
    rows += [[t, str(n), "new"] for t, n in summary.outputs.items()]
    print_out(format_table(rows, ["topic", "messages", ""]))
    per_frame = summary.infer_seconds / summary.frames_out if summary.frames_out else float("nan")
    print_out(f"frames: {summary.frames_in} in, {summary.frames_out} out, {summary.frames_metric} metric, "
              f"{summary.frames_failed} failed; {summary.seconds:.1f} s ({per_frame:.3f} s/frame inference)")
    fps = summary.frames_out / summary.seconds if summary.seconds > 0 else float("nan")
    shares = f' (frames per worker: {", ".join(map(str, summary.worker_frames))})' if summary.worker_frames else ""
    print_out(f'throughput: {fps:.2f} frames/s on {", ".join(summary.devices)}{shares}')
    print_out(f'camera_info: {summary.camera_info_topic or "none (no cloud)"}; metric scale (median): '
              f'{_median(summary.scales)}; fit residual (median, relative): {_median(summary.residuals)}')
    if summary.sparse_unused:
        print_out(f"sparse input matched but not usable for {summary.sparse_unused} frame(s) (see the warnings)")
    if summary.absrel_heldout:
        print_out(f"AbsRel of metric depth vs held-out sparse pixels (median over frames): "
                  f"{_median(summary.absrel_heldout)}")
    for topic, why in summary.skipped_topics.items():
        print_out(f"not copied {topic}: {why}")
    print_out(f"bag: {args.out}")
    if summary.damage:
        print_out(f"input bag damaged, processed up to there: {summary.damage}")
        return EXIT_DAMAGED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    """Colour/depth pairs of a bag -> rgb/ + depth/ PNGs and manifest.json (fine-tuning / evaluation input)."""
    from tqdm import tqdm

    from geodiff_ros.bag.export import ExportOptions, ExportSummary, export_bag

    opts = ExportOptions(image_topic=args.image_topic, depth_topic=args.depth_topic,
                         camera_info_topic=args.camera_info_topic, max_dt=args.max_dt, every=args.every,
                         set_name=args.set or "")
    with open_bag(args.bag) as bag, tqdm(unit="frame", desc="export", disable=None) as bar:
        def scanned(summary: ExportSummary) -> None:
            bar.total = summary.kept
            bar.refresh()

        summary = export_bag(bag, args.out_dir, opts, progress=bar.update, on_scanned=scanned)
    print_out(f"images: {summary.images}, depth images: {summary.depths}; pairs within {args.max_dt} s: "
              f"{summary.pairs} (unpaired images skipped: {summary.unpaired_images}, "
              f"unused depth images: {summary.unused_depths})")
    print_out(f"exported: {summary.exported} of {summary.kept} kept (every {args.every}); "
              f"failed: {len(summary.failed)}; depth resampled to the image grid: {summary.resampled}; "
              f"depth pixels beyond 65.535 m written as 0: {summary.beyond_range_px}")
    checked = summary.depth_camera_info_topic
    print_out(f'intrinsics: {summary.camera_info_topic or "none (no camera_info)"}'
              f'{f"; depth registration checked with {checked}" if checked else ""}')
    print_out(f'manifest: {summary.manifest or "none written"}')
    if summary.damage:
        print_out(f"input bag damaged, exported up to there: {summary.damage}")
        return EXIT_DAMAGED
    if summary.exported == 0:
        print_out("no frame could be decoded (see the warnings above)")
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodiff_bag", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Play, record, inspect, process and export ROS 2 bags (mcap, sqlite3) without rosbag2.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad arguments or input, 3 damaged bag (partly used).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="list topics, types, counts and offered QoS")
    p.add_argument("bag", help="bag directory or .mcap / .db3 file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("play", help="publish a bag with its recorded timing")
    p.add_argument("bag", help="bag directory or .mcap / .db3 file")
    p.add_argument("--rate", type=float, default=1.0, help="time scale (2 = twice as fast); default 1")
    p.add_argument("--loop", action="store_true", help="start over at the end until stopped")
    p.add_argument("--topics", nargs="+", metavar="T", help="play only these bag topics (default: all)")
    p.add_argument("--remap", nargs="+", metavar="FROM:=TO", help="publish bag topic FROM on TO")
    p.add_argument("--qos", choices=("reliable", "best_effort"),
                   help="reliability of every publisher (default: as recorded, reliable if unknown)")
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="before the first message wait until each played topic has N subscribers (so best-effort "
                        "replay loses nothing)")
    p.add_argument("--wait-timeout", type=float, default=10.0, metavar="S",
                   help="give up waiting for subscribers after S seconds and play anyway (default 10)")
    p.add_argument("--clock", type=float, nargs="?", const=40.0, default=0.0, metavar="HZ",
                   help="publish the bag time on /clock at HZ (default 40) for nodes run with use_sim_time:=true "
                        "(--wait-subscribers then waits for a /clock subscriber too)")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("record", help="record topics to a new bag")
    p.add_argument("out", help="new bag directory (must not exist)")
    p.add_argument("--topics", nargs="+", required=True, metavar="T", help="topics to record")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--qos", choices=("reliable", "best_effort"),
                   help="subscription reliability (default: reliable only if every publisher is reliable)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0 = Ctrl-C)")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop once every topic has N messages (0 = Ctrl-C)")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("process", help="run the model over a bag offline and write a new bag")
    p.add_argument("bag", help="input bag directory or .mcap / .db3 file")
    p.add_argument("out", help="new output bag directory (must not exist)")
    p.add_argument("--image-topic", required=True, help="colour Image or CompressedImage topic")
    p.add_argument("--camera-info-topic", default=None,
                   help='CameraInfo of the image (default: <image namespace>/camera_info if present; "" = none)')
    p.add_argument("--sparse-topic", default=None,
                   help="sparse metric input matched by stamp: a depth Image of the camera (32FC1 m / 16UC1 mm) or a "
                        "PointCloud2 (e.g. LiDAR), projected onto the image through the camera_info (nearest point "
                        "per pixel)")
    p.add_argument("--sparse-fraction", type=float, default=1.0, metavar="F",
                   help="use only a random fraction F of the sparse pixels (e.g. 0.02 to turn a depth camera "
                        "into LiDAR-like input; for a cloud, of its projected pixels); the rest measures the metric "
                        "error")
    p.add_argument("--depth-model", default=DEPTH_HUB_ID, help='hub id or folder; "" = off')
    p.add_argument("--normals-model", default=NORMALS_HUB_ID, help='hub id or folder; "" = off')
    p.add_argument("--tiny", action="store_true", help="generated tiny random checkpoints on the CPU (plumbing test)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda; cpu with --tiny)")
    p.add_argument("--devices", default=None, metavar="D1,D2,...",
                   help="split the bag over several devices, one worker process each (e.g. cuda:0,cuda:1); the "
                        "output bag is the one-device output")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help=f"default {DEFAULT_DTYPE} (fp32 with --tiny)")
    p.add_argument("--optimize", default="none", metavar="MODE",
                   help="engine speed-up: none, channels_last, graph, compile or compile+graph (EngineConfig.optimize; "
                        "benchmarks/README.md gives the tolerance of each); default none = the official eager path")
    p.add_argument("--processing-res", type=processing_res_argument, default=DEFAULT_PROCESSING_RES,
                   help="longest edge at inference (multiple of 8), 0 = native")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--allow-cpu-fallback", action="store_true", help="run on the CPU if the GPU is missing")
    p.add_argument("--local-files-only", action="store_true", help="never download weights")
    p.add_argument("--output-namespace", default="", help="prefix of the output topics (default: none)")
    p.add_argument("--vis", action="store_true", help="also write depth/image_vis and normals/image_vis (rgb8)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    add_frame_options(p.add_argument_group(
        "per-frame settings", "the node's per-frame parameters, same names, defaults and ranges (--NAME or with "
        "dashes, e.g. --alignment.method irls or --alignment-method irls)"))
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("export", help="write colour/depth pairs as an RGB-D manifest folder (fine-tuning input)")
    p.add_argument("bag", help="input bag directory or .mcap / .db3 file")
    p.add_argument("out_dir", help="new (or empty) folder for rgb/, depth/ and manifest.json")
    p.add_argument("--image-topic", required=True, help="colour Image or CompressedImage (JPEG/PNG) topic")
    p.add_argument("--depth-topic", required=True,
                   help="depth Image registered to the colour camera (32FC1 m / 16UC1 mm; 0/NaN = none)")
    p.add_argument("--camera-info-topic", default=None,
                   help='CameraInfo of the image (default: <image namespace>/camera_info if present; "" = none)')
    p.add_argument("--max-dt", type=float, default=0.02, metavar="S",
                   help="largest header stamp difference of a colour/depth pair in seconds (default 0.02)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th pair (default 1: all)")
    p.add_argument("--set", default=None, metavar="NAME", help='"set" of the manifest entries (default: bag name)')
    p.set_defaults(func=cmd_export)
    return parser


# Earlier option names of per-frame settings, kept as aliases.
_ALIASES = {"alignment.fixed_scale": ["--fixed-scale"], "sparse_points.frame_id": ["--sparse-frame"],
            "sparse_points.transform": ["--sparse-transform"]}


def _option_strings(name: str) -> list[str]:
    """``alignment.min_points`` -> ``--alignment.min_points``, ``--alignment-min-points`` (+ earlier aliases)."""
    dashed = "--" + name.replace(".", "-").replace("_", "-")
    return list(dict.fromkeys([f"--{name}", dashed, *_ALIASES.get(name, [])]))


def add_frame_options(group: Any) -> None:
    """One option per per-frame setting of the pipeline's table (``FRAME_PARAMS``), generated: the bag tool takes
    every per-frame parameter the node takes. Values are checked against the table in ``cmd_process``."""
    from geodiff_ros.pipeline import FRAME_PARAMS

    for spec in FRAME_PARAMS:
        limits = f", range {spec.lo:g}..{spec.hi:g}" if spec.lo is not None and spec.hi is not None else ""
        kwargs: dict[str, Any] = {"dest": spec.name, "default": None,
                                  "help": f"{spec.description} (default {spec.default!r}{limits})"}
        if isinstance(spec.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(spec.default, list):
            kwargs.update(nargs="+", metavar="V")  # numbers checked in frame_settings_from_args (names the format)
        else:
            kwargs.update(type=type(spec.default), metavar="V")
            if spec.choices:
                kwargs.update(choices=spec.choices, metavar="{" + ",".join(spec.choices) + "}")
        group.add_argument(*_option_strings(spec.name), **kwargs)
    group.add_argument("--no-cloud", dest="publish_cloud", action="store_false",
                       help="do not write the points topic (as --no-publish-cloud)")


def frame_settings_from_args(args: argparse.Namespace, transform_format: str) -> dict[str, Any]:
    """The per-frame settings given on the command line, by parameter name (the rest keep the node's defaults)."""
    from geodiff_ros.pipeline import FRAME_PARAMS

    out = {spec.name: getattr(args, spec.name) for spec in FRAME_PARAMS if getattr(args, spec.name, None) is not None}
    transform = out.get("sparse_points.transform")
    if transform is not None:
        try:
            out["sparse_points.transform"] = [float(v) for v in transform]
        except ValueError:
            msg = f'--sparse-transform {" ".join(transform)}: not numbers; give {transform_format}'
            raise BagError(msg) from None
    return out


def transform_in_fixed_notation(argv: list[str]) -> list[str]:
    """The numbers after ``--sparse-transform`` in fixed notation (the same doubles): argparse takes a token like
    ``-1.2e-3`` for an option, since only ``-1`` / ``-1.5`` look like negative numbers to it."""
    import numpy as np

    out = list(argv)
    for i, token in enumerate(argv):
        if token not in _option_strings("sparse_points.transform"):
            continue
        for j in range(i + 1, min(i + 8, len(out))):
            try:
                out[j] = np.format_float_positional(float(out[j]), trim="-")
            except ValueError:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry ``geodiff_bag``; returns the exit code (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(transform_in_fixed_notation(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except BagError as err:
        LOG.error("%s", err)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
