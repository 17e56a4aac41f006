"""Where does an AOT stage package crash? One GPU call's diagnosis of the UNet package that geodiff_compile writes.

On an H100 (torch 2.11.0+cu130) the UNet package crashed with SIGSEGV when loaded and run once in a fresh process
with synthetic weights (the check in a child process, engine/aot.py), so nodes could not use it. This script
exports the engine's UNet stage once as geodiff_compile does (weights not in the library) and once with the
weights inside it, then loads and runs each in child processes (``python -X faulthandler``) in several ways, and
reports for each how far it got (loaded / weights handed over / ran) and, for a crash, the innermost Python frames:

  shared    load, load_constants(user_managed=True), run   (what the engine does)
  copied    load, load_constants(user_managed=False), run
  threads   as shared, with run_single_threaded=False
  inside    the package with its weights inside, load, run (no load_constants)

    python benchmarks/aot_crash_probe.py --out /tmp/aot_probe.json            # full-size random model, GPU
    python benchmarks/aot_crash_probe.py --tiny --device cpu --out /tmp/p.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from geodiff_ros.engine.aot import _META
path, variant = Path(sys.argv[1]), sys.argv[2]
meta = json.loads(path.with_suffix(_META).read_text())
device = torch.device(meta["device_type"])
def synthetic(shape, dtype, stride):
    value = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype.replace("torch.", "")), device=device)
    return value.normal_(0.0, 0.02) if value.is_floating_point() else value.zero_()
t0 = time.perf_counter()
runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=variant != "threads", device_index=-1)
print("STEP loaded", round(time.perf_counter() - t0, 2), flush=True)
if variant != "inside":
    wanted = runner.get_constant_fqns()
    weights = {fqn: synthetic(*meta["constants"][fqn]) for fqn in wanted}
    runner.load_constants(weights, check_full_update=True, user_managed=variant in ("shared", "threads"))
    print("STEP weights", len(wanted), flush=True)
args = [synthetic(*spec) for spec in meta["signature"]]
with torch.no_grad():
    out = runner(*args)
if device.type == "cuda":
    torch.cuda.synchronize()
print("STEP ran", [tuple(o.shape) for o in (out if isinstance(out, (list, tuple)) else [out])], flush=True)
"""


def export_unet(args: argparse.Namespace, folder: Path, inside: bool) -> Path:
    """The engine's UNet stage as an AOT package (geodiff_compile's export), weights outside or inside the library."""
    import numpy as np
    import torch

    from geodiff_ros.engine import EngineConfig, GeoDiffEngine, aot

    engine = GeoDiffEngine(EngineConfig(depth_model=args.model, normals_model=None, device=args.device,
                                        dtype=args.dtype, processing_res=args.processing_res,
                                        optimize="compile+graph" if args.device.startswith("cuda") else "compile"))
    acc = engine.accelerator
    stage = acc.unets["depth"]
    calls: dict[str, tuple] = {}
    eager = stage.eager

    def record(*call_args: torch.Tensor) -> torch.Tensor:
        calls.setdefault("unet", call_args)
        return eager(*call_args)

    stage.fn, stage.gated, stage.aot_paths = record, False, {}
    frames = np.random.default_rng(0).integers(0, 256, (1, 480, 640, 3), dtype=np.uint8)
    with torch.no_grad():
        acc.compute(torch.from_numpy(frames).to(acc.device), ("depth",))
    owner = engine.models["depth"].unet
    path = folder / f"unet-{'inside' if inside else 'outside'}.pt2"
    with torch.no_grad():
        exported = torch.export.export(aot._StageModule(eager, owner), calls["unet"])
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path), inductor_configs={"aot_inductor.package_constants_in_so": inside})
    constants = {f"owner.{k}": [list(v.shape), str(v.dtype), list(v.stride())] for k, v in owner.state_dict().items()}
    path.with_suffix(".json").write_text(json.dumps({"stage": stage.name, "signature": aot.stage_signature(
        calls["unet"]), "device_type": acc.device.type, "constants": constants}))
    return path


def probe(path: Path, variant: str) -> dict:
    """One child process: how far it got, its exit, and for a crash the innermost frames."""
    from geodiff_ros.engine.aot import _where

    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(path), variant],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    steps = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("STEP ")]
    return {"variant": variant, "package": path.name, "exit": done.returncode, "reached": steps,
            "crash_frames": _where(done.stderr) if done.returncode else "",
            "seconds": round(time.perf_counter() - t0, 1), "stderr_tail": done.stderr.strip().splitlines()[-12:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--processing-res", type=int, default=768)
    p.add_argument("--model", default=None, help="depth model folder (default: bench_engine's random SD2 size)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.model is None:
        import torch
        from bench_engine import write_checkpoints

        root = REPO / ".cache" / "bench_ckpt"
        args.model = str(write_checkpoints(root, ["depth", "normals"], tiny=args.tiny,
                                           device=torch.device(args.device))["depth"])
    if args.tiny:
        args.dtype, args.processing_res = "fp32", 64
    folder = Path(tempfile.mkdtemp(prefix="aot_probe_"))
    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "probes": []}
    for inside, variants in ((False, ("shared", "copied", "threads")), (True, ("inside",))):
        t0 = time.perf_counter()
        path = export_unet(args, folder, inside)
        result[f"export_{'inside' if inside else 'outside'}_s"] = round(time.perf_counter() - t0, 1)
        for variant in variants:
            result["probes"].append(probe(path, variant))
            args.out.write_text(json.dumps(result, indent=1))  # after every probe: a cut-off run keeps it
    for row in result["probes"]:
        print(row["variant"], row["exit"], row["reached"], row["crash_frames"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
