"""Fused VAE path of the optimised modes: the schedule's algebra in float64, the Triton kernels against
their torch reference (Triton's CPU interpreter), the engine with the fast paths against the eager engine, and that
the kernels build for Hopper (sm_90a) without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geodiff_ros.engine.fused_vae import FusedVAE, UnsupportedVAE, subpixel_weight
from geodiff_ros.engine.latent import LATENT_SCALE
from geodiff_ros.engine.vae_kernels import TorchOps, subpixel_shuffle

REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed (requirements-dev.txt pins it for these checks)")

SMALL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 64), layers_per_block=2,
                 latent_channels=4, norm_num_groups=8)


TINY_VAE = dict(SMALL_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def small_vae(dtype: torch.dtype = torch.float64, seed: int = 0, config: dict | None = None):
    """A small SD-layout VAE (channel changes: 1x1 shortcuts; mid attention) with non-trivial norms and biases."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**(config or SMALL_VAE)).to(dtype).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.3)
    return vae.to(memory_format=torch.channels_last)


def run_script(script: str, interpret: bool = True, timeout: int = 900) -> str:
    """Run ``script`` in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (6, 4)])
def test_subpixel_convolution_equals_nearest_upsample_then_3x3(hw: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, *hw, dtype=torch.float64, generator=gen)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=gen)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    sub = subpixel_shuffle(F.conv2d(x, subpixel_weight(w), padding=1))
    assert sub.shape == ref.shape
    assert (sub - ref).abs().max().item() < 1e-12  # borders included: zero padding commutes with the upsampling


@pytest.mark.parametrize("subpixel", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "gemm"])
def test_fused_schedule_reproduces_the_diffusers_vae_in_float64(subpixel: bool, attention: str) -> None:
    vae = small_vae()
    x = (torch.rand(2, 3, 40, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    x = x.contiguous(memory_format=torch.channels_last)  # latent 5x7: odd sizes at every level
    fused = FusedVAE(vae, TorchOps(chunk=37), subpixel=subpixel, attention=attention)
    with torch.no_grad():
        z_ref = vae.encode(x).latent_dist.mean * LATENT_SCALE
        y_ref = vae.decode(z_ref / LATENT_SCALE).sample
        z, y = fused.encode(x), fused.decode(z_ref)
    assert ((z - z_ref).norm() / z_ref.norm()).item() < 1e-12
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-12


def test_group_statistics_survive_a_large_mean_in_float32() -> None:
    """Per-chunk centred sums combined with Chan's formula: a naive E[x^2] - E[x]^2 in fp32 loses the variance of
    data with mean 1000 and std 1 (relative error ~0.1); torch's group_norm in float64 is the truth."""
    gen = torch.Generator().manual_seed(3)
    x64 = 1000.0 + torch.randn(1, 16, 24, 32, dtype=torch.float64, generator=gen)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    ops = TorchOps(chunk=50)
    _, st = ops.fused_pass(x, write=False)
    scale, shift = ops.group_stats(st, 4, gamma, beta, 1e-6)
    y = ops.apply(x, scale, shift, silu=False)
    truth = F.group_norm(x.double(), 4, gamma.double(), beta.double(), 1e-6)
    assert (y.double() - truth).abs().max().item() < 2e-3


def test_a_vae_the_schedule_does_not_reproduce_is_refused() -> None:
    vae = small_vae(torch.float32)
    vae.decoder.up_blocks[0].resnets[0].output_scale_factor = 2.0
    with pytest.raises(UnsupportedVAE, match="resnet scale"):
        FusedVAE(vae, TorchOps())


