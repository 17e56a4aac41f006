"""E2E fine-tuning end to end on CPU with a tiny checkpoint and a tiny synthetic RGB-D manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geodiff_ros.engine.core import encode_empty_prompt
from geodiff_ros.training.data import ManifestRGBDDataset
from geodiff_ros.training.losses import affine_invariant_l1_loss
from geodiff_ros.training.model import TIMESTEP, e2e_forward, load_train_components
from geodiff_ros.training.train import build_parser, train


def _write_rgbd_set(folder: Path, n: int = 2, h: int = 32, w: int = 48) -> Path:
    """Colour encodes depth (a learnable mapping): slanted planes with different slopes."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        d = 1.0 + 0.04 * xx + 0.03 * (i + 1) * yy
        rgb = np.stack([(d * 60) % 255, 255 - (d * 45) % 255, np.full_like(d, 90.0)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"rgb{i}.png")
        Image.fromarray((d * 1000).astype(np.uint16)).save(folder / f"depth{i}.png")
        entries.append({"rgb": f"rgb{i}.png", "depth": f"depth{i}.png", "depth_scale": 1000.0,
                        "intrinsics": {"fx": 40.0, "fy": 40.0, "cx": w / 2, "cy": h / 2}})
    (folder / "manifest.json").write_text(json.dumps(entries))
    return folder / "manifest.json"


def _dataset_loss(source: Path, manifest: Path) -> float:
    """Mean training loss of a checkpoint over the whole (unflipped) set, text context as in training."""
    comps = load_train_components(source)
    ctx = encode_empty_prompt(comps.tokenizer, comps.text_encoder, padding="max_length")
    ds = ManifestRGBDDataset(manifest, size_hw=(32, 48), flip_p=0.0)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = e2e_forward(comps.unet.eval(), comps.vae, batch["rgb"], ctx,
                           float(comps.alphas_cumprod[TIMESTEP]), comps.prediction_type, "depth")
    return affine_invariant_l1_loss(pred, batch["depth"], batch["valid_mask"]).item()


def test_gradients_reach_only_the_unet(tiny_depth_ckpt: Path) -> None:
    comps = load_train_components(tiny_depth_ckpt)
    ctx = encode_empty_prompt(comps.tokenizer, comps.text_encoder, padding="max_length")
    assert ctx.shape[1] == 77  # training context padded to max_length (docs/method.md#text-context)
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    comps.unet.train()
    pred = e2e_forward(comps.unet, comps.vae, rgb, ctx, float(comps.alphas_cumprod[TIMESTEP]),
                       comps.prediction_type, "normals")
    assert pred.shape == (2, 3, 32, 32)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1)
    from geodiff_ros.training.losses import angular_loss

    angular_loss(pred, target, torch.ones(2, 1, 32, 32, dtype=torch.bool)).backward()
    unet_grads = [p.grad for p in comps.unet.parameters()]
    assert all(g is not None for g in unet_grads)
    assert sum(float(g.abs().sum()) for g in unet_grads) > 0
    assert all(p.grad is None for p in comps.vae.parameters())
    assert all(p.grad is None for p in comps.text_encoder.parameters())


def test_training_lowers_loss_saves_engine_loadable_checkpoint_and_resumes(
    tiny_depth_ckpt: Path, tmp_path: Path
) -> None:
    manifest = _write_rgbd_set(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--init", str(tiny_depth_ckpt), "--manifest", str(manifest), "--manifest_size", "32x48",
              "--output_dir", str(out), "--cpu", "--dataloader_num_workers", "0", "--train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "2",
              "--checkpointing_steps", "6", "--log_every", "4", "--flip_p", "0", "--local_files_only"]
    args = build_parser().parse_args([*common, "--max_train_steps", "12"])
    result = train(args)
    assert result["global_step"] == 12 and result["nan_skips"] == 0
    assert len(result["losses"]) == 12

    before = _dataset_loss(tiny_depth_ckpt, manifest)
    after = _dataset_loss(result["final"], manifest)
    assert after < 0.9 * before, (before, after)  # deterministic: seeded init, data order and fit

    # Hub layout that the engine loads unchanged (docs/method.md#checkpoint-layout), trailing DDIM with the init's
    # v-prediction.
    final = Path(result["final"])
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["geodiff_task"] == "depth"
    sched = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction"
    from geodiff_ros.engine import EngineConfig, GeoDiffEngine

    engine = GeoDiffEngine(EngineConfig(depth_model=str(final), normals_model=None, device="cpu", dtype="fp32",
                                        processing_res=0))
    depth = engine.predict(np.zeros((32, 48, 3), np.uint8)).depth
    assert depth.shape == (1, 32, 48) and np.isfinite(depth).all()

    # Resume from the latest complete checkpoint (step 12) and continue to step 14.
    assert (out / "checkpoint-12" / "trainer_state.json").exists()
    resumed = train(build_parser().parse_args([*common, "--max_train_steps", "14", "--gradient_checkpointing",
                                               "--resume_from_checkpoint", "latest"]))
    assert resumed["global_step"] == 14 and len(resumed["losses"]) == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-14"]


