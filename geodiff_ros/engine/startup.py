"""Start-up of the compiled engine: where compiled kernels live, parallel compile workers, and a warm-up
that compiles stage by stage so a caller (the ROS node) can show its progress.

Cache: inductor keeps compiled kernels, FX graphs and AOTAutograd results on disk under ``TORCHINDUCTOR_CACHE_DIR``;
its default (``/tmp/torchinductor_$USER``) is lost on reboot, so a robot would compile for minutes after every
power cycle. Unless the user set ``TORCHINDUCTOR_CACHE_DIR``, the engine uses a persistent per-user folder,
``$XDG_CACHE_HOME/geodiff_ros/inductor/<key>`` (``~/.cache/...`` without XDG_CACHE_HOME), where ``<key>`` names the
torch build and the device (GPU model and compute capability, or the CPU architecture): a torch upgrade or another
GPU starts a fresh folder instead of mixing artefacts, and inductor's own keys (graph, shapes, dtypes, config)
separate input sizes, batch sizes and precisions inside it. Delete the folder to force a clean rebuild.

Workers: inductor compiles kernels in a pool of worker processes, but only once the pool has started; before that
it compiles in the calling thread, one kernel at a time. :func:`prepare_compile` starts the pool when the engine is
built (while the weights load) and :func:`warm_up_stages` waits for it before the first compile.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOG = logging.getLogger(__name__)

__all__ = ["compile_cache_key", "default_compile_cache_dir", "prepare_compile", "warm_up_stages"]

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_POOL_READY_TIMEOUT_S = 120.0


def compile_cache_key(device: torch.device) -> str:
    """Folder name for one torch build on one kind of device, e.g. ``torch2.13.0+cu130-nvidia-h200-sm90``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        where = f"{torch.cuda.get_device_name(index)}-sm{major}{minor}"
    else:
        where = f"{device.type}-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", f"torch{torch.__version__}-{where}").lower()


def default_compile_cache_dir(device: torch.device) -> Path:
    """``$XDG_CACHE_HOME/geodiff_ros/inductor/<key>`` (``~/.cache`` without XDG_CACHE_HOME)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "geodiff_ros" / "inductor" / compile_cache_key(device)


def prepare_compile(device: torch.device, start_workers: bool = True) -> Path:
    """Before the first torch.compile of this process: choose the cache folder and start the compile workers
    (unless ``start_workers`` is False: everything is AOT-compiled, aot.py).

    An explicit ``TORCHINDUCTOR_CACHE_DIR`` is respected. Returns the folder in use.
    """
    explicit = os.environ.get(CACHE_ENV)
    folder = Path(explicit) if explicit else default_compile_cache_dir(device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only home (containers): inductor's default under /tmp still works
        LOG.warning("cannot create the compile cache %s (%s): using inductor's default under /tmp, so compiled "
                    "kernels do not survive a reboot; set %s to a writable folder", folder, err, CACHE_ENV)
        return Path(os.environ.get(CACHE_ENV, "/tmp"))
    os.environ[CACHE_ENV] = str(folder)  # inductor reads it on every cache access
    LOG.info("compiled kernels cached in %s%s", folder, "" if explicit else f" (set {CACHE_ENV} to move it)")
    if not start_workers:
        return folder
    try:
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.warm_pool()  # starts the worker processes in the background
    except Exception as err:  # noqa: BLE001 - a private API: compiling still works without the pool
        LOG.info("inductor compile workers not started early (%s: %s)", type(err).__name__, err)
    return folder


def _wait_for_compile_workers() -> None:
    """Block until inductor's worker pool answers, so kernels compile in parallel from the first one."""
    try:  # private inductor API (torch 2.13); older builds simply compile as they always did
        from torch._inductor import config
        from torch._inductor.async_compile import AsyncCompile

        threads = config.compile_threads or config.decide_compile_threads()
        if threads <= 1:
            return
        start = time.monotonic()
        AsyncCompile.wait_pool_ready(timeout=_POOL_READY_TIMEOUT_S)
        LOG.info("%d inductor compile workers ready after %.1f s", threads, time.monotonic() - start)
    except Exception as err:  # noqa: BLE001 - compiling in this thread until the pool is up is slower, not wrong
        LOG.warning("could not wait for inductor's compile workers (%s: %s): the first kernels may compile in "
                    "this thread", type(err).__name__, err)


Progress = Callable[[int, int, str], None]


def warm_up_stages(engine: Any, height: int, width: int, batch_sizes: Sequence[int],
                   tasks: Sequence[str] | None = None, progress: Progress | None = None) -> float:
    """Compile (and on CUDA capture) the engine for ``height x width`` frames at each batch size, one network stage
    at a time, calling ``progress(k, n, label)`` before stage k of n. Returns the seconds it took.

    Without an accelerator (optimize none) this is one eager frame per batch size. The compiled stages are the
    Accelerator's own (encoder, UNet per task, decoder), so what is compiled here is what frames use; the last
    step per batch size runs a whole frame (capturing its CUDA graph in the graph modes).
    """
    start = time.perf_counter()
    tasks = tuple(engine._select_tasks(tasks))
    acc = engine.accelerator
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H,W,3]
    if acc is None:
        for k, batch in enumerate(batch_sizes, 1):
            if progress:
                progress(k, len(batch_sizes), f"first frame, batch {batch}")
            engine.predict([rgb] * batch, tasks)
        return time.perf_counter() - start
    if acc.settings.compile and not acc.all_stages_aot():
        _wait_for_compile_workers()
    steps: list[tuple[str, Callable[[], None]]] = []
    for batch in batch_sizes:
        steps += _stage_steps(engine, acc, rgb, batch, tasks)
    for k, (label, run) in enumerate(steps, 1):
        if progress:
            progress(k, len(steps), label)
        t0 = time.perf_counter()
        run()
        LOG.debug("warm-up %d/%d %s: %.1f s", k, len(steps), label, time.perf_counter() - t0)
    return time.perf_counter() - start


def _stage_steps(engine: Any, acc: Any, rgb: np.ndarray, batch: int,
                 tasks: tuple[str, ...]) -> list[tuple[str, Callable[[], None]]]:
    """The warm-up steps of one batch size, in order; they hand intermediate results on through ``state``."""
    state: dict[str, Any] = {}
    frames = np.repeat(rgb[None], batch, axis=0)  # [B,H,W,3], writable (torch.from_numpy)

    def encode() -> None:
        with torch.inference_mode():
            x = acc.preprocess(torch.from_numpy(frames).to(acc.device))
            state["latents"] = {task: acc.encode(x, task) for task in tasks}  # shared VAE: one compile, cheap rerun

    def unet(task: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                state.setdefault("z0", {})[task] = acc.denoise(task, state["latents"][task])
        return run

    def decode() -> None:
        with torch.inference_mode():
            for task in tasks:
                acc.decode(state["z0"][task], task)
        state.clear()

    def whole() -> None:
        engine.predict(list(frames), tasks)

    capture = " (CUDA graph)" if acc.use_cuda_graph else ""
    return [(f"vae-encoder, batch {batch}", encode),
            *[(f"unet[{task}], batch {batch}", unet(task)) for task in tasks],
            (f"vae-decoder, batch {batch}", decode),
            (f"whole frame{capture}, batch {batch}", whole)]
