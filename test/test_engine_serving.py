"""Serve while compiling (engine/serving.py): frames are served by the eager path while a builder thread makes the
optimised one, per frame shape, and each call switches to it once built. CPU, tiny checkpoint."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from geodiff_ros.engine import EngineConfig, GeoDiffEngine
from geodiff_ros.engine.serving import PathBuilder

H, W = 48, 64


def _config(ckpt: Path, optimize: str = "none") -> EngineConfig:
    return EngineConfig(depth_model=str(ckpt), normals_model=None, device="cpu", dtype="fp32", processing_res=32,
                        optimize=optimize)


@pytest.fixture(autouse=True)
def _no_worker_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch._inductor import config

    monkeypatch.setattr(config, "compile_threads", 1)  # the engine would start inductor worker processes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("GEODIFF_AOT_DIR", str(tmp_path / "aot"))


class _SlowCompiler:
    """Stands in for torch.compile of every compiled stage: the first call per input shape blocks until released
    (a compile that takes minutes), and every call is recorded with the thread that made it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[str, tuple, str]] = []
        self.compiled: set[tuple[str, tuple]] = set()

    def wrap(self, stage):
        eager = stage.eager

        def fn(*args):
            key = (stage.name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            self.calls.append((stage.name, key[1], threading.current_thread().name))
            if key not in self.compiled:
                assert self.release.wait(60), "never released"
                self.compiled.add(key)
            return eager(*args)

        stage.fn = fn


def test_frames_run_eager_until_their_shape_is_built_then_the_built_path(tiny_depth_ckpt: Path) -> None:
    """A frame never waits for the compiler: while the builder is stuck in a compile, predict returns the eager
    result at once and the compiled form is never called from the serving thread; once the builder has built a
    frame shape, calls of that shape run the built form, other batch sizes stay eager until they are built, and a
    frame shape serving meets that was not planned is built next."""
    engine = GeoDiffEngine(_config(tiny_depth_ckpt, "compile"))
    reference = GeoDiffEngine(_config(tiny_depth_ckpt))
    slow = _SlowCompiler()
    for stage in engine.accelerator.stages():
        slow.wrap(stage)
    changes: list[str] = []
    builder = PathBuilder(engine, H, W, [1, 2], on_change=changes.append)
    rgb = np.random.default_rng(0).integers(0, 256, (4, H, W, 3), dtype=np.uint8)
    builder.start()
    try:
        deadline = time.monotonic() + 30
        while "batch" not in builder.status().building and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "compiling vae-encoder[shared] batch 2 (1 of 3" in builder.status().line()
        for _ in range(3):  # served while the "compile" blocks
            t0 = time.perf_counter()
            depth = engine.predict(rgb[0]).depth
            assert time.perf_counter() - t0 < 20
            np.testing.assert_allclose(depth, reference.predict(rgb[0]).depth, atol=1e-4)
        assert not [c for c in slow.calls if c[2] != "geodiff-builder"], "a frame called the compiler"
        assert builder.status().line().startswith("serving eager, compiling")

        slow.release.set()
        assert builder.wait(60), builder.status()
        status = builder.status()
        assert status.serving == {(2, H, W): "compiled", (1, H, W): "compiled"} and not status.errors
        assert status.line() == "serving compiled" and status.fully_built
        assert len(changes) == 2 and "batch 2: now serving compiled" in changes[0]  # largest batch first

        before = len(slow.calls)
        depth2 = engine.predict(list(rgb[:2])).depth  # batch 2: built
        served = [c for c in slow.calls[before:]]
        assert {c[2] for c in served} == {threading.current_thread().name} and len(served) == 3, served
        np.testing.assert_allclose(depth2, reference.predict(list(rgb[:2])).depth, atol=1e-4)

        def served_here() -> int:
            return sum(1 for c in slow.calls if c[2] == threading.current_thread().name)

        before = served_here()
        engine.predict(list(rgb[:3]))  # batch 3: never planned, so eager now and built next
        assert served_here() == before
        assert builder.wait(60) and builder.status().serving[(3, H, W)] == "compiled"
        engine.predict(list(rgb[:3]))
        assert served_here() == before + 3
    finally:
        slow.release.set()
        builder.stop()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_served_eager_and_compiled_outputs_agree_within_the_stated_tolerances(tiny_depth_ckpt: Path) -> None:
    """The real switch (torch.compile on the CPU): frames served before and after it agree within the optimised
    path's stated tolerances (benchmarks/README.md: depth max 0.1 / mean 1e-2 after scale and shift; both paths
    here are fp32, so far tighter in fact), for batch 1 and 2."""
    engine = GeoDiffEngine(_config(tiny_depth_ckpt, "compile"))
    builder = PathBuilder(engine, H, W, [1, 2])
    frames = np.random.default_rng(1).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    eager = {b: engine.predict(list(frames[:b])).depth for b in (1, 2)}  # nothing built yet: eager
    builder.run()
    assert builder.status().line() == "serving compiled", builder.status()
    for b in (1, 2):
        compiled = engine.predict(list(frames[:b])).depth
        for e, c in zip(eager[b], compiled, strict=True):
            a = np.vstack([c.ravel(), np.ones(c.size)]).T  # least-squares scale and shift onto the eager result
            fit = a @ np.linalg.lstsq(a, e.ravel(), rcond=None)[0]
            assert np.abs(fit - e.ravel()).max() <= 0.1 and np.abs(fit - e.ravel()).mean() <= 1e-2
            assert np.abs(c - e).max() < 1e-3  # fp32 both: kernel order only
