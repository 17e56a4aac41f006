"""One camera served by the ``geodiff`` node: its topics, inputs, alignment state, statistics and outputs.

The node owns the engine and the worker threads; a ``CameraChannel`` owns everything that must never mix
between cameras: its CameraInfo and sparse-depth messages (stamp matchers), its frame processor (the temporal
alignment state of the per-frame pipeline, ``geodiff_ros.pipeline``), the publishers and the pipeline counters.
The per-frame work after the engine is the pipeline's, shared with ``geodiff_bag process``; this module converts
messages at the edge and publishes. The single-camera node is one channel with an empty prefix, so its topics stay
``image``, ``depth/image``, ... exactly; a named camera ``front`` uses ``front/image``, ``front/depth/image``, ...

Shapes: ``H,W`` input image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.qos import ReliabilityPolicy, qos_policy_name_from_kind
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from geodiff_ros.geometry import InvalidCameraInfo, PinholeIntrinsics, sparse_to_image_grid
from geodiff_ros.geometry.rectify import CameraModel, Rectifier
from geodiff_ros.pipeline import (
    AlignmentConfig,
    FrameProcessor,
    FrameResult,
    OutputConfig,
    SparseConfig,
    StampMatcher,
    Wanted,
)
from geodiff_ros.ros.camera_sets import camera_prefix
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    camera_info_with_size,
    check_input_pixels,
    compressed_image_size,
    compressed_to_rgb8,
    decode_compressed,
    image_to_rgb8,
    intrinsics_from_msg,
    numpy_to_image,
    stamp_ns,
)
from geodiff_ros.ros.diagnostics import PipelineStats
from geodiff_ros.ros.extrinsics import cloud_extrinsic
from geodiff_ros.ros.params import Settings
from geodiff_ros.ros.pointcloud import cloud_to_msg
from geodiff_ros.ros.sparse import SparseUnusable, sparse_metres

if TYPE_CHECKING:
    import torch

    from geodiff_ros.geometry.device import HostStaging

__all__ = ["OUTPUT_TOPICS", "SPARSE_MAX_BYTES", "CameraChannel", "DecodedFrame"]

THROTTLE_S = 5.0  # per-frame warnings at most this often (per camera: each channel has its own logger)
_SPARSE_RING = 16  # sparse messages kept for stamp matching (LiDAR 10 Hz vs camera 30 Hz needs only a few)
# ... and at most this many bytes of them: a 4000x3000 32FC1 depth image is 48 MB, and 16 such would hold 768 MB.
# A single sparse message larger than this is dropped (counted as sparse_dropped, with a warning).
SPARSE_MAX_BYTES = 64 * 1024 * 1024
_INFO_RING = 8  # CameraInfo messages kept for stamp matching (usually one per image, all equal)
# Start-up: image and CameraInfo are two topics with no order between them, so the first image can overtake the
# first CameraInfo; it waits this long for it (only while none has come and a publisher exists).
FIRST_INFO_WAIT_S = 0.5

# key -> (type, topic relative to the camera prefix): the outputs of one camera.
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


class CameraChannel:
    """Inputs, per-camera state and outputs of one camera; ``finish`` runs on the worker thread only."""

    def __init__(self, node: Any, name: str, index: int) -> None:
        self.node = node
        self.name = name  # '' = the single unnamed camera
        self.index = index  # slot in the node's FrameScheduler
        self.prefix = camera_prefix(name)
        self.log = node.get_logger().get_child(name) if name else node.get_logger()
        self.stats = PipelineStats()
        self.sparse: StampMatcher[tuple[str, Any]] = StampMatcher(_SPARSE_RING, SPARSE_MAX_BYTES)  # (kind, msg)
        self.infos: StampMatcher[CameraInfo] = StampMatcher(_INFO_RING)
        self.overrides: dict[str, Any] = {}  # camera.<name>.<parameter> values that are set
        self.frames: FrameProcessor | None = None  # the per-frame pipeline's state (worker only)
        self.aligner_dirty = False
        self.pubs: dict[str, Any] = {}
        self.subs: list[Any] = []
        self._info_arrived = threading.Event()  # set by the first CameraInfo (cleared on reset_inputs)
        self._info_sub: Any = None
        self._sparse_mark = 0  # worker only: sparse arrivals before the previous frame was handled
        self._rectifier = Rectifier()  # worker only: maps of the latest camera model (rectify)
        self._warned: dict[str, float] = {}  # warning kind -> monotonic time it was last logged (per camera)

    def topic(self, base: str) -> str:
        """``depth/image`` -> ``front/depth/image`` (or unchanged for the unnamed camera)."""
        return self.prefix + base

    # ------------------------------------------------------------------ endpoints

    # QoS event handlers: rclpy gives every publisher and subscription two by default (incompatible QoS,
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
            node.create_subscription(Image, self.topic("sparse_depth"), lambda m: self._on_sparse("depth", m), qos,
                                     callback_group=group, event_callbacks=quiet),
            node.create_subscription(PointCloud2, self.topic("sparse_points"), lambda m: self._on_sparse("points", m),
                                     qos, callback_group=group, event_callbacks=quiet),
        ]

    def unsubscribe(self) -> None:
        self._info_sub = None
        for sub in self.subs:
            self.node.destroy_subscription(sub)
        self.subs = []

    def reset_inputs(self) -> None:
        """Forget CameraInfo and sparse depth (cleanup), so a reconfigured node never uses stale ones."""
        self.infos.clear()
        self._info_arrived.clear()
        self.sparse.clear()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.infos.add(stamp_ns(msg.header), msg)
        self._info_arrived.set()

    def _on_sparse(self, kind: str, msg: Any) -> None:
        """Keep a sparse message for stamp matching. One above ``max_input_pixels`` (pixels, or points of a cloud)
        or alone above SPARSE_MAX_BYTES is dropped before any conversion, counted (diagnostics sparse_dropped) and
        reported (throttled); the matcher bounds what it keeps by count and bytes."""
        limit = int(self.node.settings.for_camera(self.overrides)["max_input_pixels"])
        try:
            check_input_pixels(int(msg.width), int(msg.height), limit, what=f"sparse_{kind} message "
                               f"({'points' if kind == 'points' else getattr(msg, 'encoding', '?')})")
        except ImageConversionError as err:
            self.stats.on_sparse_dropped()
            self.warn("sparse_too_many_pixels", f"sparse input dropped: {err}")
            return
        if not self.sparse.add(stamp_ns(msg.header), (kind, msg), len(msg.data)):
            self.stats.on_sparse_dropped()
            self.warn("sparse_too_large", f"sparse input dropped: a {msg.width}x{msg.height} sparse_{kind} message "
                      f"of {len(msg.data) / 1e6:.1f} MB is above the {SPARSE_MAX_BYTES / 2**20:.0f} MiB kept for "
                      "stamp matching; publish it at the camera's resolution or decimate the cloud")

    def warn(self, kind: str, text: str) -> None:
        """A WARN through this camera's logger, at most once per THROTTLE_S for each kind of warning."""
        now = time.monotonic()
        if now - self._warned.get(kind, -1e9) >= THROTTLE_S:
            self._warned[kind] = now
            self.log.warning(text)

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

        Steps, each refusing the frame with an ImageConversionError that names the fix:
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
        info, intr = self.camera_model(src_w, src_h, stamp_ns(header))
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

    def camera_model(self, width: int, height: int,
                     stamp: int) -> tuple[CameraInfo | None, PinholeIntrinsics | None]:
        """The CameraInfo nearest to ``stamp`` and its intrinsics if it describes a ``width x height`` image, else
        (None, None)."""
        info, _ = self.infos.nearest(stamp)
        if info is None:
            return None, None
        try:
            intr = intrinsics_from_msg(info, warn=self.log.warning)  # the K-fallback warning goes to /rosout
        except InvalidCameraInfo as err:
            self.warn("bad_camera_info", f"CameraInfo unusable, no cloud: {err}")
            return None, None
        if (intr.width, intr.height) != (width, height):
            self.warn("camera_info_size",
                      f"CameraInfo describes a {intr.width}x{intr.height} image but the image is {width}x{height}: no "
                      "cloud and no depth/camera_info; remap camera_info to the image's sibling topic")
            return None, None
        return info, intr

    def sparse_for(self, s: Settings, header: Any, width: int, height: int,
                   intr: PinholeIntrinsics | None) -> np.ndarray | None:
        """Sparse metric depth ``[H,W]`` (NaN empty) matched to this image by stamp, or None.

        Unusable sparse input is logged (throttled) and ignored: the frame goes on without a new metric fit.
        """
        max_dt = float(s["alignment.sparse_max_dt"])
        match, offset_s = self.sparse.nearest(stamp_ns(header), max_dt)
        if match is None:
            if offset_s is not None:
                self.warn("sparse_dt", f"sparse depth not used: the nearest one is {offset_s:.3f} s from the image "
                          f"stamp (> alignment.sparse_max_dt = {max_dt} s); check the clocks / stamps of both sensors "
                          "or raise alignment.sparse_max_dt")
            return None
        kind, msg = match
        try:
            extrinsic = None
            if kind == "points":
                extrinsic = cloud_extrinsic(msg.header.frame_id, header.frame_id, stamp_ns(msg.header),
                                            SparseConfig.from_values(s.values), self.node.tf, self.node.tf_missing)
            return sparse_to_image_grid(sparse_metres(kind, msg, width, height, intr, extrinsic), width, height)
        except SparseUnusable as err:
            self.warn(f"sparse_{kind}", f"sparse input ignored: {err}")
        except Exception as err:  # noqa: BLE001 - a malformed sparse message must never cost the camera frame
            self.warn(f"sparse_{kind}_unreadable", f"sparse input ignored: unreadable sparse_{kind} message "
                      f"({type(err).__name__}: {err}); fix its publisher")
        return None

    def _subscribed(self, key: str) -> bool:
        pub = self.pubs.get(key)
        return pub is not None and pub.get_subscription_count() > 0

    def take_aligner_dirty(self) -> bool:
        """Whether an alignment parameter changed since the last call (and clear the flag). Clear first, read the
        settings after: a change landing in between sets the flag again, so none is ever lost."""
        dirty = self.aligner_dirty
        self.aligner_dirty = False
        return dirty

    def start_frames(self, s: Settings) -> None:
        """A fresh per-frame pipeline state (configure)."""
        self.frames = FrameProcessor(AlignmentConfig.from_values(s.values))

    def finish(self, s: Settings, msg: Any, rgb: np.ndarray, relative: torch.Tensor | None,
               normals: torch.Tensor | None, staging: HostStaging, *, rebuild_aligner: bool = False,
               latency_from: float = 0.0, now: Callable[[], float] = time.monotonic,
               camera: tuple[CameraInfo | None, PinholeIntrinsics | None] | None = None) -> None:
        """Steps after the engine for this camera's frame: the sparse depth matched to it, then the shared per-frame
        pipeline (align -> metric depth, views, cloud), then publish.

        Runs on the node's post-processing thread.

        Args:
            s: settings with this camera's overrides, read after the engine call.
            msg: the input image message (its header is copied to every output).
            rgb: [H,W,3] uint8 decoded input (host); relative: [H,W] in [0,1] or None; normals: [H,W,3] or None
                (engine device).
            rebuild_aligner: alignment parameters changed (take_aligner_dirty).
            latency_from: monotonic receive time of the frame; now: the clock for the latency.
            camera: (CameraInfo, intrinsics) of ``rgb`` from :meth:`prepare` (DecodedFrame.camera: reduced or
                rectified input); None: the CameraInfo matched by stamp if it has the size of ``rgb``.
        """
        header = msg.header
        stamp = stamp_ns(header)
        height, width = rgb.shape[:2]
        info, intr = camera if camera is not None else self.camera_model(width, height, stamp)
        alignment = AlignmentConfig.from_values(s.values)
        if self.frames is None:
            self.frames = FrameProcessor(alignment)
        elif rebuild_aligner:
            self.frames.reset(alignment)
        t0 = time.perf_counter()
        back_s = self.frames.time_went_backwards(stamp, alignment)
        if back_s is not None:
            # Bag loop or sim-time reset: old sparse depth must not pair with the new run's frames.
            self.warn("time_backwards", f"time went backwards by {back_s:.3f} s (bag loop or sim time reset): "
                      "alignment state reset")
            self.sparse.forget_up_to(self._sparse_mark)
        self._sparse_mark = self.sparse.mark()
        sparse = self.sparse_for(s, header, width, height, intr) if relative is not None else None
        wanted = Wanted(depth_vis=self._subscribed("depth_vis"), normals_vis=self._subscribed("normals_vis"),
                        cloud=self._subscribed("points"))
        result = self.frames.process(stamp_ns=stamp, relative=relative, normals=normals, rgb=rgb, intr=intr,
                                     sparse=sparse, alignment=alignment, output=OutputConfig.from_values(s.values),
                                     wanted=wanted, staging=staging)
        for kind, text in result.warnings:
            self.warn(kind, text)
        t1 = time.perf_counter()
        self._publish(result, info, header)
        t2 = time.perf_counter()
        self.stats.on_stage("post", t1 - t0)
        self.stats.on_stage("publish", t2 - t1)
        stamp_age = self.node.get_clock().now().nanoseconds - stamp
        self.stats.on_stage("stamp_to_publish", stamp_age * 1e-9)
        self.stats.on_output(now() - latency_from, result.metric, result.alignment)

    def _publish(self, result: FrameResult, info: CameraInfo | None, header: Any) -> None:
        """Step 4: one message per output, header copied from the input (same stamp, same optical frame). Each
        message copies its host buffer once (numpy_to_image / cloud_to_msg fill the message's array directly)."""
        pubs, host = self.pubs, result.host
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
            dtype = np.dtype([(name, "<f4") for name in result.cloud_fields])
            pubs["points"].publish(cloud_to_msg(packed.view(dtype)[..., 0], header))

