"""The ``geodiff`` lifecycle node: camera images in; depth, normals, metric point clouds and diagnostics out.

Topics of one camera (relative, so namespaces and remaps work):
  in   image (Image) or image/compressed (CompressedImage, by ``input_transport``), camera_info,
       sparse_depth (Image 32FC1 m / 16UC1 mm), sparse_points (PointCloud2 of a LiDAR)
  out  depth/relative (32FC1 affine-invariant), depth/image (32FC1 metres, NaN invalid; only with a metric
       scale), depth/camera_info, depth/image_vis (rgb8), normals/image (32FC3 optical frame),
       normals/image_vis (rgb8), points (PointCloud2, only while subscribed), /diagnostics

Several cameras, one model: with ``cameras: [front, left]`` every topic above moves under the camera's prefix
(front/image, front/depth/image, front/points, ...); each camera has its own CameraInfo, sparse depth, aligner,
counters and /diagnostics status (camera.py). With ``cameras: []`` the node is the single-camera node.

This module keeps the lifecycle, the parameters and the diagnostics; the engine and post-processing threads are
worker.py's ``FramePipeline``, the process entry (signals, exit codes, autostart) is process.py. Every output header
is the input image's header (same stamp and optical frame_id, as REP 118 asks), so outputs of different cameras
never mix.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter

from geodiff_ros.ros.camera import CameraChannel
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
from geodiff_ros.ros.scheduler import FrameScheduler
from geodiff_ros.ros.worker import FramePipeline

__all__ = ["NODE_NAME", "GeoDiffNode", "LoadAbandoned"]

NODE_NAME = "geodiff"


class LoadAbandoned(BaseException):
    """Raised by the signal handler into an engine load in progress: the process is shutting down. A
    BaseException (like KeyboardInterrupt) so that no ``except Exception`` in the loading libraries swallows it."""


def _is_engine_error(err: BaseException) -> bool:
    """Whether ``err`` is a ``geodiff_ros.engine.GeoDiffError`` (its message already names the fix). Checked without
    importing the engine: when importing it is what failed, that error must still be reported."""
    errors = sys.modules.get("geodiff_ros.engine.errors")
    return errors is not None and isinstance(err, errors.GeoDiffError)

class _EngineLogToRos(logging.Handler):
    """The engine's Python log records (loading times, compile progress, AOT package checks: INFO and up) go to
    the node's ROS logger, so they reach the node's log and /rosout with its name (unconfigured Python logging
    dropped INFO and wrote warnings bare to stderr)."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break the caller
            return
        if record.levelno >= logging.ERROR:
            self._log.error(text)
        elif record.levelno >= logging.WARNING:
            self._log.warning(text)
        else:
            self._log.info(text)


def _bridge_engine_logs(log: Any) -> None:
    """Route ``geodiff_ros.engine`` records to ``log`` (once per process: a later node replaces the bridge)."""
    engine_log = logging.getLogger("geodiff_ros.engine")
    for handler in [h for h in engine_log.handlers if isinstance(h, _EngineLogToRos)]:
        engine_log.removeHandler(handler)
    engine_log.addHandler(_EngineLogToRos(log))
    engine_log.setLevel(logging.INFO)
    engine_log.propagate = False


