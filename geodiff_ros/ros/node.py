"""The ``geodiff`` lifecycle node: camera image in; depth, normals, metric point cloud and diagnostics out.

Topics (relative, so namespaces and remaps work; ros-anchors 5):
  in   image (Image) or image/compressed (CompressedImage, by ``input_transport``), camera_info,
       sparse_depth (Image 32FC1 m / 16UC1 mm), sparse_points (PointCloud2 in the camera optical frame)
  out  depth/relative (32FC1 affine-invariant), depth/image (32FC1 metres, NaN invalid; only with a metric
       scale), depth/camera_info, depth/image_vis (rgb8), normals/image (32FC3 optical frame),
       normals/image_vis (rgb8), points (PointCloud2, only while subscribed), /diagnostics

Threading: subscription callbacks only store messages (newest image in a one-slot mailbox, latest CameraInfo,
a small ring buffer of sparse depth); ONE worker thread runs the engine, the alignment and publishes. The
executor threads therefore stay free for parameter and lifecycle services during inference (ros-anchors 0.3).
Every output header is the input image's header (same stamp and optical frame_id; REP 118, ros-anchors 2.2).

Shapes: ``H,W`` input image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from geodiff_ros.geometry import (
    InvalidCameraInfo,
    PinholeIntrinsics,
    TemporalAligner,
    apply_alignment,
    backproject,
    fit_scale_shift,
    sparse_to_image_grid,
)
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    compressed_to_rgb8,
    depth_to_metres,
    image_to_rgb8,
    intrinsics_from_msg,
    numpy_to_image,
)
from geodiff_ros.ros.diagnostics import AlignmentInfo, PipelineStats, build_status
from geodiff_ros.ros.params import (
    Settings,
    declare_all,
    engine_config_kwargs,
    read_settings,
    validate_changes,
)
from geodiff_ros.ros.pointcloud import PointCloudError, cloud_array, cloud_to_msg, cloud_xyz, project_points_to_depth
from geodiff_ros.ros.qos import DIAGNOSTICS_QOS, make_qos

__all__ = ['GeoDiffNode', 'main']

NODE_NAME = 'geodiff'
_THROTTLE_S = 5.0  # per-frame warnings at most this often
_SPARSE_RING = 16  # sparse messages kept for stamp matching (LiDAR 10 Hz vs camera 30 Hz needs only a few)
_JOIN_TIMEOUT_S = 1.5  # shutdown must finish within 2 s (issue 3)


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class _Mailbox:
    """One-slot mailbox: ``put`` overwrites (latest-frame semantics), ``get`` blocks until a frame or close."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store ``item``; True if it replaced a frame the worker never took (a drop)."""
        with self._cond:
            dropped = self._item is not None
            self._item = item
            self._cond.notify()
            return dropped

    def get(self, timeout: float) -> Any:
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._item = None