def test_cli_rejects_missing_data(tiny_depth_ckpt: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(["--init", str(tiny_depth_ckpt), "--output_dir", str(tmp_path), "--cpu"])
    with pytest.raises(SystemExit, match="no training data"):
        train(args)


def test_sd2_style_4_channel_init_is_expanded_and_text_padding_flag(tiny_depth_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    from diffusers import UNet2DConditionModel

    sd = tmp_path / "tiny-sd2"
    shutil.copytree(tiny_depth_ckpt, sd)
    cfg = dict(UNet2DConditionModel.load_config(sd / "unet"))
    cfg["in_channels"] = 4
    four = UNet2DConditionModel.from_config(cfg)
    four.save_pretrained(sd / "unet")
    comps = load_train_components(sd)
    assert comps.unet.config.in_channels == 8  # conv_in widened from 4 to 8 channels
    w4 = four.conv_in.weight.detach()
    assert torch.allclose(comps.unet.conv_in.weight[:, :4], w4 / 2) and torch.allclose(
        comps.unet.conv_in.weight[:, 4:], w4 / 2)
    assert torch.allclose(comps.unet.conv_in.bias, four.conv_in.bias / 2)
    # Inference-style 2-token context is available as --text_padding do_not_pad.
    assert encode_empty_prompt(comps.tokenizer, comps.text_encoder, padding="do_not_pad").shape[1] == 2


def _tiny_run_args(ckpt: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["--init", str(ckpt), "--manifest", str(manifest), "--manifest_size", "32x48", "--output_dir", str(out),
            "--cpu", "--dataloader_num_workers", "0", "--train_batch_size", "1", "--flip_p", "0",
            "--local_files_only", "--log_every", "1", "--checkpointing_steps", "1000", *extra]


def test_lr_decay_length_and_logged_loss_follow_the_papers_code(
    tiny_depth_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LR decays over lr_total_iter_length (20000 by default), not max_train_steps; the logged step loss is
    the sum over micro-batches of the mean over processes / accumulation steps, a dropped NaN counting as 0."""
    import geodiff_ros.training.train as train_module
    from geodiff_ros.training.schedule import IterExponential

    assert build_parser().parse_args(["--init", "x", "--output_dir", "y"]).lr_total_iter_length == 20000
    micro: list[float] = []
    real_loss = train_module.affine_invariant_l1_loss

    def recording(pred, target, mask):
        loss = real_loss(pred, target, mask)
        if not micro:
            loss = loss * float("nan")  # the first micro-batch's loss is NaN: dropped
        micro.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(train_module, "affine_invariant_l1_loss", recording)
    manifest = _write_rgbd_set(tmp_path / "data")
    args = build_parser().parse_args(_tiny_run_args(
        tiny_depth_ckpt, manifest, tmp_path / "run", "--max_train_steps", "3", "--gradient_accumulation_steps", "2",
        "--lr_warmup_steps", "1", "--lr_total_iter_length", "10", "--learning_rate", "1e-3"))
    result = train(args)
    assert result["nan_skips"] == 1 and len(micro) == 6
    as_logged = [0.0 if np.isnan(v) else v for v in micro]
    expected = [as_logged[0] / 2 + as_logged[1] / 2, as_logged[2] / 2 + as_logged[3] / 2,
                as_logged[4] / 2 + as_logged[5] / 2]
    assert result["losses"] == expected
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    schedule = IterExponential(10, 1, 0.01)
    assert [rec["lr"] for rec in log] == pytest.approx([1e-3 * schedule(n) for n in (1, 2, 3)], rel=1e-12)
    # tied to max_train_steps (the old behaviour) the last step would already be at 1 %
    assert log[-1]["lr"] > 10 * 1e-3 * IterExponential(3, 1, 0.01)(3)


def _weight_dtypes_seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, torch.dtype, torch.dtype]]:
    import geodiff_ros.training.train as train_module

    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    real_forward = train_module.e2e_forward

    def recording(unet, vae, rgb, text_context, *rest):
        seen.append((next(unet.parameters()).dtype, vae.dtype, text_context.dtype))
        return real_forward(unet, vae, rgb, text_context, *rest)

    monkeypatch.setattr(train_module, "e2e_forward", recording)
    return seen


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a run with another precision needs it reset (and reset after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("half", [False, True], ids=["autocast-fp32-weights", "half-weights"])
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_mixed_precision_default_and_the_papers_half_weights(
    tiny_depth_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, half: bool
) -> None:
    seen = _weight_dtypes_seen(monkeypatch)
    manifest = _write_rgbd_set(tmp_path / "data")
    extra = ["--max_train_steps", "1", "--gradient_accumulation_steps", "1", "--lr_warmup_steps", "0",
             "--mixed_precision", "bf16", *(["--half_weights"] if half else [])]
    result = train(build_parser().parse_args(_tiny_run_args(tiny_depth_ckpt, manifest, tmp_path / "run", *extra)))
    assert result["global_step"] == 1 and np.isfinite(result["losses"]).all()
    expected = torch.bfloat16 if half else torch.float32
    assert seen == [(expected, expected, expected)]  # UNet, VAE, text context


def test_half_weights_refuse_fp16_and_fp32(tiny_depth_ckpt: Path, tmp_path: Path) -> None:
    manifest = _write_rgbd_set(tmp_path / "data")
    for precision in ("fp16", "no"):
        args = build_parser().parse_args(_tiny_run_args(tiny_depth_ckpt, manifest, tmp_path / "run",
                                                        "--mixed_precision", precision, "--half_weights"))
        with pytest.raises(SystemExit, match="--half_weights needs --mixed_precision bf16"):
            train(args)
