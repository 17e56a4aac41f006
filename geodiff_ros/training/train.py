"""E2E fine-tuning console script (docs/method.md#training): ``geodiff_train``, runs under ``accelerate launch``.

Single-step regression fine-tuning of an image-conditional diffusion UNet: zero target latent,
t = 999, x0 from the prediction type, decode through the frozen VAE decoder, task loss in pixel
space (affine-invariant L1 for depth, mean angular error for normals). Only the UNet trains.

Shape letters: ``B`` micro-batch, ``H,W`` training crop, ``h,w`` latent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..engine.core import encode_empty_prompt
from .data import HypersimDataset, ManifestRGBDDataset, MixedDataLoader, VirtualKITTI2Dataset
from .export import save_hub_checkpoint
from .losses import affine_invariant_l1_loss, angular_loss
from .model import TIMESTEP, e2e_forward, load_train_components
from .schedule import IterExponential

logger = logging.getLogger("geodiff_ros.training")

__all__ = ["build_parser", "main", "train"]

STATE_FILE = "trainer_state.json"
ACCEL_DIR = "accelerate_state"


def _size_hw(text: str) -> tuple[int, int] | None:
    if text.lower() in ("native", "none", "0"):
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        msg = f"size must look like 480x640 (HxW) or 'native'; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from err
    if h % 8 or w % 8:
        msg = f"size {text} must be a multiple of 8 in both axes (VAE down-sampling)"
        raise argparse.ArgumentTypeError(msg)
    return h, w


def build_parser() -> argparse.ArgumentParser:
    """All flags; defaults are the paper's unless a flag says otherwise."""
    p = argparse.ArgumentParser(
        prog="geodiff_train",
        description="E2E fine-tuning of a Marigold / E2E-FT / Stable Diffusion 2 UNet for single-step "
        "depth or normals (arXiv 2409.11355). Launch with `accelerate launch` for several GPUs.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--init", required=True,
                   help="init checkpoint: hub id or folder (e.g. prs-eth/marigold-depth-v1-0, "
                   "GonzaloMG/marigold-e2e-ft-depth, stabilityai/stable-diffusion-2; a 4-channel SD UNet "
                   "gets its conv_in doubled with weight and bias halved)")
    g.add_argument("--modality", choices=("depth", "normals"), default="depth", help="task to train")
    g.add_argument("--text_padding", choices=("max_length", "do_not_pad"), default="max_length",
                   help="empty-prompt context used in training: max_length (77 tokens) is what the paper's "
                   "code did; inference always uses do_not_pad (2 tokens)")
    g.add_argument("--local_files_only", action="store_true", help="never download from the hub")
    d = p.add_argument_group("data (at least one source)")
    d.add_argument("--hypersim_dir", help="Hypersim in Marigold's preprocessed layout")
    d.add_argument("--hypersim_split", help="E2E filename_meta_train.csv or Marigold filename list")
    d.add_argument("--hypersim_all_depth_rows", action="store_true",
                   help="depth training: also keep Hypersim rows without a normal map (the paper's loader keeps "
                   "only rows whose normals file exists, for depth too)")
    d.add_argument("--vkitti_dir", help="Virtual KITTI 2 root (vkitti_2.0.3_rgb/, vkitti_2.0.3_depth/)")
    d.add_argument("--manifest", action="append", default=[],
                   help="RGB-D manifest.json of your own recordings (repeatable)")
    d.add_argument("--manifest_size", type=_size_hw, default=(480, 640),
                   help="HxW the manifest frames are resized to, or 'native' (cropped to a multiple of 8)")
    d.add_argument("--manifest_max_depth", type=float, default=80.0, help="far limit of valid depth [m]")
    d.add_argument("--mix_weights", default=None,
                   help="comma list of batch ratios in the order hypersim, vkitti, manifests; default 9,1 for "
                   "Hypersim+VKITTI as in the paper, otherwise equal")
    d.add_argument("--flip_p", type=float, default=0.5, help="horizontal flip probability")
    d.add_argument("--preprocess", choices=("official", "float"), default="official",
                   help="Hypersim / VKITTI samples: 'official' = the paper's loader bit for bit (PIL uint8 resizing, "
                   "Hypersim normals re-quantised to uint8 after orientation); 'float' keeps float maps and resizes "
                   "with torch")
    d.add_argument("--dataloader_num_workers", type=int, default=2)
    o = p.add_argument_group("optimisation (the paper's values)")
    o.add_argument("--max_train_steps", type=int, default=20000, help="optimiser steps")
    o.add_argument("--train_batch_size", type=int, default=2, help="micro-batch per GPU")
    o.add_argument("--gradient_accumulation_steps", type=int, default=16)
    o.add_argument("--learning_rate", type=float, default=3e-5)
    o.add_argument("--adam_beta1", type=float, default=0.9)
    o.add_argument("--adam_beta2", type=float, default=0.999)
    o.add_argument("--adam_weight_decay", type=float, default=1e-2)
    o.add_argument("--adam_epsilon", type=float, default=1e-8)
    o.add_argument("--lr_warmup_steps", "--lr_exp_warmup_steps", type=int, default=100,
                   help="linear LR warm-up, optimiser steps")
    o.add_argument("--lr_total_iter_length", type=int, default=20000,
                   help="optimiser step at which the exponential decay reaches --lr_final_ratio; as in the paper's "
                   "code it does not follow --max_train_steps (a shorter run stops before the LR has decayed)")
    o.add_argument("--lr_final_ratio", type=float, default=0.01,
                   help="LR factor reached at --lr_total_iter_length (exponential decay), held after it")
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--gradient_checkpointing", action="store_true", help="UNet activation checkpointing")
    o.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="'no' = fp32 as in the paper; fp16/bf16 run under autocast with fp32 weights (see "
                   "--half_weights); losses always run in fp32")
    o.add_argument("--half_weights", action="store_true",
                   help="with --mixed_precision bf16: the paper's code path, UNet, VAE and text encoder weights "
                   "cast to bf16 (AdamW updates bf16 weights; ground truth and alphas in bf16 too). fp16 is "
                   "refused: its gradient scaler cannot unscale fp16 gradients (the paper's code stops there)")
    o.add_argument("--seed", type=int, default=1234)
    o.add_argument("--cpu", action="store_true", help="train on the CPU (tests, smoke runs)")
    s = p.add_argument_group("output")
    s.add_argument("--output_dir", required=True, help="run folder: checkpoints, final model, log")
    s.add_argument("--checkpointing_steps", type=int, default=2000,
                   help="save a resumable checkpoint (hub layout + accelerate state) every N steps")
    s.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the newest N checkpoints")
    s.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder or 'latest'")
    s.add_argument("--log_every", type=int, default=10, help="log every N optimiser steps")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not (args.hypersim_dir or args.vkitti_dir or args.manifest):
        msg = "no training data: pass --hypersim_dir, --vkitti_dir and/or --manifest"
        raise SystemExit(msg)
    if args.lr_total_iter_length <= args.lr_warmup_steps:
        msg = (f"--lr_total_iter_length ({args.lr_total_iter_length}) must exceed --lr_warmup_steps "
               f"({args.lr_warmup_steps})")
        raise SystemExit(msg)
    if args.half_weights and args.mixed_precision != "bf16":
        msg = (f"--half_weights needs --mixed_precision bf16 (got {args.mixed_precision!r}): with fp16 the "
               "gradient scaler cannot unscale fp16 gradients, and with 'no' there is nothing to cast to")
        raise SystemExit(msg)
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1; got {getattr(args, name)}")