class _SparseRing:
    """Recent sparse messages keyed by stamp; the worker picks the one nearest to the image stamp."""

    def __init__(self, size: int = _SPARSE_RING) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[int, str, Any]] = collections.deque(maxlen=size)

    def add(self, kind: str, msg: Any) -> None:
        with self._lock:
            self._items.append((_stamp_ns(msg.header), kind, msg))

    def nearest(self, stamp_ns: int, max_dt_s: float) -> tuple[str, Any] | None:
        with self._lock:
            if not self._items:
                return None
            best = min(self._items, key=lambda it: abs(it[0] - stamp_ns))
        if abs(best[0] - stamp_ns) > max_dt_s * 1e9:
            return None
        return best[1], best[2]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


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
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._stats = PipelineStats()
        self._engine: Any = None
        self._aligner: TemporalAligner | None = None
        self._aligner_dirty = False
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._mailbox = _Mailbox()
        self._sparse = _SparseRing()
        self._info_lock = threading.Lock()
        self._latest_info: CameraInfo | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._state_label = 'unconfigured'
        self._input_group = ReentrantCallbackGroup()  # callbacks only touch locked containers

        # Diagnostics run in every state, so a node that failed to configure still says why.
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
        self._diag_timer = self.create_timer(float(initial['diagnostics_period']), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())

    # ------------------------------------------------------------------ parameters

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Validate a set request (ranges were already checked by rclpy); the reason goes back to the caller."""
        changes = {p.name: p.value for p in params}
        reason = validate_changes(changes, self._settings.values, configured=self._engine is not None)
        if reason:
            self.get_logger().warning(f'rejected parameter change: {reason}')
        return SetParametersResult(successful=reason is None, reason=reason or '')

    def _after_set_parameters(self, params: list[Any]) -> None:
        values = dict(self._settings.values)
        values.update({p.name: p.value for p in params if p.name in values})
        self._settings = Settings(values)
        if any(p.name.startswith('alignment.') and p.name != 'alignment.sparse_max_dt' for p in params):
            self._aligner_dirty = True  # rebuilt by the worker, which owns the aligner

    def _make_aligner(self) -> TemporalAligner:
        s = self._settings
        fixed = float(s['alignment.fixed_scale'])
        return TemporalAligner(ema_alpha=float(s['alignment.ema_alpha']),
                               max_fallback_age_s=float(s['alignment.max_fallback_age_s']),
                               reset_ratio=float(s['alignment.reset_ratio']),
                               fixed_scale=fixed if fixed > 0 else None)

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the engine and create publishers; FAILURE (back to unconfigured) with the fix in the log."""
        from geodiff_ros.engine import EngineConfig, GeoDiffEngine, GeoDiffError

        settings = self._settings
        kwargs = engine_config_kwargs(settings)
        self.get_logger().info(
            f'loading engine: depth={kwargs["depth_model"]!r} normals={kwargs["normals_model"]!r} '
            f'device={kwargs["device"]} dtype={kwargs["dtype"]} processing_res={kwargs["processing_res"]}')
        try:
            self._engine = GeoDiffEngine(EngineConfig(**kwargs))
        except GeoDiffError as err:
            self._stats.last_error = str(err)
            self.get_logger().error(f'configure failed: {err}')
            return TransitionCallbackReturn.FAILURE
        except Exception as err:  # noqa: BLE001 - any loader failure must leave the node alive and unconfigured
            self._stats.last_error = f'{type(err).__name__}: {err}'
            self.get_logger().error(
                f'configure failed while loading the model ({type(err).__name__}: {err}); check model_depth / '
                'model_normals (hub id or folder in hub layout), device and dtype')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f'engine ready: tasks {self._engine.tasks} on {self._engine.device}')
        out_qos = make_qos(settings['qos.output.reliability'], settings['qos.output.depth'])
        topics = {
            'relative': (Image, 'depth/relative'),
            'depth': (Image, 'depth/image'),
            'depth_info': (CameraInfo, 'depth/camera_info'),
            'depth_vis': (Image, 'depth/image_vis'),
            'normals': (Image, 'normals/image'),
            'normals_vis': (Image, 'normals/image_vis'),
            'points': (PointCloud2, 'points'),
        }
        for key, (msg_type, topic) in topics.items():
            self._pubs[key] = self.create_lifecycle_publisher(msg_type, topic, out_qos)
        self._aligner = self._make_aligner()
        self._state_label = 'inactive'
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the inputs and start the worker thread."""
        s = self._settings
        in_qos = make_qos(s['qos.input.reliability'], s['qos.input.depth'])
        grp = self._input_group
        if s['input_transport'] == 'compressed':
            # image_transport naming: <resolved image topic>/compressed, so remapping `image` is enough.
            topic = self.resolve_topic_name('image') + '/compressed'
            self._subs.append(self.create_subscription(
                CompressedImage, topic, self._on_compressed, in_qos, callback_group=grp))
        else:
            self._subs.append(self.create_subscription(Image, 'image', self._on_image, in_qos, callback_group=grp))
        self._subs += [
            self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info, in_qos, callback_group=grp),
            self.create_subscription(Image, 'sparse_depth', self._on_sparse_depth, in_qos, callback_group=grp),
            self.create_subscription(PointCloud2, 'sparse_points', self._on_sparse_points, in_qos,
                                     callback_group=grp),
        ]
        self._start_worker()
        self._state_label = 'active'
        self.get_logger().info(
            f'active: listening on {self._subs[0].topic_name} ({s["input_transport"]}, '
            f'{s["qos.input.reliability"]}); outputs {s["qos.output.reliability"]}')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and unsubscribe."""
        self._stop_worker()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
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
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        self._engine = None
        self._aligner = None
        with self._info_lock:
            self._latest_info = None
        self._sparse.clear()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def stop(self) -> None:
        """Stop the worker and drop subscriptions (process exit); safe to call twice."""
        self._stop_worker()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def _start_worker(self) -> None:
        self._stop.clear()
        self._mailbox.reopen()
        self._worker = threading.Thread(target=self._run_worker, name='geodiff-worker', daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        self._stop.set()
        self._mailbox.close()
        if self._worker is not None:
            self._worker.join(_JOIN_TIMEOUT_S)
            if not self._worker.is_alive():
                self._worker = None

    # ------------------------------------------------------------------ callbacks (store only)

    def _on_image(self, msg: Image) -> None:
        self._stats.on_input(self._mailbox.put((msg, time.monotonic(), False)))

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._stats.on_input(self._mailbox.put((msg, time.monotonic(), True)))

    def _on_camera_info(self, msg: CameraInfo) -> None:
        with self._info_lock:
            self._latest_info = msg

    def _on_sparse_depth(self, msg: Image) -> None:
        self._sparse.add('depth', msg)

    def _on_sparse_points(self, msg: PointCloud2) -> None:
        self._sparse.add('points', msg)

    # ------------------------------------------------------------------ worker

    def _run_worker(self) -> None:
        log = self.get_logger()
        while not self._stop.is_set():
            frame = self._mailbox.get(timeout=0.2)
            if frame is None or self._stop.is_set():
                continue
            try:
                self._process(*frame)
            except ImageConversionError as err:
                self._stats.on_bad_input(str(err))
                log.warning(f'dropped a frame: {err}', throttle_duration_sec=_THROTTLE_S)
            except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                if self._stop.is_set() or not rclpy.ok(context=self.context):
                    break  # shutting down: publishers may be gone
                self._stats.on_bad_input(f'{type(err).__name__}: {err}')
                log.error(f'dropped a frame: {type(err).__name__}: {err}', throttle_duration_sec=_THROTTLE_S)

    def _camera_model(self, width: int, height: int) -> tuple[CameraInfo | None, PinholeIntrinsics | None]:
        """Latest CameraInfo and its intrinsics if it describes a ``width x height`` image, else (None, None)."""
        with self._info_lock:
            info = self._latest_info
        if info is None:
            return None, None
        try:
            intr = intrinsics_from_msg(info)
        except InvalidCameraInfo as err:
            self.get_logger().warning(f'CameraInfo unusable, no cloud: {err}', throttle_duration_sec=_THROTTLE_S)
            return None, None
        if (intr.width, intr.height) != (width, height):
            self.get_logger().warning(
                f'CameraInfo describes a {intr.width}x{intr.height} image but the image is {width}x{height}: no '
                'cloud and no depth/camera_info; remap camera_info to the image\'s sibling topic',
                throttle_duration_sec=_THROTTLE_S)
            return None, None
        return info, intr

    def _sparse_for(self, header: Any, width: int, height: int,
                    intr: PinholeIntrinsics | None) -> np.ndarray | None:
        """Sparse metric depth ``[H,W]`` (NaN empty) matched to this image by stamp, or None."""
        s = self._settings
        match = self._sparse.nearest(_stamp_ns(header), float(s['alignment.sparse_max_dt']))
        if match is None:
            return None
        kind, msg = match
        if kind == 'depth':
            # Same camera, any resolution: moved onto the image grid through the intrinsics ratio.
            return sparse_to_image_grid(depth_to_metres(msg), width, height)
        if intr is None:
            self.get_logger().warning('sparse_points need a valid camera_info to be projected; skipping the fit',
                                      throttle_duration_sec=_THROTTLE_S)
            return None
        if msg.header.frame_id and header.frame_id and msg.header.frame_id != header.frame_id:
            self.get_logger().warning(
                f'sparse_points are in frame {msg.header.frame_id!r}, the image in {header.frame_id!r}; transform '
                'them into the camera optical frame first (no tf here)', throttle_duration_sec=_THROTTLE_S)
            return None
        try:
            xyz = cloud_xyz(msg)  # [N,3]
        except PointCloudError as err:
            raise ImageConversionError(f'sparse_points: {err}') from err
        return project_points_to_depth(xyz, intr.fx, intr.fy, intr.cx, intr.cy, width, height)

    def _subscribed(self, key: str) -> bool:
        pub = self._pubs.get(key)
        return pub is not None and pub.get_subscription_count() > 0

    def _process(self, msg: Any, t_recv: float, compressed: bool) -> None:
        """Steps: decode -> engine -> align -> publish. Runs on the worker thread only."""
        from geodiff_ros.visualize import colorize_depth, normals_to_rgb

        s = self._settings
        pubs = self._pubs
        header = msg.header
        # 1. Decode the input (raises ImageConversionError on bad data: logged, frame dropped).
        rgb = compressed_to_rgb8(msg) if compressed else image_to_rgb8(msg)  # [H,W,3] uint8
        height, width = rgb.shape[:2]
        # 2. Model invocation: engine.predict (VAE encode, one UNet step per task, VAE decode).
        pred = self._engine.predict(rgb)
        if self._stop.is_set():
            return
        relative = pred.depth[0] if pred.depth is not None else None  # [H,W] in [0,1], 0 near
        normals = pred.normals[0] if pred.normals is not None else None  # [H,W,3] optical frame
        info, intr = self._camera_model(width, height)

        # 3. Metric alignment: robust fit to the sparse depth matched by stamp, smoothed over time (ros-anchors 3.4).
        if self._aligner_dirty or self._aligner is None:
            self._aligner = self._make_aligner()
            self._aligner_dirty = False
        metric = None
        align = AlignmentInfo()
        if relative is not None:
            sparse = self._sparse_for(header, width, height, intr)
            result = None
            if sparse is not None:
                result = fit_scale_shift(
                    relative, sparse, method=s['alignment.method'], min_points=int(s['alignment.min_points']),
                    min_inlier_ratio=float(s['alignment.min_inlier_ratio']),
                    inlier_threshold_rel=float(s['alignment.inlier_threshold_rel']))
                if not result.ok:
                    self.get_logger().warning(f'no metric fit this frame: {result.reason}',
                                              throttle_duration_sec=_THROTTLE_S)
            state = self._aligner.update(result, _stamp_ns(header) * 1e-9)
            if state is not None:
                metric = apply_alignment(relative, state.scale, state.shift,
                                         float(s['min_depth']), float(s['max_depth']))  # [H,W] m, NaN invalid
                align = AlignmentInfo(state.source, state.scale, state.shift,
                                      result.n_points if result else 0, state.n_inliers, state.residual_rel,
                                      result.reason if result else 'no sparse depth matched')
            elif result is not None:
                align = AlignmentInfo('none', math.nan, math.nan, result.n_points, result.n_inliers,
                                      result.residual_rel, result.reason)
            else:
                align = AlignmentInfo(reason='no sparse depth within alignment.sparse_max_dt')

        # 4. Publish, header copied from the input (same stamp, same optical frame).
        if relative is not None:
            pubs['relative'].publish(numpy_to_image(relative, '32FC1', header))
            if self._subscribed('depth_vis'):
                vis_src = metric if metric is not None else relative
                pubs['depth_vis'].publish(numpy_to_image(colorize_depth(vis_src), 'rgb8', header))
        if metric is not None:
            pubs['depth'].publish(numpy_to_image(metric, '32FC1', header))
        if info is not None:
            out_info = CameraInfo()
            for field in ('height', 'width', 'distortion_model', 'd', 'k', 'r', 'p', 'binning_x', 'binning_y',
                          'roi'):
                setattr(out_info, field, getattr(info, field))
            out_info.header = header  # identical stamp: image_transport pairs them with an exact sync
            pubs['depth_info'].publish(out_info)
        if normals is not None:
            pubs['normals'].publish(numpy_to_image(normals, '32FC3', header))
            if self._subscribed('normals_vis'):
                pubs['normals_vis'].publish(numpy_to_image(normals_to_rgb(normals), 'rgb8', header))
        if metric is not None and intr is not None and s['publish_cloud'] and self._subscribed('points'):
            stride = int(s['cloud_stride'])
            xyz = backproject(metric, intr, stride)  # [H',W',3], NaN invalid: depth_image_proc's formula
            colours = rgb[::stride, ::stride] if s['cloud_color'] else None
            nrm = normals[::stride, ::stride] if (normals is not None and s['cloud_normals']) else None
            pubs['points'].publish(cloud_to_msg(cloud_array(xyz, colours, nrm), header))
        self._stats.on_output(time.monotonic() - t_recv, metric is not None, align)

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        hw = str(self._engine.device) if self._engine is not None else str(self._settings['device'])
        status = build_status(f'{self.get_name()}: pipeline', hw, self._stats.snapshot(), self._state_label)
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self._diag_pub.publish(arr)


def main(args: list[str] | None = None) -> int:
    """Console entry ``geodiff_node``: run the node, autostarting it unless ``autostart:=false``.

    Exit codes: 0 on Ctrl-C / SIGTERM / normal shutdown, 1 when autostart's configure failed (the log says
    why), 2 for invalid parameters at start-up. Ends the process itself (``os._exit``) once ROS is shut down, so
    call it as a program, not from code that should keep running.
    """
    rclpy.init(args=args)
    code = 0
    node: GeoDiffNode | None = None
    executor: MultiThreadedExecutor | None = None
    try:
        try:
            node = GeoDiffNode()
        except Exception as err:  # noqa: BLE001 - parameter errors from rclpy come as several types
            rclpy.logging.get_logger(NODE_NAME).fatal(f'cannot start: {err}')
            code = 2
            return code
        # Threads: inputs (trivial callbacks), diagnostics timer, parameter/lifecycle services.
        executor = MultiThreadedExecutor(num_threads=3)
        executor.add_node(node)
        if node.get_parameter('autostart').value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('autostart: configure failed (see the error above); exiting')
                code = 1
                return code
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('autostart: activate failed; exiting')
                code = 1
                return code
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            if executor is not None:
                executor.shutdown(timeout_sec=0.5)
            node.destroy_node()
        rclpy.try_shutdown()
    # Everything ROS is closed now. Interpreter teardown of torch/diffusers takes ~1.5 s on 2 cores, and a worker
    # stuck in a long GPU call would block it further; exit right away so SIGINT/SIGTERM finish within 2 s.
    _exit_now(code)
    return code  # not reached; keeps the console_scripts contract (main returns the exit code)


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
