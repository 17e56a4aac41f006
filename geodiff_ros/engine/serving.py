"""Serve while compiling: frames go through the fastest path that is ready now while a builder thread makes the
optimised one, per frame shape (batch size, height, width), and each call switches to it once it is built.

The compiled modes (accel.py) cost a compile at start-up: minutes on a first start, tens of seconds on a restart,
more with several cameras (one compile for batch 1 and one shared by batch sizes >= 2). A robot should not be blind
meanwhile. :class:`PathBuilder` gates the accelerator's network stages (``accel._Stage``): a stage runs its fast
form (torch.compile, an AOT package, the fused VAE) only for input shapes the builder has already built, and its
eager form otherwise. So a frame never waits for a compiler: it runs eager (the official computation in the
engine's precision, on the optimised memory layout), and the next frame of a shape the builder finished runs
compiled, then as a CUDA-graph replay once that shape's graph is captured. Nothing else changes for the caller:
``GeoDiffEngine.predict`` picks the path per call.

The builder, in order: for each planned frame shape (the largest batch first: with several cameras the eager path
is slow, so batches fill up) each compiled stage (VAE encoder, UNet per task, VAE decoder, or the fused VAE's
first call: Triton JIT and cuDNN algorithm search), then the whole frame's CUDA graph. Its GPU work runs on a
stream of its own; the graph capture holds the accelerator's lock for a fraction of a second, so it never
overlaps a frame of the same engine. Inductor compiles kernels in its pool of worker processes (startup.py).
A frame shape serving meets that was not planned (another camera size or batch size) is built after the plan.

Eager and compiled outputs differ only by kernel choice and summation order: within the optimised path's stated
tolerances (benchmarks/README.md; test_engine_serving.py checks it on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .accel import building
from .config import DEFAULT_STARTUP_MODE, STARTUP_MODES

LOG = logging.getLogger(__name__)

__all__ = ["PathBuilder", "BuildStatus"]

FrameShape = tuple[int, int, int]  # (batch, height, width)
FIRST_FRAME_WAIT_S = 10.0  # the builder starts after the first served frame, or after this without frames


@dataclass
class BuildStatus:
    """What serves and what is being built, for logs and /diagnostics."""

    serving: dict[FrameShape, str] = field(default_factory=dict)  # frame shape -> "eager" | "compiled" | "graph"
    building: str = ""  # "unet[depth] batch 2 (3 of 9, 41 s)", "" when idle
    done: bool = False
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line: 'serving eager, compiling unet[depth] batch 2 (3 of 9, 41 s)', 'serving graph (batch 2, 3),
        eager (batch 1), compiling ...', 'serving graph'."""
        by_path: dict[str, list[int]] = {}
        for (batch, _, _), path in sorted(self.serving.items()):
            by_path.setdefault(path, []).append(batch)
        if len(by_path) <= 1:
            serving = "serving " + (next(iter(by_path)) if by_path else "eager")
        else:
            serving = "serving " + ", ".join(f"{path} (batch {', '.join(map(str, sorted(set(b))))})"
                                             for path, b in by_path.items())
        return f"{serving}, compiling {self.building}" if self.building else serving

    @property
    def fully_built(self) -> bool:
        """Every frame shape met so far serves its optimised path."""
        return bool(self.serving) and all(path != "eager" for path in self.serving.values())


