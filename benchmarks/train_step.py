"""Time one E2E fine-tuning micro-step at full size: SD2/Marigold UNet + SD2 VAE, random weights.

A micro-step is exactly the trainer's: frozen VAE encode, UNet at t=999 on a zero latent, x0 from v,
decode through the frozen VAE decoder, affine-invariant L1 in fp32, backward into the UNet, clip 1.0,
AdamW step. Reports seconds per micro-step and peak memory per precision, and projects the paper's run
(20k optimiser steps x 16 accumulation x batch 2) for comparison with "about 3 days on one H100"
(the paper). ``--tiny`` builds small models for a CPU smoke test.

    python benchmarks/train_step.py                       # GPU: batch 2 at 480x640, fp32 and bf16
    python benchmarks/train_step.py --tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from geodiff_ros.training.losses import affine_invariant_l1_loss
from geodiff_ros.training.model import e2e_forward

ALPHA_999 = 0.0046601  # scaled_linear 0.00085-0.012 at t=999 (docs/method.md#noise-schedule)


def build_models(tiny: bool) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """Marigold/SD2 UNet (8 input channels) and SD2 VAE with random weights; returns (unet, vae, ctx_dim)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=64, scaling_factor=0.18215,
        )
        return unet, vae, 32
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-2 unet/config.json with in_channels 8
        sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )
    vae = AutoencoderKL(  # SD2 vae/config.json
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
    )
    return unet, vae, 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_precision(args: argparse.Namespace, precision: str, device: torch.device) -> dict:
    """Build fresh models, run warm-up + timed micro-steps, return timings and peak memory."""
    torch.manual_seed(0)
    unet, vae, ctx_dim = build_models(args.tiny)
    unet.to(device).train()
    vae.to(device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ctx = torch.randn(1, 77, ctx_dim, device=device)  # 77-token training context (docs/method.md#text-context)
    b, h, w = args.batch, args.height, args.width
    rgb = torch.rand(b, 3, h, w, device=device) * 2 - 1
    target = 1.0 + 9.0 * torch.rand(b, 1, h, w, device=device)
    mask = torch.rand(b, 1, h, w, device=device) > 0.1
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = e2e_forward(unet, vae, rgb, ctx, ALPHA_999, "v_prediction", "depth")  # [B,1,H,W]
        loss = affine_invariant_l1_loss(pred, target, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    sec = times[len(times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS high-water mark, GiB
    micro_steps = args.paper_steps * args.paper_accumulation * 2 // b  # effective batch 32 per optimiser step
    projected_h = sec * micro_steps / 3600
    res = {
        "precision": precision, "sec_per_micro_step_median": sec, "sec_min": times[0], "sec_max": times[-1],
        "peak_mem_gib": peak, "final_loss": loss, "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "projected_hours_paper_run": projected_h, "projected_days_paper_run": projected_h / 24,
    }
    return res  # models are freed when this frame goes away


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small models and 64x64 input (CPU smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=None, help="default 480 (64 with --tiny)")
    p.add_argument("--width", type=int, default=None, help="default 640 (64 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed micro-steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--paper_steps", type=int, default=20000)
    p.add_argument("--paper_accumulation", type=int, default=16)
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/train_step_<device>.json)")
    args = p.parse_args(argv)
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 640)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the paper's setting)
        torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for prec in args.precisions.split(","):
        try:
            rows.append(run_precision(args, prec.strip(), device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except torch.OutOfMemoryError:
            rows.append({"precision": prec, "error": "out of memory"})
            torch.cuda.empty_cache()
    report = {
        "device": card, "torch": torch.__version__, "tiny": args.tiny, "batch": args.batch,
        "size_hw": [args.height, args.width], "gradient_checkpointing": args.gradient_checkpointing,
        "paper": "20k steps x 16 accumulation x batch 2, about 3 days on one H100 (paper)", "results": rows,
    }
    print(f"E2E train micro-step on {card}: batch {args.batch} at {args.height}x{args.width}, "
          f"gradient checkpointing {args.gradient_checkpointing}, tiny={args.tiny}")
    print("| precision | s / micro-step | peak mem [GiB] | projected paper run [days] |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | {r['error']} | | |")
        else:
            print(f"| {r['precision']} | {r['sec_per_micro_step_median']:.3f} | {r['peak_mem_gib']:.2f} | "
                  f"{r['projected_days_paper_run']:.2f} |")
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / f"train_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
