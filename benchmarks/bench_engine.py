"""Engine speed benchmark: diffusers' MarigoldDepthPipeline against the engine, eager and optimised.

Full-size Marigold / SD2 architecture (UNet 866 M parameters, SD2 VAE) with random weights, written once as hub-layout
folders (one per task, sharing one VAE; a one-layer text encoder of width 1024 stands in for CLIP) and loaded through
the engine's real loader. 640x480 uint8 host frames in, host float32 outputs, processing_res 768 by default.

In one run and on one card it measures, per dtype: median / p95 ms per frame (host to host) and FPS for the diffusers
pipeline (1 step, trailing, same weights) and for the engine with every optimize mode (engine/accel.py), for depth,
normals and depth+normals; FLOPs per frame (torch.utils.flop_counter) and the floor at the card's measured matmul rate;
peak GPU memory; load and first-call (compile / capture / warm-up) time; the accuracy cost against fp32 eager (depth:
max and mean abs difference after least-squares scale+shift alignment; normals: mean angle); and a per-stage GPU time
breakdown. Prints a table and writes JSON naming the card. How to run: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from geodiff_ros.engine import EngineConfig, GeoDiffEngine  # noqa: E402
from geodiff_ros.engine.config import DEFAULT_PROCESSING_RES, processing_res_argument  # noqa: E402
from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

LOG = logging.getLogger("bench_engine")

# Marigold / E2E-FT = Stable Diffusion 2 architecture with an 8-channel UNet input (docs/method.md#conv-in-expansion).
SD2_UNET: dict[str, Any] = {
    "sample_size": 96, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
}
SD2_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 768, "scaling_factor": 0.18215,
}
TASK_SETS = {"depth": ("depth",), "normals": ("normals",), "depth+normals": ("depth", "normals")}
# Engines built per optimize group; the rows of a group toggle Accelerator.use_cuda_graph on one engine.
GROUPS = {"none": ("none", False), "channels_last": ("graph", False), "graph": ("graph", True),
          "compile": ("compile+graph", False), "compile+graph": ("compile+graph", True)}
FUSED_VAE_KERNELS = ("_fused_pass_kernel", "_apply_kernel", "_group_stats_kernel", "_softmax_rows_kernel")
FAST_PATH_KEYS = ("fused_vae", "subpixel", "vae_attention", "batch_decode", "concurrent_unets")
# Accuracy tolerances against fp32 eager (stated up front): the precision's own cost ...
TOL_DEPTH_MEAN, TOL_DEPTH_MAX, TOL_NORMALS_DEG = 1e-2, 1e-1, 1.0
# ... and what an optimisation may add on top of eager at the same dtype: x1.25 plus a small absolute slack.
TOL_OPT_FACTOR, TOL_OPT_DEPTH, TOL_OPT_DEG = 1.25, 1e-3, 0.1


# ---------------------------------------------------------------------------------------------------- setup


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16, fp32")
    p.add_argument("--modes", default="none,channels_last,graph,compile,compile+graph",
                   help="engine optimize modes to time (see engine/accel.py)")
    p.add_argument("--tasks", default="depth,normals,depth+normals")
    p.add_argument("--size", default="640x480", help="input WxH")
    p.add_argument("--processing-res", type=processing_res_argument, default=DEFAULT_PROCESSING_RES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ref-frames", type=int, default=4, help="frames compared against fp32 eager")
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke test of this script)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-reference", action="store_true", help="no fp32 reference / accuracy columns")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / ".cache" / "bench_ckpt")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/engine_<card>.json)")
    p.add_argument("--startup-only", default=None, metavar="MODE",
                   help="only load an engine with this optimize mode, warm it up, report the times")
    p.add_argument("--profile", action="store_true", help="with --startup-only: GPU kernel time by category")
    p.add_argument("--inductor-cdt", action="store_true",
                   help="torch._inductor.config.coordinate_descent_tuning = True (try: tunes Triton kernel configs)")
    p.add_argument("--gn-channel-sum", choices=("on", "off"), default=None,
                   help="compiled modes: VAE GroupNorm stats from per-channel sums (accel.VAE_CHANNEL_SUM_GROUPNORM)")
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                   help="torch.backends.cudnn.benchmark_limit (algorithms cuDNN tries per shape; 0 = all)")
    p.add_argument("--fast-paths", default=None, metavar="VARIANTS",
                   help="compiled CUDA modes: A/B variants of accel.FastPaths, 'name:key=val,..;name2:..' "
                        "over accel.FAST_PATHS, e.g. 'fused;sdpa:vae_attention=sdpa;old:fused_vae=0,batch_decode=0,"
                        "concurrent_unets=0' (keys: " + ", ".join(FAST_PATH_KEYS) + "); default: the defaults")
    p.add_argument("--kernel-config", type=Path, default=None,
                   help="JSON of engine/vae_kernels.py tile constants (bench_vae_kernels.py --sweep writes one)")
    p.add_argument("--extra-res", default="", metavar="RES,..",
                   help="compiled CUDA modes: also time the first variant at these processing_res values (UNet "
                        "recompiles per size) and report FLOPs and the depth difference to the 768 result")
    p.add_argument("--real-images", nargs="*", type=Path, default=[],
                   help="RGB images (resized to --size) for the --extra-res depth difference")
    p.add_argument("--markdown", nargs="+", type=Path, default=None,
                   help="print the README table for these result JSON files and exit")
    return p.parse_args(argv)


def parse_fast_paths(spec: str | None) -> list[tuple[str, Any]]:
    """'name:key=val,key=val;name2' -> [(name, accel.FastPaths)] over accel.FAST_PATHS; None -> the defaults."""
    import dataclasses

    from geodiff_ros.engine import accel

    if not spec:
        return [("default", accel.FAST_PATHS)]
    variants = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, body = part.partition(":")
        changes: dict[str, Any] = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, _, value = item.partition("=")
            if key not in FAST_PATH_KEYS:
                raise SystemExit(f"--fast-paths: unknown key {key!r} in {part!r}; keys: {', '.join(FAST_PATH_KEYS)}")
            changes[key] = value if key == "vae_attention" else value.lower() in ("1", "on", "true", "yes")
        variants.append((name.strip(), dataclasses.replace(accel.FAST_PATHS, **changes)))
    return variants


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        import diffusers

        info["diffusers"] = diffusers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["card"] = f"CPU ({info['cpu']}, {info['cpu_threads']} threads)"
    info["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)")
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (random data, median of timed products): the ceiling the floor is taken at."""
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e12


