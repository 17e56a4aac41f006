"""The eager engine (optimize="none") is the official E2E-FT computation, bit for bit in fp32.

The reference below restates the official inference (docs/method.md#single-step-forward;
``Marigold/marigold/marigold_pipeline.py`` of the E2E-FT repository, driven as ``run.py`` / ``infer.py`` drive it)
with diffusers building blocks on contiguous NCHW tensors, one image at a time, fp32 on the CPU. It is written from
the method's description, not from the engine, so a change of layout, op order or dtype in the engine shows up
here. The earlier 1e-4 agreement with diffusers' own Marigold pipelines (test_engine.py) was too loose to see that
the engine ran its networks on channels-last tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from geodiff_ros.engine import EngineConfig, GeoDiffEngine, x0_from_prediction
from geodiff_ros.geometry.normal_frames import TO_OPTICAL_SIGNS

LATENT_SCALE = 0.18215  # rgb_latent_scale_factor


def natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: structure the tiny network turns into varied depth, unlike flat noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255.0, yy / h * 255.0, (xx + yy) % 256.0], axis=-1)
    img += np.random.default_rng(seed).normal(0.0, 20.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def official_normals_ensemble(members: torch.Tensor) -> torch.Tensor:
    """GeoWizard's ensemble as the E2E-FT Marigold pipeline has it: [E,3,h,w] -> one member
    (docs/method.md#normals-ensemble)."""
    e = members.shape[0]
    n = members / (torch.norm(members, p=2, dim=1).unsqueeze(1) + 1e-5)
    phi = torch.atan2(n[:, 1, :, :], n[:, 0, :, :]).mean(dim=0)
    theta = torch.atan2(torch.norm(n[:, :2, :, :], p=2, dim=1), n[:, 2, :, :]).mean(dim=0)
    mean = torch.zeros(n.shape[1:])
    mean[0, :, :] = torch.sin(theta) * torch.cos(phi)
    mean[1, :, :] = torch.sin(theta) * torch.sin(phi)
    mean[2, :, :] = torch.cos(theta)
    angle = torch.acos(torch.clip(torch.cosine_similarity(mean[None], n, dim=1), -0.999, 0.999))
    return n[torch.argmin(angle.reshape(e, -1).sum(-1))]


def official_depth_ensemble(depths: torch.Tensor) -> torch.Tensor:
    """Marigold's older ensemble, median reduction, as the E2E-FT code calls it (docs/method.md#depth-ensemble):
    [E,h,w] -> [h,w].
    float32 parameters and objective values, as the official (BFGS's finite differences follow their dtype)."""
    from scipy.optimize import minimize

    e = depths.shape[0]
    lo = np.min(depths.reshape((e, -1)).numpy(), axis=1)
    hi = np.max(depths.reshape((e, -1)).numpy(), axis=1)
    s0 = 1.0 / (hi - lo).reshape((-1, 1, 1))
    t0 = (-1 * s0.flatten() * lo.flatten()).reshape((-1, 1, 1))
    x0 = np.concatenate([s0, t0]).reshape(-1).astype(np.float32)

    def closure(x: np.ndarray) -> np.ndarray:
        s, t = torch.from_numpy(x[:e]).float(), torch.from_numpy(x[e:]).float()
        aligned = depths * s.view((-1, 1, 1)) + t.view((-1, 1, 1))
        dists = torch.concatenate([aligned[i:i + 1] - aligned[j:j + 1]
                                   for i, j in torch.combinations(torch.arange(e))], dim=0)
        pred = torch.median(aligned, dim=0).values
        err = torch.sqrt(torch.mean(dists**2)) + (torch.sqrt((0 - torch.min(pred)) ** 2)
                                                   + torch.sqrt((1 - torch.max(pred)) ** 2)) * 0.02
        return err.detach().numpy().astype(np.float32)

    x = minimize(closure, x0, method="BFGS", tol=1e-3, options={"maxiter": 2, "disp": False}).x
    aligned = depths * torch.from_numpy(x[:e]).float().view(-1, 1, 1) + torch.from_numpy(x[e:]).float().view(-1, 1, 1)
    agg = torch.median(aligned, dim=0).values
    return (agg - torch.min(agg)) / (torch.max(agg) - torch.min(agg))


def official_reference(folder: Path, rgb: np.ndarray, processing_res: int, task: str,
                       steps: int = 1, noise: str = "zeros", members: int = 1) -> np.ndarray:
    """The official inference restated: depth [H,W] in [0,1] or normals [H,W,3] in the checkpoint frame (LUB).

    ``noise="gaussian"`` draws from torch's global generator (seed it before the call); ``members`` > 1 runs
    the normals ensemble as the official does on a CPU: one member per batch (find_batch_size returns 1 without
    CUDA), each drawing its own noise in turn, then the ensemble."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # Components loaded one by one in fp32; the scheduler's spacing set at load time (as run.py does).
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="trailing")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    height, width = rgb.shape[:2]
    with torch.no_grad():
        # 1. uint8 [3,H,W] -> a contiguous [1,3,H,W] batch (the pipeline stacks its inputs).
        u8 = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        # 2. Longest edge -> R: f = min(R/W, R/H), size (int(H*f), int(W*f)); antialiased resize of the uint8
        #    image (torchvision: float, interpolate, round, back to uint8).
        if processing_res > 0:
            f = min(processing_res / width, processing_res / height)
            size = (int(height * f), int(width * f))
            u8 = F.interpolate(u8.float(), size=size, mode="bilinear", align_corners=False,
                               antialias=True).round().to(torch.uint8)
        # 4. [0,255] -> [-1,1].
        x = u8 / 255.0 * 2.0 - 1.0
        # 9. Empty prompt, do_not_pad: [1,2,C].
        ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
        scheduler.set_timesteps(steps)
        decoded = []
        # 5. The input repeated `members` times and iterated through a DataLoader of batch size 1 (find_batch_size
        #    on a CPU): starting the iteration takes the loader's base seed from torch's global CPU generator.
        loader = DataLoader(TensorDataset(x.expand(members, -1, -1, -1)), batch_size=1, shuffle=False)
        for (batch,) in loader:
            # 7. Mean of the VAE posterior x 0.18215.
            z_img = vae.encode(batch).latent_dist.mean * LATENT_SCALE
            # 6, 8, 10, 11. Trailing timesteps, zero (or Gaussian) target latent, image latent first; x0 last.
            latent = torch.randn(z_img.shape, device="cpu", dtype=torch.float32) if noise == "gaussian" else \
                torch.zeros(z_img.shape)
            for i, t in enumerate(scheduler.timesteps):
                pred = unet(torch.cat([z_img, latent], dim=1), t, encoder_hidden_states=context).sample
                step = scheduler.step(pred, t, latent)
                latent = step.pred_original_sample if i == steps - 1 else step.prev_sample
            # 12. Decode.
            decoded.append(vae.decode(latent / LATENT_SCALE).sample)  # [1,3,h',w']
        y = decoded[0]
        if task == "depth":
            d = (torch.clip(y.mean(dim=1, keepdim=True), -1.0, 1.0) + 1.0) / 2.0
            if members > 1:  # 12. for each member, then 13.
                each = torch.concat([(torch.clip(m.mean(dim=1), -1.0, 1.0) + 1.0) / 2.0 for m in decoded])
                d = official_depth_ensemble(each)[None, None]
            d = (d - d.min()) / (d.max() - d.min())  # 14. min-max to [0,1]
            d = F.interpolate(d, size=(height, width), mode="bilinear", align_corners=False, antialias=True)  # 15.
            return d[0, 0].numpy().clip(0.0, 1.0)  # 16.
        n = y / (torch.norm(y, p=2, dim=1, keepdim=True) + 1e-5)  # 12.
        if members > 1:  # 12. for each member, then 13.
            unit = [m / (torch.norm(m, p=2, dim=1, keepdim=True) + 1e-5) for m in decoded]
            n = official_normals_ensemble(torch.concat(unit, dim=0))[None]
        n = n / (torch.norm(n, p=2, dim=1, keepdim=True) + 1e-5)  # 14.
        n = F.interpolate(n, size=(height, width), mode="bilinear", align_corners=False, antialias=True)  # 15.
        return n[0].permute(1, 2, 0).numpy().clip(-1.0, 1.0)  # 16. (HWC here; the official returns CHW)


def engine_for(task: str, folder: Path, processing_res: int) -> GeoDiffEngine:
    models = {"depth_model": str(folder), "normals_model": None} if task == "depth" else \
        {"depth_model": None, "normals_model": str(folder)}
    return GeoDiffEngine(EngineConfig(device="cpu", dtype="fp32", processing_res=processing_res, **models))


def engine_output(engine: GeoDiffEngine, task: str, rgb: np.ndarray) -> np.ndarray:
    """The engine's output in the reference's frame: normals back from the optical frame to LUB."""
    pred = engine.predict(rgb)
    if task == "depth":
        return pred.depth[0]
    return pred.normals[0] * np.asarray(TO_OPTICAL_SIGNS["LUB"], np.float32)  # the signs are their own inverse


@pytest.mark.parametrize("processing_res", [0, 768], ids=["native", "768"])
@pytest.mark.parametrize("task", ["depth", "normals"])
def test_eager_engine_equals_the_official_computation(task: str, processing_res: int, tiny_depth_ckpt: Path,
                                                      tiny_normals_ckpt: Path) -> None:
    """KITTI's odd size 1242x375: latents 155x46, decoder output 1240x368, resized back (docs/method.md#resize)."""
    folder = tiny_depth_ckpt if task == "depth" else tiny_normals_ckpt
    image = natural_image(375, 1242)
    ours = engine_output(engine_for(task, folder, processing_res), task, image)
    reference = official_reference(folder, image, processing_res, task)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-6


def test_multistep_equals_the_official_loop(tiny_depth_ckpt: Path) -> None:
    """predict_multistep with zero noise follows the official DDIM loop (x0 on the last step) just as exactly."""
    image = natural_image(75, 98, seed=1)
    engine = engine_for("depth", tiny_depth_ckpt, 128)
    for steps in (1, 2):
        ours = engine.predict_multistep(image, num_steps=steps, timestep_spacing="trailing", noise="zeros").depth
        reference = official_reference(tiny_depth_ckpt, image, 128, "depth", steps=steps)
        assert np.abs(ours - reference).max() <= 1e-6, steps


def test_multistep_gaussian_noise_is_the_official_draw(tiny_depth_ckpt: Path) -> None:
    """Gaussian start (docs/method.md#gaussian-noise): the official draws torch.randn on the device in the model
    dtype from torch's global generator; ``seed=s`` equals that draw right after ``torch.manual_seed(s)``,
    ``seed=None`` uses it."""
    image = natural_image(75, 98, seed=3)
    engine = engine_for("depth", tiny_depth_ckpt, 128)
    torch.manual_seed(7)
    reference = official_reference(tiny_depth_ckpt, image, 128, "depth", steps=2, noise="gaussian")
    seeded = engine.predict_multistep(image, num_steps=2, timestep_spacing="trailing", seed=7).depth
    torch.manual_seed(7)
    global_rng = engine.predict_multistep(image, num_steps=2, timestep_spacing="trailing", seed=None).depth
    assert np.abs(seeded - reference).max() <= 1e-6
    assert np.array_equal(seeded, global_rng)
    other = engine.predict_multistep(image, num_steps=2, timestep_spacing="trailing", seed=8).depth
    assert np.abs(other - reference).max() > 1e-3  # the noise matters: the check above can fail


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("task", ["depth", "normals"])
def test_multistep_gaussian_ensemble_equals_the_official(task: str, steps: int, tiny_depth_ckpt: Path,
                                                         tiny_normals_ckpt: Path) -> None:
    """E=3 Gaussian members one at a time, each drawing its noise in turn after the DataLoader's base-seed draw,
    then the task's ensemble (Marigold's depth BFGS / GeoWizard's normals pick), min-max or re-normalisation and
    the resize. ``seed=s`` and ``seed=None`` after ``torch.manual_seed(s)`` both give the official output, and
    ``seed=None`` leaves torch's global generator where the official call leaves it."""
    folder = tiny_depth_ckpt if task == "depth" else tiny_normals_ckpt
    image = natural_image(60, 84, seed=6)
    engine = engine_for(task, folder, 96)

    def ours(seed: int | None) -> np.ndarray:
        pred = engine.predict_multistep(image, task=task, num_steps=steps, ensemble_size=3,
                                        timestep_spacing="trailing", seed=seed)
        if task == "depth":
            return pred.depth
        return pred.normals * np.asarray(TO_OPTICAL_SIGNS["LUB"], np.float32)

    torch.manual_seed(1234)
    reference = official_reference(folder, image, 96, task, steps=steps, noise="gaussian", members=3)
    after_official = torch.randn(8)
    seeded = ours(1234)
    torch.manual_seed(1234)
    global_rng = ours(None)
    after_ours = torch.randn(8)
    assert np.abs(seeded - reference).max() <= 1e-6
    assert np.abs(global_rng - reference).max() <= 1e-6
    assert torch.equal(after_ours, after_official)


@pytest.mark.parametrize("seed", [9, 10, 34, 58, 100])
def test_normals_ensemble_picks_the_official_member(seed: int) -> None:
    """Members close together (angles under the 0.999 clip, theta near the pole): the choice follows the official
    formula exactly. These seeds are cases where theta = acos(z) and an unclipped angle chose another member."""
    from geodiff_ros.engine.ensemble import ensemble_normals

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 8, 8, generator=g)
    spread = torch.rand(4, 1, 1, 1, generator=g) * 0.1
    members = base[None] + torch.randn(4, 3, 8, 8, generator=g) * spread
    members = members / (members.norm(dim=1, keepdim=True) + 1e-5)
    assert torch.equal(ensemble_normals(members), official_normals_ensemble(members))