def build_datasets(args: argparse.Namespace) -> tuple[list[Dataset], list[float]]:
    """Datasets in the order hypersim, vkitti, manifests, and their batch mixing weights."""
    sets: list[Dataset] = []
    if args.hypersim_dir:
        sets.append(HypersimDataset(args.hypersim_dir, split_file=args.hypersim_split,
                                    modality=args.modality, flip_p=args.flip_p, preprocess=args.preprocess,
                                    require_normals=not args.hypersim_all_depth_rows))
    if args.vkitti_dir:
        sets.append(VirtualKITTI2Dataset(args.vkitti_dir, modality=args.modality, flip_p=args.flip_p,
                                         preprocess=args.preprocess))
    for m in args.manifest:
        sets.append(ManifestRGBDDataset(m, modality=args.modality, size_hw=args.manifest_size,
                                        far=args.manifest_max_depth, flip_p=args.flip_p))
    if args.mix_weights:
        weights = [float(w) for w in args.mix_weights.split(",")]
        if len(weights) != len(sets):
            msg = f"--mix_weights has {len(weights)} values for {len(sets)} datasets"
            raise SystemExit(msg)
    elif args.hypersim_dir and args.vkitti_dir and not args.manifest:
        weights = [9.0, 1.0]  # Hypersim 90 % / VKITTI 10 % of the batches
    else:
        weights = [1.0] * len(sets)
    return sets, weights