def write_checkpoints(root: Path, tasks: Sequence[str], *, tiny: bool, device: torch.device) -> dict[str, Path]:
    """Hub-layout folders per task with random weights (fp16 on disk), one shared VAE; re-used when present."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    kind = "tiny" if tiny else "sd2"
    folders = {task: root / f"{kind}-random-{task}" for task in tasks}
    if all((f / "BENCH_COMPLETE").is_file() for f in folders.values()):
        return folders
    start = time.perf_counter()
    for task, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        write_tiny_checkpoint(folder, task=task, seed=0)  # layout, tokenizer, scheduler, model_index
    if not tiny:
        first = folders[tasks[0]]
        tokenizer = CLIPTokenizer.from_pretrained(first / "tokenizer")
        init_device = device if device.type == "cuda" else torch.device("cpu")
        with torch.device(init_device):
            torch.manual_seed(1)
            vae = AutoencoderKL(**SD2_VAE).to(torch.float16)
            torch.manual_seed(2)
            text = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=16, max_position_embeddings=77, projection_dim=1024,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)).to(torch.float16)
        vae.save_pretrained(first / "vae", safe_serialization=True)
        text.save_pretrained(first / "text_encoder", safe_serialization=True)
        del vae, text
        for i, folder in enumerate(folders.values()):
            if folder != first:
                for sub in ("vae", "text_encoder"):
                    shutil.rmtree(folder / sub)
                    shutil.copytree(first / sub, folder / sub)
            with torch.device(init_device):
                torch.manual_seed(10 + i)
                unet = UNet2DConditionModel(**SD2_UNET).to(torch.float16)
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            del unet
    for folder in folders.values():
        (folder / "BENCH_COMPLETE").write_text(kind)
    LOG.info("wrote %s random checkpoints in %.1f s", kind, time.perf_counter() - start)
    return folders


def make_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Structured synthetic RGB frames (gradients, boxes, discs, noise): no zeros, no constant images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for _ in range(count):
        img = np.stack([xx / width, yy / height, 1 - xx / width], axis=-1) * rng.uniform(80, 200, 3)
        for _ in range(12):
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            h, w = rng.integers(20, height // 2), rng.integers(20, width // 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, 90)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


# ---------------------------------------------------------------------------------------------------- measuring


def timed(fn: Callable[[np.ndarray], Any], frames: Sequence[np.ndarray], warmup: int, iters: int,
          device: torch.device) -> dict[str, float]:
    """Host-to-host ms per frame: first call (compile/capture/warm-up) apart, then warm-up, then timed calls."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn(frames[0])
    first = time.perf_counter() - start
    for i in range(warmup):
        fn(frames[i % len(frames)])
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn(frames[i % len(frames)])  # returns host arrays: synchronised
        times.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(times)
    row = {"first_call_s": round(first, 3), "median_ms": float(np.median(arr)),
           "p95_ms": float(np.percentile(arr, 95)), "mean_ms": float(arr.mean()), "min_ms": float(arr.min()),
           "fps": float(1e3 / arr.mean()), "iters": iters}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def depth_errors(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Max and mean |s*pred + t - ref| after least-squares scale and shift (affine-invariant depth)."""
    a = np.stack([pred.ravel().astype(np.float64), np.ones(pred.size)], axis=1)
    coef, *_ = np.linalg.lstsq(a, ref.ravel().astype(np.float64), rcond=None)
    diff = np.abs(a @ coef - ref.ravel())
    return float(diff.max()), float(diff.mean())


def normals_angle_deg(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean angle between the normals (each re-normalised: resized normals are not unit length,
    docs/method.md#normals-output)."""
    p = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    r = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), 1e-12)
    return float(np.degrees(np.arccos(np.clip((p * r).sum(-1), -1.0, 1.0))).mean())


