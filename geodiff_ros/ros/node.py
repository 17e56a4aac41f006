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
CameraInfo, a small ring buffer of sparse depth); ONE worker thread takes the frames that are ready (fairly, the
longest-waiting camera first; scheduler.py), runs them through the engine in one call (same-size frames share a
network pass), then aligns and publishes per camera. The executor thread therefore stays free for parameter
and lifecycle services during inference (ros-anchors 0.3). Every output header is the input image's header
(same stamp and optical frame_id; REP 118, ros-anchors 2.2), so outputs of different cameras never mix.
"""

from __future__ import annotations

import os
import sys
import threading
import time
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
from geodiff_ros.ros.scheduler import BatchStats, FrameScheduler
from geodiff_ros.ros.shutdown import ShutdownRequest

__all__ = ['GeoDiffNode', 'main']

NODE_NAME = 'geodiff'
_THROTTLE_S = 5.0  # per-frame warnings at most this often
_JOIN_TIMEOUT_S = 1.5  # shutdown must finish within 2 s (issue 3)
_POLL_S = 0.05  # executor spin slice of the main loop: how soon a shutdown request is acted on


class _LoadAbandoned(BaseException):
    """Raised by the signal handler into an engine load in progress: the process is shutting down. A
    BaseException (like KeyboardInterrupt) so that no ``except Exception`` in the loading libraries swallows it."""


def _is_engine_error(err: BaseException) -> bool:
    """Whether ``err`` is a ``geodiff_ros.engine.GeoDiffError`` (its message already names the fix). Checked without
    importing the engine: when importing it is what failed, that error must still be reported."""
    errors = sys.modules.get('geodiff_ros.engine.errors')
    return errors is not None and isinstance(err, errors.GeoDiffError)


class GeoDiffNode(LifecycleNode):
    """Lifecycle node: ``configure`` loads the engine, ``activate`` subscribes and starts the worker."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declare_all(self)
        initial = read_settings(self)
        reason = validate_changes(initial.values, {}, configured=False)
        if reason:
            msg = f'invalid parameter: {reason}'
            raise ValueError(msg)
        self._settings: Settings = initial
        self._cams: list[CameraChannel] = []
        self._build_cameras(initial.cameras())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._engine: Any = None
        self._batch_stats = BatchStats()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._loading = False  # main thread only: an engine load is in progress (see request_shutdown)
        self._state_label = 'unconfigured'
        self._input_group = ReentrantCallbackGroup()  # callbacks only touch locked containers

        # Diagnostics run in every state, so a node that failed to configure still says why.
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
        self._diag_timer = self.create_timer(float(initial['diagnostics_period']), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())

    def _build_cameras(self, names: list[str]) -> None:
        """One channel per camera (one unnamed channel for ``cameras: []``) and their per-camera parameters."""
        declare_camera_overrides(self, names)
        overrides = camera_overrides(self, names)
        self._cams = [CameraChannel(self, name, i) for i, name in enumerate(names or [''])]
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
            values.update({f'camera.{cam.name}.{k}': v for k, v in cam.overrides.items()})
        return values

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Validate a set request (ranges were already checked by rclpy); the reason goes back to the caller."""
        changes = {p.name: p.value for p in params}
        reason = validate_changes(changes, self._current_values(), configured=self._engine is not None)
        if reason:
            self.get_logger().warning(f'rejected parameter change: {reason}')
        return SetParametersResult(successful=reason is None, reason=reason or '')

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
            if key[1].startswith('alignment.') and key[1] != 'alignment.sparse_max_dt':
                cam.aligner_dirty = True
        if any(p.name.startswith('alignment.') and p.name != 'alignment.sparse_max_dt' for p in params):
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
            self.get_logger().info('configure abandoned: the process is shutting down')
            return TransitionCallbackReturn.FAILURE
        except Exception as err:  # noqa: BLE001 - any loader failure must leave the node alive and unconfigured
            if _is_engine_error(err):
                self._set_error(str(err))
                self.get_logger().error(name_launch_arguments(f'configure failed: {err}'))
                return TransitionCallbackReturn.FAILURE
            self._set_error(f'{type(err).__name__}: {err}')
            self.get_logger().error(name_launch_arguments(
                f'configure failed while loading the model ({type(err).__name__}: {err}); check model_depth / '
                'model_normals (hub id or folder in hub layout), device and dtype'))
            return TransitionCallbackReturn.FAILURE
        if str(engine.device) != kwargs['device']:
            # CPU fallback: `ros2 param get <node> device` shows the device in use (set while still unconfigured:
            # device is fixed once configured).
            self.set_parameters([Parameter('device', value=str(engine.device))])
        self._engine = engine
        self.get_logger().info(f'engine ready: tasks {self._engine.tasks} on {self._engine.device}')
        if kwargs['optimize'] not in ('none', ''):
            # Not warmed up here: a cold compile takes minutes and would hold the lifecycle transition; the worker
            # warms up on activation (warmup_size) and compiles any other input size on its first frame.
            self.get_logger().info(f'optimize={kwargs["optimize"]}: each new input size compiles or captures on '
                                   'its first frame (up to ~100 s with a cold TORCHINDUCTOR_CACHE_DIR)')
        out_qos = make_qos(settings['qos.output.reliability'], settings['qos.output.depth'])
        for cam in self._cams:
            cam.create_publishers(out_qos, self._engine.tasks)
            cam.aligner = cam.make_aligner(settings.for_camera(cam.overrides))
        if self._multi:
            self.get_logger().info(
                f'serving {len(self._cams)} cameras ({", ".join(c.name for c in self._cams)}) with one model, '
                f'up to {settings["batch_size"]} frames per engine call')
        self._state_label = 'inactive'
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
        in_qos = make_qos(s['qos.input.reliability'], s['qos.input.depth'])
        for cam in self._cams:
            cam.subscribe(s['input_transport'], in_qos, self._input_group, self._sched.put)
        self._state_label = 'active'  # before the worker starts: its warm-up shows 'warming up' meanwhile
        self._start_worker()
        self.get_logger().info(
            f'active: listening on {", ".join(cam.subs[0].topic_name for cam in self._cams)} '
            f'({s["input_transport"]}, {s["qos.input.reliability"]}); outputs {s["qos.output.reliability"]}')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and unsubscribe."""
        self._stop_worker()
        for cam in self._cams:
            cam.unsubscribe()
        self._state_label = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release publishers and the engine (GPU memory)."""
        self._release()
        self._state_label = 'unconfigured'
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop()
        self._state_label = 'finalized'
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
        self._stop.clear()
        self._sched.reopen()
        self._worker = threading.Thread(target=self._worker_main, name='geodiff-worker', daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        self._stop.set()
        self._sched.close()
        if self._worker is not None:
            self._worker.join(_JOIN_TIMEOUT_S)
            if not self._worker.is_alive():
                self._worker = None

    # ------------------------------------------------------------------ worker

    def _worker_main(self) -> None:
        self._warm_up()
        self._run_worker()

    def _warm_up(self) -> None:
        """Run dummy frames of ``warmup_size`` through the engine before the first camera frame.

        Lazy CUDA/cuDNN initialisation, torch.compile and CUDA-graph capture then happen here, on the worker
        thread, while subscriptions already fill the newest-frame mailboxes and services answer (issue 5,
        start-up). Compiled and captured code is specialised to the batch size, so with ``optimize`` set every
        batch size the scheduler can form is warmed up too. A failure is logged and serving goes on.
        """
        width, height = (int(v) for v in self._settings['warmup_size'])
        engine = self._engine
        if engine is None or width <= 0 or height <= 0 or self._stop.is_set():
            self.get_logger().info('ready: no warm-up (warmup_size [0, 0]); processing frames')
            return
        batches = [1]
        if engine.accelerator is not None:  # optimize set: code specialised per batch size
            batches = list(range(1, min(int(self._settings['batch_size']), len(self._cams)) + 1))
        self._state_label = 'warming up'
        start = time.monotonic()
        try:
            for batch in batches:
                if self._stop.is_set():
                    break
                engine.warmup(height, width, batch=batch)
        except Exception as err:  # noqa: BLE001 - e.g. out of GPU memory: real frames may still fit
            self.get_logger().error(
                f'warm-up at {width}x{height} failed ({type(err).__name__}: {err}); processing frames anyway, '
                'the first ones may be slow (set warmup_size to your camera size, or [0, 0] to skip the warm-up)')
        else:
            self.get_logger().info(
                f'ready: warm-up at {width}x{height} (batch {", ".join(map(str, batches))}) took '
                f'{time.monotonic() - start:.2f} s; processing frames')
        if self._state_label == 'warming up':
            self._state_label = 'active'

    def _run_worker(self) -> None:
        while not self._stop.is_set():
            s = self._settings
            window = float(s['batch_window_s']) if self._multi else 0.0
            picked = self._sched.take(int(s['batch_size']), window, timeout=0.2)
            if not picked or self._stop.is_set():
                continue
            # Settings as of now, not of before the wait: a parameter set just before the frame applies to it.
            if not self._process_batch(self._settings, picked):
                break  # shutting down: publishers may be gone

    def _drop(self, cam: CameraChannel, err: Exception) -> bool:
        """Count and log a frame that could not be processed; False if this happened because we are stopping."""
        if isinstance(err, ImageConversionError):
            cam.stats.on_bad_input(str(err))
            cam.log.warning(f'dropped a frame: {err}', throttle_duration_sec=_THROTTLE_S)
            return True
        if self._stop.is_set() or not rclpy.ok(context=self.context):
            return False
        cam.stats.on_bad_input(f'{type(err).__name__}: {err}')
        cam.log.error(f'dropped a frame: {type(err).__name__}: {err}', throttle_duration_sec=_THROTTLE_S)
        return True

    def _process_batch(self, s: Settings, picked: list[tuple[int, Any]]) -> bool:
        """Steps: decode each frame -> ONE engine call for all of them -> align and publish per camera.

        Runs on the worker thread only. Bad input drops only its own frame (never the others of the batch).
        Returns False when the node is shutting down.
        """
        # 1. Decode the inputs (ImageConversionError: logged, that camera's frame dropped).
        frames: list[tuple[CameraChannel, Any, float, Any]] = []
        cameras: dict[int, Any] = {}  # camera index -> (CameraInfo, intrinsics) of its decoded image
        for index, (msg, t_recv, compressed) in picked:
            cam = self._cams[index]
            try:
                decoded = cam.prepare(msg, compressed, s.for_camera(cam.overrides))  # size checks, decode, rectify
            except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                if not self._drop(cam, err):
                    return False
                continue
            cameras[index] = decoded.camera
            frames.append((cam, msg, t_recv, decoded.rgb))  # rgb [H,W,3] uint8
        if not frames:
            return True
        # 2. Model invocation: engine.predict on all frames at once; it groups same-size frames into batches of
        #    batch_size (VAE encode, one UNet step per task, VAE decode per batch).
        try:
            pred = self._engine.predict([rgb for *_, rgb in frames])
        except Exception as err:  # noqa: BLE001 - e.g. CUDA OOM on one batch: drop it, keep serving
            return all(self._drop(cam, err) for cam, *_ in frames)
        self._batch_stats.record([rgb.shape for *_, rgb in frames], int(s['batch_size']))
        if self._stop.is_set():
            return True
        # 3.-4. Per camera: alignment with its own state, publishing with its input header.
        for j, (cam, msg, t_recv, rgb) in enumerate(frames):
            relative = pred.depth[j] if pred.depth is not None else None  # [H,W] in [0,1], 0 near
            normals = pred.normals[j] if pred.normals is not None else None  # [H,W,3] optical frame
            try:
                cam.finish(s.for_camera(cam.overrides), msg, rgb, relative, normals, t_recv, time.monotonic,
                           camera=cameras[cam.index])
            except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                if not self._drop(cam, err):
                    return False
        return True

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        hw = str(self._engine.device) if self._engine is not None else str(self._settings['device'])
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        if not self._multi:
            arr.status = [build_status(f'{self.get_name()}: pipeline', hw, self._stats.snapshot(), self._state_label)]
        else:
            for cam in self._cams:
                status = build_status(f'{self.get_name()}: {cam.name}', f'{cam.name}@{hw}', cam.stats.snapshot(),
                                      self._state_label)
                status.values.append(KeyValue(key='camera', value=cam.name))
                status.values.append(KeyValue(key='image_topic', value=self.resolve_topic_name(cam.topic('image'))))
                arr.status.append(status)
            arr.status.append(self._scheduler_status(hw))
        self._diag_pub.publish(arr)

    def _scheduler_status(self, hw: str) -> DiagnosticStatus:
        """How frames of the cameras were batched: frames per network pass > 1 means batching works."""
        snap = self._batch_stats.snapshot()
        message = (f'{snap["frames"]} frames of {len(self._cams)} cameras in {snap["network_passes"]} network '
                   f'passes ({snap["engine_calls"]} engine calls)')
        level = DiagnosticStatus.OK if self._state_label == 'active' else DiagnosticStatus.WARN
        values = {**snap, 'cameras': len(self._cams), 'batch_size': self._settings['batch_size'],
                  'batch_window_s': self._settings['batch_window_s'], 'state': self._state_label}
        status = DiagnosticStatus(level=level, name=f'{self.get_name()}: scheduler', message=message,
                                  hardware_id=hw)
        status.values = [KeyValue(key=k, value=f'{v:.4g}' if isinstance(v, float) else str(v))
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
    except Exception:  # noqa: BLE001
        # The context can be shut down while spin_once() builds its wait set (RCLError "the given context is
        # not valid"). That is a normal shutdown; anything else is a real error.
        if rclpy.ok() and not shutdown.requested:
            raise
    finally:
        if node is not None:
            if shutdown.requested:
                node.get_logger().info(f'{shutdown.reason} received: shutting down')
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
        rclpy.logging.get_logger(NODE_NAME).fatal(name_launch_arguments(f'cannot start: {err}'))
        return None


def _autostart(node: GeoDiffNode, shutdown: ShutdownRequest) -> int:
    """Configure and activate unless ``autostart:=false``; the exit code (1 = failed, 0 = fine or shut down)."""
    if not node.get_parameter('autostart').value:
        return 0
    for name, trigger in (('configure', node.trigger_configure), ('activate', node.trigger_activate)):
        if shutdown.requested:
            return 0
        if trigger() != TransitionCallbackReturn.SUCCESS:
            if shutdown.requested:
                return 0  # abandoned because of the signal: a normal shutdown
            reason = ' (see the error above)' if name == 'configure' else ''
            node.get_logger().fatal(f'autostart: {name} failed{reason}; exiting')
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


if __name__ == '__main__':
    raise SystemExit(main())