def test_fast_paths_fall_back_when_triton_is_missing(tiny_depth_ckpt: Path, tiny_normals_ckpt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from geodiff_ros.engine import EngineConfig, GeoDiffEngine, accel, vae_kernels

    monkeypatch.setattr(vae_kernels, "HAVE_TRITON", False)
    engine = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=str(tiny_normals_ckpt),
                                        device="cpu", dtype="fp32", processing_res=64, optimize="channels_last"))
    effective = engine.accelerator.set_fast_paths(accel.FastPaths())
    assert not effective.fused_vae and not effective.batch_decode
    assert "triton" in engine.accelerator.stage_errors()["fast-paths"]
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pred = engine.predict(rgb)
    assert pred.depth.shape == (1, 48, 64) and np.isfinite(pred.normals).all()


@needs_triton
def test_triton_kernels_match_their_torch_reference_in_the_interpreter() -> None:
    out = run_script("""
        import torch
        from geodiff_ros.engine import vae_kernels
        from geodiff_ros.engine.vae_kernels import TorchOps, TritonOps
        vae_kernels.TARGET_PROGRAMS = 3  # several tiles per program: the in-program shifted sums are exercised
        tr, ref = TritonOps(), TorchOps(chunk=29)
        gen = torch.Generator().manual_seed(0)
        def rnd(*shape, mean=0.5):
            return (torch.randn(*shape, generator=gen) * 2 + mean).contiguous(memory_format=torch.channels_last)
        worst = {}
        def note(key, a, b):
            worst[key] = max(worst.get(key, 0.0), (a.double() - b.double()).abs().max().item())
        for b, c, h, w in ((1, 8, 6, 10), (2, 24, 7, 9), (1, 128, 12, 16), (2, 16, 33, 20)):
            groups = 4 if c % 8 else 8
            x, r = rnd(b, c, h, w), rnd(b, c, h, w)
            bias, gamma, beta = (torch.randn(c, generator=gen) for _ in range(3))
            o1, s1 = tr.fused_pass(x, res=r, bias=bias)
            o2, s2 = ref.fused_pass(x, res=r, bias=bias)
            note("pass", o1, o2)
            for pending in (None, bias):
                sc1, sh1 = tr.group_stats(s1, groups, gamma, beta, 1e-6, pending)
                sc2, sh2 = ref.group_stats(s2, groups, gamma, beta, 1e-6, pending)
                note("scale", sc1, sc2)
                note("shift", sh1, sh2)
            for silu in (True, False):
                note("apply", tr.apply(x, sc1, sh1, silu), ref.apply(x, sc1, sh1, silu))
            p1, _ = tr.fused_pass(x, res=r, pad_out=True, stats=False)
            p2, _ = ref.fused_pass(x, res=r, pad_out=True, stats=False)
            note("pad", p1, p2)
            assert p1.shape == (b, c, h + 1, w + 1) and p1[:, :, h].abs().max() == 0 and p1[:, :, :, w].abs().max() == 0
            y = rnd(b, 4 * c, h + 1, w + 1)
            q1, t1 = tr.fused_pass(y, bias=bias, shuffle=True)
            q2, t2 = ref.fused_pass(y, bias=bias, shuffle=True)
            note("shuffle", q1, q2)
            note("shuffle-stats", tr.group_stats(t1, groups, gamma, beta, 1e-6)[1],
                 ref.group_stats(t2, groups, gamma, beta, 1e-6)[1])
            xh = x.half()
            note("fp16-in-place", tr.fused_pass(xh, bias=bias.half(), out=xh.clone())[0],
                 ref.fused_pass(xh, bias=bias.half())[0])
        s = torch.randn(3, 50, generator=gen) * 5
        note("softmax", tr.softmax_rows(s, 0.3, torch.float16), torch.softmax(s * 0.3, -1))
        # large mean, against float64 truth
        x64 = 1000.0 + torch.randn(1, 16, 24, 32, dtype=torch.float64, generator=gen)
        x = x64.float().contiguous(memory_format=torch.channels_last)
        _, st = tr.fused_pass(x, write=False)
        sc, sh = tr.group_stats(st, 4, torch.ones(16), torch.zeros(16), 1e-6)
        note("large-mean", tr.apply(x, sc, sh, False), torch.nn.functional.group_norm(x64, 4, eps=1e-6))
        limits = {"pass": 1e-5, "scale": 1e-5, "shift": 1e-5, "apply": 1e-5, "pad": 0, "shuffle": 1e-5,
                  "shuffle-stats": 1e-5, "fp16-in-place": 2e-3, "softmax": 1e-3, "large-mean": 2e-3}
        bad = {k: v for k, v in worst.items() if v > limits[k]}
        print(worst)
        assert not bad, bad
        print("OK")
    """)
    assert "OK" in out


