"""N cameras spread over G GPUs (serving): one geodiff node per GPU against one GPU for all cameras.

For every N in --cameras and G in --gpus the script streams N cameras (bench_multicam's Harness: 640x480 rgb8 at
--hz each, phases spread like free-running cameras, over loopback DDS) into G node processes, node i on
``cuda:i`` (or the i-th entry of --devices) serving the cameras launch/multi_gpu.launch.py would give it
(geodiff_ros.ros.camera_sets.assign_cameras, round-robin), named geodiff_gpu<i> as the launch file names them;
G = 1 is one node for all cameras on one GPU, the reference. The nodes are started as processes rather than through
``ros2 launch`` (ROS launch is not installable from PyPI); the camera-to-GPU plan is the launch file's.

Per run: per-camera output rate (depth/relative messages per second), latency from the image stamp (the wall clock
at publish) to reception p50 / p95, the nodes' own stage figures from /diagnostics when they report them
(e.g. stamp_to_publish), GPU memory per card (nvidia-smi per process), host CPU busy fraction and each node's CPU
use over the window (is the host or DDS the limit?), and the scaling of the total output rate against G = 1.
Writes JSON naming the cards after every run (a cut-off run keeps what it measured).

  python benchmarks/bench_multigpu.py --gpus 1 2 --cameras 2 4 8 --dtype fp16 --optimize compile
  python benchmarks/bench_multigpu.py --tiny          # CPU rehearsal: 2 cameras on one and on two CPU nodes
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
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

# the camera harness, DDS environment, node stop, statistics and JSON/table helpers of the one-GPU benchmark
import bench_multicam  # noqa: E402
from bench_multicam import fmt  # noqa: E402

from geodiff_ros.engine.config import (  # noqa: E402
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DTYPE_CHOICES,
    processing_res_argument,
)

LOG = logging.getLogger("bench_multigpu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts G (1 = the one-GPU reference)")
    p.add_argument("--cameras", type=int, nargs="+", default=[2, 4, 8], help="camera counts N")
    p.add_argument("--devices", default=None,
                   help="comma list of the devices node 0, 1, ... use (default cuda:0,cuda:1,...); cpu,cpu = rehearsal")
    p.add_argument("--hz", type=float, default=30.0, help="frame rate of every camera")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--seconds", type=float, default=15.0, help="measuring window per run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds streamed before measuring (after first output)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES)
    p.add_argument("--optimize", default="compile", help="node parameter optimize (none, compile, compile+graph, ...)")
    p.add_argument("--processing-res", type=processing_res_argument, default=DEFAULT_PROCESSING_RES)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model-depth", default=None, help="depth model (default random SD2-size weights)")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / ".cache" / "bench_ckpt")
    p.add_argument("--startup-timeout", type=float, default=400.0, help="seconds for the nodes to load and answer")
    p.add_argument("--domain", type=int, default=80, help="first ROS_DOMAIN_ID (one per run, counting up)")
    p.add_argument("--domain-step", type=int, default=1, help="0 = every run in --domain (a shared machine)")
    p.add_argument("--torch-threads", type=int, default=0, help="OMP/MKL threads of every node (0 = unset)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/multigpu_<dev>.json)")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, 160x120, 2 cameras, cpu,cpu")
    args = p.parse_args(argv)
    if args.tiny:
        args.dtype, args.processing_res, args.optimize, args.torch_threads = "fp32", 64, "none", 1
        args.width, args.height, args.hz = 160, 120, min(args.hz, 10.0)
        args.seconds, args.warmup, args.startup_timeout = min(args.seconds, 6.0), min(args.warmup, 2.0), 180.0
        args.devices = args.devices or "cpu,cpu"
        if args.cameras == p.get_default("cameras"):
            args.cameras = [2]
    args.device_list = ([d.strip() for d in args.devices.split(",")] if args.devices else
                        [f"cuda:{i}" for i in range(max(args.gpus))])
    if max(args.gpus) > len(args.device_list):
        p.error(f"--gpus {max(args.gpus)} needs that many devices; --devices lists {len(args.device_list)}")
    return args


# ------------------------------------------------------------------------------------------- measurements

def gpu_memory_per_card(pids: Sequence[int]) -> dict[str, float] | None:
    """MiB used by these processes on each card (nvidia-smi index -> MiB); None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None

    def query(*fields: str) -> list[list[str]]:
        out = subprocess.run([exe, *fields, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             check=False).stdout
        return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if "," in line]

    index_of = {uuid: idx for idx, uuid in query("--query-gpu=index,uuid")}
    used: dict[str, float] = {}
    for pid, uuid, mib in query("--query-compute-apps=pid,gpu_uuid,used_memory"):
        if int(pid) in pids:
            card = index_of.get(uuid, uuid)
            used[card] = used.get(card, 0.0) + float(mib)
    return used


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _proc_ticks(pid: int) -> int:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------- one run

