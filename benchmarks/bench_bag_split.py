"""One bag over several GPUs (offline): ``geodiff_bag process --devices`` against one device.

For each device list in --device-sets (default ``cuda:0`` ``cuda:0,cuda:1``; the first is the reference) the
script loads the engine (one process, or an EnginePool with one worker per device), runs one warm-up pass over a
short bag of the same image size (compiled modes compile there, not in the timing), then times
``process_bag`` / ``process_bag_parallel`` over the main bag: frames per second, inference seconds summed over
the workers, frames per worker. Every output bag is then compared with the reference bag: the same messages
(topic, bag time, header) in the same order, the bytes identical or not, and the largest difference of the
relative depth, metric depth and normals values. Writes JSON naming the cards.

The bag is the synthetic RGB-D room of geodiff_ros.bag.synthetic (colour, 16UC1 depth as the sparse input, CameraInfo)
at --width x --height; the model is the full-size Marigold / SD2 architecture with random weights
(bench_engine.write_checkpoints) unless --model-depth / --model-normals name real ones. --tiny is the CPU
rehearsal: tiny checkpoints, 160x120, processing_res 64, fp32, device sets ``cpu`` and ``cpu,cpu``.

  .venv/bin/python benchmarks/bench_bag_split.py --device-sets cuda:0 cuda:0,cuda:1 cuda:0,cuda:1,cuda:2,cuda:3 \\
      --dtype fp16 --optimize compile
  .venv/bin/python benchmarks/bench_bag_split.py --tiny          # CPU rehearsal (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a checkout without installing the package

from geodiff_ros.engine.config import (  # noqa: E402
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DTYPE_CHOICES,
    processing_res_argument,
)

LOG = logging.getLogger("bench_bag_split")
VALUE_TOPICS = ("/depth/relative", "/depth/image", "/normals/image")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device-sets", nargs="+", default=["cuda:0", "cuda:0,cuda:1"],
                   help="device lists to run; the first is the reference (one device)")
    p.add_argument("--frames", type=int, default=96, help="frames in the timed bag")
    p.add_argument("--warmup-frames", type=int, default=8, help="frames of the warm-up pass (per device set)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES)
    p.add_argument("--optimize", default="none", help="EngineConfig.optimize of every worker")
    p.add_argument("--processing-res", type=processing_res_argument, default=DEFAULT_PROCESSING_RES)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default="depth,normals", help="depth, normals or both")
    p.add_argument("--model-depth", default=None, help="depth model (default random SD2-size weights)")
    p.add_argument("--model-normals", default=None, help="normals model (default random SD2-size weights)")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / ".cache" / "bench_ckpt")
    p.add_argument("--work-dir", type=Path, default=None, help="where the bags go (default a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bag_split_<dev>.json)")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, 160x120, cpu and cpu,cpu")
    args = p.parse_args(argv)
    if args.tiny:
        args.dtype, args.processing_res, args.optimize = "fp32", 64, "none"
        args.width, args.height = 160, 120
        args.frames, args.warmup_frames = min(args.frames, 8), min(args.warmup_frames, 2)
        if args.device_sets == p.get_default("device_sets"):
            args.device_sets = ["cpu", "cpu,cpu"]
    return args


def checkpoints(args: argparse.Namespace) -> dict[str, str | None]:
    """Depth / normals model folders: given, tiny, or random full-size weights (bench_engine's writer)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    given = {"depth": args.model_depth, "normals": args.model_normals}
    missing = [t for t in tasks if not given[t]]
    out: dict[str, str | None] = {"depth": None, "normals": None}
    if missing:
        import torch
        from bench_engine import write_checkpoints

        first = args.device_sets[0].split(",")[0]
        folders = write_checkpoints(args.ckpt_dir, missing, tiny=args.tiny, device=torch.device(first))
        out.update({t: str(f) for t, f in folders.items()})
    out.update({t: given[t] for t in tasks if given[t]})
    return out


def device_info(devices: Sequence[str]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": platform.processor() or platform.machine()}
    cards = []
    for dev in dict.fromkeys(devices):
        if dev.startswith("cuda"):
            index = int(dev.split(":")[1]) if ":" in dev else 0
            props = torch.cuda.get_device_properties(index)
            cards.append({"device": dev, "card": torch.cuda.get_device_name(index),
                          "memory_gib": round(props.total_memory / 2**30, 1)})
        else:
            import os

            cards.append({"device": dev, "card": f'CPU ({info["cpu"]}, {os.cpu_count()} cores)'})
    info["cards"] = cards
    if any(dev.startswith("cuda") for dev in devices):
        info["cuda"] = torch.version.cuda
    return info


def run_set(devices: list[str], args: argparse.Namespace, models: dict[str, str | None], bags: dict[str, Path],
            out_dir: Path) -> dict[str, Any]:
    """Load, warm up, time one device set; returns its row (the output bag is ``out_dir``/<tag>)."""
    from geodiff_ros.bag.parallel import EnginePool, process_bag_parallel
    from geodiff_ros.bag.process import ProcessOptions, process_bag
    from geodiff_ros.bag.storage import BagWriter, open_bag
    from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC
    from geodiff_ros.engine import EngineConfig, GeoDiffEngine

    cfg = EngineConfig(depth_model=models["depth"], normals_model=models["normals"], device=devices[0],
                       dtype=args.dtype, processing_res=args.processing_res, batch_size=args.batch_size,
                       optimize=args.optimize, local_files_only=True)
    opts = ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC, batch_size=args.batch_size)
    tag = devices[0].replace(":", "") if len(devices) == 1 else f"{len(devices)}x"
    row: dict[str, Any] = {"devices": devices, "bag": f"{tag}"}

    def one_pass(runner: Any, src: Path, dst: Path) -> Any:
        with open_bag(src) as bag, BagWriter(dst, typestore=bag.typestore) as writer:
            return runner(bag, writer)

    t0 = time.perf_counter()
    if len(devices) == 1:
        engine = GeoDiffEngine(cfg)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        runner = functools.partial(process_bag, engine=engine, options=opts)
        t1 = time.perf_counter()
        one_pass(runner, bags["warmup"], out_dir / f"{tag}_warmup")
        row["warmup_s"] = round(time.perf_counter() - t1, 2)
        summary = one_pass(runner, bags["main"], out_dir / tag)
    else:
        with EnginePool(cfg, devices) as pool:
            row["load_s"] = round(time.perf_counter() - t0, 2)
            row["load_s_per_worker"] = [round(s, 2) for s in pool.load_seconds]
            runner = functools.partial(process_bag_parallel, pool=pool, options=opts)
            t1 = time.perf_counter()
            one_pass(runner, bags["warmup"], out_dir / f"{tag}_warmup")
            row["warmup_s"] = round(time.perf_counter() - t1, 2)
            before = list(pool.frames)
            summary = one_pass(runner, bags["main"], out_dir / tag)
            summary.worker_frames = [a - b for a, b in zip(pool.frames, before, strict=True)]
    row.update({
        "frames_out": summary.frames_out, "frames_failed": summary.frames_failed, "seconds": round(summary.seconds, 3),
        "frames_per_s": summary.frames_out / summary.seconds if summary.seconds > 0 else None,
        "infer_seconds_sum": round(summary.infer_seconds, 3),
        "infer_s_per_frame": summary.infer_seconds / summary.frames_out if summary.frames_out else None,
        "worker_frames": summary.worker_frames or [summary.frames_out],
    })
    return row


def compare(reference: Path, other: Path) -> dict[str, Any]:
    """Same messages in the same order? Bytes identical? Largest value difference per output topic."""
    from geodiff_ros.bag.storage import open_bag
    from geodiff_ros.ros.conversions import image_to_numpy

    with open_bag(reference) as a, open_bag(other) as b:
        ra, rb = list(a.messages()), list(b.messages())
        same_sequence = [(m.topic, m.timestamp) for m in ra] == [(m.topic, m.timestamp) for m in rb]
        identical = same_sequence and all(bytes(x.data) == bytes(y.data) for x, y in zip(ra, rb, strict=True))
        diffs: dict[str, float] = {}
        headers_equal = True
        if same_sequence:
            for x, y in zip(ra, rb, strict=True):
                if x.topic not in VALUE_TOPICS:
                    continue
                mx, my = a.deserialize(x), b.deserialize(y)
                headers_equal &= mx.header == my.header
                va, vb = image_to_numpy(mx).astype(np.float64), image_to_numpy(my).astype(np.float64)
                ok = np.isfinite(va) & np.isfinite(vb)
                nan_mismatch = bool(np.any(np.isfinite(va) != np.isfinite(vb)))
                d = float(np.max(np.abs(va[ok] - vb[ok]))) if ok.any() else 0.0
                diffs[x.topic] = max(diffs.get(x.topic, 0.0), d if not nan_mismatch else float("inf"))
    return {"messages": len(rb), "same_messages_and_order": same_sequence, "headers_equal": bool(headers_equal),
            "bytes_identical": bool(identical), "max_abs_diff": diffs}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from geodiff_ros.bag.synthetic import write_synthetic_bag

    sets = [[d.strip() for d in s.split(",")] for s in args.device_sets]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_bag_split_"))
    work.mkdir(parents=True, exist_ok=True)
    bags = {"main": write_synthetic_bag(work / "in_main", frames=args.frames, width=args.width, height=args.height),
            "warmup": write_synthetic_bag(work / "in_warmup", frames=args.warmup_frames, width=args.width,
                                          height=args.height)}
    models = checkpoints(args)
    result: dict[str, Any] = {
        "device": device_info([d for s in sets for d in s]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": models, "runs": [],
    }
    card = result["device"]["cards"][0]["card"].split(" (")[0].replace(" ", "_").lower()
    out = args.out or REPO / "benchmarks" / "results" / f'bag_split_{card}{"_tiny" if args.tiny else ""}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs = work / "out"
    outputs.mkdir(exist_ok=True)
    for devices in sets:
        LOG.info("device set: %s", ",".join(devices))
        try:
            row = run_set(devices, args, models, bags, outputs)
        except Exception as err:  # noqa: BLE001 - one failed set (e.g. a missing GPU) must not lose the others
            row = {"devices": devices, "error": f"{type(err).__name__}: {err}"}
        result["runs"].append(row)
        out.write_text(json.dumps(result, indent=1, default=str))
    ref = result["runs"][0]
    for row in result["runs"]:
        if "error" in row or "error" in ref:
            continue
        if row is not ref:
            row["against_first"] = compare(outputs / ref["bag"], outputs / row["bag"])
            if ref.get("frames_per_s") and row.get("frames_per_s"):
                row["speedup"] = row["frames_per_s"] / ref["frames_per_s"]
    lines = [f"{result['device']['cards'][0]['card']}: {args.frames} frames {args.width}x{args.height}, "
             f"processing_res {args.processing_res}, {args.dtype}, optimize {args.optimize}, batch {args.batch_size}",
             "| devices | frames/s | speed-up | frames per worker | same messages | bytes identical | max diff rel. "
             "depth | max diff normals |", "|---|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        if "error" in row:
            lines.append(f"| {','.join(row['devices'])} | {row['error']} | | | | | | |")
            continue
        cmp = row.get("against_first", {})
        diff = cmp.get("max_abs_diff", {})
        lines.append(f"| {','.join(row['devices'])} | {row['frames_per_s']:.2f} | {row.get('speedup', 1.0):.2f} | "
                     f"{row['worker_frames']} | {cmp.get('same_messages_and_order', '-')} | "
                     f"{cmp.get('bytes_identical', '-')} | {diff.get('/depth/relative', '-')} | "
                     f"{diff.get('/normals/image', '-')} |")
    result["table"] = "\n".join(lines)
    print(result["table"])
    out.write_text(json.dumps(result, indent=1, default=str))
    LOG.info("wrote %s", out)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
