"""Optimised forward path for GeoDiffEngine: the same computation with fewer host round trips.

Chosen with ``EngineConfig.optimize``; "none" keeps the official eager path in core.py. Each mode adds:

    channels_last   NHWC weights and activations; cudnn.benchmark over all algorithms (static shapes: the search
                    runs once per shape; a process-wide setting); the VAE called as encoder -> quant_conv -> first
                    half of the moments (the posterior mean, without building the distribution);
                    pinned host buffers and one asynchronous device-to-host copy per output
    graph           channels_last + the whole frame (upload .. resize back) captured once per input shape and task
                    set in one CUDA graph and replayed: no Python or kernel-launch cost per frame
    compile         channels_last + torch.compile (inductor, static shapes) of VAE encoder, UNet(s) and VAE decoder:
                    GroupNorm+SiLU and element-wise chains fused into single kernels; the VAE's GroupNorm statistics
                    from per-channel sums (same maths, reads NHWC memory at full speed)
    compile+graph   both

On CUDA the compiled modes add fast paths (``FastPaths``; each switchable, for A/B in bench_engine.py):
the VAE scheduled by hand (fused_vae.py over vae_kernels.py) instead of compiled, sub-pixel upsampling, GEMM attention
in the VAE, several tasks' latents decoded as one batch, and their UNets on separate CUDA streams. Measured on H200s
(fp16, 768x576, two runs): depth 25.0 ms with the compiled VAE, 21.9 ms with these; same accuracy tolerances
(benchmarks/README.md).

Numerics: the same operations in the same dtype as core.py; results differ only through kernel choice and summation
order (cuDNN algorithms, inductor's fused reductions, GroupNorm statistics). benchmarks/bench_engine.py reports the
difference to fp32 eager (H100 fp16: within the eager fp16 error, see benchmarks/README.md).

Start-up: the first frame of a new input size compiles (minutes for the full-size model) and/or captures (seconds).
Call ``GeoDiffEngine.warmup`` (or startup.warm_up_stages, with progress) before serving, or serve while compiling:
serving.PathBuilder builds the fast path on a thread of its own while calls run eagerly. Inductor keeps its compiled
kernels on disk, by default in a persistent per-user folder keyed by torch build and device (startup.py;
``TORCHINDUCTOR_CACHE_DIR`` overrides it), so a restart re-uses them; dynamo still re-traces the model on each
start (tens of seconds).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .aot import stage_signature
from .config import optimize_problem
from .latent import LATENT_SCALE, Prediction, x0_from_prediction

LOG = logging.getLogger(__name__)

MAX_GRAPHS = 8  # captured (shape, tasks) combinations kept (batch sizes 1-4 of two sizes); each holds its memory
# Compiled modes only: VAE GroupNorm statistics from per-channel sums (see _ChannelSumGroupNorm). Read when an
# Accelerator is built. H100 fp16 compile+graph: depth 30.8 -> 27.0 ms, depth+normals 54.3 -> 47.1 ms, accuracy
# against fp32 unchanged (benchmarks/README.md, results/engine_h100_fp16_exp_*.json).
VAE_CHANNEL_SUM_GROUPNORM = True
# cuDNN algorithms tried per convolution shape when benchmarking (0 = all): 27.0 -> 26.4 ms on the same H100.
CUDNN_BENCHMARK_LIMIT = 0


@dataclass(frozen=True)
class FastPaths:
    """Optimisations of the compiled modes on CUDA, each switchable for A/B (bench_engine --fast-paths).

    Read from ``FAST_PATHS`` when an Accelerator is built; ``Accelerator.set_fast_paths`` changes them live."""

    # VAE encoder/decoder scheduled by hand (engine/fused_vae.py: cuDNN convolutions + the Triton passes of
    # engine/vae_kernels.py) instead of torch.compile; needs triton (bundled with CUDA builds of torch)
    fused_vae: bool = True
    subpixel: bool = True  # fused VAE: nearest 2x upsampling + 3x3 conv as one 2x2 sub-pixel convolution (exact)
    vae_attention: str = "gemm"  # fused VAE mid-block attention: "gemm" (fp32 scores, one softmax pass) or "sdpa"
    batch_decode: bool = True  # fused VAE, several tasks sharing it: one decoder call on all their latents
    concurrent_unets: bool = True  # several tasks: their UNets on separate CUDA streams (overlap small kernels)


FAST_PATHS = FastPaths()


@dataclass(frozen=True)
class AccelSettings:
    """What an optimize mode switches on."""

    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False


def parse_optimize(mode: str) -> AccelSettings:
    """Settings for an ``EngineConfig.optimize`` value; an unknown value is an error naming the choices.
    ``auto`` is resolved for a device first (:func:`resolve_optimize`); here it only passes the check."""
    problem = optimize_problem(mode)
    if problem:
        raise ValueError(f"{problem} (node parameter optimize, EngineConfig.optimize)")
    key = (mode or "none").strip().lower()
    return AccelSettings(channels_last=key not in ("none", "auto"), compile="compile" in key,
                         cuda_graph="graph" in key)


def resolve_optimize(mode: str, device: torch.device) -> str:
    """The mode to run: ``auto`` is the fastest one the device has: compile+graph on CUDA, and on the CPU
    none, the official eager path (compiling the full model there costs minutes for little gain). Any other mode
    is kept as given."""
    key = (mode or "none").strip().lower()
    if key != "auto":
        return key
    return "compile+graph" if device.type == "cuda" else "none"


class _Stage:
    """A network stage with an eager form and a fast form: torch.compile of the eager form (``compiled``), an AOT
    package per input signature (aot.py, loaded on first use), or a hand-scheduled form (``fast``, the fused VAE).
    A compiler failure falls back to eager once.

    Serve while compiling (serving.py): while ``gated``, a call runs the fast form only for input shapes in
    ``ready`` and the eager form otherwise, so a frame never waits for a compiler; the builder thread runs the fast
    form itself (inside :func:`building`) and adds the shapes it completed to ``ready``.
    """

    def __init__(self, name: str, eager: Callable[..., torch.Tensor], compiled: bool,
                 fast: Callable[..., torch.Tensor] | None = None) -> None:
        self.name = name
        self.eager = eager
        self.fn = torch.compile(eager, dynamic=False) if compiled else (fast or eager)
        self.compiled = compiled
        self.error: str | None = None
        self.aot: dict[tuple, Callable[..., torch.Tensor]] = {}  # input signature -> loaded AOT package (aot.py)
        self.aot_paths: dict[tuple, Any] = {}  # input signature -> package path, loaded on first use
        self.aot_failed: set[tuple] = set()
        self.owner: Any = None  # the module whose parameters a package gets as its weights (aot.index_packages)
        self.gated = False
        self.ready: set[tuple] = set()  # input shapes whose fast form is built (read while gated)

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.gated:
            key = shape_key(args)
            if not _BUILD.active:
                if key in self.ready:
                    return self.run_fast(*args)
                return self.eager(*args)
            out = self.run_fast(*args)
            self.ready.add(key)  # built and run once: serving may use it from the next call on
            return out
        return self.run_fast(*args)

    def run_fast(self, *args: Any) -> torch.Tensor:
        """The fast form: an AOT package for this signature, else the compiled (or hand-scheduled) function."""
        if self.aot_paths:
            signature = stage_signature(args)
            runner = self.aot.get(signature)
            if runner is None and signature in self.aot_paths and signature not in self.aot_failed:
                runner = self._load_package(signature)
            if runner is not None:
                return runner(*args)
        if self.fn is self.eager:
            return self.eager(*args)
        if self.compiled:
            mark_batch_dynamic(args)
        try:
            return self.fn(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep serving frames eagerly
            self.error = f"{type(exc).__name__}: {exc}"
            LOG.warning("torch.compile failed for the %s stage (%s); running it eagerly", self.name,
                        self.error.splitlines()[0][:300])
            self.fn = self.eager
            return self.eager(*args)

    def _load_package(self, signature: tuple) -> Callable[..., torch.Tensor] | None:
        """Load (after a check in a child process, aot.py) the package for ``signature``; None, logged, when it
        cannot be used: the stage then compiles as usual."""
        from .aot import load_stage_package

        path = self.aot_paths[signature]
        runner = load_stage_package(path, self.owner)
        if runner is None:
            self.aot_failed.add(signature)
            return None
        self.aot[signature] = runner
        return runner


class _BuildFlag(threading.local):
    active = False


_BUILD = _BuildFlag()


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Calls of gated stages on this thread build and run their fast form (the serve-while-compiling builder)."""
    was = _BUILD.active
    _BUILD.active = True
    try:
        yield
    finally:
        _BUILD.active = was