def start_nodes(plan: dict[int, list[str]], args: argparse.Namespace, model: str, domain: int,
                log_dir: Path, tag: str) -> list[subprocess.Popen]:
    """One node process per used device, with the cameras multi_gpu.launch.py would give it."""
    common = ["-p", f"model_depth:={model}", "-p", "model_normals:=''", "-p", "tasks:=[depth]",
              "-p", f"dtype:={args.dtype}", "-p", f"processing_res:={args.processing_res}",
              "-p", f"batch_size:={args.batch_size}", "-p", "diagnostics_period:=1.0",
              "-p", "local_files_only:=true", "-p", f"optimize:={args.optimize}",
              "-p", f"warmup_size:=[{args.width},{args.height}]"]
    env = bench_multicam.ros_env(domain)
    if args.torch_threads > 0:
        env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
    procs = []
    for index, cameras in sorted(plan.items()):
        device = args.device_list[index]
        cmd = [sys.executable, "-m", "geodiff_ros.ros.process", "--ros-args", "--params-file",
               str(REPO / "config" / "geodiff.yaml"), *common, "-p", f"device:={device}",
               "-p", f'cameras:=[{",".join(cameras)}]', "-r", f"__node:=geodiff_gpu{index}"]
        log = open(log_dir / f"{tag}_gpu{index}.log", "wb")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_one(g: int, n: int, args: argparse.Namespace, model: str, domain: int, log_dir: Path) -> dict[str, Any]:
    from geodiff_ros.ros.camera_sets import assign_cameras

    names = [f"cam{i}" for i in range(n)]
    plan = assign_cameras(names, list(range(g)))  # round-robin, as multi_gpu.launch.py without `assignment`
    row: dict[str, Any] = {"gpus": g, "cameras": n, "processes": len(plan),
                           "plan": [{"node": f"geodiff_gpu{i}", "device": args.device_list[i], "cameras": cams}
                                    for i, cams in sorted(plan.items())]}
    harness = bench_multicam.Harness(domain, names, args.width, args.height)
    procs = start_nodes(plan, args, model, domain, log_dir, f"g{g}n{n}")
    try:
        if not bench_multicam.stream_until_warm(harness, procs, args, row, log_dir):
            return row
        pids = [p.pid for p in procs]
        host0, procs0 = _cpu_ticks(), [_proc_ticks(pid) for pid in pids]
        got, sent, span, _ = harness.window(args.seconds)
        host1, procs1 = _cpu_ticks(), [_proc_ticks(pid) for pid in pids]
        row["gpu_mem_mib_per_card"] = gpu_memory_per_card(pids)
        row["rss_mib"] = round(bench_multicam.rss_mib(pids), 1)
        hz = os.sysconf("SC_CLK_TCK")
        row["host_cpu_busy_frac"] = round((host1[0] - host0[0]) / max(1, host1[1] - host0[1]), 3)
        row["node_cpu_percent"] = [round(100.0 * (b - a) / hz / span, 1) for a, b in zip(procs0, procs1, strict=True)]
        row["host_cpus"] = os.cpu_count()
        time.sleep(1.2)  # one more /diagnostics period
        with harness.lock:
            diag = dict(harness.diag)
    finally:
        harness.close()
        row["exit_codes"] = bench_multicam.stop_nodes(procs)
    per_cam, all_lat = bench_multicam.camera_rates(names, got, sent, span)
    for name in names:
        status = next((v for k, v in diag.items() if k.endswith(f": {name}")), None)
        if status:  # the node's own figures for this camera (counters, stage percentiles where it reports them)
            per_cam[name]["node"] = {k: v for k, v in status.items()
                                     if k in ("received", "dropped", "processed") or k.endswith(("_p50_ms", "_p95_ms"))}
    row.update({"per_camera": per_cam,
                "output_hz_total": float(np.sum([c["output_hz"] for c in per_cam.values()])),
                **bench_multicam.rate_summary(per_cam, all_lat)})
    stp = [float(c["node"]["stamp_to_publish_p95_ms"]) for c in per_cam.values()
           if "stamp_to_publish_p95_ms" in c.get("node", {})]
    if stp:
        row["stamp_to_publish_p95_ms_worst"] = max(stp)
    return row