def _find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    if spec != "latest":
        path = Path(spec)
        if not (path / STATE_FILE).exists():
            raise SystemExit(f"--resume_from_checkpoint {path}: no {STATE_FILE}; not a complete checkpoint")
        return path
    done = [c for c in output_dir.glob("checkpoint-*") if (c / STATE_FILE).exists()]
    if not done:
        return None
    return max(done, key=lambda c: int(c.name.split("-")[-1]))


def _rotate(output_dir: Path, keep: int) -> None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    for old in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def train(args: argparse.Namespace) -> dict:
    """Run fine-tuning; returns ``{"losses": [...per optimiser step], "final": path, ...}``."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

    _check_args(args)
    out = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        project_config=ProjectConfiguration(project_dir=str(out)),
        # The mixed loader is not an accelerate-prepared loader: never force a sync at its end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    set_seed(args.seed, device_specific=True)  # different augmentation draws per process
    device = accelerator.device
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # 1. Model: UNet trainable, VAE + text encoder frozen, all fp32. --half_weights: the paper's code
    #    under mixed precision casts all three to that dtype (after accelerate.prepare, below).
    with accelerator.main_process_first():  # one hub download, the other processes read the cache
        comps = load_train_components(args.init, local_files_only=args.local_files_only)
    weight_dtype = torch.bfloat16 if args.half_weights else torch.float32
    unet = comps.unet
    unet.requires_grad_(True)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    vae = comps.vae.to(device, weight_dtype)
    text_encoder = comps.text_encoder.to(device, weight_dtype)
    text_context = encode_empty_prompt(comps.tokenizer, text_encoder, padding=args.text_padding)  # [1,L,C]
    text_encoder.to("cpu")  # only needed once; frees GPU memory
    # alphas_cumprod in float32 (bf16 with --half_weights), as the paper's code converts them
    alpha_t = comps.alphas_cumprod.to(device, weight_dtype)[TIMESTEP]

    # 2. Optimiser + schedule (docs/method.md#optimiser): AdamW, warm-up 100 then exp decay to 1 % at
    #    lr_total_iter_length.
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_lambda = IterExponential(args.lr_total_iter_length, args.lr_warmup_steps, args.lr_final_ratio)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if args.half_weights:
        unet.to(dtype=weight_dtype)  # the paper's code: after prepare, so AdamW holds the bf16 parameters
    accelerator.register_for_checkpointing(lr_scheduler)  # stepped by us once per optimiser step

    # 3. Data: one dataset per micro-batch, mixed by ratio; sharded over processes.
    datasets, weights = build_datasets(args)
    samplers = [
        DistributedSampler(ds, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                           shuffle=True, seed=args.seed, drop_last=True)
        for ds in datasets
    ]
    loaders = []
    for ds, sampler in zip(datasets, samplers, strict=True):
        if len(sampler) < args.train_batch_size:
            raise SystemExit(f"dataset {type(ds).__name__} has {len(ds)} samples: fewer than one batch of "
                             f"{args.train_batch_size} per process")
        loaders.append(DataLoader(ds, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                                  num_workers=args.dataloader_num_workers, pin_memory=not args.cpu))
    mixed = MixedDataLoader(loaders, weights, seed=args.seed + accelerator.process_index)
    if len(mixed) == 0:
        raise SystemExit(f"the mixing weights {weights} leave no batch per epoch; check --mix_weights")

    # 4. Resume.
    global_step, epoch = 0, 0
    if args.resume_from_checkpoint:
        ckpt = _find_checkpoint(out, args.resume_from_checkpoint)
        if ckpt is None:
            logger.warning("No complete checkpoint in %s; starting from step 0.", out)
        else:
            accelerator.load_state(str(ckpt / ACCEL_DIR))
            state = json.loads((ckpt / STATE_FILE).read_text())
            global_step, epoch = int(state["global_step"]), int(state["epoch"])
            logger.info("Resumed from %s at step %d (epoch %d).", ckpt, global_step, epoch)

    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # one log stream, from the main process
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        "E2E fine-tuning %s from %s: %d steps (LR decay over %d), batch %d x %d processes x %d accumulation = %d, "
        "datasets %s weights %s (%s samples), %d mixed batches per epoch, precision %s%s, text context %s "
        "(%d tokens)",
        args.modality, args.init, args.max_train_steps, args.lr_total_iter_length, args.train_batch_size,
        accelerator.num_processes, args.gradient_accumulation_steps, total_batch, [type(d).__name__ for d in datasets],
        weights, args.preprocess, len(mixed), args.mixed_precision,
        " with bf16 weights" if args.half_weights else "", args.text_padding, text_context.shape[1],
    )
    if accelerator.is_main_process:
        (out / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    def save(step: int, final: bool = False) -> Path:
        folder = out / ("final" if final else f"checkpoint-{step}")
        if not final:
            accelerator.save_state(str(folder / ACCEL_DIR))
        if accelerator.is_main_process:
            save_hub_checkpoint(
                folder, unet=accelerator.unwrap_model(unet), vae=comps.vae, text_encoder=comps.text_encoder,
                tokenizer=comps.tokenizer, scheduler_config=comps.scheduler_config, modality=args.modality,
                extra={"geodiff_init": str(args.init), "geodiff_train_step": step},
            )
            # Written last: a checkpoint without it is incomplete and never resumed from.
            (folder / STATE_FILE).write_text(json.dumps({"global_step": step, "epoch": epoch}))
            if not final:
                _rotate(out, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        return folder

    # 5. Loop: optimiser steps = global_step; micro-batches accumulate.
    # The logged step loss is the paper's: per micro-batch the mean over processes (a dropped NaN or an empty
    # mask counts as 0), summed / gradient_accumulation_steps.
    losses: list[float] = []
    nan_skips = 0
    step_loss = 0.0
    t_last = time.perf_counter()
    log_path = out / "train_log.jsonl"
    params = [p for p in unet.parameters() if p.requires_grad]
    while global_step < args.max_train_steps:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for batch in mixed:
            with accelerator.accumulate(unet):
                rgb = batch["rgb"].to(device, non_blocking=True)  # [B,3,H,W]
                # fp32 weights: the whole forward under autocast. --half_weights: as the paper's code, only the
                # prepared UNet autocasts (accelerate hands its output back in fp32); the VAE runs in bf16.
                with accelerator.autocast() if not args.half_weights else contextlib.nullcontext():
                    pred = e2e_forward(unet, vae, rgb, text_context, alpha_t, comps.prediction_type,
                                       args.modality)
                if pred.shape[-2:] != rgb.shape[-2:]:
                    raise SystemExit(f"decoded size {tuple(pred.shape[-2:])} != input {tuple(rgb.shape[-2:])}: "
                                     "training sizes must be multiples of 8")
                if args.modality == "depth":  # ground truth in the weight dtype, as the paper's code
                    loss = affine_invariant_l1_loss(pred, batch["depth"].to(device, weight_dtype),
                                                    batch["valid_mask"].to(device))
                else:
                    loss = angular_loss(pred, batch["normals"].to(device, weight_dtype),
                                        batch["normals_mask"].to(device))
                if not torch.isfinite(loss):
                    # A NaN loss term is dropped, as the paper's code does. A zero loss over all parameters keeps the
                    # backward (and DDP's gradient all-reduce) in step on every process.
                    nan_skips += 1
                    loss = sum(p.sum() for p in params) * 0.0
                step_loss += float(accelerator.gather(loss.detach().float().reshape(1)).mean()) \
                    / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            global_step += 1
            losses.append(step_loss)
            if global_step % args.log_every == 0 or global_step == args.max_train_steps:
                now = time.perf_counter()
                rec = {"step": global_step, "loss": step_loss, "lr": lr_scheduler.get_last_lr()[0],
                       "sec_per_step": (now - t_last) / args.log_every, "nan_skips": nan_skips}
                t_last = now
                logger.info("step %(step)d loss %(loss).4f lr %(lr).3e %(sec_per_step).2f s/step", rec)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                save(global_step)
            step_loss = 0.0
            if global_step >= args.max_train_steps:
                break
        epoch += 1
    last_ckpt = save(global_step)
    final = save(global_step, final=True)
    accelerator.end_training()
    return {"losses": losses, "final": final, "last_checkpoint": last_ckpt, "nan_skips": nan_skips,
            "global_step": global_step}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``geodiff_train``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result = train(args)
    logger.info("Done: %d steps; fine-tuned model in %s (load it with the engine / node as a local folder).",
                result["global_step"], result["final"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