@needs_triton
def test_fused_vae_with_triton_kernels_matches_diffusers_in_the_interpreter() -> None:
    out = run_script("""
        import torch, sys
        sys.path.insert(0, "test")
        from test_engine_kernels import TINY_VAE, small_vae
        from geodiff_ros.engine.latent import LATENT_SCALE
        from geodiff_ros.engine.fused_vae import FusedVAE
        from geodiff_ros.engine.vae_kernels import TritonOps
        vae = small_vae(torch.float32, config=TINY_VAE)  # the interpreter costs ~0.1-1 s per launch: few launches
        x = (torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            z_ref = vae.encode(x).latent_dist.mean * LATENT_SCALE
            y_ref = vae.decode(z_ref / LATENT_SCALE).sample
            for attention in ("gemm",):  # sdpa differs only in torch code, checked in float64 above
                fused = FusedVAE(vae, TritonOps(), subpixel=True, attention=attention)
                z, y = fused.encode(x), fused.decode(z_ref)
                ez = ((z - z_ref).norm() / z_ref.norm()).item()
                ey = ((y - y_ref).norm() / y_ref.norm()).item()
                print(attention, ez, ey)
                assert ez < 1e-5 and ey < 1e-5, (ez, ey)
        print("OK")
    """)
    assert "OK" in out


@needs_triton
def test_engine_with_fast_paths_matches_the_eager_engine_in_the_interpreter(tiny_depth_ckpt: Path,
                                                                            tiny_normals_ckpt: Path) -> None:
    out = run_script(f"""
        import numpy as np
        from geodiff_ros.engine import EngineConfig, GeoDiffEngine, accel
        cfg = dict(depth_model={str(tiny_depth_ckpt)!r}, normals_model={str(tiny_normals_ckpt)!r}, device="cpu",
                   dtype="fp32", processing_res=32)
        eager = GeoDiffEngine(EngineConfig(**cfg))
        fast = GeoDiffEngine(EngineConfig(**cfg, optimize="channels_last"))
        effective = fast.accelerator.set_fast_paths(accel.FastPaths())
        assert effective.fused_vae and effective.batch_decode and not effective.concurrent_unets, effective
        assert any("fused" in s.name for s in fast.accelerator.decoders.values())
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(2)]
        for tasks in (("depth", "normals"),):  # shared encode, batched decode of both tasks
            a, b = eager.predict(frames, tasks), fast.predict(frames, tasks)
            d = np.abs(a.depth - b.depth).max()
            assert d < 1e-4, d
            if "normals" in tasks:
                cos = (a.normals * b.normals).sum(-1) / (np.linalg.norm(a.normals, axis=-1)
                                                         * np.linalg.norm(b.normals, axis=-1))
                deg = np.degrees(np.arccos(np.clip(cos, -1, 1))).max()
                assert deg < 0.05, deg
            print(tasks, d)
        print("OK")
    """)
    assert "OK" in out


