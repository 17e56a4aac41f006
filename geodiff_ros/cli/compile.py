"""``geodiff_compile``: compile the engine ahead of time for one GPU, precision and camera size.

With ``optimize`` compile or compile+graph (the GPU default ``auto``), a node compiles its network stages with
torch.compile on every start: minutes on the first start of a machine, still tens of seconds on a restart (dynamo
re-traces the model). Run this once per GPU model, dtype, processing_res and camera size (and batch size, for a
multi-camera node); it writes AOTInductor packages (engine/aot.py) that the engine loads in seconds instead. Stages,
sizes or batch sizes without a package compile as before, so nothing breaks when the camera changes.

    geodiff_compile --device cuda --dtype fp16 --size 640x480                 # the shipped models, one camera
    geodiff_compile --model-depth /models/depth --model-normals '' --batch-sizes 1 2 3 4   # 4 cameras, depth only

Then start the node as usual with the same model, dtype, processing_res and optimize.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..engine import DEPTH_HUB_ID, NORMALS_HUB_ID, EngineConfig, GeoDiffEngine, GeoDiffError

LOG = logging.getLogger("geodiff_compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-depth", default=DEPTH_HUB_ID, help='depth model (hub id or folder; "" = none)')
    p.add_argument("--model-normals", default=NORMALS_HUB_ID, help='normals model (hub id or folder; "" = none)')
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--processing-res", type=int, default=768)
    p.add_argument("--size", default="640x480", help="camera image WIDTHxHEIGHT (the node's input size)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                   help="frames per engine call to compile for (a node with N cameras forms 1..min(N, batch_size))")
    p.add_argument("--optimize", default="compile+graph", choices=("compile", "compile+graph"),
                   help="the node's mode (auto = compile+graph on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="package folder (default: the engine's, engine/aot.py)")
    p.add_argument("--local-files-only", action="store_true", help="never download the models")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..engine.aot import aot_dir, export_stages

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        LOG.error("--size %r: use WIDTHxHEIGHT, e.g. 640x480", args.size)
        return 2
    try:
        engine = GeoDiffEngine(EngineConfig(
            depth_model=args.model_depth or None, normals_model=args.model_normals or None, device=args.device,
            dtype=args.dtype, processing_res=args.processing_res, optimize=args.optimize,
            local_files_only=args.local_files_only, batch_size=max(args.batch_sizes)))
    except GeoDiffError as err:
        LOG.error("cannot load the engine: %s", err)
        return 1
    folder = args.out or aot_dir(engine.device)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    paths: list[Path] = []
    for batch in args.batch_sizes:
        frames = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)  # [B,H,W,3]
        LOG.info("batch %d, %dx%d, %s, tasks %s:", batch, width, height, args.dtype, engine.tasks)
        try:
            paths += export_stages(engine, frames, folder)
        except RuntimeError as err:  # a package that does not run in a child process (kept aside, never loaded)
            LOG.error("%s", err)
            return 1
    LOG.info("%d package(s) in %s after %.0f s; nodes and engines with optimize %s load them at start-up",
             len(paths), folder, time.perf_counter() - start, args.optimize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