def shape_key(args: Sequence[Any]) -> tuple:
    """Shapes of a stage call's tensor arguments: what a built fast form is ready for."""
    return tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))


def mark_batch_dynamic(args: Sequence[Any]) -> None:
    """Compile one graph for every batch size >= 2 (several cameras): dim 0 of a compiled stage's tensor
    inputs is symbolic from batch 2 on, so batch 3 and 4 reuse batch 2's code instead of compiling again (tiny model,
    CPU, batch sizes 1-4: 6 compiled graphs instead of 12). Batch 1 keeps its own static graph, as dynamo always
    specialises sizes 0 and 1; height and width stay static. CUDA graphs are still captured per batch size."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] >= 2:
            torch._dynamo.mark_dynamic(arg, 0)


@dataclass
class _CapturedFrame:
    """One CUDA graph for a fixed input shape and task set, with its static input and outputs on the device."""

    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: dict[str, torch.Tensor]


class Accelerator:
    """Runs ``GeoDiffEngine``'s single-step forward (docs/method.md#single-step-forward) faster; built by the engine
    when optimize != none.

    ``use_cuda_graph`` may be switched at run time (e.g. off when input sizes change every frame).
    """

    def __init__(self, engine: Any, mode: str) -> None:
        self.engine = engine
        self.mode = mode
        self.settings = parse_optimize(mode)
        self.device: torch.device = engine.device
        is_cuda = self.device.type == "cuda"
        if self.settings.cuda_graph and not is_cuda:
            LOG.warning("optimize=%s: CUDA graphs need a CUDA device, running %s without them", mode, self.device)
        self.use_cuda_graph = self.settings.cuda_graph and is_cuda
        self.graph_error: str | None = None
        self._graphs: OrderedDict[tuple, _CapturedFrame] = OrderedDict()
        self._host: dict[tuple, torch.Tensor] = {}
        self._timesteps: dict[tuple[int, int], torch.Tensor] = {}
        self._lock = threading.Lock()
        if is_cuda and self.settings.channels_last:
            # Static shapes: cuDNN tries its algorithms once per convolution shape and keeps the fastest.
            # Process-wide settings: other models in this process benchmark their convolutions too.
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.benchmark_limit = CUDNN_BENCHMARK_LIMIT
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        self._memory_format = memory_format
        vaes: dict[str | None, Any] = {None: engine.vae, **engine._extra_vaes}
        for vae in vaes.values():
            vae.to(memory_format=memory_format)
        for model in engine.models.values():
            model.unet.to(memory_format=memory_format)
        compiled = self.settings.compile
        self.channel_sum_groupnorm = compiled and VAE_CHANNEL_SUM_GROUPNORM
        if self.channel_sum_groupnorm:
            for vae in vaes.values():
                for module in vae.modules():
                    if type(module) is torch.nn.GroupNorm:
                        module.__class__ = _ChannelSumGroupNorm
        self.encoders = {key: _Stage(f"vae-encoder[{key or 'shared'}]", _encoder_fn(vae), compiled)
                         for key, vae in vaes.items()}
        self.decoders = {key: _Stage(f"vae-decoder[{key or 'shared'}]", _decoder_fn(vae), compiled)
                         for key, vae in vaes.items()}
        self.unets = {task: _Stage(f"unet[{task}]", _unet_fn(model.unet), compiled)
                      for task, model in engine.models.items()}
        self._vaes = vaes
        self._compiled_vae_stages = (self.encoders, self.decoders)
        self.fast_paths = FastPaths(fused_vae=False, batch_decode=False, concurrent_unets=False)
        self.fast_path_error: str | None = None
        self._streams: dict[str, torch.cuda.Stream] = {}
        if compiled and is_cuda:
            self.set_fast_paths(FAST_PATHS)
        self.aot_packages = 0
        self.compile_cache_dir = None
        # Serve while compiling (serving.PathBuilder): it captures the CUDA graphs (never on demand then) and is
        # told of every frame shape a call meets.
        self.builder: Any = None
        if compiled:
            from .aot import index_packages
            from .startup import prepare_compile

            # geodiff_compile's packages: found now (their JSON sidecars), each loaded on its stage's first call
            # with that input signature, after a check in a child process (aot.py): a package never takes the
            # process down. A hand-scheduled (fused) VAE stage is not compiled and gets none (aot._stages).
            self.aot_packages = index_packages(self)
            # Persistent per-user kernel cache; compile workers only if some stage may still compile.
            self.compile_cache_dir = prepare_compile(self.device, start_workers=not self.all_stages_aot())

    # ---------------------------------------------------------------- stages (docs/method.md#single-step-forward)

    def preprocess(self, u8_nhwc: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] uint8 on device -> [B,3,h,w] in [-1,1], engine dtype and memory format (resize, normalise)."""
        x = self.engine.preprocess(u8_nhwc.permute(0, 3, 1, 2))
        return x.contiguous(memory_format=self._memory_format)

    def encode(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Image latent [B,4,h/8,w/8] (posterior mean x 0.18215), with the task's own VAE when it has one."""
        return self.encoders[self._vae_key(task)](x)

    def denoise(self, task: str, z_img: torch.Tensor) -> torch.Tensor:
        """x0 from one UNet call at t = T-1 on a zero target latent, as core.denoise_single_step."""
        model = self.engine.models[task]
        t = model.scheduler.config.num_train_timesteps - 1  # 999
        z_t = torch.zeros_like(z_img)
        x = torch.cat([z_img, z_t], dim=1).contiguous(memory_format=self._memory_format)  # [B,8,h,w]
        context = self.engine.empty_embedding.expand(z_img.shape[0], -1, -1)  # [B,2,C]
        pred = self.unets[task](x, self._timestep(t, z_img.shape[0]), context)  # [B,4,h,w]
        return x0_from_prediction(pred, z_t, model.scheduler.alphas_cumprod[t], model.scheduler.config.prediction_type)

    def decode(self, z0: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """[B,4,h/8,w/8] -> [B,3,h',w'] decoder output."""
        return self.decoders[self._vae_key(task)](z0)

    def postprocess(self, task: str, y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder output -> contiguous depth [B,H,W] or normals [B,H,W,3] (core's post-processing)"""
        if task == "depth":
            return self.engine.postprocess_depth(y, size).contiguous()
        frame = self.engine.models[task].normals_frame
        return self.engine.postprocess_normals(y, size, frame).contiguous()

    def compute(self, u8_nhwc: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """The whole frame on the device: uint8 [B,H,W,3] -> {task: float32 output}; each frame encoded once."""
        size = (u8_nhwc.shape[1], u8_nhwc.shape[2])
        x = self.preprocess(u8_nhwc)
        if len(tasks) > 1 and (self.fast_paths.batch_decode or self.fast_paths.concurrent_unets):
            return _compute_tasks_together(self, x, tasks, size)
        latents: dict[str | None, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for task in tasks:
            key = self._vae_key(task)
            if key not in latents:
                latents[key] = self.encoders[key](x)
            y = self.decoders[key](self.denoise(task, latents[key]))
            out[task] = self.postprocess(task, y, size)
        return out

    # ---------------------------------------------------------------- host interface

    def forward(self, batch: np.ndarray, tasks: Sequence[str]) -> Prediction:
        """[B,H,W,3] uint8 frames -> Prediction with host float32 arrays (called by GeoDiffEngine._forward)."""
        tasks = tuple(tasks)
        with self._lock, torch.inference_mode():
            if self.device.type != "cuda":
                self._note(batch.shape, tasks)
                out = self.compute(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device), tasks)
                return Prediction(**{task: value.numpy().copy() for task, value in out.items()})
            device_out, _ = self._run_cuda(batch, tasks)
            host_out = {}
            for task, value in device_out.items():  # one device-to-host copy per output
                host_out[task] = self._host_buffer(("out", task), value.shape, value.dtype)
                host_out[task].copy_(value, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return Prediction(**{task: value.numpy().copy() for task, value in host_out.items()})

    def forward_device(self, batch: np.ndarray, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """As :meth:`forward`, but the outputs stay on the device: tensors of their own (a CUDA graph's static
        outputs are copied, the next replay overwrites them), complete when this returns (the ROS node
        post-processes them on another stream while the next frame runs)."""
        tasks = tuple(tasks)
        with self._lock, torch.inference_mode():
            if self.device.type != "cuda":
                self._note(batch.shape, tasks)
                return self.compute(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device), tasks)
            device_out, static = self._run_cuda(batch, tasks)
            if static:
                device_out = {task: value.clone() for task, value in device_out.items()}
            torch.cuda.current_stream(self.device).synchronize()
            return device_out

    def _run_cuda(self, batch: np.ndarray, tasks: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], bool]:
        """Upload through the pinned buffer and run the frame (graph replay when captured); the outputs and
        whether they are a graph's static buffers. Asynchronous: the caller synchronises."""
        self._note(batch.shape, tasks)
        host_in = self._host_buffer(("in",), batch.shape, torch.uint8)
        np.copyto(host_in.numpy(), batch)
        if self.use_cuda_graph:
            frame = self._captured(host_in, tasks) if self.builder is None else self._graphs.get(
                (tuple(host_in.shape), tasks))
            if frame is not None:
                frame.static_in.copy_(host_in, non_blocking=True)
                frame.graph.replay()
                return frame.static_out, True
        return self.compute(host_in.to(self.device, non_blocking=True), tasks), False

    def all_stages_aot(self) -> bool:
        """Whether every stage in use that torch.compile would compile has at least one AOT package (then nothing
        is likely to compile; a hand-scheduled stage needs none)."""
        return all(stage.aot_paths for stage in self.stages() if stage.compiled)

    def stages(self) -> list[_Stage]:
        """The network stages in use (encoders, UNets, decoders)."""
        return [*self.encoders.values(), *self.unets.values(), *self.decoders.values()]

    @property
    def aot_loaded(self) -> int:
        """AOT packages loaded so far (each on its stage's first call with its input signature)."""
        return sum(len(stage.aot) for stage in self.stages())

    def gate(self, on: bool) -> None:
        """Serve while compiling: while on, each stage runs its fast form only for input shapes it was built for
        (``_Stage.ready``), the eager form otherwise (serving.PathBuilder)."""
        for stage in {id(s): s for s in (*self.stages(), *self._compiled_vae_stages[0].values(),
                                         *self._compiled_vae_stages[1].values())}.values():
            stage.gated = on

    def stage_errors(self) -> dict[str, str]:
        """Compiler or capture failures that made a stage fall back (empty when everything runs as asked)."""
        errors = {s.name: s.error for s in (*self.encoders.values(), *self.unets.values(),
                                            *self.decoders.values()) if s.error}
        if self.graph_error:
            errors["cuda-graph"] = self.graph_error
        if self.fast_path_error:
            errors["fast-paths"] = self.fast_path_error
        return errors

    def set_fast_paths(self, paths: FastPaths) -> FastPaths:
        """Switch the CUDA fast paths (captured graphs are dropped); returns what is in effect: the fused
        VAE stays off, with the reason in stage_errors(), where triton or the VAE's layers do not allow it. AOT
        packages are attached once, at construction, to the stages then in use: a compiled VAE switched on later
        compiles (or uses the packages it had)."""
        with self._lock:
            self._graphs.clear()
            self.encoders, self.decoders = self._compiled_vae_stages
            self.fast_path_error = None
            fused = paths.fused_vae
            if fused:
                try:
                    self.encoders, self.decoders = _fused_vae_stages(self._vaes, paths)
                except Exception as exc:  # noqa: BLE001 - no triton, or a VAE layer the schedule does not cover
                    self.fast_path_error = f"fused VAE unavailable: {type(exc).__name__}: {exc}"
                    LOG.warning("%s; the VAE runs compiled", self.fast_path_error)
                    fused = False
            cuda = self.device.type == "cuda"
            self.fast_paths = FastPaths(fused_vae=fused, subpixel=paths.subpixel, vae_attention=paths.vae_attention,
                                        batch_decode=paths.batch_decode and fused,
                                        concurrent_unets=paths.concurrent_unets and cuda)
            return self.fast_paths

    # ---------------------------------------------------------------- helpers

    def _note(self, shape: tuple, tasks: tuple[str, ...]) -> None:
        """Tell the builder (serve while compiling) about a frame shape it has not planned: it builds it next."""
        builder = self.builder
        if builder is not None:
            builder.note(tuple(shape[:3]), tasks)

    def _vae_key(self, task: str | None) -> str | None:
        return task if task in self.encoders else None

    def _timestep(self, t: int, batch: int) -> torch.Tensor:
        """t as a device tensor [B] (int64, as the UNet builds it from an int) so no host copy runs per call."""
        key = (t, batch)
        if key not in self._timesteps:
            self._timesteps[key] = torch.full((batch,), t, dtype=torch.int64, device=self.device)
        return self._timesteps[key]

    def _host_buffer(self, key: tuple, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer reused across frames of the same shape (page-locked: asynchronous DMA)."""
        full_key = (*key, tuple(shape), dtype)
        if full_key not in self._host:
            self._host[full_key] = torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
        return self._host[full_key]

    def _captured(self, host_in: torch.Tensor, tasks: tuple[str, ...]) -> _CapturedFrame | None:
        """The CUDA graph for this input shape and task set, captured on first use (None if capture failed)."""
        key = (tuple(host_in.shape), tasks)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        try:
            frame = self._capture(host_in, tasks)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - capture is an optimisation: fall back to plain launches
            torch.cuda.synchronize(self.device)
            self.graph_error = f"{type(exc).__name__}: {exc}"
            self.use_cuda_graph = False
            LOG.warning("CUDA graph capture failed (%s); running without graphs", self.graph_error[:300])
            return None
        self._graphs[key] = frame
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return frame

    def capture(self, host_in: torch.Tensor, tasks: tuple[str, ...]) -> None:
        """Capture the CUDA graph of this input shape and task set now (the serve-while-compiling builder; frames
        wait on the lock meanwhile, a fraction of a second). A failure turns graphs off, as on demand."""
        with self._lock, torch.inference_mode():
            self._captured(host_in, tasks)

    def _capture(self, host_in: torch.Tensor, tasks: tuple[str, ...]) -> _CapturedFrame:
        static_in = host_in.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compile, cuDNN algorithm search and lazy init happen here
            for _ in range(2):
                self.compute(static_in, tasks)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the node's post-processing stream) may launch, allocate and synchronise
        # while this thread captures; only this thread's own unsafe calls would break the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.compute(static_in, tasks)
        LOG.info("captured a CUDA graph for input %s, tasks %s", tuple(host_in.shape), tasks)
        return _CapturedFrame(graph, static_in, static_out)


class _ChannelSumGroupNorm(torch.nn.GroupNorm):
    """GroupNorm with statistics from per-channel sums over the image, then summed per group (fp32, two passes).

    The maths of torch's group_norm (fp32 statistics, biased variance), summed in another order. In channels_last a
    group's 4 channels are 8-byte pieces 256 bytes apart, and inductor's per-group reduction of them ran far below
    memory bandwidth on the VAE's full-resolution maps (benchmarks/README.md); a per-channel reduction reads whole
    pixel rows. Used only inside compiled or exported graphs: called eagerly (the path that serves while they
    compile) it is torch's fused native op, which launches far fewer kernels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)
        b, c = x.shape[:2]
        per_group = c // self.num_groups
        dims = tuple(range(2, x.dim()))
        view = (b, c) + (1,) * len(dims)
        count = per_group * x[0, 0].numel()
        xf = x.float()
        mean = xf.sum(dim=dims).view(b, self.num_groups, per_group).sum(-1) / count  # [B,G]
        centred = xf - mean.repeat_interleave(per_group, dim=1).view(view)
        var = (centred * centred).sum(dim=dims).view(b, self.num_groups, per_group).sum(-1) / count  # [B,G]
        y = centred * torch.rsqrt(var + self.eps).repeat_interleave(per_group, dim=1).view(view)
        if self.affine:
            y = y * self.weight.float().view(1, c, *(1,) * len(dims)) + self.bias.float().view(1, c, *(1,) * len(dims))
        return y.to(x.dtype)


def _fused_vae_stages(vaes: dict[str | None, Any], paths: FastPaths) -> tuple[dict, dict]:
    """Encoder and decoder stages of the hand-scheduled VAE (fused_vae.py), one per distinct VAE."""
    from .fused_vae import FusedVAE
    from .vae_kernels import TritonOps

    ops = TritonOps()
    fused = {key: FusedVAE(vae, ops, subpixel=paths.subpixel, attention=paths.vae_attention)
             for key, vae in vaes.items()}
    # The fused form is the fast one; the plain VAE serves while it is built (its first call JIT-compiles the
    # Triton kernels and searches cuDNN algorithms: seconds, which serve-while-compiling keeps off frames).
    encoders = {key: _Stage(f"vae-encoder[{key or 'shared'}, fused]", _encoder_fn(vaes[key]), False, fast=f.encode)
                for key, f in fused.items()}
    decoders = {key: _Stage(f"vae-decoder[{key or 'shared'}, fused]", _decoder_fn(vaes[key]), False, fast=f.decode)
                for key, f in fused.items()}
    return encoders, decoders


def _compute_tasks_together(acc: Accelerator, x: torch.Tensor, tasks: Sequence[str],
                            size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Several tasks on one preprocessed batch: the UNets on separate CUDA streams (concurrent_unets) and one
    decoder call per VAE on the tasks' latents stacked along the batch (batch_decode). Same results as one task at
    a time up to kernel choice (the decoder is per-sample; GroupNorm statistics are per sample)."""
    paths = acc.fast_paths
    latents: dict[str | None, torch.Tensor] = {}
    for task in tasks:
        key = acc._vae_key(task)
        if key not in latents:
            latents[key] = acc.encoders[key](x)
    z0: dict[str, torch.Tensor] = {}
    if paths.concurrent_unets and x.device.type == "cuda":
        main = torch.cuda.current_stream(x.device)
        for i, task in enumerate(tasks):
            if i == 0:
                continue
            if task not in acc._streams:
                acc._streams[task] = torch.cuda.Stream(x.device)
            stream = acc._streams[task]
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                z0[task] = acc.denoise(task, latents[acc._vae_key(task)])
        z0[tasks[0]] = acc.denoise(tasks[0], latents[acc._vae_key(tasks[0])])
        for task in tasks[1:]:
            # Join: what follows on this stream (and, through the wait at the next call, on the side streams) is
            # ordered after the side UNets, so the blocks they allocated or read are not reused early.
            main.wait_stream(acc._streams[task])
    else:
        for task in tasks:
            z0[task] = acc.denoise(task, latents[acc._vae_key(task)])
    out: dict[str, torch.Tensor] = {}
    groups: dict[str | None, list[str]] = {}
    for task in tasks:
        groups.setdefault(acc._vae_key(task), []).append(task)
    for key, group in groups.items():
        if paths.batch_decode and len(group) > 1:
            y = acc.decoders[key](torch.cat([z0[t] for t in group]))  # [T*B,3,h,w]
            for task, y_task in zip(group, y.chunk(len(group)), strict=True):
                out[task] = acc.postprocess(task, y_task, size)
        else:
            for task in group:
                out[task] = acc.postprocess(task, acc.decoders[key](z0[task]), size)
    return {task: out[task] for task in tasks}


def _encoder_fn(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """encoder -> quant_conv -> posterior mean (first half of the moments) x 0.18215, as AutoencoderKL.encode."""
    channels = vae.config.latent_channels

    def encode(x: torch.Tensor) -> torch.Tensor:
        moments = vae.encoder(x)  # [B,2*4,h/8,w/8]
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        return moments[:, :channels] * LATENT_SCALE  # [B,4,h/8,w/8]

    return encode


def _decoder_fn(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """latent / 0.18215 -> post_quant_conv -> decoder, as AutoencoderKL.decode without tiling or slicing."""

    def decode(z0: torch.Tensor) -> torch.Tensor:
        z = z0 / LATENT_SCALE
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)  # [B,3,8h,8w]

    return decode


def _unet_fn(unet: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]  # [B,4,h,w]

    return run
