"""One camera served by the ``geodiff`` node: its topics, inputs, alignment state, statistics and outputs.

The node owns the engine and the worker threads; a ``CameraChannel`` owns everything that must never mix
between cameras: the latest CameraInfo, the sparse-depth ring, the temporal aligner, the publishers and the
pipeline counters. The single-camera node is one channel with an empty prefix, so its topics stay ``image``,
``depth/image``, ... exactly; a named camera ``front`` uses ``front/image``, ``front/depth/image``, ...

Shapes: ``H,W`` input image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.qos import ReliabilityPolicy, qos_policy_name_from_kind
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from geodiff_ros.geometry import (
    AlignmentState,
    InvalidCameraInfo,
    PinholeIntrinsics,
    TemporalAligner,
    fit_scale_shift,
    sparse_to_image_grid,
)
from geodiff_ros.geometry.rectify import CameraModel, Rectifier
from geodiff_ros.geometry.transform import RigidTransform
from geodiff_ros.ros.camera_sets import camera_prefix
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    camera_info_with_size,
    check_input_pixels,
    compressed_image_size,
    compressed_to_rgb8,
    decode_compressed,
    depth_to_metres,
    image_to_rgb8,
    intrinsics_from_msg,
    numpy_to_image,
    stamp_ns,
)
from geodiff_ros.ros.diagnostics import AlignmentInfo, PipelineStats
from geodiff_ros.ros.params import Settings
from geodiff_ros.ros.pointcloud import PointCloudError, cloud_to_msg, cloud_to_sparse_depth

if TYPE_CHECKING:
    import torch

    from geodiff_ros.geometry.device import HostStaging

__all__ = ["OUTPUT_TOPICS", "CameraChannel", "DecodedFrame", "SparseRing", "cloud_fields"]

THROTTLE_S = 5.0  # per-frame warnings at most this often (per camera: each channel has its own logger)
_SPARSE_RING = 16  # sparse messages kept for stamp matching (LiDAR 10 Hz vs camera 30 Hz needs only a few)
# Start-up: image and CameraInfo are two topics with no order between them, so the first image can overtake the
# first CameraInfo; it waits this long for it (only while none has come and a publisher exists).
FIRST_INFO_WAIT_S = 0.5

# key -> (type, topic relative to the camera prefix); the issue-3 output set, per camera.
OUTPUT_TOPICS: dict[str, tuple[type, str]] = {
    "relative": (Image, "depth/relative"),
    "depth": (Image, "depth/image"),
    "depth_info": (CameraInfo, "depth/camera_info"),
    "depth_vis": (Image, "depth/image_vis"),
    "normals": (Image, "normals/image"),
    "normals_vis": (Image, "normals/image_vis"),
    "points": (PointCloud2, "points"),
}


@dataclass(frozen=True, repr=False)
class DecodedFrame:
    """An input image ready for the engine and the camera model of exactly these pixels (decoded at reduced size
    and/or rectified, see :meth:`CameraChannel.prepare`); ``info``/``intr`` None: no usable CameraInfo."""

    rgb: np.ndarray  # [H,W,3] uint8
    info: CameraInfo | None
    intr: PinholeIntrinsics | None

    @property
    def camera(self) -> tuple[CameraInfo | None, PinholeIntrinsics | None]:
        return self.info, self.intr


class SparseRing:
    """Recent sparse messages keyed by stamp; the worker picks the one nearest to the image stamp."""

    def __init__(self, size: int = _SPARSE_RING) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[tuple[int, str, Any, int]] = collections.deque(maxlen=size)
        self._arrivals = 0  # arrival counter: tells the old timeline's messages from the new one's after a reset

    def add(self, kind: str, msg: Any) -> None:
        with self._lock:
            self._arrivals += 1
            self._items.append((stamp_ns(msg.header), kind, msg, self._arrivals))

    def mark(self) -> int:
        """The arrival count now; :meth:`forget_up_to` drops what had arrived by then."""
        with self._lock:
            return self._arrivals

    def nearest(self, stamp: int, max_dt_s: float) -> tuple[tuple[str, Any] | None, float | None]:
        """(kind, msg) nearest to ``stamp`` within ``max_dt_s`` (newest wins ties) and the nearest offset in
        seconds (None when the ring is empty), so a caller can say why nothing matched."""
        with self._lock:
            if not self._items:
                return None, None
            best = min(reversed(self._items), key=lambda it: abs(it[0] - stamp))
        offset_s = abs(best[0] - stamp) * 1e-9
        if offset_s > max_dt_s:
            return None, offset_s
        return (best[1], best[2]), offset_s

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget_up_to(self, mark: int) -> None:
        """Forget messages that arrived by ``mark``: after time went backwards they belong to the old timeline."""
        with self._lock:
            kept = [it for it in self._items if it[3] > mark]
            self._items.clear()
            self._items.extend(kept)


class CameraChannel:
    """Inputs, per-camera state and outputs of one camera; ``finish`` runs on the worker thread only."""

    def __init__(self, node: Any, name: str, index: int) -> None:
        self.node = node
        self.name = name  # '' = the single unnamed camera
        self.index = index  # slot in the node's FrameScheduler
        self.prefix = camera_prefix(name)
        self.log = node.get_logger().get_child(name) if name else node.get_logger()
        self.stats = PipelineStats()
        self.sparse = SparseRing()
        self.overrides: dict[str, Any] = {}  # camera.<name>.<parameter> values that are set
        self.aligner: TemporalAligner | None = None
        self.aligner_dirty = False
        self.pubs: dict[str, Any] = {}
        self.subs: list[Any] = []
        self._info_lock = threading.Lock()
        self._latest_info: CameraInfo | None = None
        self._info_arrived = threading.Event()  # set by the first CameraInfo (cleared on reset_inputs)
        self._info_sub: Any = None
        self._last_stamp_ns: int | None = None  # worker only: detects time going backwards
        self._sparse_mark = 0  # worker only: sparse arrivals before the previous frame was handled
        self._had_metric = False  # worker only: log once when metric output stops
        self._rectifier = Rectifier()  # worker only: maps of the latest camera model (rectify)
        self._extrinsic: tuple[tuple[float, ...], RigidTransform] | None = None  # worker only: sparse_points

    def topic(self, base: str) -> str:
        """``depth/image`` -> ``front/depth/image`` (or unchanged for the unnamed camera)."""
        return self.prefix + base

    # ------------------------------------------------------------------ endpoints

    # QoS event handlers (issue 7): rclpy gives every publisher and subscription two by default (incompatible QoS,
    # incompatible type), and the Python executor walks every handler in Python on every wake-up, i.e. several
    # times per received message. With 4 cameras that was 92 handlers x ~240 messages/s: the executor thread held
    # the GIL 70% of the time and starved the inference worker (benchmarks/README.md, multi-camera). So handlers
    # exist only where a QoS mismatch silently loses data: the image input, and best-effort outputs (a reliable
    # subscriber such as RViz's default gets nothing from them).

    def create_publishers(self, qos: Any, tasks: tuple[str, ...] = ("depth", "normals")) -> None:
        """Publishers of the outputs; normals/* only when the normals task runs (no topic that never publishes)."""
        watch = qos.reliability == ReliabilityPolicy.BEST_EFFORT
        for key, (msg_type, topic) in OUTPUT_TOPICS.items():
            if topic.startswith("normals/") and "normals" not in tasks:
                continue
            events = PublisherEventCallbacks(incompatible_qos=self._on_offered_incompatible if watch else None,
                                             use_default_callbacks=False)
            self.pubs[key] = self.node.create_lifecycle_publisher(msg_type, self.topic(topic), qos,
                                                                  event_callbacks=events)

    def _on_offered_incompatible(self, event: Any) -> None:
        policy = qos_policy_name_from_kind(event.last_policy_kind)
        self.log.warning(
            f"a subscriber requests QoS incompatible with our outputs ({policy}); it receives nothing: set "
            "qos.output.reliability to reliable, or make the subscriber best effort", throttle_duration_sec=THROTTLE_S)

    def _on_requested_incompatible(self, event: Any) -> None:
        policy = qos_policy_name_from_kind(event.last_policy_kind)
        self.log.warning(
            f'a publisher of {self.topic("image")} offers QoS incompatible with ours ({policy}); its images never '
            'arrive: set qos.input.reliability to best_effort (connects to any camera)',
            throttle_duration_sec=THROTTLE_S)

    def destroy_publishers(self) -> None:
        for pub in self.pubs.values():
            self.node.destroy_lifecycle_publisher(pub)
        self.pubs = {}

    def subscribe(self, transport: str, qos: Any, group: Any, put: Callable[[int, Any], bool]) -> None:
        """Create the input subscriptions; image callbacks hand ``(msg, t_recv, compressed)`` to ``put``."""
        import time

        node = self.node
        quiet = SubscriptionEventCallbacks(use_default_callbacks=False)  # see create_publishers
        watched = SubscriptionEventCallbacks(incompatible_qos=self._on_requested_incompatible,
                                             use_default_callbacks=False)

        def on_image(msg: Image) -> None:
            self.stats.on_input(put(self.index, (msg, time.monotonic(), False)))

        def on_compressed(msg: CompressedImage) -> None:
            self.stats.on_input(put(self.index, (msg, time.monotonic(), True)))

        if transport == "compressed":
            # image_transport naming: <resolved image topic>/compressed, so remapping `image` is enough.
            topic = node.resolve_topic_name(self.topic("image")) + "/compressed"
            self.subs.append(node.create_subscription(CompressedImage, topic, on_compressed, qos,
                                                      callback_group=group, event_callbacks=watched))
        else:
            self.subs.append(node.create_subscription(Image, self.topic("image"), on_image, qos,
                                                      callback_group=group, event_callbacks=watched))
        self._info_sub = node.create_subscription(CameraInfo, self.topic("camera_info"), self._on_camera_info, qos,
                                                  callback_group=group, event_callbacks=quiet)
        self.subs += [
            self._info_sub,
            node.create_subscription(Image, self.topic("sparse_depth"), lambda m: self.sparse.add("depth", m), qos,
                                     callback_group=group, event_callbacks=quiet),
            node.create_subscription(PointCloud2, self.topic("sparse_points"), lambda m: self.sparse.add("points", m),
                                     qos, callback_group=group, event_callbacks=quiet),
        ]

    def unsubscribe(self) -> None:
        self._info_sub = None
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        self.subs = []

    def reset_inputs(self) -> None:
        """Forget CameraInfo and sparse depth (cleanup), so a reconfigured node never uses stale ones."""
        with self._info_lock:
            self._latest_info = None
            self._info_arrived.clear()
        self.sparse.clear()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        with self._info_lock:
            self._latest_info = msg
            self._info_arrived.set()

    def _wait_first_camera_info(self) -> None:
        """Worker: before any CameraInfo has come, give a live camera_info publisher FIRST_INFO_WAIT_S to deliver
        one, so the first frame is not published without depth/camera_info and cloud (nothing waits afterwards, or
        when no camera_info publisher exists)."""
        sub = self._info_sub
        if self._info_arrived.is_set() or sub is None:
            return
        try:
            publishers = sub.get_publisher_count()
        except Exception:  # noqa: BLE001 - destroyed by a concurrent cleanup: nothing to wait for
            return
        if publishers > 0:
            self._info_arrived.wait(FIRST_INFO_WAIT_S)

    # ------------------------------------------------------------------ worker steps

    @staticmethod
    def decode(msg: Any, compressed: bool) -> np.ndarray:
        """Input message -> [H,W,3] uint8 RGB at full size, no checks (raises ImageConversionError on bad data)."""
        return compressed_to_rgb8(msg) if compressed else image_to_rgb8(msg)

    def prepare(self, msg: Any, compressed: bool, s: Settings) -> DecodedFrame:
        """Input message -> the engine's input and its camera model; ``s`` has this camera's overrides.

        Steps (issue 13), each refusing the frame with an ImageConversionError that names the fix:
        1. size from the message (raw) or the JPEG/PNG header (compressed) against ``max_input_pixels``;
        2. decode; compressed input far above processing_res at 1/2, 1/4 or 1/8 size (``reduce_large_input``);
        3. too thin for the network at processing_res (the VAE needs 8 px per side);
        4. CameraInfo matched to the image (scaled to a reduced decode) and, with ``rectify``, the image
           undistorted and rectified with it; the outputs then carry that camera model.
        """
        from geodiff_ros.engine.preprocess import processing_size_problem  # torch: loaded with the engine by now

        limit = int(s["max_input_pixels"])
        res = int(s["processing_res"])
        if compressed:
            rgb, factor = decode_compressed(msg, limit, 2 * res if s["reduce_large_input"] else 0)
            src_w, src_h = compressed_image_size(msg.data)[1:] if factor > 1 else (rgb.shape[1], rgb.shape[0])
        else:
            check_input_pixels(int(msg.width), int(msg.height), limit, what=f"image ({msg.encoding})")
            rgb, factor = image_to_rgb8(msg), 1
            src_w, src_h = rgb.shape[1], rgb.shape[0]
        problem = processing_size_problem(rgb.shape[0], rgb.shape[1], res)
        if problem:
            raise ImageConversionError(f"{problem}; frame dropped")
        return self._with_camera(msg.header, rgb, src_w, src_h, factor, bool(s["rectify"]))

    def _with_camera(self, header: Any, rgb: np.ndarray, src_w: int, src_h: int, factor: int,
                     rectify: bool) -> DecodedFrame:
        """The latest CameraInfo for an image decoded from a ``src_w x src_h`` message at 1/``factor`` size,
        rectifying the image with it when asked; without a usable CameraInfo the frame goes on without one."""
        self._wait_first_camera_info()
        info, intr = self.camera_model(src_w, src_h)
        if info is None:
            if rectify:
                self.log.warning("rectify: no usable CameraInfo for this image; processed unrectified (no cloud)",
                                 throttle_duration_sec=THROTTLE_S)
            return DecodedFrame(rgb, None, None)
        if factor == 1 and not rectify:
            return DecodedFrame(rgb, info, intr)  # published as received (binning and ROI kept)
        height, width = rgb.shape[:2]
        out = camera_info_with_size(info, header, width, height, scale=1.0 / factor if factor > 1 else None)
        if rectify:
            model = CameraModel(width, height, str(out.distortion_model), tuple(out.d), tuple(out.k), tuple(out.r),
                                tuple(out.p))
            if model.needs_rectification():
                try:
                    rgb = self._rectifier(rgb, model)
                except Exception as err:  # noqa: BLE001 - InvalidCameraInfo, or cv2.error on absurd numbers
                    self.log.warning(f"rectify: {err}; processed unrectified (no cloud)",
                                     throttle_duration_sec=THROTTLE_S)
                    return DecodedFrame(rgb, None, None)
                rect = model.rectified()
                out.d, out.k, out.r, out.p = list(rect.d), list(rect.k), list(rect.r), list(rect.p)
        return DecodedFrame(rgb, out, intrinsics_from_msg(out, warn=self.log.warning))

    def make_aligner(self, s: Settings) -> TemporalAligner:
        fixed = float(s["alignment.fixed_scale"])
        return TemporalAligner(ema_alpha=float(s["alignment.ema_alpha"]),
                               max_fallback_age_s=float(s["alignment.max_fallback_age_s"]),
                               reset_ratio=float(s["alignment.reset_ratio"]),
                               fixed_scale=fixed if fixed > 0 else None)

    def camera_model(self, width: int, height: int) -> tuple[CameraInfo | None, PinholeIntrinsics | None]:
        """Latest CameraInfo and its intrinsics if it describes a ``width x height`` image, else (None, None)."""
        with self._info_lock:
            info = self._latest_info
        if info is None:
            return None, None
        try:
            intr = intrinsics_from_msg(info, warn=self.log.warning)  # the K-fallback warning goes to /rosout
        except InvalidCameraInfo as err:
            self.log.warning(f"CameraInfo unusable, no cloud: {err}", throttle_duration_sec=THROTTLE_S)
            return None, None
        if (intr.width, intr.height) != (width, height):
            self.log.warning(
                f"CameraInfo describes a {intr.width}x{intr.height} image but the image is {width}x{height}: no "
                "cloud and no depth/camera_info; remap camera_info to the image's sibling topic",
                throttle_duration_sec=THROTTLE_S)
            return None, None
        return info, intr

    def sparse_extrinsic(self, values: list[float]) -> RigidTransform:
        """The parameter's transform, rebuilt only when it changes (validated when set)."""
        key = tuple(values)
        if self._extrinsic is None or self._extrinsic[0] != key:
            self._extrinsic = (key, RigidTransform(values))
        return self._extrinsic[1]

    def sparse_for(self, s: Settings, header: Any, width: int, height: int,
                   intr: PinholeIntrinsics | None) -> np.ndarray | None:
        """Sparse metric depth ``[H,W]`` (NaN empty) matched to this image by stamp, or None.

        Unusable sparse input is logged (throttled) and ignored: the frame goes on without metric alignment.
        """
        max_dt = float(s["alignment.sparse_max_dt"])
        match, offset_s = self.sparse.nearest(stamp_ns(header), max_dt)
        if match is None:
            if offset_s is not None:
                self.log.warning(f"sparse depth not used: the nearest one is {offset_s:.3f} s from the image stamp "
                                 f"(> alignment.sparse_max_dt = {max_dt} s); check the clocks / stamps of both "
                                 "sensors or raise alignment.sparse_max_dt", throttle_duration_sec=THROTTLE_S)
            return None
        kind, msg = match
        try:
            return self._sparse_to_grid(s, kind, msg, header, width, height, intr)
        except ImageConversionError as err:
            self.log.warning(f"sparse input ignored: {err}", throttle_duration_sec=THROTTLE_S)
            return None
        except Exception as err:  # noqa: BLE001 - a malformed sparse message must never cost the camera frame
            self.log.warning(f"sparse input ignored: unreadable sparse_{kind} message ({type(err).__name__}: "
                             f"{err}); fix its publisher", throttle_duration_sec=THROTTLE_S)
            return None

    def _sparse_to_grid(self, s: Settings, kind: str, msg: Any, header: Any, width: int, height: int,
                        intr: PinholeIntrinsics | None) -> np.ndarray | None:
        if kind == "depth":
            # Same camera, any resolution: moved onto the image grid through the intrinsics ratio. Another aspect
            # ratio cannot be the same camera's image (it would pair pixels with the wrong depths).
            if msg.width and msg.height and abs(msg.width / msg.height - width / height) > 0.01 * width / height:
                raise ImageConversionError(
                    f"sparse_depth is {msg.width}x{msg.height} but the image is {width}x{height} (another aspect "
                    "ratio): it must come from the same camera (register it to the camera first, e.g. "
                    "depth_image_proc register)")
            return sparse_to_image_grid(depth_to_metres(msg), width, height)
        if intr is None:
            self.log.warning("sparse_points need a valid camera_info to be projected; skipping the fit",
                             throttle_duration_sec=THROTTLE_S)
            return None
        try:
            depth = cloud_to_sparse_depth(msg, header.frame_id, s["sparse_points.frame_id"],
                                          self.sparse_extrinsic(s["sparse_points.transform"]), intr, width, height)
        except PointCloudError as err:
            raise ImageConversionError(f"sparse_points: {err}") from err
        if depth is None:
            cloud_frame = msg.header.frame_id
            self.log.warning(
                f"sparse_points are in frame {cloud_frame!r}, the image in {header.frame_id!r}: set "
                f"sparse_points.frame_id to {cloud_frame!r} and sparse_points.transform to its pose in the image "
                f"frame (x y z qx qy qz qw, as `ros2 run tf2_ros tf2_echo {header.frame_id} {cloud_frame}` "
                "prints it), or transform the cloud upstream", throttle_duration_sec=THROTTLE_S)
        return depth

    def _subscribed(self, key: str) -> bool:
        pub = self.pubs.get(key)
        return pub is not None and pub.get_subscription_count() > 0

    def take_aligner_dirty(self) -> bool:
        """Whether an alignment parameter changed since the last call (and clear the flag). Clear first, read the
        settings after: a change landing in between sets the flag again, so none is ever lost (issue 13 bug 2)."""
        dirty = self.aligner_dirty
        self.aligner_dirty = False
        return dirty

    def align(self, s: Settings, header: Any, relative: np.ndarray, intr: PinholeIntrinsics | None,
              rebuild: bool) -> tuple[AlignmentState | None, AlignmentInfo]:
        """Step 3, metric alignment (ros-anchors 3.4): robust fit of ``relative`` [H,W] to the sparse depth matched
        by stamp, smoothed over time. Returns the scale/shift to apply (None: no metric output) and what the
        diagnostics show. ``rebuild``: alignment parameters changed, the aligner starts over with ``s``."""
        height, width = relative.shape
        if rebuild or self.aligner is None:
            self.aligner = self.make_aligner(s)
        stamp = stamp_ns(header)
        if self._last_stamp_ns is not None and stamp < self._last_stamp_ns:
            # Bag loop or sim-time reset: old sparse depth must not pair with the new run's frames.
            self.log.warning(f"time went backwards by {(self._last_stamp_ns - stamp) * 1e-9:.3f} s (bag loop or "
                             "sim time reset): alignment state reset", throttle_duration_sec=THROTTLE_S)
            self.sparse.forget_up_to(self._sparse_mark)
            self.aligner = self.make_aligner(s)
        self._last_stamp_ns = stamp
        self._sparse_mark = self.sparse.mark()
        sparse = self.sparse_for(s, header, width, height, intr)
        result = None
        if sparse is not None:
            result = fit_scale_shift(
                relative, sparse, method=s["alignment.method"], min_points=int(s["alignment.min_points"]),
                min_inlier_ratio=float(s["alignment.min_inlier_ratio"]),
                inlier_threshold_rel=float(s["alignment.inlier_threshold_rel"]),
                depth_range=(float(s["min_depth"]), float(s["max_depth"])))
            if not result.ok:
                self.log.warning(f"no metric fit this frame: {result.reason}", throttle_duration_sec=THROTTLE_S)
        state = self.aligner.update(result, stamp * 1e-9)
        if state is None and self._had_metric:
            self.log.warning("no usable sparse depth for longer than alignment.max_fallback_age_s: publishing "
                             "relative depth only (no depth/image, no points)", throttle_duration_sec=THROTTLE_S)
        self._had_metric = state is not None
        if state is not None:
            return state, AlignmentInfo(state.source, state.scale, state.shift, result.n_points if result else 0,
                                        state.n_inliers, state.residual_rel,
                                        result.reason if result else "no sparse depth matched")
        if result is not None:
            return None, AlignmentInfo("none", math.nan, math.nan, result.n_points, result.n_inliers,
                                       result.residual_rel, result.reason)
        return None, AlignmentInfo(reason="no sparse depth within alignment.sparse_max_dt")

    def finish(self, s: Settings, msg: Any, rgb: np.ndarray, relative: torch.Tensor | None,
               normals: torch.Tensor | None, staging: HostStaging, *, rebuild_aligner: bool = False,
               latency_from: float = 0.0, now: Callable[[], float] = time.monotonic,
               camera: tuple[CameraInfo | None, PinholeIntrinsics | None] | None = None) -> None:
        """Steps after the engine for this camera's frame: align -> metric depth, views, cloud -> publish.

        Runs on the node's post-processing thread. The per-pixel work runs in torch where the engine's outputs
        are (geometry/device.py; bit-identical to the numpy functions on the CPU) and each output crosses to the
        host once, through ``staging``'s reused (pinned on CUDA) buffers.

        Args:
            s: settings with this camera's overrides, read after the engine call.
            msg: the input image message (its header is copied to every output).
            rgb: [H,W,3] uint8 decoded input (host); relative: [H,W] in [0,1] or None; normals: [H,W,3] or None
                (engine device).
            rebuild_aligner: alignment parameters changed (take_aligner_dirty).
            latency_from: monotonic receive time of the frame; now: the clock for the latency.
            camera: (CameraInfo, intrinsics) of ``rgb`` from :meth:`prepare` (DecodedFrame.camera: reduced or
                rectified input); None: the latest CameraInfo if it has the size of ``rgb``.
        """
        import torch  # the node imports torch only once configured (start-up errors stay fast)

        from geodiff_ros.geometry.device import (
            cloud_points,
            colorize_depth_t,
            metres_to_mm16_t,
            metric_depth_t,
            normals_to_rgb_t,
        )

        header = msg.header
        height, width = rgb.shape[:2]
        info, intr = camera if camera is not None else self.camera_model(width, height)
        t0 = time.perf_counter()
        stream = staging.stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            host: dict[str, torch.Tensor] = {}
            if relative is not None:
                host["relative"] = staging.to_host("relative", relative)
            if normals is not None:
                host["normals"] = staging.to_host("normals", normals)
            staging.wait()  # the fit below needs the relative depth on the host
            state, align = None, AlignmentInfo()
            if relative is not None:
                state, align = self.align(s, header, host["relative"].numpy(), intr, rebuild_aligner)
            metric = None
            if state is not None:
                metric = metric_depth_t(relative, state.scale, state.shift, float(s["min_depth"]),
                                        float(s["max_depth"]))  # [H,W] m, NaN invalid
                encoded = metres_to_mm16_t(metric) if s["depth_encoding"] == "16UC1" else metric
                host["depth"] = staging.to_host("depth", encoded)  # [H,W] float32 m or uint16 mm
            if relative is not None and self._subscribed("depth_vis"):
                host["depth_vis"] = staging.to_host("depth_vis", colorize_depth_t(metric if metric is not None
                                                                                  else relative))
            if normals is not None and self._subscribed("normals_vis"):
                host["normals_vis"] = staging.to_host("normals_vis", normals_to_rgb_t(normals))
            if metric is not None and intr is not None and s["publish_cloud"] and self._subscribed("points"):
                colours = torch.from_numpy(rgb).to(metric.device) if s["cloud_color"] else None
                nrm = normals if s["cloud_normals"] else None
                host["points"] = staging.to_host("points", cloud_points(metric, intr, int(s["cloud_stride"]),
                                                                        colours, nrm))  # [H',W',k]
            staging.wait()
        t1 = time.perf_counter()
        self._publish(host, info, header, cloud_fields(s, normals is not None))
        t2 = time.perf_counter()
        self.stats.on_stage("post", t1 - t0)
        self.stats.on_stage("publish", t2 - t1)
        stamp_age = self.node.get_clock().now().nanoseconds - stamp_ns(header)
        self.stats.on_stage("stamp_to_publish", stamp_age * 1e-9)
        self.stats.on_output(now() - latency_from, metric is not None, align)

    def _publish(self, host: dict[str, torch.Tensor], info: CameraInfo | None, header: Any,
                 point_fields: list[str]) -> None:
        """Step 4: one message per output, header copied from the input (same stamp, same optical frame). Each
        message copies its host buffer once (numpy_to_image / cloud_to_msg fill the message's array directly)."""
        pubs = self.pubs
        if "relative" in host:
            pubs["relative"].publish(numpy_to_image(host["relative"].numpy(), "32FC1", header))
        if "depth_vis" in host:
            pubs["depth_vis"].publish(numpy_to_image(host["depth_vis"].numpy(), "rgb8", header))
        if "depth" in host:
            depth = host["depth"].numpy()
            pubs["depth"].publish(numpy_to_image(depth, "16UC1" if depth.dtype == np.uint16 else "32FC1", header))
        if info is not None:
            out_info = CameraInfo()
            for field in ("height", "width", "distortion_model", "d", "k", "r", "p", "binning_x", "binning_y",
                          "roi"):
                setattr(out_info, field, getattr(info, field))
            out_info.header = header  # identical stamp: image_transport pairs them with an exact sync
            pubs["depth_info"].publish(out_info)
        if "normals" in host:
            pubs["normals"].publish(numpy_to_image(host["normals"].numpy(), "32FC3", header))
        if "normals_vis" in host:
            pubs["normals_vis"].publish(numpy_to_image(host["normals_vis"].numpy(), "rgb8", header))
        if "points" in host:
            packed = host["points"].numpy()  # [H',W',k] float32, the structured layout's bytes
            dtype = np.dtype([(name, "<f4") for name in point_fields])
            pubs["points"].publish(cloud_to_msg(packed.view(dtype)[..., 0], header))


def cloud_fields(s: Settings, with_normals: bool) -> list[str]:
    """PointCloud2 field names of the node's cloud, in the order cloud_points packs them."""
    names = ["x", "y", "z"]
    if s["cloud_color"]:
        names.append("rgb")
    if with_normals and s["cloud_normals"]:
        names += ["normal_x", "normal_y", "normal_z"]
    return names