# ------------------------------------------------------------------------------------------- report

def table(result: dict[str, Any]) -> str:
    lines = ["| cameras | GPUs | out Hz/cam (mean) | out Hz/cam (min) | total Hz | scaling vs 1 GPU | p50 ms | "
             "p95 ms | node p95 stamp-to-publish ms | GPU MiB per card | host CPU busy | node CPU % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r["cameras"]: r for r in result["runs"] if r["gpus"] == 1 and "error" not in r}
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['cameras']} | {r['gpus']} | {r['error']} |" + " |" * 9)
            continue
        base = ref.get(r["cameras"])
        scaling = r["output_hz_total"] / base["output_hz_total"] if base and base["output_hz_total"] else None
        mem = r.get("gpu_mem_mib_per_card")
        mem_text = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(mem.items())) if mem else "-"
        lines.append(f"| {r['cameras']} | {r['gpus']} | {r['output_hz_mean']:.1f} | {r['output_hz_min']:.1f} | "
                     f"{r['output_hz_total']:.1f} | {fmt(scaling, '.2f')} | {fmt(r['latency_p50_ms'], '.0f')} | "
                     f"{fmt(r['latency_p95_ms'], '.0f')} | {fmt(r.get('stamp_to_publish_p95_ms_worst'), '.0f')} | "
                     f"{mem_text} | {r['host_cpu_busy_frac']:.2f} | {r['node_cpu_percent']} |")
    s = result["settings"]
    title = (f"{result['device']['card']} x {max(s['gpus'])}: {s['width']}x{s['height']} @ {s['hz']:g} Hz per camera, "
             f"processing_res {s['processing_res']}, {s['dtype']}, optimize {s['optimize']}, batch_size "
             f"{s['batch_size']}, {s['seconds']:g} s window")
    return title + "\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_depth:
        model = args.model_depth
    elif args.tiny:
        from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

        model = str(write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_multigpu_ckpt_")) / "tiny", "depth"))
    else:
        import torch
        from bench_engine import write_checkpoints

        model = str(write_checkpoints(args.ckpt_dir, ["depth"], tiny=False,
                                      device=torch.device(args.device_list[0]))["depth"])
    log_dir = Path(tempfile.mkdtemp(prefix="bench_multigpu_"))
    result: dict[str, Any] = {
        "device": bench_multicam.device_info(args.device_list[0]),
        "cards": [bench_multicam.device_info(d).get("card") for d in args.device_list[:max(args.gpus)]],
        "settings": bench_multicam.settings_of(args), "model_depth": model, "runs": [],
    }
    out = bench_multicam.result_path(args, result["device"], "multigpu")
    domain = args.domain
    for n in args.cameras:
        for g in args.gpus:
            LOG.info("run: %d camera(s) over %d device(s)", n, g)
            row = run_one(g, n, args, model, domain, log_dir)
            LOG.info("  %s", {k: v for k, v in row.items() if k != "per_camera"})
            result["runs"].append(row)
            bench_multicam.write_result(out, result)
            domain = domain + args.domain_step if domain + args.domain_step <= 100 else 1
    result["table"] = table(result)
    print(result["table"])
    bench_multicam.write_result(out, result)
    LOG.info("wrote %s (node logs in %s)", out, log_dir)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
