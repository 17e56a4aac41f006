"""The ``geodiff`` lifecycle node: camera images in; depth, normals, metric point clouds and diagnostics out.

Topics of one camera (relative, so namespaces and remaps work; ros-anchors 5):
  in   image (Image) or image/compressed (CompressedImage, by ``input_transport``), camera_info,
       sparse_depth (Image 32FC1 m / 16UC1 mm), sparse_points (PointCloud2 in the camera optical frame)
  out  depth/relative (32FC1 affine-invariant), depth/image (32FC1 metres, NaN invalid; only with a metric
       scale), depth/camera_info, depth/image_vis (rgb8), normals/image (32FC3 optical frame),
       normals/image_vis (rgb8), points (PointCloud2, only while subscribed), /diagnostics

Several cameras, one model (issue 7): with ``cameras: [front, left]`` every topic above moves under the camera's
prefix (front/image, front/depth/image, front/points, ...); each camera has its own CameraInfo, sparse depth,
aligner, counters and /diagnostics status (camera.py). With ``cameras: []`` the node is the single-camera node.

Threading: subscription callbacks only store messages (newest image in a per-camera one-slot mailbox, latest
CameraInfo, a small ring buffer of sparse depth). Two worker threads form a pipeline (issue 14): the ENGINE thread
takes the frames that are ready (fairly, the longest-waiting camera first; scheduler.py), decodes them and runs
them through the engine in one call (same-size frames share a network pass); the POST thread aligns, builds the
colour views and the cloud (in torch on the engine's device) and publishes per camera. So frame N+1 runs through
the network while frame N is post-processed; a one-slot hand-off between them (scheduler.Handoff) keeps at most
one finished frame waiting, so nothing stale piles up. The executor thread stays free for parameter and lifecycle
services during inference (ros-anchors 0.3). The two threads live from the first activation until cleanup or
shutdown; deactivate only pauses them, so however often the node is cycled there is one pipeline (issue 13 bug 3).
Every output header is the input image's header (same stamp and optical frame_id; REP 118, ros-anchors 2.2), so
outputs of different cameras never mix.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from geodiff_ros.ros.camera import CameraChannel
from geodiff_ros.ros.conversions import ImageConversionError
from geodiff_ros.ros.diagnostics import PipelineStats, build_status
from geodiff_ros.ros.param_requests import apply_requests_whole
from geodiff_ros.ros.params import (
    Settings,
    camera_override_key,
    camera_overrides,
    declare_all,
    declare_camera_overrides,
    engine_config_kwargs,
    name_launch_arguments,
    read_settings,
    validate_changes,
)
from geodiff_ros.ros.qos import DIAGNOSTICS_QOS, make_qos
from geodiff_ros.ros.scheduler import BatchStats, FrameScheduler, Handoff
from geodiff_ros.ros.shutdown import ShutdownRequest

__all__ = ["GeoDiffNode", "main"]

NODE_NAME = "geodiff"
_THROTTLE_S = 5.0  # per-frame warnings at most this often
_JOIN_TIMEOUT_S = 1.5  # shutdown must finish within 2 s (issue 3)
_POLL_S = 0.05  # executor spin slice of the main loop: how soon a shutdown request is acted on


class _LoadAbandoned(BaseException):
    """Raised by the signal handler into an engine load in progress: the process is shutting down. A
    BaseException (like KeyboardInterrupt) so that no ``except Exception`` in the loading libraries swallows it."""


def _is_engine_error(err: BaseException) -> bool:
    """Whether ``err`` is a ``geodiff_ros.engine.GeoDiffError`` (its message already names the fix). Checked without
    importing the engine: when importing it is what failed, that error must still be reported."""
    errors = sys.modules.get("geodiff_ros.engine.errors")
    return errors is not None and isinstance(err, errors.GeoDiffError)

_WORKER_POLL_S = 0.2  # worker threads re-check their stop flag this often while idle


class _WarmUpStopped(Exception):
    """The node is shutting down during its warm-up."""


@dataclass
class _Frame:
    """One camera frame between the engine and the post-processing thread."""

    cam: CameraChannel
    msg: Any  # the input message (its header goes on every output)
    t_recv: float  # monotonic receive time
    rgb: Any  # [H,W,3] uint8 decoded input (host)
    relative: Any = None  # [H,W] torch tensor on the engine's device, or None
    normals: Any = None  # [H,W,3] torch tensor on the engine's device, or None
    camera: Any = None  # (CameraInfo, intrinsics) of rgb (DecodedFrame.camera: reduced or rectified input)


@dataclass
class _Batch:
    """The frames of one engine call, tagged with the activation they belong to."""

    epoch: int
    frames: list[_Frame]


class GeoDiffNode(LifecycleNode):
    """Lifecycle node: ``configure`` loads the engine, ``activate`` subscribes and starts the worker."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declare_all(self)
        initial = read_settings(self)
        reason = validate_changes(initial.values, {}, configured=False)
        if reason:
            msg = f"invalid parameter: {reason}"
            raise ValueError(msg)
        self._settings: Settings = initial
        self._cams: list[CameraChannel] = []
        self._build_cameras(initial.cameras())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        apply_requests_whole(self)  # a set_parameters request of several parameters is validated as one change

        self._engine: Any = None
        self._batch_stats = BatchStats()
        self._loading = False  # main thread only: an engine load is in progress (see request_shutdown)
        # The pipeline threads (engine, post), their stop flag, and what pauses them (see the module docstring).
        self._threads: list[threading.Thread] = []
        self._quit = threading.Event()
        self._active = threading.Event()
        self._epoch = 0  # +1 on every activate/deactivate: frames of an earlier activation are never published
        self._handoff = Handoff()
        self._warm_status = ""  # 'warming up' / 'compiling (stage k of n: ..., {elapsed} s)' during the warm-up
        self._warm_start = 0.0
        self._state_label = "unconfigured"
        self._input_group = ReentrantCallbackGroup()  # callbacks only touch locked containers

        # Diagnostics run in every state, so a node that failed to configure still says why.
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", DIAGNOSTICS_QOS)
        self._diag_timer = self.create_timer(float(initial["diagnostics_period"]), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())

    def _build_cameras(self, names: list[str]) -> None:
        """One channel per camera (one unnamed channel for ``cameras: []``) and their per-camera parameters."""
        declare_camera_overrides(self, names)
        overrides = camera_overrides(self, names)
        self._cams = [CameraChannel(self, name, i) for i, name in enumerate(names or [""])]
        for cam in self._cams:
            cam.overrides = overrides.get(cam.name, {})
        self._sched = FrameScheduler(len(self._cams))

    @property
    def _stats(self) -> PipelineStats:
        """The first camera's counters (the only ones of a single-camera node)."""
        return self._cams[0].stats

    @property
    def _multi(self) -> bool:
        return bool(self._cams[0].name)

    # ------------------------------------------------------------------ parameters

    def _current_values(self) -> dict[str, Any]:
        values = dict(self._settings.values)
        for cam in self._cams:
            values.update({f"camera.{cam.name}.{k}": v for k, v in cam.overrides.items()})
        return values

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Validate a set request (ranges were already checked by rclpy); the reason goes back to the caller."""
        changes = {p.name: p.value for p in params}
        reason = validate_changes(changes, self._current_values(), configured=self._engine is not None)
        if reason:
            self.get_logger().warning(f"rejected parameter change: {reason}")
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _after_set_parameters(self, params: list[Any]) -> None:
        values = dict(self._settings.values)
        values.update({p.name: p.value for p in params if p.name in values})
        self._settings = Settings(values)
        by_name = {cam.name: cam for cam in self._cams}
        for p in params:
            key = camera_override_key(p.name)
            if key is None or key[0] not in by_name:
                continue
            cam = by_name[key[0]]
            overrides = {k: v for k, v in cam.overrides.items() if k != key[1]}
            if p.value is not None:
                overrides[key[1]] = p.value
            cam.overrides = overrides  # replaced whole: the worker reads it without a lock
            if key[1].startswith("alignment.") and key[1] != "alignment.sparse_max_dt":
                cam.aligner_dirty = True
        if any(p.name.startswith("alignment.") and p.name != "alignment.sparse_max_dt" for p in params):
            for cam in self._cams:
                cam.aligner_dirty = True  # rebuilt by the worker, which owns the aligners

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the engine and create publishers; FAILURE (back to unconfigured) with the fix in the log."""
        settings = self._settings
        if settings.cameras() != [cam.name for cam in self._cams if cam.name]:
            self._build_cameras(settings.cameras())  # `cameras` was changed while unconfigured
        kwargs = engine_config_kwargs(settings)
        self.get_logger().info(
            f'loading engine: depth={kwargs["depth_model"]!r} normals={kwargs["normals_model"]!r} '
            f'device={kwargs["device"]} dtype={kwargs["dtype"]} processing_res={kwargs["processing_res"]} '
            f'optimize={kwargs["optimize"]}')
        try:
            engine = self._load_engine(kwargs)
        except _LoadAbandoned:
            self.get_logger().info("configure abandoned: the process is shutting down")
            return TransitionCallbackReturn.FAILURE
        except Exception as err:  # noqa: BLE001 - any loader failure must leave the node alive and unconfigured
            if _is_engine_error(err):
                self._set_error(str(err))
                self.get_logger().error(name_launch_arguments(f"configure failed: {err}"))
                return TransitionCallbackReturn.FAILURE
            self._set_error(f"{type(err).__name__}: {err}")
            self.get_logger().error(name_launch_arguments(
                f"configure failed while loading the model ({type(err).__name__}: {err}); check model_depth / "
                "model_normals (hub id or folder in hub layout), device and dtype"))
            return TransitionCallbackReturn.FAILURE
        if str(engine.device) != kwargs["device"]:
            # CPU fallback: `ros2 param get <node> device` shows the device in use (set while still unconfigured:
            # device is fixed once configured).
            self.set_parameters([Parameter("device", value=str(engine.device))])
        self._engine = engine
        optimize = self._engine.optimize  # 'auto' resolved for the device
        self.get_logger().info(f'engine ready: tasks {self._engine.tasks} on {self._engine.device} '
                               f'({str(self._engine.dtype).replace("torch.", "")}, optimize {optimize})')
        if optimize != "none":
            # Not warmed up here: a cold compile takes minutes and would hold the lifecycle transition; the engine
            # thread warms up on activation (warmup_size) and compiles any other input size on its first frame.
            acc = self._engine.accelerator
            aot = getattr(acc, "aot_loaded", 0)
            cache = getattr(acc, "compile_cache_dir", None)
            self.get_logger().info(
                f"optimize={optimize}: the warm-up on activation compiles or captures (progress in /diagnostics); "
                "other input sizes do so on their first frame" + (f"; compiled kernels cached in {cache}" if cache
                                                                  else "")
                + (f"; {aot} stage(s) load AOT packages (geodiff_compile)" if aot else ""))
        out_qos = make_qos(settings["qos.output.reliability"], settings["qos.output.depth"])
        for cam in self._cams:
            cam.create_publishers(out_qos, self._engine.tasks)
            cam.aligner = cam.make_aligner(settings.for_camera(cam.overrides))
        if self._multi:
            self.get_logger().info(
                f'serving {len(self._cams)} cameras ({", ".join(c.name for c in self._cams)}) with one model, '
                f'up to {settings["batch_size"]} frames per engine call')
        self._state_label = "inactive"
        return super().on_configure(state)

    def request_shutdown(self) -> None:
        """Called from the signal handler (main thread, between two bytecodes) when the process is to exit: an
        engine load in progress on the main thread is abandoned by raising ``_LoadAbandoned`` into it."""
        if self._loading:
            self._loading = False
            raise _LoadAbandoned

    def _load_engine(self, kwargs: dict[str, Any]) -> Any:
        """Import and build the engine; a shutdown signal meanwhile abandons it (issue 13, bug 7).

        Loading takes seconds (tiny model) to minutes (real weights from a slow disk), and SIGTERM meanwhile must
        still end the process within 2 s. The load runs on the calling thread (the main thread: autostart, and
        the executor, which spins there too): on another thread, torch's CPU kernels ran 4-5x slower in the
        worker afterwards (measured; the CPU thread pools are set up by the first thread that computes). Python
        runs signal handlers on the main thread between bytecodes, so :meth:`request_shutdown` can raise into the
        load; a load started from another thread just finishes.
        """
        on_main = threading.current_thread() is threading.main_thread()
        try:
            self._loading = on_main
            from geodiff_ros.engine import EngineConfig, GeoDiffEngine

            return GeoDiffEngine(EngineConfig(**kwargs))
        finally:
            self._loading = False

    def _set_error(self, text: str) -> None:
        for cam in self._cams:
            cam.stats.last_error = text

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the inputs and start the worker thread."""
        s = self._settings
        in_qos = make_qos(s["qos.input.reliability"], s["qos.input.depth"])
        for cam in self._cams:
            cam.subscribe(s["input_transport"], in_qos, self._input_group, self._sched.put)
        self._state_label = "active"
        self._sched.reopen()
        self._epoch += 1
        self._active.set()
        self._start_worker()
        self.get_logger().info(
            f'active: listening on {", ".join(cam.subs[0].topic_name for cam in self._cams)} '
            f'({s["input_transport"]}, {s["qos.input.reliability"]}); outputs {s["qos.output.reliability"]}')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Pause the pipeline (a frame in flight is finished and discarded, never waited for) and unsubscribe."""
        self._pause_worker()
        for cam in self._cams:
            cam.unsubscribe()
        self._state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release publishers and the engine (GPU memory)."""
        self._stop_worker()
        self._release()
        self._state_label = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop()
        self._state_label = "finalized"
        return super().on_shutdown(state)

    def _release(self) -> None:
        for cam in self._cams:
            cam.destroy_publishers()
            cam.aligner = None
            cam.reset_inputs()
        self._engine = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def stop(self) -> None:
        """Stop the worker and drop subscriptions (process exit); safe to call twice."""
        self._stop_worker()
        for cam in self._cams:
            cam.unsubscribe()

    def _start_worker(self) -> None:
        """Start the pipeline threads unless they run (paused by a deactivate, they simply resume)."""
        if self._threads and all(t.is_alive() for t in self._threads) and not self._quit.is_set():
            return
        for old in self._threads:  # stopped by a cleanup but still finishing an engine call: never two pipelines
            old.join(30.0)
            if old.is_alive():
                self.get_logger().error(f"{old.name} is still in an engine call after 30 s; starting anyway")
        self._quit = threading.Event()  # a new flag: a thread that outlived its stop keeps its own, set one
        engine = self._engine
        self._handoff = Handoff()
        self._threads = [
            threading.Thread(target=self._engine_main, args=(engine, self._quit), name="geodiff-engine",
                             daemon=True),
            threading.Thread(target=self._post_main, args=(engine, self._quit), name="geodiff-post", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pause_worker(self) -> None:
        self._active.clear()
        self._epoch += 1
        self._sched.close()
        self._handoff.clear()

    def _stop_worker(self) -> None:
        """Stop the pipeline threads, waiting at most _JOIN_TIMEOUT_S in all (an engine call may run longer: the
        thread then ends after it, publishing nothing)."""
        self._pause_worker()
        self._quit.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    # ------------------------------------------------------------------ worker threads

    def _engine_main(self, engine: Any, quit_: threading.Event) -> None:
        """Engine thread: warm up, then decode -> engine call for the frames that are ready, hand them on."""
        self._warm_up(engine, quit_)
        while not quit_.is_set():
            if not self._active.wait(_WORKER_POLL_S) or not self._handoff.wait_free(_WORKER_POLL_S):
                continue
            s = self._settings
            window = float(s["batch_window_s"]) if self._multi else 0.0
            picked = self._sched.take(int(s["batch_size"]), window, timeout=_WORKER_POLL_S)
            if not picked or quit_.is_set():
                continue
            epoch = self._epoch
            frames = self._run_engine(engine, picked, int(s["batch_size"]), quit_)
            if frames is None:
                return  # shutting down
            if frames and epoch == self._epoch and not quit_.is_set():
                self._handoff.put(_Batch(epoch, frames))

    def _run_engine(self, engine: Any, picked: list[tuple[int, Any]], batch_size: int,
                    quit_: threading.Event) -> list[_Frame] | None:
        """Decode each frame, then ONE engine call for all of them (the engine groups same-size frames into
        batches of batch_size: VAE encode, one UNet step per task, VAE decode per batch). Bad input drops only
        its own frame. Returns the frames with their outputs on the engine's device, None when shutting down."""
        frames: list[_Frame] = []
        for index, (msg, t_recv, compressed) in picked:
            cam = self._cams[index]
            t0 = time.perf_counter()
            try:
                # size checks, decode, rectify (cam.decode alone skips the checks)
                decoded = cam.prepare(msg, compressed, self._settings.for_camera(cam.overrides))
            except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                if not self._drop(cam, err, quit_):
                    return None
                continue
            cam.stats.on_stage("decode", time.perf_counter() - t0)
            frames.append(_Frame(cam, msg, t_recv, decoded.rgb, camera=decoded.camera))  # rgb [H,W,3] uint8
        if not frames:
            return []
        t0 = time.perf_counter()
        try:
            pred = engine.predict([f.rgb for f in frames], on_device=True)
        except Exception as err:  # noqa: BLE001 - e.g. CUDA OOM on one batch: drop it, keep serving
            return [] if all(self._drop(f.cam, err, quit_) for f in frames) else None
        elapsed = time.perf_counter() - t0
        self._batch_stats.record([f.rgb.shape for f in frames], batch_size)
        for j, frame in enumerate(frames):
            frame.relative = pred.depth[j] if pred.depth is not None else None
            frame.normals = pred.normals[j] if pred.normals is not None else None
            frame.cam.stats.on_stage("engine", elapsed)
        return frames

    def _post_main(self, engine: Any, quit_: threading.Event) -> None:
        """Post-processing thread: per camera, align -> metric depth, views, cloud -> publish (camera.finish)."""
        from geodiff_ros.geometry.device import HostStaging

        staging = HostStaging(engine.device)
        while not quit_.is_set():
            batch = self._handoff.take(_WORKER_POLL_S)
            if batch is None:
                continue
            for frame in batch.frames:
                if batch.epoch != self._epoch or quit_.is_set():
                    break  # deactivated meanwhile: its publishers are off
                cam = frame.cam
                rebuild = cam.take_aligner_dirty()  # before reading the settings (camera.take_aligner_dirty)
                s = self._settings.for_camera(cam.overrides)
                try:
                    cam.finish(s, frame.msg, frame.rgb, frame.relative, frame.normals, staging,
                               rebuild_aligner=rebuild, latency_from=frame.t_recv, camera=frame.camera)
                except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                    if not self._drop(cam, err, quit_):
                        return

    def _warm_up(self, engine: Any, quit_: threading.Event) -> None:
        """Run dummy frames of ``warmup_size`` through the engine before the first camera frame.

        Lazy CUDA/cuDNN initialisation, torch.compile and CUDA-graph capture then happen here, on the engine
        thread, while subscriptions already fill the newest-frame mailboxes and services answer (issue 5,
        start-up). With ``optimize`` set, the engine compiles stage by stage for every batch size the scheduler
        can form (engine/startup.py) and /diagnostics shows "compiling (stage k of n: ..., N s)". A failure is
        logged and serving goes on.
        """
        from geodiff_ros.engine.startup import warm_up_stages

        width, height = (int(v) for v in self._settings["warmup_size"])
        if engine is None or width <= 0 or height <= 0 or quit_.is_set():
            self.get_logger().info("ready: no warm-up (warmup_size [0, 0]); processing frames")
            return
        batches = [1]
        if engine.accelerator is not None:  # optimize set: code compiled / captured per batch size
            batches = list(range(1, min(int(self._settings["batch_size"]), len(self._cams)) + 1))
        start = self._warm_start = time.monotonic()
        self._warm_status = "warming up"
        current: list[Any] = []  # (k, n, label, start) of the running stage

        def stage_done() -> None:
            if current:
                k, n, label, t0 = current.pop()
                self.get_logger().info(f"warm-up {k}/{n} {label}: {time.monotonic() - t0:.1f} s")

        def progress(k: int, n: int, label: str) -> None:
            stage_done()
            if quit_.is_set():
                raise _WarmUpStopped
            current.append((k, n, label, time.monotonic()))
            if engine.accelerator is not None and engine.accelerator.settings.compile:
                self._warm_status = f"compiling (stage {k} of {n}: {label}, {{elapsed}} s)"

        try:
            warm_up_stages(engine, height, width, batches, progress=progress)
            stage_done()
        except _WarmUpStopped:
            return
        except Exception as err:  # noqa: BLE001 - e.g. out of GPU memory: real frames may still fit
            self.get_logger().error(
                f"warm-up at {width}x{height} failed ({type(err).__name__}: {err}); processing frames anyway, "
                "the first ones may be slow (set warmup_size to your camera size, or [0, 0] to skip the warm-up)")
        else:
            self.get_logger().info(
                f'ready: warm-up at {width}x{height} (batch {", ".join(map(str, batches))}) took '
                f'{time.monotonic() - start:.2f} s; processing frames')
        finally:
            self._warm_status = ""

    def _drop(self, cam: CameraChannel, err: Exception, quit_: threading.Event) -> bool:
        """Count and log a frame that could not be processed; False if this happened because we are stopping."""
        if isinstance(err, ImageConversionError):
            cam.stats.on_bad_input(str(err))
            cam.log.warning(f"dropped a frame: {err}", throttle_duration_sec=_THROTTLE_S)
            return True
        if quit_.is_set() or not rclpy.ok(context=self.context):
            return False
        cam.stats.on_bad_input(f"{type(err).__name__}: {err}")
        cam.log.error(f"dropped a frame: {type(err).__name__}: {err}", throttle_duration_sec=_THROTTLE_S)
        return True

    # ------------------------------------------------------------------ diagnostics

    def _status_label(self) -> str:
        """The lifecycle state, or the warm-up's progress while it runs in an active node."""
        status = self._warm_status
        if self._state_label == "active" and status:
            return status.replace("{elapsed}", f"{time.monotonic() - self._warm_start:.0f}")
        return self._state_label

    def _publish_diagnostics(self) -> None:
        hw = str(self._engine.device) if self._engine is not None else str(self._settings["device"])
        state = self._status_label()
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        if not self._multi:
            arr.status = [build_status(f"{self.get_name()}: pipeline", hw, self._stats.snapshot(), state)]
        else:
            for cam in self._cams:
                status = build_status(f"{self.get_name()}: {cam.name}", f"{cam.name}@{hw}", cam.stats.snapshot(),
                                      state)
                status.values.append(KeyValue(key="camera", value=cam.name))
                status.values.append(KeyValue(key="image_topic", value=self.resolve_topic_name(cam.topic("image"))))
                arr.status.append(status)
            arr.status.append(self._scheduler_status(hw))
        self._diag_pub.publish(arr)

    def _scheduler_status(self, hw: str) -> DiagnosticStatus:
        """How frames of the cameras were batched: frames per network pass > 1 means batching works."""
        snap = self._batch_stats.snapshot()
        message = (f'{snap["frames"]} frames of {len(self._cams)} cameras in {snap["network_passes"]} network '
                   f'passes ({snap["engine_calls"]} engine calls)')
        level = DiagnosticStatus.OK if self._state_label == "active" else DiagnosticStatus.WARN
        values = {**snap, "cameras": len(self._cams), "batch_size": self._settings["batch_size"],
                  "batch_window_s": self._settings["batch_window_s"], "state": self._state_label}
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: scheduler", message=message,
                                  hardware_id=hw)
        status.values = [KeyValue(key=k, value=f"{v:.4g}" if isinstance(v, float) else str(v))
                         for k, v in values.items()]
        return status