def test_output_does_not_depend_on_the_memory_layout_of_the_input(tiny_depth_ckpt: Path,
                                                                   tiny_normals_ckpt: Path) -> None:
    """Same pixels in any numpy layout -> identical output, and every network sees a contiguous NCHW tensor."""
    base = natural_image(45, 61, seed=2)
    padded = np.zeros((100, 130, 3), np.uint8)
    padded[10:55, 20:81] = base
    spaced = np.zeros((90, 122, 3), np.uint8)
    spaced[::2, ::2] = base
    layouts = {
        "NHWC": base,
        "transposed view of CHW": np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0),
        "slice of a larger image": padded[10:55, 20:81],
        "every other pixel": spaced[::2, ::2],
        "Fortran order": np.asfortranarray(base),
    }
    for res in (0, 64):
        engine = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=str(tiny_normals_ckpt),
                                            device="cpu", dtype="fp32", processing_res=res))
        seen: list[tuple[str, bool]] = []
        networks = {"VAE encoder": engine.vae.encoder, "VAE decoder": engine.vae.decoder,
                    "depth UNet": engine.models["depth"].unet, "normals UNet": engine.models["normals"].unet}
        handles = [module.register_forward_pre_hook(
            lambda _m, args, name=name, seen=seen: seen.append((name, args[0].is_contiguous())))
            for name, module in networks.items()]
        try:
            outputs = {name: engine.predict(image) for name, image in layouts.items()}
        finally:
            for handle in handles:
                handle.remove()
        assert {name for name, _ in seen} == set(networks)
        assert [entry for entry in seen if not entry[1]] == [], "a network ran on a non-contiguous (NHWC) tensor"
        first = outputs["NHWC"]
        for name, out in outputs.items():
            assert np.array_equal(out.depth, first.depth), (res, name)
            assert np.array_equal(out.normals, first.normals), (res, name)


def test_x0_is_the_scheduler_step_bit_for_bit() -> None:
    """x0 from the v-prediction equals diffusers' DDIM pred_original_sample exactly (square roots in float32)."""
    from diffusers import DDIMScheduler

    from geodiff_ros.testing.tiny_checkpoint import E2E_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(E2E_SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    v = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3.0
    zeros = torch.zeros_like(v)
    official = scheduler.step(v, 999, zeros).pred_original_sample
    ours = x0_from_prediction(v, zeros, scheduler.alphas_cumprod[999], "v_prediction")
    assert torch.equal(ours, official)
