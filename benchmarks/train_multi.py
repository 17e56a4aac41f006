"""Fine-tuning on several processes: ``accelerate launch --num_processes G`` of geodiff_train against one.

For every G in --processes (default 1 2; the first is the reference) the script runs geodiff_train under
``accelerate launch`` with micro-batch --batch and accumulation --accumulation / G per process, so every run has
the same effective batch (the paper's 2 x 16 = 32 by default). With ``--log_every 1`` the trainer's
train_log.jsonl gives the LR and the logged loss of every optimiser step; inside every process this script also
records the time of each optimiser step (a torch optimizer-step hook), every micro-batch loss (a wrapper around the
trainer's loss function) and the peak memory. It then checks each G against the reference:

- LR per step: must be identical (the schedule counts optimiser steps, whatever G is).
- Loss over all processes per step (mean of the micro-batch losses of every process): must agree with the
  one-process loss. The data is the same: DistributedSampler hands the processes the interleaved slices of the
  permutation one process reads, so an optimiser step sees the same samples (--samples must be a multiple of
  batch x accumulation x 2); differences are float rounding (gradient all-reduce order), growing slowly.
- Logged loss per step: what a user reads in the log; it should be that all-process mean.

Writes JSON: per G the step time (median, first), samples/s, peak memory and wall time per process, LR and losses
per step, and the checks. Data: --manifest (default the shared RGB-D frames when present, else a synthetic
slanted-plane set), repeated to --samples entries; flips off so the runs see identical pixels. Model: the
full-size Marigold / SD2 architecture with random weights (bench_engine.write_checkpoints), or --init; --tiny is
the CPU rehearsal (tiny checkpoint, 32x48 crops, gloo).

Several CPU processes need accelerate's torchrun launcher (``--multi_gpu``) with geodiff_train ``--cpu``:
``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate 1.15's simple launcher).

  python benchmarks/train_multi.py --processes 1 2 4 --steps 4            # GPUs: full size, 480x640, fp32
  python benchmarks/train_multi.py --tiny --processes 1 2 --accumulation 4 --steps 4   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a checkout without installing the package

LOG = logging.getLogger("train_multi")
SHARED_MANIFEST = Path(os.environ.get("GEODIFF_SHARED_DATA", REPO.parent / "shared" / "data")) / "manifest.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                   help="process counts; the first is the reference")
    p.add_argument("--batch", type=int, default=2, help="micro-batch per process (paper: 2)")
    p.add_argument("--accumulation", type=int, default=16,
                   help="accumulation of ONE process; G processes use accumulation / G (paper: 16)")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per run")
    p.add_argument("--lr-warmup", type=int, default=2, help="LR warm-up steps (schedule visible in a short run)")
    p.add_argument("--learning-rate", type=float, default=3e-5)
    p.add_argument("--samples", type=int, default=0,
                   help="dataset size (manifest entries repeated or cut); 0 = batch x accumulation x 2")
    p.add_argument("--size", default="480x640", help="training crop HxW (manifest_size)")
    p.add_argument("--manifest", type=Path, default=None, help="RGB-D manifest (default shared data, else synthetic)")
    p.add_argument("--init", default=None, help="init checkpoint (default random full-size weights)")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / ".cache" / "bench_ckpt")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo); implied by --tiny")
    p.add_argument("--dataloader-workers", type=int, default=2)
    p.add_argument("--port", type=int, default=29627, help="first main-process port (one per run)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--work-dir", type=Path, default=None, help="run folders (default a temporary folder, removed)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/train_multi_<dev>.json)")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny checkpoint, 32x48, one thread a process")
    args = p.parse_args(argv)
    if args.tiny:
        args.cpu, args.size, args.dataloader_workers = True, "32x48", 0
        args.learning_rate = 1e-3 if args.learning_rate == p.get_default("learning_rate") else args.learning_rate
    for g in args.processes:
        if args.accumulation % g:
            p.error(f"--accumulation {args.accumulation} is not divisible by {g} processes: the effective batch "
                    "would differ between the runs")
    args.samples = args.samples or args.batch * args.accumulation * 2
    if args.samples % (args.batch * max(args.processes)):
        p.error(f"--samples {args.samples} must be a multiple of batch x processes "
                f"({args.batch * max(args.processes)}) so every run sees the same samples per step")
    return args


# ------------------------------------------------------------------------------------------- inputs

def init_checkpoint(args: argparse.Namespace) -> str:
    if args.init:
        return args.init
    if args.tiny:
        from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

        return str(write_tiny_checkpoint(args.ckpt_dir / "train-multi-tiny-depth", "depth"))
    import torch
    from bench_engine import write_checkpoints

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    return str(write_checkpoints(args.ckpt_dir, ["depth"], tiny=False, device=dev)["depth"])


def synthetic_manifest(folder: Path, n: int, h: int, w: int) -> Path:
    """Slanted planes whose colour encodes depth (learnable), 16-bit mm depth PNGs; n different frames."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    entries = []
    for i in range(n):
        d = 1.0 + (0.04 * xx + 0.03 * (i + 1) * yy) * (48.0 / w)
        rgb = np.stack([(d * 60) % 255, 255 - (d * 45) % 255, np.full_like(d, 90.0)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"rgb{i}.png")
        Image.fromarray((d * 1000).astype(np.uint16)).save(folder / f"depth{i}.png")
        entries.append({"rgb": f"rgb{i}.png", "depth": f"depth{i}.png", "depth_scale": 1000.0})
    (folder / "manifest.json").write_text(json.dumps(entries))
    return folder / "manifest.json"


def sized_manifest(source: Path, samples: int, dest: Path) -> Path:
    """``source``'s entries with absolute paths, cycled to exactly ``samples`` entries."""
    base = source.parent.resolve()
    entries = json.loads(source.read_text())
    entries = entries["entries"] if isinstance(entries, dict) else entries
    out = []
    for k in range(samples):
        e = dict(entries[k % len(entries)])
        for key in ("rgb", "depth", "normals"):
            if key in e:
                e[key] = str(base / e[key])
        out.append(e)
    dest.write_text(json.dumps(out))
    return dest


# ------------------------------------------------------------------------------------------- one process

def worker(record_dir: Path, train_argv: list[str]) -> int:
    """Inside ``accelerate launch``: run geodiff_train with step-time, micro-loss and memory recording."""
    import torch

    from geodiff_ros.training import train as train_mod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    step_times: list[float] = []
    micro_losses: list[float] = []

    def on_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:  # after every real optimiser step
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(on_step)
    for name in ("affine_invariant_l1_loss", "angular_loss"):  # the names train.py calls
        original = getattr(train_mod, name)

        def recorded(*a: Any, _loss_fn: Any = original, **k: Any) -> Any:
            loss = _loss_fn(*a, **k)
            micro_losses.append(float(loss.detach()))
            return loss

        setattr(train_mod, name, recorded)
    t0 = time.perf_counter()
    args = train_mod.build_parser().parse_args(train_argv)
    result = train_mod.train(args)
    wall = time.perf_counter() - t0
    handle.remove()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    rec: dict[str, Any] = {
        "rank": rank, "world_size": world, "wall_s": wall, "step_times": [t - t0 for t in step_times],
        "micro_losses": micro_losses, "global_step": result["global_step"],
        "host_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if torch.cuda.is_available() and not args.cpu:
        dev = torch.cuda.current_device()
        rec.update(device=f"cuda:{dev}", card=torch.cuda.get_device_name(dev),
                   gpu_peak_allocated_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                   gpu_peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30)
    else:
        rec["device"] = "cpu"
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(rec))
    return 0


# ------------------------------------------------------------------------------------------- orchestration

def run_one(g: int, args: argparse.Namespace, init: str, manifest: Path, work: Path, port: int) -> dict[str, Any]:
    accumulation = args.accumulation // g
    folder = work / f"p{g}"
    shutil.rmtree(folder, ignore_errors=True)
    train_argv = [
        "--init", init, "--manifest", str(manifest), "--manifest_size", args.size, "--output_dir", str(folder / "run"),
        "--train_batch_size", str(args.batch), "--gradient_accumulation_steps", str(accumulation),
        "--max_train_steps", str(args.steps), "--lr_warmup_steps", str(args.lr_warmup),
        "--learning_rate", str(args.learning_rate), "--log_every", "1", "--checkpointing_steps", "1000000000",
        "--flip_p", "0", "--dataloader_num_workers", str(args.dataloader_workers),
        "--mixed_precision", args.mixed_precision, "--local_files_only", "--seed", "1234",
    ]
    if args.cpu:
        train_argv.append("--cpu")
    if args.gradient_checkpointing:
        train_argv.append("--gradient_checkpointing")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(g), "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(port)]
    if g > 1:
        launch.append("--multi_gpu")  # torchrun launcher; with geodiff_train --cpu the processes use gloo
    cmd = [*launch, str(Path(__file__).resolve()), "--worker", str(folder / "records"), "--", *train_argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    if args.cpu:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread a process: same arithmetic for every G
    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"processes": g, "accumulation": accumulation, "batch": args.batch,
                           "effective_batch": args.batch * g * accumulation}
    t0 = time.perf_counter()
    with open(folder / "launch.log", "wb") as log:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = None
    row["launch_wall_s"] = round(time.perf_counter() - t0, 2)
    if code != 0:
        tail = (folder / "launch.log").read_text(errors="replace")[-3000:]
        row["error"] = f"accelerate launch exit {code}" + (" (timeout)" if code is None else "")
        row["log_tail"] = tail
        return row
    log_path = folder / "run" / "train_log.jsonl"
    logged = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    ranks = sorted((json.loads(p.read_text()) for p in (folder / "records").glob("rank*.json")),
                   key=lambda r: r["rank"])
    row["lr"] = [r["lr"] for r in logged]
    row["loss_logged"] = [r["loss"] for r in logged]
    row["loss_all_processes"] = [all_process_loss(ranks, s, accumulation) for s in range(len(logged))]
    row["per_process"] = [{k: r.get(k) for k in ("rank", "world_size", "device", "card", "wall_s", "global_step",
                                                 "gpu_peak_allocated_gib", "gpu_peak_reserved_gib",
                                                 "host_rss_peak_gib")} for r in ranks]
    for r, pp in zip(ranks, row["per_process"], strict=True):
        times = r["step_times"]
        steps = [b - a for a, b in zip(times, times[1:], strict=False)]
        pp["step_s_median"] = sorted(steps)[len(steps) // 2] if steps else None
        pp["first_step_s"] = times[0] if times else None  # from the start of train(): includes loading
        pp["optimizer_steps"] = len(times)
    medians = [pp["step_s_median"] for pp in row["per_process"] if pp["step_s_median"]]
    if medians:
        row["step_s_median"] = max(medians)  # processes wait for each other at every step
        row["samples_per_s"] = row["effective_batch"] / row["step_s_median"]
    shutil.rmtree(folder / "run", ignore_errors=True)  # full-size checkpoints are GBs; the log is in the JSON
    return row


def all_process_loss(ranks: list[dict], step: int, accumulation: int) -> float:
    """Mean of the finite micro-batch losses of every process in optimiser step ``step`` (0-based)."""
    values = [v for r in ranks for v in r["micro_losses"][step * accumulation:(step + 1) * accumulation]
              if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def checks(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per-step agreement of a run with the reference run (LR exactly; losses relative)."""
    n = min(len(row["lr"]), len(ref["lr"]))
    return {
        "steps_compared": n,
        "lr_max_abs_diff": max((abs(a - b) for a, b in zip(row["lr"][:n], ref["lr"][:n], strict=True)), default=0.0),
        "loss_all_processes_vs_reference_rel": [_rel(row["loss_all_processes"][s], ref["loss_logged"][s])
                                                for s in range(n)],
        "loss_logged_vs_reference_rel": [_rel(row["loss_logged"][s], ref["loss_logged"][s]) for s in range(n)],
        "loss_logged_vs_all_processes_rel": [_rel(row["loss_logged"][s], row["loss_all_processes"][s])
                                             for s in range(n)],
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| processes | accumulation | effective batch | s / step (median) | samples/s | scaling | peak memory "
             "per process [GiB] | LR max diff | loss (all processes) max rel. diff | logged loss max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = result["runs"][0]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['processes']} | {r['accumulation']} | {r['effective_batch']} | {r['error']} "
                         "| | | | | | |")
            continue
        mem = [pp.get("gpu_peak_allocated_gib") or pp.get("host_rss_peak_gib") for pp in r["per_process"]]
        c = r.get("checks", {})
        scaling = (r["samples_per_s"] / ref["samples_per_s"]) if r.get("samples_per_s") and ref.get(
            "samples_per_s") else None
        lines.append(
            f"| {r['processes']} | {r['accumulation']} | {r['effective_batch']} | {r.get('step_s_median', 0):.3f} | "
            f"{r.get('samples_per_s', 0):.2f} | {'-' if scaling is None else f'{scaling:.2f}'} | "
            f"{', '.join(f'{m:.2f}' for m in mem)} | {c.get('lr_max_abs_diff', 0):.1e} | "
            f"{max(c.get('loss_all_processes_vs_reference_rel', [0])):.1e} | "
            f"{max(c.get('loss_logged_vs_reference_rel', [0])):.1e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # inside accelerate launch: --worker DIR -- <geodiff_train args>
        rest = argv[2:]
        return worker(Path(argv[1]), rest[1:] if rest[:1] == ["--"] else rest)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="train_multi_"))
    work.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in args.size.split("x"))
    source = args.manifest or (SHARED_MANIFEST if SHARED_MANIFEST.is_file() and not args.tiny else None)
    if source is None:
        source = synthetic_manifest(work / "synthetic", n=min(8, args.samples), h=h, w=w)
    manifest = sized_manifest(source, args.samples, work / "manifest.json")
    init = init_checkpoint(args)
    import accelerate
    import torch

    result: dict[str, Any] = {
        "device": {"python": platform.python_version(), "torch": torch.__version__,
                   "accelerate": accelerate.__version__, "cpu": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(),
                   "cards": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if torch.cuda.is_available() and not args.cpu else [],
                   "cuda": torch.version.cuda},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "init": init, "manifest_source": str(source), "runs": [],
    }
    card = (result["device"]["cards"] or ["cpu"])[0].replace(" ", "_").lower()
    out = args.out or REPO / "benchmarks" / "results" / f'train_multi_{card}{"_tiny" if args.tiny else ""}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(args.processes):
        LOG.info("run: %d process(es), accumulation %d", g, args.accumulation // g)
        row = run_one(g, args, init, manifest, work, args.port + i)
        if "error" in row:
            LOG.error("  %s\n%s", row["error"], row.get("log_tail", ""))
        result["runs"].append(row)
        out.write_text(json.dumps(result, indent=1, default=str))
    ref = result["runs"][0]
    for row in result["runs"]:
        if "error" not in row and "error" not in ref:
            row["checks"] = checks(row, ref)
    result["table"] = table(result)
    print(result["table"])
    out.write_text(json.dumps(result, indent=1, default=str))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    LOG.info("wrote %s", out)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