class GeoDiffNode(LifecycleNode):
    """Lifecycle node: ``configure`` loads the engine, ``activate`` subscribes and starts the worker."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        _bridge_engine_logs(self.get_logger())
        declare_all(self)
        initial = read_settings(self)
        reason = validate_changes(initial.values, {}, configured=False)
        if reason:
            msg = f"invalid parameter: {reason}"
            raise ValueError(msg)
        self._settings: Settings = initial
        self._cams: list[CameraChannel] = []
        self._build_cameras(initial.cameras())
        # the per-camera overrides from the params file, with the node-wide values they combine with
        reason = validate_changes(self._current_values(), {}, configured=False)
        if reason:
            msg = f"invalid parameter: {reason}"
            raise ValueError(msg)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        apply_requests_whole(self)  # a set_parameters request of several parameters is validated as one change

        self._engine: Any = None
        self._loading = False  # main thread only: an engine load is in progress (see request_shutdown)
        self.tf: Any = None  # ros.tf.NodeTf once configured (None: tf2_ros missing, see tf_missing)
        self.tf_missing = "TF not started"
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
        self._pipeline = FramePipeline(self.get_logger(), self._cams, self._sched, lambda: self._settings,
                                       lambda: rclpy.ok(context=self.context))

    @property
    def settings(self) -> Settings:
        """The current parameter values (replaced whole on every accepted change: safe to read from any thread)."""
        return self._settings

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
        except LoadAbandoned:
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
            # Not built here: a cold compile takes minutes and would hold the lifecycle transition; the engine
            # thread starts it on activation (warmup_size, startup_mode) and any other input size when it appears.
            acc = self._engine.accelerator
            aot = getattr(acc, "aot_packages", 0)
            cache = getattr(acc, "compile_cache_dir", None)
            waits = settings["startup_mode"] == "wait_compiled"
            self.get_logger().info(
                f"optimize={optimize}: the optimised path builds on activation "
                + ("before the first frame (startup_mode wait_compiled)" if waits else
                   "while frames are served eagerly (startup_mode serve_eager)")
                + "; progress in /diagnostics" + (f"; compiled kernels cached in {cache}" if cache else "")
                + (f"; {aot} AOT package(s) found (geodiff_compile), each checked and loaded on first use"
                   if aot else ""))
        out_qos = make_qos(settings["qos.output.reliability"], settings["qos.output.depth"])
        for cam in self._cams:
            cam.create_publishers(out_qos, self._engine.tasks)
            cam.start_frames(settings.for_camera(cam.overrides))
        self._start_tf()
        if self._multi:
            self.get_logger().info(
                f'serving {len(self._cams)} cameras ({", ".join(c.name for c in self._cams)}) with one model, '
                f'up to {settings["batch_size"]} frames per engine call')
        self._state_label = "inactive"
        return super().on_configure(state)

    def request_shutdown(self) -> None:
        """Called from the signal handler (main thread, between two bytecodes) when the process is to exit: an
        engine load in progress on the main thread is abandoned by raising ``LoadAbandoned`` into it."""
        if self._loading:
            self._loading = False
            raise LoadAbandoned

    def _load_engine(self, kwargs: dict[str, Any]) -> Any:
        """Import and build the engine; a shutdown signal meanwhile abandons it.

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
        self._pipeline.activate(self._engine)
        self.get_logger().info(
            f'active: listening on {", ".join(cam.subs[0].topic_name for cam in self._cams)} '
            f'({s["input_transport"]}, {s["qos.input.reliability"]}); outputs {s["qos.output.reliability"]}')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Pause the pipeline (a frame in flight is finished and discarded, never waited for) and unsubscribe."""
        self._pipeline.pause()
        for cam in self._cams:
            cam.unsubscribe()
        self._state_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release publishers and the engine (GPU memory). A frame still in the engine finishes on its own."""
        self._pipeline.stop()
        self._release()
        self._state_label = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop()
        self._state_label = "finalized"
        return super().on_shutdown(state)

    def _start_tf(self) -> None:
        """Listen to TF (static and dynamic) for sparse clouds in other frames than the image's."""
        from geodiff_ros.ros.tf import TF2_MISSING, NodeTf, tf2_available

        if self.tf is not None:
            return
        if not tf2_available():
            self.tf_missing = TF2_MISSING
            self.get_logger().info(f"TF off: {TF2_MISSING}")
            return
        try:
            self.tf = NodeTf(self)
        except Exception as err:  # noqa: BLE001 - without TF the static parameters still place clouds
            self.tf_missing = f"TF listener failed to start ({type(err).__name__}: {err})"
            self.get_logger().warning(f"{self.tf_missing}; sparse_points.frame_id / transform still work")

    def _release(self) -> None:
        if self.tf is not None:
            self.tf.close()
            self.tf = None
        for cam in self._cams:
            cam.destroy_publishers()
            cam.frames = None
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
        self._pipeline.stop()
        for cam in self._cams:
            cam.unsubscribe()

    # ------------------------------------------------------------------ diagnostics

    def _status_label(self) -> str:
        """The lifecycle state, or the warm-up's progress while it runs in an active node."""
        status = self._pipeline.status()
        return status if self._state_label == "active" and status else self._state_label

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
        serving = self._pipeline.serving()  # serve while compiling: which path serves, what still builds
        for status in arr.status:
            if serving is None:
                status.values.append(KeyValue(key="optimised", value="n/a"))
                continue
            line = serving.line()
            status.values += [KeyValue(key="serving", value=line),
                              KeyValue(key="optimised", value=str(serving.fully_built).lower())]
            if not serving.fully_built and status.level == DiagnosticStatus.OK:
                status.message += f"; {line}"
        self._diag_pub.publish(arr)

    def _scheduler_status(self, hw: str) -> DiagnosticStatus:
        """How frames of the cameras were batched: frames per network pass > 1 means batching works."""
        snap = self._pipeline.batch_stats.snapshot()
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
