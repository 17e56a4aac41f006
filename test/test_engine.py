"""Engine: E2E-FT single-step path, sharing, determinism, the scheduler finding, parity with diffusers."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geodiff_ros.engine import EngineConfig, GeoDiffEngine, ModelLoadError, x0_from_prediction
from geodiff_ros.engine.core import minmax_per_image
from geodiff_ros.engine.preprocess import processing_size


def make_engine(depth: Path | None, normals: Path | None = None, **kw) -> GeoDiffEngine:
    cfg = dict(device="cpu", dtype="fp32", processing_res=64, batch_size=4)
    cfg.update(kw)
    return GeoDiffEngine(EngineConfig(depth_model=str(depth) if depth else None,
                                      normals_model=str(normals) if normals else None, **cfg))


@pytest.fixture(scope="module")
def both(tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> GeoDiffEngine:
    return make_engine(tiny_depth_ckpt, tiny_normals_ckpt)


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_outputs_have_input_size_and_documented_ranges(both: GeoDiffEngine) -> None:
    pred = both.predict(rgb(48, 80))
    assert pred.depth.shape == (1, 48, 80) and pred.depth.dtype == np.float32
    assert pred.normals.shape == (1, 48, 80, 3) and pred.normals.dtype == np.float32
    assert pred.depth.min() >= 0.0 and pred.depth.max() <= 1.0
    assert pred.depth.max() - pred.depth.min() > 0.5  # min-max normalised per image (docs/method.md#depth-output)
    assert np.all(np.abs(pred.normals) <= 1.0)
    assert np.median(np.linalg.norm(pred.normals, axis=-1)) > 0.9


def test_single_step_runs_at_t999_and_vae_encodes_each_frame_once(both: GeoDiffEngine) -> None:
    calls = {"encode": 0}
    original = both.vae.encode

    def counting(x):
        calls["encode"] += 1
        return original(x)

    both.vae.encode = counting
    try:
        pred = both.predict([rgb(32, 32, 1), rgb(32, 32, 2)])
    finally:
        both.vae.encode = original
    assert calls["encode"] == 2  # one encoding per frame, shared by both tasks
    assert pred.timesteps == [999]
    assert not both._extra_vaes  # same VAE in both tiny checkpoints -> shared


def test_text_encoder_released_after_embedding(both: GeoDiffEngine) -> None:
    from transformers import CLIPTextModel

    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, CLIPTextModel)]
    assert alive == []
    assert tuple(both.empty_embedding.shape) == (1, 2, 32)  # BOS + EOS, do_not_pad (docs/method.md#unet-call)


def test_deterministic_and_batch_equals_single(both: GeoDiffEngine) -> None:
    a, b = rgb(40, 56, 3), rgb(40, 56, 4)
    first = both.predict(a)
    again = both.predict(a)
    assert np.array_equal(first.depth, again.depth) and np.array_equal(first.normals, again.normals)
    batched = both.predict(np.stack([a, b]))
    # The eager path runs the networks frame by frame, as the official pipeline: a frame's output does not depend
    # on the frames that share its call (batched convolutions would round differently, up to 4.6e-4 here).
    assert np.array_equal(batched.depth[0], first.depth[0])
    assert np.array_equal(batched.normals[0], first.normals[0])
    assert np.abs(batched.depth[1] - first.depth[0]).max() > 0.05  # the second frame is not the first


def test_bf16_eager_runs_a_batch_in_one_pass(tiny_depth_ckpt: Path) -> None:
    """Exactness is an fp32 property (the official code only runs in fp32): in bf16 frames share network passes."""
    engine = make_engine(tiny_depth_ckpt, dtype="bf16")
    assert engine.bit_exact is False
    calls = {"encode": 0}
    original = engine.vae.encode

    def counting(x):
        calls["encode"] += 1
        return original(x)

    engine.vae.encode = counting
    pred = engine.predict([rgb(32, 32, 1), rgb(32, 32, 2)])
    assert calls["encode"] == 1 and pred.depth.shape == (2, 32, 32) and np.isfinite(pred.depth).all()


def test_mixed_sizes_in_one_call_come_back_in_order(both: GeoDiffEngine) -> None:
    frames = [rgb(32, 48, 5), rgb(24, 24, 6), rgb(32, 48, 7)]
    pred = both.predict(frames)
    assert [d.shape for d in pred.depth] == [(32, 48), (24, 24), (32, 48)]
    assert np.array_equal(pred.depth[1], both.predict(frames[1]).depth[0])


def test_processing_size_policy() -> None:
    assert processing_size(480, 640, 768) == (576, 768)  # longest edge -> 768
    assert processing_size(100, 50, 768) == (768, 384)  # small images are up-sampled (docs/method.md#resize)
    assert processing_size(231, 300, 0) == (231, 300)
    assert processing_size(375, 1242, 768) == (int(375 * 768 / 1242), 768)


def test_x0_for_v_prediction_matches_spec_constant() -> None:
    from diffusers import DDIMScheduler

    from geodiff_ros.testing.tiny_checkpoint import E2E_SCHEDULER_CONFIG

    sched = DDIMScheduler.from_config(E2E_SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod[999]
    assert float(abar) == pytest.approx(0.0046601, abs=1e-6)  # docs/method.md#noise-schedule
    v = torch.randn(2, 4, 3, 3)
    x0 = x0_from_prediction(v, torch.zeros_like(v), abar, "v_prediction")
    torch.testing.assert_close(x0, -0.997667 * v, atol=1e-5, rtol=1e-5)
    eps = x0_from_prediction(v, torch.ones_like(v), abar, "epsilon")
    torch.testing.assert_close(eps, (1 - math.sqrt(1 - float(abar)) * v) / math.sqrt(float(abar)))
    assert x0_from_prediction(v, torch.zeros_like(v), abar, "sample") is v
    with pytest.raises(ModelLoadError, match="prediction_type 'velocity'"):
        x0_from_prediction(v, v, abar, "velocity")


def test_scheduler_finding_leading_runs_t1_trailing_t999(tiny_depth_ckpt: Path) -> None:
    engine = make_engine(tiny_depth_ckpt)
    assert engine.scheduler_timesteps(1, "leading") == [1]
    assert engine.scheduler_timesteps(1, "trailing") == [999]
    assert engine.scheduler_timesteps(4, "trailing") == [999, 749, 499, 249]
    assert engine.scheduler_timesteps(4, "leading") == [751, 501, 251, 1]
    image = rgb(40, 40, 8)
    leading = engine.predict_multistep(image, num_steps=1, timestep_spacing="leading", seed=3)
    trailing = engine.predict_multistep(image, num_steps=1, timestep_spacing="trailing", seed=3)
    assert leading.timesteps == [1] and trailing.timesteps == [999]
    assert np.abs(leading.depth - trailing.depth).max() > 1e-2


def test_multistep_ensemble_returns_normalised_depth_and_unit_normals(both: GeoDiffEngine) -> None:
    image = rgb(48, 64, 9)  # longest edge = processing_res: no resize, so min-max is exact
    depth = both.predict_multistep(image, num_steps=2, ensemble_size=3, timestep_spacing="trailing", seed=0)
    assert depth.depth.shape == (48, 64) and depth.timesteps == [999, 499]
    assert depth.depth.min() == pytest.approx(0.0, abs=1e-6) and depth.depth.max() == pytest.approx(1.0, abs=1e-6)
    normals = both.predict_multistep(image, task="normals", num_steps=2, ensemble_size=3,
                                     timestep_spacing="trailing", seed=0)
    assert normals.normals.shape == (48, 64, 3)
    norms = np.linalg.norm(normals.normals, axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    # zero noise on the trailing single step is the E2E-FT computation itself
    zeros = both.predict_multistep(image, num_steps=1, timestep_spacing="trailing", noise="zeros")
    np.testing.assert_allclose(zeros.depth, both.predict(image).depth[0], atol=1e-5)


def _diffusers_parts(folder: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        # set_alpha_to_one=True: the single trailing step returns x0 exactly (docs/method.md#diffusers-pipelines)
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler", set_alpha_to_one=True),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
    )


def test_depth_agrees_with_diffusers_marigold_pipeline(tiny_depth_ckpt: Path) -> None:
    """Same weights, zero latents, native size divisible by 8: the two define the same computation
    (docs/method.md#diffusers-pipelines)."""
    from diffusers import MarigoldDepthPipeline

    pipe = MarigoldDepthPipeline(**_diffusers_parts(tiny_depth_ckpt), prediction_type="depth")
    image = rgb(48, 64, 10)
    latents = torch.zeros(1, 4, 6, 8)
    ref = pipe(Image.fromarray(image), num_inference_steps=1, ensemble_size=1, processing_resolution=0, latents=latents,
               output_type="pt").prediction  # [1,1,H,W], (clip(mean)+1)/2 without min-max
    ref = minmax_per_image(ref.float())[0, 0].numpy()
    ours = make_engine(tiny_depth_ckpt, processing_res=0).predict(image).depth[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_normals_agree_with_diffusers_marigold_pipeline(tiny_normals_ckpt: Path) -> None:
    from diffusers import MarigoldNormalsPipeline

    pipe = MarigoldNormalsPipeline(**_diffusers_parts(tiny_normals_ckpt), prediction_type="normals")
    image = rgb(48, 64, 11)
    ref = pipe(Image.fromarray(image), num_inference_steps=1, ensemble_size=1, processing_resolution=0,
               latents=torch.zeros(1, 4, 6, 8), output_type="pt").prediction[0].permute(1, 2, 0).numpy()
    engine = make_engine(None, tiny_normals_ckpt, processing_res=0)
    ours = engine.predict(image).normals[0]
    # diffusers clips the decoder output to [-1, 1] before normalising, E2E-FT does not: the two
    # define the same computation only where the raw decoder output lies inside [-1, 1].
    with torch.inference_mode():
        x = engine.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None])
        raw = engine.decode(engine.denoise_single_step("normals", engine.encode(x)))[0].permute(1, 2, 0).numpy()
    # The normalisation eps also differs (1e-5 vs 1e-6), which only shows on near-zero decoder vectors.
    same = np.all(np.abs(raw) <= 1.0, axis=-1) & (np.linalg.norm(raw, axis=-1) > 0.25)
    assert same.mean() > 0.5
    # The checkpoint frame is LUB (x left, y up, z to camera); ours is optical: every axis flips
    # (docs/method.md#normal-frames).
    np.testing.assert_allclose(ours[same], -ref[same], atol=1e-4)


def test_cpu_threads_sets_torch_threads_and_keeps_results(tiny_depth_ckpt: Path) -> None:
    """cpu_threads (node parameter of the same name) sets torch's intra-op threads; outputs do not change."""
    before = torch.get_num_threads()
    img = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    try:
        default = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=None, device="cpu",
                                             dtype="fp32", processing_res=64)).predict(img).depth
        one = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=None, device="cpu",
                                         dtype="fp32", processing_res=64, cpu_threads=1))
        assert torch.get_num_threads() == 1
        np.testing.assert_allclose(one.predict(img).depth, default, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_engine_config_refuses_a_processing_res_that_is_not_a_multiple_of_8() -> None:
    """The rule lives with the engine's defaults (engine/config.py): every front-end that builds an EngineConfig
    gets the same message, naming the nearest valid values."""
    from geodiff_ros.engine import EngineConfig

    with pytest.raises(ValueError, match=r"processing_res=756 must be a multiple of 8 .* 752 or 760"):
        EngineConfig(processing_res=756)
    assert EngineConfig(processing_res=0).processing_res == 0  # native size