def accuracy(outputs: list[dict[str, np.ndarray]], refs: list[dict[str, np.ndarray]] | None) -> dict[str, float]:
    if not refs:
        return {}
    acc: dict[str, float] = {}
    finite = all(np.isfinite(v).all() for out in outputs for v in out.values())
    acc["finite"] = float(finite)
    if "depth" in outputs[0]:
        errs = [depth_errors(o["depth"], r["depth"]) for o, r in zip(outputs, refs, strict=True)]
        acc["depth_max_abs"] = max(e[0] for e in errs)
        acc["depth_mean_abs"] = float(np.mean([e[1] for e in errs]))
    if "normals" in outputs[0]:
        acc["normals_mean_deg"] = float(np.mean([normals_angle_deg(o["normals"], r["normals"])
                                                 for o, r in zip(outputs, refs, strict=True)]))
    return acc


def engine_outputs(engine: GeoDiffEngine, frames: Sequence[np.ndarray], tasks: Sequence[str]) -> list[dict]:
    out = []
    for frame in frames:
        pred = engine.predict(frame, tasks)
        out.append({t: getattr(pred, t)[0] for t in tasks})
    return out


def count_flops(engine: GeoDiffEngine, frame: np.ndarray) -> dict[str, float]:
    """FLOPs per frame by stage (FlopCounterMode; SDPA through the math kernel so attention counts as matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    flops: dict[str, float] = {}
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]):
        u8 = torch.from_numpy(frame[None]).to(engine.device).permute(0, 3, 1, 2)
        x = engine.preprocess(u8)
        stages: list[tuple[str, Callable[[], Any]]] = [("encode", lambda: engine.encode(x))]
        z = engine.encode(x)
        z0 = {task: engine.denoise_single_step(task, z) for task in engine.tasks}
        for task in engine.tasks:
            stages.append((f"unet_{task}", lambda task=task: engine.denoise_single_step(task, z)))
        stages.append(("decode", lambda: engine.decode(z0[engine.tasks[0]])))
        for name, fn in stages:
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = float(counter.get_total_flops())
    unet = flops.get("unet_depth", flops.get("unet_normals", 0.0))
    flops["depth"] = flops["encode"] + unet + flops["decode"]
    flops["normals"] = flops["depth"]
    flops["depth+normals"] = flops["encode"] + 2 * unet + 2 * flops["decode"]
    return flops


def stage_breakdown(engine: GeoDiffEngine, frame: np.ndarray, flops: dict[str, float], rate: float,
                    reps: int = 10) -> dict[str, dict[str, float]]:
    """Median ms per stage (CUDA events) for one frame of depth, with achieved TFLOP/s and share of the rate.

    Optimised engines replay each stage as its own CUDA graph (GPU time); eager stages are timed as launched, so a
    stage whose Python launches more slowly than the GPU runs (the eager UNet) shows its launch time."""
    device = engine.device
    if device.type != "cuda":
        return {}
    acc = engine.accelerator
    size = frame.shape[:2]
    with torch.inference_mode():
        host = torch.from_numpy(frame[None]).pin_memory()
        u8 = host.to(device)
        if acc is None:
            pre = lambda: engine.preprocess(u8.permute(0, 3, 1, 2))  # noqa: E731
            enc, den, dec = engine.encode, engine.denoise_single_step, engine.decode
            post = lambda y: engine.postprocess_depth(y, size)  # noqa: E731
        else:
            pre = lambda: acc.preprocess(u8)  # noqa: E731
            enc, den, dec = acc.encode, acc.denoise, acc.decode
            post = lambda y: acc.postprocess("depth", y, size)  # noqa: E731
        x = pre()
        z = enc(x)
        z0 = den("depth", z)
        y = dec(z0)
        d = post(y)
        out_host = torch.empty(d.shape, dtype=d.dtype, pin_memory=True)
        stages = {"upload": lambda: u8.copy_(host, non_blocking=True), "preprocess": pre,
                  "encode": lambda: enc(x), "unet": lambda: den("depth", z), "decode": lambda: dec(z0),
                  "postprocess": lambda: post(y), "download": lambda: out_host.copy_(d, non_blocking=True)}
        result = {}
        for name, fn in stages.items():
            fn()
            run = fn
            if acc is not None:  # time the GPU work alone: replay the stage as its own CUDA graph
                with contextlib.suppress(Exception):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    run = graph.replay
            times = []
            for _ in range(reps):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                run()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            ms = float(np.median(times))
            key = {"unet": "unet_depth"}.get(name, name)
            entry = {"ms": ms, "cuda_graph": run is not fn}
            if key in flops:
                entry["tflops"] = flops[key] / (ms * 1e-3) / 1e12
                entry["pct_of_matmul_rate"] = 100 * entry["tflops"] / rate
            result[name] = entry
    return result


def kernel_profile(engine: GeoDiffEngine, frame: np.ndarray, tasks: Sequence[str], frames: int = 3,
                   top: int = 15) -> dict[str, Any]:
    """GPU kernel time by category and the top kernels (torch.profiler), per frame; graphs off so kernels show."""
    from torch.profiler import ProfilerActivity, profile

    if engine.accelerator is not None:
        engine.accelerator.use_cuda_graph = False
    engine.predict(frame, tasks)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(frames):
            engine.predict(frame, tasks)
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1e3 / frames  # ms per frame
    categories: dict[str, float] = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = ("fused VAE kernels (vae_kernels.py)" if low.startswith(FUSED_VAE_KERNELS) else
               "triton (fused norm / element-wise)" if low.startswith("triton") else
               "attention" if any(k in low for k in ("flash", "fmha", "attention", "sdpa")) else
               "conv" if any(k in low for k in ("conv", "implicit", "dgrad", "wgrad", "fprop", "nhwc")) else
               "gemm" if any(k in low for k in ("gemm", "cutlass", "xmma", "sm90", "cublas", "matmul")) else
               "memcpy/memset" if "memcpy" in low or "memset" in low else "other")
        categories[cat] = categories.get(cat, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"tasks": list(tasks), "ms_per_frame_total": sum(kernels.values()), "by_category_ms": categories,
            "top_kernels_ms": [[name[:120], ms] for name, ms in ranked]}


def diffusers_baseline(folder: Path, dtype: torch.dtype, device: torch.device, processing_res: int,
                       frame_hw: tuple[int, int]) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """diffusers' MarigoldDepthPipeline on the same weights: 1 trailing DDIM step, zero initial latent."""
    from diffusers import AutoencoderKL, DDIMScheduler, MarigoldDepthPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    pipe = MarigoldDepthPipeline(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="trailing"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        prediction_type="depth", scale_invariant=True, shift_invariant=True,
        default_denoising_steps=1, default_processing_resolution=processing_res,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    h, w = frame_hw
    ph, pw = (h * processing_res // max(h, w), w * processing_res // max(h, w)) if processing_res else (h, w)
    latents = torch.zeros(1, 4, -(-ph // 8), -(-pw // 8), device=device, dtype=dtype)

    def run(frame: np.ndarray) -> np.ndarray:
        # A host uint8 tensor [1,3,H,W] (a view of the frame): diffusers 0.42.1's check_inputs reads numpy input as
        # [..,H,W] and rejects the latents shape for [N,H,W,3] arrays.
        image = torch.from_numpy(frame).permute(2, 0, 1)[None]
        out = pipe(image, num_inference_steps=1, ensemble_size=1, processing_resolution=processing_res,
                   match_input_resolution=True, batch_size=1, latents=latents, output_type="np")
        return out.prediction[0, :, :, 0]  # [H,W] float32

    run.pipe = pipe  # type: ignore[attr-defined] - kept alive with the closure, freed by the caller
    return run, load_s


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- main

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Bench:
    """One benchmark run: its settings, the fp32 reference outputs and the result JSON written after every row."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str] | None) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.width, self.height = (int(v) for v in args.size.lower().split("x"))
        self.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        self.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        self.task_sets = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = ([m for m in self.modes if m not in GROUPS] + [t for t in self.task_sets if t not in TASK_SETS]
                   + [d for d in self.dtypes if d not in DTYPES])
        if unknown:
            raise SystemExit(f"unknown mode/task set/dtype {unknown}: modes {list(GROUPS)}, tasks {list(TASK_SETS)}, "
                             f"dtypes {list(DTYPES)}")
        self.needed = [t for t in ("depth", "normals") if any(t in TASK_SETS[ts] for ts in self.task_sets)]
        info = device_info(self.device)
        slug = "".join(c if c.isalnum() else "_" for c in info["card"].lower()).strip("_")[:40]
        self.out_path = args.out or REPO / "benchmarks" / "results" / f"engine_{slug}.json"
        self.result: dict[str, Any] = {
            "benchmark": "bench_engine", "issue": 5, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "device": info, "settings": {
                "input": f"{self.width}x{self.height} uint8", "processing_res": args.processing_res,
                "iters": args.iters, "warmup": args.warmup, "ref_frames": args.ref_frames,
                "model": "tiny" if args.tiny else "sd2-full-size", "weights": "random (fp16 on disk)",
                "unet": SD2_UNET, "vae": SD2_VAE},
            "tolerances": {"depth_mean_abs": TOL_DEPTH_MEAN, "depth_max_abs": TOL_DEPTH_MAX,
                           "normals_mean_deg": TOL_NORMALS_DEG, "optimisation_factor": TOL_OPT_FACTOR,
                           "optimisation_depth_slack": TOL_OPT_DEPTH, "optimisation_deg_slack": TOL_OPT_DEG},
            "matmul_tflops": {}, "flops": {}, "rows": [], "stages": {}, "load_s": {}, "errors": [],
            "inductor_coordinate_descent_tuning": bool(args.inductor_cdt), "profile": {},
            "vae_channel_sum_groupnorm": args.gn_channel_sum, "cudnn_benchmark_limit": args.cudnn_benchmark_limit,
            "fast_paths": {}, "kernel_config": {}, "extra_res": [],
        }
        self.variants = parse_fast_paths(args.fast_paths)
        self.extra_res = [int(r) for r in args.extra_res.split(",") if r.strip()]
        self.frames = make_frames(max(4, args.ref_frames), self.height, self.width)
        self.ref_frames = self.frames[:args.ref_frames]
        self.refs: dict[str, list[dict[str, np.ndarray]]] = {}
        self.eager_acc: dict[tuple[str, str], dict[str, float]] = {}
        self.cfg: dict[str, Any] = {}

    def save(self) -> None:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(self.result, indent=1, default=str))

    def error(self, what: str, exc: BaseException) -> None:
        LOG.exception("%s failed", what)
        self.result["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        self.save()

    def setup(self) -> None:
        info = self.result["device"]
        LOG.info("card %s, torch %s", info["card"], info["torch"])
        folders = write_checkpoints(self.args.ckpt_dir, self.needed, tiny=self.args.tiny, device=self.device)
        self.cfg = {"depth_model": str(folders["depth"]) if "depth" in folders else None,
                    "normals_model": str(folders["normals"]) if "normals" in folders else None,
                    "device": self.args.device, "processing_res": self.args.processing_res, "batch_size": 1}
        self.folders = folders

    def startup_only(self, mode: str) -> None:
        """One optimize mode in a fresh process: load and warm-up time (with TORCHINDUCTOR_CACHE_DIR kept from an
        earlier run this is the restart cost), then the timed rows (no accuracy) and optionally a kernel profile."""
        if not self.args.skip_reference:
            self.reference()
        for dtype in self.dtypes:
            self.result["matmul_tflops"][dtype] = matmul_tflops(self.device, DTYPES[dtype])
            self.diffusers_rows(dtype)  # the same-run baseline for the speed-up column
            start = time.perf_counter()
            engine = GeoDiffEngine(EngineConfig(**self.cfg, dtype=dtype, optimize=mode))
            load = time.perf_counter() - start
            if not self.result["flops"]:
                self.result["flops"] = count_flops(engine, self.frames[0])  # eager calls: before the warm-up
            warm = {ts: engine.warmup(self.height, self.width, TASK_SETS[ts]) for ts in self.task_sets}
            self.result["startup"] = {"dtype": dtype, "optimize": mode, "load_s": load, "warmup_s": warm,
                                      "errors": engine.accelerator.stage_errors() if engine.accelerator else {}}
            LOG.info("startup %s %s: load %.1f s, warm-up %s", dtype, mode, load, warm)
            self.save()
            graph = bool(GROUPS[mode][1]) if mode in GROUPS else False
            for ts in self.task_sets:
                if engine.accelerator is not None:
                    engine.accelerator.use_cuda_graph = graph
                self.engine_row(engine, dtype, mode, ts, load)
            if self.args.profile and self.device.type == "cuda":
                for ts in ("depth", "depth+normals"):
                    if ts in self.task_sets:
                        self.result["profile"][f"{dtype}-{mode}-{ts}"] = prof = kernel_profile(
                            engine, self.frames[0], TASK_SETS[ts])
                        LOG.info("profile %s %s: %.2f ms GPU/frame, %s; top %s", mode, ts, prof["ms_per_frame_total"],
                                 {k: round(v, 2) for k, v in prof["by_category_ms"].items()},
                                 [(n[:60], round(m, 2)) for n, m in prof["top_kernels_ms"][:8]])
            del engine
            free(self.device)
        print(text_table(self.result))
        self.save()

    def reference(self) -> None:
        """fp32 eager outputs (TF32 off for matmuls and convolutions) and the FLOP count per frame."""
        torch.backends.cudnn.benchmark = False
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            start = time.perf_counter()
            engine = GeoDiffEngine(EngineConfig(**self.cfg, dtype="fp32"))
            self.result["load_s"]["fp32-reference"] = time.perf_counter() - start
            self.result["flops"] = count_flops(engine, self.frames[0])
            LOG.info("FLOPs per frame: %s", {k: f"{v / 1e12:.3f} T" for k, v in self.result["flops"].items()})
            if not self.args.skip_reference:
                both = engine_outputs(engine, self.ref_frames, self.needed)
                self.refs = {ts: [{t: o[t] for t in TASK_SETS[ts]} for o in both] for ts in self.task_sets}
            del engine
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            free(self.device)
        self.save()

    def add_row(self, row: dict[str, Any]) -> None:
        dtype, ts = row["dtype"], row["tasks"]
        rate = self.result["matmul_tflops"][dtype]
        row["floor_ms"] = row.get("flops", self.result["flops"][ts]) / (rate * 1e12) * 1e3
        row["pct_of_floor"] = 100 * row["floor_ms"] / row["median_ms"]
        base = next((r for r in self.result["rows"] if r["dtype"] == dtype and r["impl"] == "diffusers"), None)
        if base:
            row["x_diffusers"] = base["median_ms"] / row["median_ms"]
        row["acc_ok"] = (None if "processing_res" in row else  # other resolution: reported, not judged
                         accuracy_ok(row.get("acc", {}), self.eager_acc.get((dtype, ts)), row["optimize"]))
        self.result["rows"].append(row)
        LOG.info("%s %-9s %-14s %-13s median %7.2f ms p95 %7.2f ms (%5.1f FPS) first %.1f s acc %s", dtype,
                 row["impl"], row_label(row), ts, row["median_ms"], row["p95_ms"], row["fps"],
                 row["first_call_s"], {k: round(v, 5) for k, v in row.get("acc", {}).items()})
        self.save()

    def diffusers_rows(self, dtype: str) -> None:
        if self.args.skip_diffusers or "depth" not in self.task_sets:
            return
        torch.backends.cudnn.benchmark = False
        try:
            run, load_s = diffusers_baseline(self.folders["depth"], DTYPES[dtype], self.device,
                                             self.args.processing_res, (self.height, self.width))
            row = {"dtype": dtype, "impl": "diffusers", "optimize": "MarigoldDepthPipeline", "tasks": "depth",
                   "load_s": load_s, **timed(run, self.frames, self.args.warmup, self.args.iters, self.device)}
            if self.refs:
                row["acc"] = accuracy([{"depth": run(f)} for f in self.ref_frames], self.refs["depth"])
            self.add_row(row)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the engine rows
            self.error(f"diffusers {dtype}", exc)
        free(self.device)

    def engine_rows(self, dtype: str, group: str, row_modes: Sequence[str]) -> None:
        """One engine for an optimize group; its rows toggle CUDA graphs on it (compile once, capture after)."""
        torch.backends.cudnn.benchmark = False  # eager runs with defaults; an Accelerator turns it on for itself
        try:
            start = time.perf_counter()
            engine = GeoDiffEngine(EngineConfig(**self.cfg, dtype=dtype, optimize=group))
            load_s = time.perf_counter() - start
            self.result["load_s"][f"{dtype}-{group}"] = load_s
        except Exception as exc:  # noqa: BLE001
            self.error(f"engine {dtype} {group} load", exc)
            return
        acc = engine.accelerator
        # CUDA; on a CPU only as a rehearsal of this script with the Triton interpreter (TRITON_INTERPRET=1)
        with_variants = acc is not None and acc.settings.compile and (
            self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
        for v_index, (variant, paths) in enumerate(self.variants if with_variants else [(None, None)]):
            if paths is not None:
                effective = acc.set_fast_paths(paths)
                self.result["fast_paths"][variant] = {"asked": dataclasses.asdict(paths),
                                                      "effective": dataclasses.asdict(effective)}
                LOG.info("fast paths %s: %s", variant, effective)
            for mode in row_modes:
                graph = bool(GROUPS[mode][1])
                if graph and self.device.type != "cuda":
                    self.result["errors"].append(f"{mode}: skipped (CUDA graphs need a CUDA device)")
                    continue
                if acc is not None:
                    acc.use_cuda_graph = graph
                for ts in self.task_sets:
                    try:
                        self.engine_row(engine, dtype, mode, ts, load_s, variant)
                    except Exception as exc:  # noqa: BLE001
                        self.error(f"engine {dtype} {mode} {ts} {variant}", exc)
                        free(self.device)
            if self.device.type == "cuda" and "depth" in engine.tasks:
                key = f"{dtype}-{group}" + (f"[{variant}]" if variant else "")
                try:
                    if acc is not None:
                        acc.use_cuda_graph = False
                    self.result["stages"][key] = stage_breakdown(
                        engine, self.frames[0], self.result["flops"], self.result["matmul_tflops"][dtype])
                    if self.args.profile and v_index == 0:
                        for ts in ("depth", "depth+normals"):
                            if ts in self.task_sets:
                                self.result["profile"][f"{key}-{ts}"] = kernel_profile(engine, self.frames[0],
                                                                                      TASK_SETS[ts])
                except Exception as exc:  # noqa: BLE001
                    self.error(f"stages {key}", exc)
                self.save()
        if with_variants and self.extra_res:
            try:
                acc.set_fast_paths(self.variants[0][1])
                self.extra_res_rows(engine, dtype, row_modes[-1], load_s, self.variants[0][0])
            except Exception as exc:  # noqa: BLE001
                self.error(f"extra-res {dtype}", exc)
        del engine
        free(self.device)
        self.save()

    def extra_res_rows(self, engine: GeoDiffEngine, dtype: str, mode: str, load_s: float, variant: str) -> None:
        """Rows at other processing resolutions on the same engine (the UNet recompiles for each size): time, FLOPs
        and the depth difference to this engine's own 768 result on the real images (and the synthetic frames)."""
        acc = engine.accelerator
        acc.use_cuda_graph = bool(GROUPS[mode][1])
        base_res = engine.config.processing_res
        real = [load_rgb(p, self.width, self.height) for p in self.args.real_images]
        images = {"real": real, "synthetic": self.frames[:max(1, self.args.ref_frames)]}
        base = {k: [engine.predict(f, ("depth",)).depth[0] for f in v] for k, v in images.items() if v}
        try:
            for res in self.extra_res:
                engine.config.processing_res = res
                acc._graphs.clear()
                flops = count_flops(engine, self.frames[0])
                entry: dict[str, Any] = {"processing_res": res, "flops": flops, "variant": variant}
                for ts in self.task_sets:
                    row = {"dtype": dtype, "impl": "engine", "optimize": mode, "tasks": ts, "load_s": load_s,
                           "variant": f"{variant}@{res}", "processing_res": res, "flops": flops[ts],
                           **timed(lambda f, t=TASK_SETS[ts]: engine.predict(f, t), self.frames, self.args.warmup,
                                   self.args.iters, self.device)}
                    self.add_row(row)
                for kind, frames in images.items():
                    if kind in base:
                        errs = [depth_errors(engine.predict(f, ("depth",)).depth[0], ref)
                                for f, ref in zip(frames, base[kind], strict=True)]
                        entry[f"depth_vs_{base_res}_{kind}"] = {"max_abs": max(e[0] for e in errs),
                                                                 "mean_abs": float(np.mean([e[1] for e in errs])),
                                                                 "images": len(errs)}
                self.result["extra_res"].append(entry)
                LOG.info("processing_res %d: %s", res, {k: v for k, v in entry.items() if k.startswith("depth")})
                self.save()
        finally:
            engine.config.processing_res = base_res
            acc._graphs.clear()

    def engine_row(self, engine: GeoDiffEngine, dtype: str, mode: str, ts: str, load_s: float,
                   variant: str | None = None) -> None:
        tasks = TASK_SETS[ts]
        row = {"dtype": dtype, "impl": "engine", "optimize": mode, "tasks": ts, "load_s": load_s,
               **({"variant": variant} if variant else {}),
               **timed(lambda f: engine.predict(f, tasks), self.frames, self.args.warmup, self.args.iters,
                       self.device)}
        if self.refs:
            row["acc"] = accuracy(engine_outputs(engine, self.ref_frames, tasks), self.refs[ts])
            if mode == "none":
                self.eager_acc[(dtype, ts)] = row["acc"]
        if engine.accelerator is not None:
            row["fallbacks"] = engine.accelerator.stage_errors()
            row["cuda_graph_used"] = engine.accelerator.use_cuda_graph
        self.add_row(row)

    def run(self) -> None:
        for dtype in self.dtypes:
            self.result["matmul_tflops"][dtype] = matmul_tflops(self.device, DTYPES[dtype])
            LOG.info("matmul %s: %.0f TFLOP/s", dtype, self.result["matmul_tflops"][dtype])
        self.reference()
        for dtype in self.dtypes:
            self.diffusers_rows(dtype)
            groups: dict[str, list[str]] = {}
            for mode in self.modes:
                groups.setdefault(GROUPS[mode][0], []).append(mode)
            for group, row_modes in groups.items():
                self.engine_rows(dtype, group, row_modes)
        print(text_table(self.result))
        self.save()
        LOG.info("wrote %s", self.out_path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "torch._inductor", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.markdown:
        print(markdown_tables([json.loads(p.read_text()) for p in args.markdown]))
        return 0
    if args.inductor_cdt:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if args.gn_channel_sum is not None:
        from geodiff_ros.engine import accel

        accel.VAE_CHANNEL_SUM_GROUPNORM = args.gn_channel_sum == "on"
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    kernel_config = {}
    if args.kernel_config is not None and args.kernel_config.is_file():
        from geodiff_ros.engine import vae_kernels

        kernel_config = json.loads(args.kernel_config.read_text())
        for key, value in kernel_config.items():
            if not hasattr(vae_kernels, key):
                raise SystemExit(f"--kernel-config: vae_kernels has no constant {key}")
            setattr(vae_kernels, key, value)
    bench = Bench(args, argv)
    bench.result["kernel_config"] = kernel_config
    bench.setup()
    if args.startup_only:
        bench.startup_only(args.startup_only)
    else:
        bench.run()
    return 0


def accuracy_ok(acc: dict[str, float], eager: dict[str, float] | None, optimize: str) -> bool | None:
    """Within the stated tolerances: absolute for the precision, relative to eager for an optimisation."""
    if not acc or optimize == "MarigoldDepthPipeline":
        return None  # diffusers is a different computation (no min-max, no AA on the way back): reported only
    ok = bool(acc.get("finite", 1.0))
    ok &= acc.get("depth_mean_abs", 0.0) <= TOL_DEPTH_MEAN and acc.get("depth_max_abs", 0.0) <= TOL_DEPTH_MAX
    ok &= acc.get("normals_mean_deg", 0.0) <= TOL_NORMALS_DEG
    if eager and optimize not in ("none", "MarigoldDepthPipeline"):
        for key, slack in (("depth_mean_abs", TOL_OPT_DEPTH), ("depth_max_abs", 10 * TOL_OPT_DEPTH),
                           ("normals_mean_deg", TOL_OPT_DEG)):
            if key in acc and key in eager:
                ok &= acc[key] <= TOL_OPT_FACTOR * eager[key] + slack
    return ok


def row_label(row: dict[str, Any]) -> str:
    return row["optimize"] + (f" [{row['variant']}]" if row.get("variant") else "")


def load_rgb(path: Path, width: int, height: int) -> np.ndarray:
    """An RGB image as uint8 [H,W,3] at the benchmark's input size (one captured graph per input size)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result["rows"]:
        if "median_ms" not in r:
            continue
        acc = r.get("acc", {})
        depth = (f"{acc['depth_max_abs']:.1e}/{acc['depth_mean_abs']:.1e}" if "depth_max_abs" in acc else "-")
        ok = {True: "ok", False: "FAIL", None: "-"}[r.get("acc_ok")]
        rows.append([r["dtype"], "diffusers" if r["impl"] == "diffusers" else row_label(r), r["tasks"],
                     f"{r['median_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['fps']:.1f}",
                     _fmt(r.get("x_diffusers"), ".2f"), f"{r['floor_ms']:.1f}", f"{r['pct_of_floor']:.0f}%",
                     _fmt(r.get("peak_mem_gib"), ".1f"), f"{r['first_call_s']:.1f}", depth,
                     _fmt(acc.get("normals_mean_deg"), ".3f"), ok])
    return rows


HEADER = ["dtype", "path", "tasks", "median ms", "p95 ms", "FPS", "x diffusers", "floor ms", "% of floor",
          "peak GiB", "first call s", "depth max/mean", "normals deg", "acc"]


def text_table(result: dict[str, Any]) -> str:
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"card: {result['device']['card']}  torch {result['device']['torch']}  input "
             f"{result['settings']['input']} -> processing_res {result['settings']['processing_res']}  "
             f"matmul TFLOP/s {({k: round(v, 1) for k, v in result['matmul_tflops'].items()})}  "
             f"TFLOP/frame {({k: round(result['flops'][k] / 1e12, 2) for k in TASK_SETS if k in result['flops']})}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for name, stages in result.get("stages", {}).items():
        lines.append(f"stages {name}: " + ", ".join(
            f"{k} {v['ms']:.2f} ms" + (f" ({v['pct_of_matmul_rate']:.0f}%)" if "pct_of_matmul_rate" in v else "")
            for k, v in stages.items()))
    lines += [f"error: {e}" for e in result.get("errors", [])]
    return "\n".join(lines)


def markdown_tables(results: list[dict[str, Any]]) -> str:
    parts = []
    for result in results:
        d = result["device"]
        parts.append(f"**{d['card']}**, torch {d['torch']}, CUDA {d.get('cuda', '-')}, input "
                     f"{result['settings']['input']} -> processing_res {result['settings']['processing_res']}, "
                     f"{result['settings']['iters']} timed frames per row, {result['date']}; measured matmul rate "
                     + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in result["matmul_tflops"].items())
                     + "; FLOPs per frame " + ", ".join(f"{k} {result['flops'][k] / 1e12:.2f} T" for k in TASK_SETS
                                                       if k in result["flops"]) + ".\n")
        parts.append("| " + " | ".join(HEADER) + " |")
        parts.append("|" + "---|" * len(HEADER))
        parts += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