class PathBuilder:
    """Builds the accelerator's fast path for frame shapes in the background while frames are served (see the
    module docstring). ``start()`` runs the builder on a thread; ``run()`` builds in the calling thread (wait for
    the compiled path first, as a latency test wants)."""

    def __init__(self, engine: Any, height: int, width: int, batch_sizes: Sequence[int],
                 tasks: Sequence[str] | None = None, on_change: Callable[[str], None] | None = None) -> None:
        acc = engine.accelerator
        if acc is None:
            raise ValueError("nothing to build: the engine runs optimize none (its eager path is always ready)")
        self.engine = engine
        self.acc = acc
        self.tasks = tuple(engine._select_tasks(tasks))
        self.on_change = on_change or (lambda text: LOG.info("%s", text))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._plan: list[FrameShape] = [(b, height, width) for b in sorted(set(batch_sizes), reverse=True)]
        self._known: set[FrameShape] = set(self._plan)  # planned, in progress, built or failed
        self._built: set[FrameShape] = set()
        self._failed: set[FrameShape] = set()
        self._status = BuildStatus(serving=dict.fromkeys(self._plan, "eager"))
        self._start = time.monotonic()
        self._step: tuple[str, int, int, int] | None = None  # (label, batch, k, n) of the step in progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._stream: Any = torch.cuda.Stream(acc.device) if acc.device.type == "cuda" else None
        self._served = 0  # engine calls met so far (note); the builder starts after the first frame
        self._first_frame = threading.Event()
        # cuDNN's algorithm search (accel: every algorithm of every convolution shape) took ~17 s of the first
        # eager frame on an H100 (warm restart: first frame 36.5 s after process start, engine loaded after
        # 14.3 s). Eager frames run cuDNN's heuristic choice instead; the search is switched on for the CUDA-graph
        # capture of the first built shape, so the graphs replay the fastest algorithms.
        self._benchmark = bool(torch.backends.cudnn.benchmark)
        if acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
        acc.builder = self
        acc.gate(True)

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        """Build on a background thread (daemon): frames are served meanwhile."""
        self._thread = threading.Thread(target=self._loop, name="geodiff-builder", daemon=True)
        self._thread.start()

    def run(self, progress: Callable[[int, int, str], None] | None = None) -> None:
        """Build every planned frame shape now, in this thread; ``progress(k, n, label)`` before each step."""
        self._prepare()
        for shape in self._take_plan():
            self._build(shape, progress)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop after the step in progress (a compile cannot be interrupted); frames keep the paths built so far."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every planned (and noted) frame shape is built; False after ``timeout``."""
        return self._idle.wait(timeout)

    def note(self, shape: FrameShape, tasks: tuple[str, ...]) -> None:
        """Serving met this frame shape (called per engine call by the accelerator): build it if it is new."""
        self._served += 1
        if self._served >= 2:  # the first frame is done (the second call starts when it is)
            self._first_frame.set()
        if shape in self._known or tuple(tasks) != self.tasks:
            return
        with self._wake:
            if shape not in self._known:
                self._known.add(shape)
                self._plan.append(shape)
                self._status.serving.setdefault(shape, "eager")
                self._idle.clear()
                self._wake.notify_all()

    def status(self) -> BuildStatus:
        """A snapshot; ``building`` counts the seconds since the builder started, as of now."""
        with self._lock:
            building = ""
            if self._step is not None:
                label, batch, k, n = self._step
                building = (f"{label} batch {batch} ({k} of {n}, {time.monotonic() - self._start:.0f} s)" if n
                            else label)
            return BuildStatus(dict(self._status.serving), building, self._status.done, list(self._status.errors))

    # ---------------------------------------------------------------- building

    def _prepare(self) -> None:
        """Wait for inductor's compile workers (started with the engine) when something will compile, so kernels
        compile in parallel from the first one."""
        if self.acc.settings.compile and not self.acc.all_stages_aot():
            from .startup import _wait_for_compile_workers

            with self._lock:
                self._step = ("(starting inductor's compile workers)", 0, 0, 0)
            _wait_for_compile_workers()
            with self._lock:
                self._step = None

    def _take_plan(self) -> list[FrameShape]:
        with self._lock:
            plan, self._plan = self._plan, []
            return plan

    def _loop(self) -> None:
        # The first camera frame first: it runs eagerly on a process the builder would otherwise load with
        # compiling and kernel searches from the same moment (CPU, GPU and the interpreter lock).
        self._first_frame.wait(FIRST_FRAME_WAIT_S)
        self._prepare()
        while not self._stop.is_set():
            plan = self._take_plan()
            if not plan:
                with self._wake:
                    self._status.done = True
                    self._step = None
                    if not self._plan:
                        self._idle.set()
                        self._wake.wait(0.5)
                continue
            with self._lock:
                self._status.done = False
            for shape in plan:
                if self._stop.is_set():
                    return
                self._build(shape, None)

    def _build(self, shape: FrameShape, progress: Callable[[int, int, str], None] | None) -> None:
        """Every stage of one frame shape, then its CUDA graph; a failure leaves that shape eager."""
        steps = self._steps(shape)
        batch = shape[0]
        for k, (label, run) in enumerate(steps, 1):
            if self._stop.is_set():
                return
            with self._lock:
                self._step = (label, batch, k, len(steps))
            if progress:
                progress(k, len(steps), f"{label}, batch {batch}")
            t0 = time.perf_counter()
            try:
                with building(), torch.inference_mode(), self._on_stream():
                    run()
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: this shape keeps serving eagerly
                message = f"building {label} for {shape} failed ({type(err).__name__}: {err}); it stays eager"
                LOG.warning("%s", message)
                with self._lock:
                    self._status.errors.append(message)
                    self._failed.add(shape)
                    self._step = None
                return
            LOG.info("built %s batch %d for %dx%d in %.1f s", label, batch, shape[2], shape[1],
                     time.perf_counter() - t0)
        path = "graph" if (self.acc.use_cuda_graph and self._graph_ready(shape)) else "compiled"
        with self._lock:
            self._built.add(shape)
            self._status.serving[shape] = path
            self._step = None
        self.on_change(f"{shape[2]}x{shape[1]}, batch {batch}: now serving {path} "
                       f"({time.monotonic() - self._start:.1f} s after the builder started)")

    def _steps(self, shape: FrameShape) -> list[tuple[str, Callable[[], None]]]:
        """The build steps of one frame shape; they hand intermediate results on through ``state``."""
        acc, tasks = self.acc, self.tasks
        batch, height, width = shape
        rgb = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)  # [B,H,W,3]
        state: dict[str, Any] = {}

        def encode() -> None:
            x = acc.preprocess(torch.from_numpy(rgb).to(acc.device))
            state["latents"] = {task: acc.encode(x, task) for task in tasks}

        def unet(task: str) -> Callable[[], None]:
            def run() -> None:
                state.setdefault("z0", {})[task] = acc.denoise(task, state["latents"][task])
            return run

        def decode() -> None:
            for task in tasks:
                acc.decode(state["z0"][task], task)
            state.clear()
            self._sync()

        steps: list[tuple[str, Callable[[], None]]] = [
            (_stage_label(acc.encoders[acc._vae_key(tasks[0])]), encode),
            *[(_stage_label(acc.unets[task]), unet(task)) for task in tasks],
            (_stage_label(acc.decoders[acc._vae_key(tasks[0])]), decode),
        ]
        if acc.use_cuda_graph:
            def capture() -> None:
                torch.backends.cudnn.benchmark = self._benchmark  # search algorithms now, for the graph
                self._sync()
                host_in = acc._host_buffer(("in",), rgb.shape, torch.uint8)
                np.copyto(host_in.numpy(), rgb)
                acc.capture(host_in, tasks)

            steps.append(("CUDA graph", capture))
        return steps

    def _graph_ready(self, shape: FrameShape) -> bool:
        return (shape, self.tasks) in {(k[0][:3], k[1]) for k in self.acc._graphs}

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _on_stream(self) -> Any:
        """The builder's own CUDA stream (a null context on the CPU)."""
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()


def _stage_label(stage: Any) -> str:
    """What a step builds, as users read it: 'unet[depth]' (compile), 'vae-decoder[shared, fused]' (JIT kernels)."""
    return stage.name


def start_serving(engine: Any, height: int, width: int, batch_sizes: Sequence[int], mode: str = DEFAULT_STARTUP_MODE,
                  progress: Callable[[int, int, str], None] | None = None,
                  on_change: Callable[[str], None] | None = None) -> PathBuilder | None:
    """How a server (the ROS node) starts an engine: None when there is nothing to build (optimize none: the eager
    path is ready); with ``serve_eager`` the builder runs in the background and frames are served from now on;
    with ``wait_compiled`` it builds every planned frame shape first, in this thread (repeatable latency from the
    first frame), then returns."""
    if mode not in STARTUP_MODES:
        raise ValueError(f"unknown startup mode {mode!r}: use {' or '.join(STARTUP_MODES)}")
    if engine.accelerator is None:
        return None
    builder = PathBuilder(engine, height, width, batch_sizes, on_change=on_change)
    if mode == "wait_compiled":
        builder.run(progress)
    else:
        builder.start()
    return builder
