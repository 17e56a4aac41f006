"""Where the compiled engine keeps its kernels: a persistent per-user folder keyed by torch build and
device unless TORCHINDUCTOR_CACHE_DIR says otherwise. No compiling here (test_ros_warmup.py compiles for real)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from aot_helpers import crashing_library, replace_library

from geodiff_ros.engine.startup import compile_cache_key, default_compile_cache_dir, prepare_compile


@pytest.fixture(autouse=True)
def _no_worker_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import config

    monkeypatch.setattr(config, "compile_threads", 1)  # prepare_compile would start worker processes


def test_default_folder_is_persistent_per_user_and_keyed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    key = compile_cache_key(torch.device("cpu"))
    assert key.startswith(f"torch{torch.__version__}".lower()) and "cpu" in key and "/" not in key
    folder = prepare_compile(torch.device("cpu"))
    assert folder == tmp_path / "xdg" / "geodiff_ros" / "inductor" / key and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)  # what inductor reads
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_compile_cache_dir(torch.device("cpu")) == tmp_path / "home" / ".cache" / "geodiff_ros" / \
        "inductor" / key
    assert not str(default_compile_cache_dir(torch.device("cpu"))).startswith("/tmp/torchinductor")


def test_an_explicit_cache_folder_is_respected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare_compile(torch.device("cpu")) == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "xdg").exists()


@pytest.mark.skipif(not __import__("shutil").which("g++") and not __import__("shutil").which("c++"),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_stage_compiles_once_for_batch_sizes_2_to_4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Several cameras: batch sizes 2, 3, 4 share one compiled graph (batch 1 has its own: dynamo
    specialises size 1), instead of one compile per batch size; results equal the eager stage's."""
    from torch._dynamo.utils import counters

    from geodiff_ros.engine.accel import _Stage

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()

    def stage_fn(x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(conv(x)) * context.mean(dim=(1, 2))[:, None, None, None]

    stage = _Stage("toy", stage_fn, compiled=True)
    before = counters["stats"]["unique_graphs"]
    context = torch.randn(1, 2, 8)
    with torch.inference_mode():
        for batch in (1, 2, 3, 4, 2):
            x = torch.randn(batch, 3, 16, 24)
            ctx = context.expand(batch, -1, -1)  # stride 0 in the batch dim, as the engine's text context
            torch.testing.assert_close(stage(x, ctx), stage_fn(x, ctx))
    assert stage.error is None
    assert counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.skipif(not __import__("shutil").which("g++") and not __import__("shutil").which("c++"),
                    reason="AOTInductor on the CPU needs a C++ compiler")
def test_geodiff_compile_packages_replace_compiling_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             tiny_depth_ckpt: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Start-up: `geodiff_compile` writes one AOT package per stage; a new engine with optimize compile
    loads them (no dynamo tracing: no compiled graph at all) and gives the eager results; a package that does not
    load is skipped with a warning and that stage compiles as usual."""
    import numpy as np
    from torch._dynamo.utils import counters

    from geodiff_ros.cli.compile import main as compile_main
    from geodiff_ros.engine import EngineConfig, GeoDiffEngine

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("GEODIFF_AOT_DIR", str(tmp_path / "aot"))
    assert compile_main(["--model-depth", str(tiny_depth_ckpt), "--model-normals", "", "--device", "cpu",
                         "--dtype", "fp32", "--processing-res", "64", "--size", "160x120",
                         "--optimize", "compile"]) == 0
    packages = sorted((tmp_path / "aot").glob("*.pt2"))
    assert len(packages) == 3, packages  # VAE encoder, UNet, VAE decoder

    config = EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=None, device="cpu", dtype="fp32",
                          processing_res=64)
    rgb = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    engine = GeoDiffEngine(EngineConfig(**{**config.__dict__, "optimize": "compile"}))
    assert engine.accelerator.aot_packages == 3 and engine.accelerator.aot_loaded == 0  # loaded on first use
    depth = engine.predict(rgb).depth
    assert engine.accelerator.aot_loaded == 3
    assert counters["stats"]["unique_graphs"] == before  # nothing traced or compiled
    reference = GeoDiffEngine(config).predict(rgb).depth
    np.testing.assert_allclose(depth, reference, rtol=0, atol=1e-4)
    assert all(json.loads(p.with_suffix(".checked").read_text())["problem"] is None for p in packages)

    # The same architecture from another folder (a moved or re-downloaded model) re-uses the packages.
    moved = shutil.copytree(tiny_depth_ckpt, tmp_path / "moved-model")
    with caplog.at_level("INFO", logger="geodiff_ros.engine.aot"):
        assert compile_main(["--model-depth", str(moved), "--model-normals", "", "--device", "cpu", "--dtype", "fp32",
                             "--processing-res", "64", "--size", "160x120", "--optimize", "compile"]) == 0
    assert sorted((tmp_path / "aot").glob("*.pt2")) == packages and caplog.text.count("exists") == 3

    # A package must never take the process down: a truncated one does not load, and one whose library crashes
    # the process that loads it (SIGSEGV, as a broken package did on a GPU) is caught by its check in a child
    # process and never loaded here; either way its stage compiles as usual.
    from geodiff_ros.engine.aot import load_stage_package

    unet = engine.models["depth"].unet
    by_stage = {json.loads(p.with_suffix(".json").read_text())["stage"]: p for p in packages}
    truncated, crashing = by_stage["vae-encoder[shared]"], by_stage["unet[depth]"]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    replace_library(crashing, crashing_library(tmp_path))
    caplog.clear()
    with caplog.at_level("WARNING", logger="geodiff_ros.engine.aot"):
        assert load_stage_package(truncated, engine.vae) is None
        assert load_stage_package(crashing, unet) is None
    assert "killed by SIGSEGV" in caplog.text and caplog.text.count("compiles as usual") == 2, caplog.text
    assert json.loads(crashing.with_suffix(".checked").read_text())["problem"].startswith("its check")
    engine = GeoDiffEngine(EngineConfig(**{**config.__dict__, "optimize": "compile"}))
    assert engine.accelerator.aot_packages == 3  # found; the two broken ones fail on first use and compile