def main(args: list[str] | None = None) -> int:
    """Console entry ``geodiff_node``: run the node, autostarting it unless ``autostart:=false``.

    Exit codes: 0 on Ctrl-C / SIGTERM / SIGHUP / normal shutdown (also when the signal arrives during configure),
    1 when autostart's configure failed (the log says why), 2 for invalid parameters at start-up. Ends the process
    itself (``os._exit``) once ROS is shut down, so call it as a program, not from code that should keep running.

    Signals (issue 13): our own handlers, not rclpy's, so the first SIGINT/SIGTERM/SIGHUP requests one orderly
    shutdown and any further one (``ros2 launch`` + Ctrl-C sends SIGINT twice, then maybe SIGTERM) is only
    noted; see shutdown.py. The executor therefore spins in short slices and checks the request in between.
    """
    shutdown = ShutdownRequest.install()  # before rclpy.init: no signal finds the default handler
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    code = 0
    node: GeoDiffNode | None = None
    executor: SingleThreadedExecutor | None = None
    try:
        node = _create_node()
        if node is None:
            code = 2
        else:
            shutdown.on_request(node.request_shutdown)
            # ONE executor thread for inputs (trivial callbacks), the diagnostics timer and parameter/lifecycle
            # services; inference runs on the worker thread, so services still answer during it. Not the
            # MultiThreadedExecutor (issue 7): it re-yields and re-submits every callback its pool has not started
            # yet, so while the worker holds the GIL its spin loop busy-waits (measured: 64-84% of a core with 4
            # cameras at 30 Hz, the worker starved to 2 frames/s per camera) instead of 20% here. Its pool also
            # could not run services concurrently anyway: they share the node's default mutually exclusive
            # callback group.
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            code = _autostart(node, shutdown)
            while code == 0 and not shutdown.requested and rclpy.ok():
                executor.spin_once(timeout_sec=_POLL_S)
    except ExternalShutdownException:
        pass
    except Exception:
        # The context can be shut down while spin_once() builds its wait set (RCLError "the given context is
        # not valid"). That is a normal shutdown; anything else is a real error.
        if rclpy.ok() and not shutdown.requested:
            raise
    finally:
        if node is not None:
            if shutdown.requested:
                node.get_logger().info(f"{shutdown.reason} received: shutting down")
            node.stop()
            if executor is not None:
                executor.shutdown(timeout_sec=0.5)
            if len(shutdown.received) > 1:
                node.get_logger().info(f'also received during the shutdown (noted, no action): '
                                       f'{", ".join(shutdown.received[1:])}')
            node.destroy_node()
        rclpy.try_shutdown()
    # Everything ROS is closed now. Interpreter teardown of torch/diffusers takes ~1.5 s on 2 cores, and a worker
    # stuck in a long GPU call (or an abandoned model load) would block it further; exit right away so
    # SIGINT/SIGTERM finish within 2 s.
    _exit_now(code)
    return code  # not reached; keeps the console_scripts contract (main returns the exit code)


def _create_node() -> GeoDiffNode | None:
    """The node, or None (logged) when its start-up parameters are invalid."""
    try:
        return GeoDiffNode()
    except Exception as err:  # noqa: BLE001 - parameter errors from rclpy come as several types
        rclpy.logging.get_logger(NODE_NAME).fatal(name_launch_arguments(f"cannot start: {err}"))
        return None


def _autostart(node: GeoDiffNode, shutdown: ShutdownRequest) -> int:
    """Configure and activate unless ``autostart:=false``; the exit code (1 = failed, 0 = fine or shut down)."""
    if not node.get_parameter("autostart").value:
        return 0
    for name, trigger in (("configure", node.trigger_configure), ("activate", node.trigger_activate)):
        if shutdown.requested:
            return 0
        if trigger() != TransitionCallbackReturn.SUCCESS:
            if shutdown.requested:
                return 0  # abandoned because of the signal: a normal shutdown
            reason = " (see the error above)" if name == "configure" else ""
            node.get_logger().fatal(f"autostart: {name} failed{reason}; exiting")
            return 1
    return 0


def _exit_now(code: int) -> None:
    """Flush the logs and leave the process immediately with ``code``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