@needs_triton
def test_kernels_build_for_hopper_without_a_gpu() -> None:
    """The most complex specialisation (sub-pixel gather + bias + write + statistics) and apply, compiled for
    sm_90a with Triton's bundled compiler: they build, and global loads are 16 bytes wide."""
    out = run_script("""
        import torch
        from geodiff_ros.engine.vae_kernels import KERNELS, compile_for
        f16 = torch.empty(1, dtype=torch.float16, device="meta")
        f32 = torch.empty(1, dtype=torch.float32, device="meta")
        fused = compile_for("fused_pass", (f16, f16, f16, f16, f32, f32, 73728, 256, 384, 18874368, 0, 18874368,
                                           18, 144), dict(SHUFFLE=True, HAS_RES=False, HAS_BIAS=True, WRITE=True,
                                                          OUT_PAD=False, STATS=True, BLOCK_P=16, BLOCK_C=256,
                                                          num_warps=8))
        apply = compile_for("apply", (f16, f32, f32, f16, 442368, 128, 56623104, 56623104),
                            dict(SILU=True, BLOCK_P=64, BLOCK_C=128, num_warps=8))
        for c in (fused, apply):
            assert "ld.global.v4.b32" in c.asm["ptx"], "no 16-byte loads"
            assert c.metadata.arch == "sm90", c.metadata.arch
        print("OK")
    """, interpret=False, timeout=600)
    assert "OK" in out


def test_kernel_outputs_are_allocated_channels_last_without_a_copy() -> None:
    """Every pass allocates its output with empty_nhwc; allocating NCHW and converting ran a transposing copy of
    each output (10.5 of 29 ms per depth frame on an H200)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from geodiff_ros.engine.vae_kernels import empty_nhwc, padded_nhwc

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    like = torch.empty(1, dtype=torch.float16)
    with Ops() as ops:
        out = empty_nhwc(2, 8, 5, 7, like)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float16
    assert not [n for n in ops.names if "copy" in n or "clone" in n], ops.names
    with Ops() as ops:
        buf, interior = padded_nhwc(1, 8, 5, 7, like)
    assert not [n for n in ops.names if "copy" in n or "clone" in n], ops.names  # only the border is written
    assert buf.shape == (1, 8, 6, 8) and interior.shape == (1, 8, 5, 7)


@needs_triton
@pytest.mark.skipif(not __import__("shutil").which("c++"), reason="AOTInductor on the CPU needs a C++ compiler")
def test_aot_packages_leave_the_fused_vae_alone_in_the_interpreter(tiny_depth_ckpt: Path, tmp_path: Path) -> None:
    """geodiff_compile and the fused VAE path together: only the stages torch.compile would
    compile get packages (the UNet), a hand-scheduled VAE stage none; with the fused VAE on, every stage in use is
    then covered (no compile workers), nothing is traced, and the result is the eager engine's."""
    out = run_script(f"""
        import os
        os.environ["GEODIFF_AOT_DIR"] = {str(tmp_path / "aot")!r}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = {str(tmp_path / "inductor")!r}
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        import numpy as np
        from torch._dynamo.utils import counters
        from geodiff_ros.engine import EngineConfig, GeoDiffEngine, accel
        from geodiff_ros.engine.aot import export_stages
        cfg = dict(depth_model={str(tiny_depth_ckpt)!r}, normals_model=None, device="cpu", dtype="fp32",
                   processing_res=32)
        frames = np.random.default_rng(0).integers(0, 256, (1, 24, 32, 3), dtype=np.uint8)
        maker = GeoDiffEngine(EngineConfig(**cfg, optimize="compile"))
        assert maker.accelerator.set_fast_paths(accel.FastPaths()).fused_vae
        paths = export_stages(maker, frames)
        assert [p.name.split("-")[0] for p in paths] == ["unet"], paths  # no package for the fused VAE stages
        engine = GeoDiffEngine(EngineConfig(**cfg, optimize="compile"))
        acc = engine.accelerator
        assert acc.aot_packages == 1 and not acc.all_stages_aot()  # the compiled VAE (fast paths off) still compiles
        assert acc.set_fast_paths(accel.FastPaths()).fused_vae and acc.all_stages_aot()
        before = counters["stats"]["unique_graphs"]
        depth = engine.predict(frames[0]).depth
        assert counters["stats"]["unique_graphs"] == before, "something was traced"
        d = np.abs(depth - GeoDiffEngine(EngineConfig(**cfg)).predict(frames[0]).depth).max()
        assert d < 1e-4, d
        print("OK", d)
    """)
    assert "OK" in out
