"""Export a recorded RGB-D bag as a generic RGB-D manifest folder, for fine-tuning and evaluation.

``OUT_DIR/rgb/000000.png`` (8-bit RGB), ``OUT_DIR/depth/000000.png`` (16-bit millimetres, ``depth_scale`` 1000,
0 = no measurement) and ``OUT_DIR/manifest.json`` in the format :func:`geodiff_ros.manifest.read_manifest` reads
(that of ``../shared/data/manifest.json``), so ``geodiff_train --manifest`` and ``geodiff_eval --dataset
manifest:`` take a recording directly. No rclpy: the bag is read with ``rosbags`` (bag.storage).

The bag is read twice. The first pass decodes only headers, sizes, encodings and CameraInfos, so every check runs
and the pairing is decided before a file is written; the second decodes and writes the kept pairs. Memory stays at
a few frames however long the recording is.

Choices (README, "Bags without rosbag2"):

* Pairing: each colour image takes the depth image nearest in header stamp within ``max_dt``; a depth image serves
  one colour image at most (the nearest), so no depth map is duplicated in the training data. Unpaired images and
  unused depth images are counted, not exported.
* Intrinsics: from the colour CameraInfo nearest in stamp, read from **P** like image_geometry and so
  depth_image_proc (K only when P is unset), scaled to the image size when the CameraInfo describes another one.
  P describes the *rectified* image: export an ``image_rect`` topic for exact intrinsics; a raw topic of a camera
  with lens distortion keeps that distortion in its pixels.
* Depth range: 16-bit millimetres hold 0.001-65.535 m. Farther measurements are written as 0 (no measurement) and
  counted: clipping them to 65.535 m would put a false surface into the training targets.
* Resolution: both manifest readers need depth on the colour image grid. Depth registered to the colour camera at
  another resolution (same aspect ratio, e.g. half size) is moved onto the image grid by nearest neighbour, never
  interpolated (:func:`geodiff_ros.geometry.sparse_to_image_grid`). Depth that is not registered to the colour
  camera is refused: a different aspect ratio, or a depth CameraInfo (``<depth namespace>/camera_info``) whose
  intrinsics scaled to the image size differ from the colour ones. Mapping it needs the extrinsics
  (depth_image_proc's ``register``); export the aligned depth topic instead.

Shapes: ``H,W`` colour image; ``h,w`` depth image.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geodiff_ros.bag.storage import Bag, BagError, camera_info_topic_for, image_topic_is_compressed
from geodiff_ros.geometry import InvalidCameraInfo, PinholeIntrinsics, scale_intrinsics, sparse_to_image_grid
from geodiff_ros.geometry.depth_units import MM_PER_M, metres_to_mm16
from geodiff_ros.manifest import write_manifest
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    compressed_to_rgb8,
    depth_to_metres,
    image_to_rgb8,
    intrinsics_from_msg,
    stamp_ns,
    to_uint8_array,
)

__all__ = [
    "DEPTH_SCALE",
    "ExportOptions",
    "ExportSummary",
    "export_bag",
    "metres_to_mm16",
    "pair_by_stamp",
]

LOG = logging.getLogger(__name__)

DEPTH_SCALE = MM_PER_M  # stored value / DEPTH_SCALE = metres (16-bit PNG millimetres, like NYUv2 and ScanNet)
_IMAGE = "sensor_msgs/msg/Image"
_INFO = "sensor_msgs/msg/CameraInfo"
_COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3")
_DEPTH_ENCODINGS = ("32FC1", "16UC1", "mono16")
_FOCAL_TOL = 0.01  # registration check: focal lengths within 1 %
_CENTRE_TOL_PX = 2.0  # ... and principal points within max(2 px, 1 % of the image size)


@dataclass
class ExportOptions:
    """Settings of ``geodiff_bag export``."""

    image_topic: str
    depth_topic: str
    camera_info_topic: str | None = None  # None: <image namespace>/camera_info if the bag has it; '' = none
    max_dt: float = 0.02  # s, largest image-depth header stamp difference of a pair
    every: int = 1  # keep every N-th pair
    set_name: str = ""  # the entries' "set"; '' = the bag's name


@dataclass
class ExportSummary:
    """What :func:`export_bag` did; ``damage`` says where a damaged bag stopped being readable."""

    images: int = 0
    depths: int = 0
    pairs: int = 0  # images with a depth image within max_dt (one depth image per colour image)
    unpaired_images: int = 0
    unused_depths: int = 0
    kept: int = 0  # pairs selected by --every
    exported: int = 0
    failed: list[str] = field(default_factory=list)  # frames that did not decode (skipped)
    resampled: int = 0  # frames whose depth was moved onto the image grid
    beyond_range_px: int = 0  # depth pixels beyond 65.535 m, written as 0
    nearest_dt_s: float | None = None  # smallest image-depth stamp difference seen (explains 0 pairs)
    camera_info_topic: str | None = None
    depth_camera_info_topic: str | None = None
    manifest: Path | None = None
    damage: str | None = None


@dataclass
class _Header:
    """What the first pass keeps of one image message (its ordinal on the topic identifies it in pass two)."""

    ordinal: int
    stamp: int  # ns
    width: int  # 0 = unknown (compressed data whose header does not parse; decoding will say why)
    height: int
    frame_id: str


def _seconds(stamp_ns: int) -> float:
    """ns -> s as sec + nanosec * 1e-9, so 0.1 s shows as .1 in the JSON (not .1000001 from a 1.7e18 product)."""
    sec, nsec = divmod(stamp_ns, 1_000_000_000)
    return sec + nsec * 1e-9


def pair_by_stamp(image_stamps: Sequence[int], depth_stamps: Sequence[int],
                  max_dt_ns: int) -> tuple[list[tuple[int, int]], int | None]:
    """``(image index, depth index)`` pairs, each image with the depth stamp nearest to its own within
    ``max_dt_ns``; a depth index used by several images stays with the nearest one (ties: the earlier image).

    Returns the pairs in image order and the smallest stamp difference seen (None without depth stamps).
    """
    order = sorted(range(len(depth_stamps)), key=lambda j: depth_stamps[j])
    ordered = [depth_stamps[j] for j in order]
    best: dict[int, tuple[int, int]] = {}  # depth index -> (|dt|, image index)
    nearest: int | None = None
    for i, stamp in enumerate(image_stamps):
        k = bisect.bisect_left(ordered, stamp)
        candidates = [order[c] for c in (k - 1, k) if 0 <= c < len(order)]
        if not candidates:
            continue
        j = min(candidates, key=lambda c: abs(depth_stamps[c] - stamp))
        dt = abs(depth_stamps[j] - stamp)
        nearest = dt if nearest is None else min(nearest, dt)
        if dt <= max_dt_ns and (j not in best or dt < best[j][0]):
            best[j] = (dt, i)
    return sorted((i, j) for j, (_, i) in best.items()), nearest


class _Exporter:
    """Both passes over the bag; see the module docstring."""

    def __init__(self, bag: Bag, out_dir: Path, opts: ExportOptions,
                 progress: Callable[[int], None] | None) -> None:
        self.bag, self.out_dir, self.opts, self.progress = bag, out_dir, opts, progress
        self.summary = ExportSummary()
        self.infos: dict[str, tuple[list[int], list[PinholeIntrinsics | str]]] = {}  # topic -> sorted stamps, values
        self._warned: set[tuple[str, int, int]] = set()
        self._checked: set[tuple[Any, ...]] = set()
        self._check_options()

    # -- checks

    def _check_options(self) -> None:
        bag, opts = self.bag, self.opts
        if opts.max_dt < 0 or not math.isfinite(opts.max_dt):
            msg = f"--max-dt must be a non-negative number of seconds, got {opts.max_dt}"
            raise BagError(msg)
        if opts.every < 1:
            msg = f"--every must be 1 or more (keep every N-th pair), got {opts.every}"
            raise BagError(msg)
        if opts.image_topic == opts.depth_topic:
            msg = f"--image-topic and --depth-topic are both {opts.image_topic}; give the colour and the depth topic"
            raise BagError(msg)
        bag.select([opts.image_topic, opts.depth_topic])
        self.compressed = image_topic_is_compressed(bag, opts.image_topic)
        depth_type = bag.topics[opts.depth_topic].msgtype
        if depth_type != _IMAGE:
            msg = (f"--depth-topic {opts.depth_topic} has type {depth_type}; it must be a depth {_IMAGE} "
                   "(32FC1 metres or 16UC1 millimetres; compressedDepth is not supported)")
            raise BagError(msg)
        for topic in (opts.image_topic, opts.depth_topic):
            problem = bag.type_problem(bag.topics[topic].msgtype)
            if problem:
                raise BagError(f"cannot decode {topic}: {problem}")
        self.info_topic = camera_info_topic_for(bag, opts.image_topic, opts.camera_info_topic)
        if self.info_topic:
            LOG.info("intrinsics from %s (P, as depth_image_proc)", self.info_topic)
        else:
            LOG.warning("no camera_info for %s (give --camera-info-topic): the manifest gets no intrinsics",
                        opts.image_topic)
        depth_info = opts.depth_topic.rsplit("/", 1)[0] + "/camera_info"
        self.depth_info_topic = depth_info if depth_info in bag.topics and \
            bag.topics[depth_info].msgtype == _INFO and depth_info != self.info_topic else ""
        self.summary.camera_info_topic = self.info_topic or None
        self.summary.depth_camera_info_topic = self.depth_info_topic or None

    # -- pass 1: headers, CameraInfos, pairing, checks

    def scan(self) -> list[tuple[_Header, _Header]]:
        """Read headers and CameraInfos, pair the images, check registration; the pairs to export, in order."""
        opts, bag = self.opts, self.bag
        topics = [t for t in (opts.image_topic, opts.depth_topic, self.info_topic, self.depth_info_topic) if t]
        images: list[_Header] = []
        depths: list[_Header] = []
        infos: dict[str, list[tuple[int, PinholeIntrinsics | str]]] = {t: [] for t in topics[2:]}
        ordinals = dict.fromkeys(topics, 0)
        for raw in bag.messages(topics):
            ordinal = ordinals[raw.topic]
            ordinals[raw.topic] += 1
            try:
                msg = bag.deserialize(raw)
            except Exception as err:  # noqa: BLE001 - a corrupt message must not end the export
                self._fail(f"{raw.topic} #{ordinal} at bag time {raw.timestamp * 1e-9:.3f} s does not "
                           f"deserialize: {err}")
                continue
            if raw.topic == opts.image_topic:
                images.append(self._image_header(ordinal, msg))
            elif raw.topic == opts.depth_topic:
                if str(msg.encoding) not in _DEPTH_ENCODINGS:
                    msg_ = (f"--depth-topic {opts.depth_topic} has encoding {msg.encoding!r}; a depth image is "
                            "32FC1 metres or 16UC1 millimetres (REP 118). Is it the right topic?")
                    raise BagError(msg_)
                depths.append(_Header(ordinal, stamp_ns(msg.header), int(msg.width), int(msg.height),
                                      str(msg.header.frame_id)))
            else:
                try:
                    intr: PinholeIntrinsics | str = intrinsics_from_msg(msg)
                except InvalidCameraInfo as err:
                    intr = str(err)
                infos[raw.topic].append((stamp_ns(msg.header), intr))
        for topic, items in infos.items():
            items.sort(key=lambda item: item[0])
            self.infos[topic] = ([s for s, _ in items], [i for _, i in items])
            if not items and topic == self.info_topic:
                LOG.warning("%s holds no readable CameraInfo: the manifest gets no intrinsics", topic)
        self.summary.damage = bag.damage
        self.summary.images, self.summary.depths = len(images), len(depths)
        pairs, nearest = pair_by_stamp([h.stamp for h in images], [h.stamp for h in depths],
                                       round(opts.max_dt * 1e9))
        self.summary.pairs = len(pairs)
        self.summary.unpaired_images = len(images) - len(pairs)
        self.summary.unused_depths = len(depths) - len(pairs)
        self.summary.nearest_dt_s = None if nearest is None else nearest * 1e-9
        if not pairs:
            near = "no depth image" if nearest is None else f"the nearest pair is {nearest * 1e-9:.4f} s apart"
            msg = (f"no colour/depth pairs within --max-dt {opts.max_dt} s ({len(images)} images on "
                   f"{opts.image_topic}, {len(depths)} depth images on {opts.depth_topic}; {near}); raise --max-dt "
                   "if the cameras are not stamped together")
            raise BagError(msg)
        kept = [(images[i], depths[j]) for i, j in pairs][::opts.every]
        self.summary.kept = len(kept)
        for img, dep in kept:
            self._check_registration(img, dep)
        if kept[0][0].frame_id != kept[0][1].frame_id and not self.depth_info_topic:
            LOG.warning("depth frame %r differs from the image frame %r and there is no depth camera_info to check "
                        "that the depth is registered to the colour camera; assuming it is", kept[0][1].frame_id,
                        kept[0][0].frame_id)
        return kept

    def _image_header(self, ordinal: int, msg: Any) -> _Header:
        stamp, frame = stamp_ns(msg.header), str(msg.header.frame_id)
        if not self.compressed:
            if str(msg.encoding) not in _COLOUR_ENCODINGS:
                msg_ = (f'--image-topic {self.opts.image_topic} has encoding {msg.encoding!r}; a colour image is one '
                        f'of {", ".join(_COLOUR_ENCODINGS)}')
                raise BagError(msg_)
            return _Header(ordinal, stamp, int(msg.width), int(msg.height), frame)
        from PIL import Image as PILImage

        try:  # the size is in the JPEG / PNG header: no decoding needed
            with PILImage.open(io.BytesIO(to_uint8_array(msg.data).tobytes())) as im:
                width, height = im.size
        except Exception:  # noqa: BLE001 - undecodable: pass two reports why, per frame
            width = height = 0
        return _Header(ordinal, stamp, width, height, frame)

    def _intrinsics(self, topic: str, stamp: int, width: int, height: int) -> PinholeIntrinsics | None:
        """Intrinsics of the CameraInfo on ``topic`` nearest to ``stamp``, for an image of ``width x height``."""
        stamps, values = self.infos.get(topic, ([], []))
        if not stamps:
            return None
        k = bisect.bisect_left(stamps, stamp)
        near = min((c for c in (k - 1, k) if 0 <= c < len(stamps)), key=lambda c: abs(stamps[c] - stamp))
        intr = values[near]
        if isinstance(intr, str):
            msg = (f"{topic} cannot give intrinsics: {intr}. Pass another --camera-info-topic, or "
                   "--camera-info-topic '' to export without intrinsics")
            raise BagError(msg)
        if width and height and (intr.width, intr.height) != (width, height):
            if (topic, width, height) not in self._warned:
                self._warned.add((topic, width, height))
                LOG.warning("%s describes a %dx%d image, the image is %dx%d: intrinsics scaled to the image",
                            topic, intr.width, intr.height, width, height)
            intr = scale_intrinsics(intr, width, height)
        return intr

    def _check_registration(self, img: _Header, dep: _Header) -> None:
        """Refuse depth that is not on the colour camera's grid up to a scale (see the module docstring)."""
        iw, ih, dw, dh = img.width, img.height, dep.width, dep.height
        colour = self._intrinsics(self.info_topic, img.stamp, iw, ih)  # also refuses an uncalibrated CameraInfo
        if not (iw and ih and dw and dh):
            return
        if not self._near_aspect((dh, dw), (ih, iw)):
            msg = (f"depth {self.opts.depth_topic} is {dw}x{dh} but the image {self.opts.image_topic} is {iw}x{ih}, "
                   "a different aspect ratio: the depth is not registered to the colour camera. Export the depth "
                   "aligned to the colour image (e.g. /camera/aligned_depth_to_color/image_raw, or "
                   "depth_image_proc register)")
            raise BagError(msg)
        depth = self._intrinsics(self.depth_info_topic, dep.stamp, dw, dh)
        key = (iw, ih, dw, dh, colour, depth)
        if colour is None or depth is None or key in self._checked:
            return
        self._checked.add(key)
        scaled = scale_intrinsics(depth, iw, ih)
        tol_c = max(_CENTRE_TOL_PX, 0.01 * max(iw, ih))
        if (abs(scaled.fx - colour.fx) > _FOCAL_TOL * colour.fx or abs(scaled.fy - colour.fy) > _FOCAL_TOL * colour.fy
                or abs(scaled.cx - colour.cx) > tol_c or abs(scaled.cy - colour.cy) > tol_c):
            msg = (f"depth {self.opts.depth_topic} is not registered to the colour camera: its intrinsics "
                   f"({self.depth_info_topic}, scaled to {iw}x{ih}: fx {scaled.fx:.1f} fy {scaled.fy:.1f} cx "
                   f"{scaled.cx:.1f} cy {scaled.cy:.1f}) differ from the colour ones ({self.info_topic}: fx "
                   f"{colour.fx:.1f} fy {colour.fy:.1f} cx {colour.cx:.1f} cy {colour.cy:.1f}). Export the depth "
                   "aligned to the colour image (e.g. /camera/aligned_depth_to_color/image_raw, or depth_image_proc "
                   "register)")
            raise BagError(msg)

    # -- pass 2: decode and write

    def write(self, kept: list[tuple[_Header, _Header]]) -> ExportSummary:
        """Decode and write the kept pairs and the manifest (also after an error, for what was written)."""
        opts, bag = self.opts, self.bag
        set_name = opts.set_name or bag.path.name.removesuffix(".mcap").removesuffix(".db3")
        (self.out_dir / "rgb").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "depth").mkdir(exist_ok=True)
        want_image = {img.ordinal: n for n, (img, _) in enumerate(kept)}
        want_depth = {dep.ordinal: n for n, (_, dep) in enumerate(kept)}
        held: dict[int, dict[str, Any]] = {}  # pair -> decoded messages while its partner is still to come
        ordinals = {opts.image_topic: 0, opts.depth_topic: 0}
        entries: list[dict[str, Any]] = []
        try:
            for raw in bag.messages([opts.image_topic, opts.depth_topic]):
                ordinal = ordinals[raw.topic]
                ordinals[raw.topic] += 1
                role = "image" if raw.topic == opts.image_topic else "depth"
                pair = (want_image if role == "image" else want_depth).get(ordinal)
                if pair is None:
                    continue
                try:
                    held.setdefault(pair, {})[role] = bag.deserialize(raw)
                except Exception as err:  # noqa: BLE001 - skipped in pass one already (same bytes)
                    self._fail(f"{raw.topic} #{ordinal} does not deserialize: {err}")
                    held.pop(pair, None)
                    continue
                if len(held[pair]) == 2:
                    parts = held.pop(pair)
                    entry = self._write_pair(len(entries), kept[pair], parts["image"], parts["depth"], set_name)
                    if entry is not None:
                        entries.append(entry)
                    if self.progress is not None:
                        self.progress(1)
        finally:
            if entries:
                self.summary.manifest = write_manifest(self.out_dir, entries)
            self.summary.exported = len(entries)
        if bag.damage:
            self.summary.damage = bag.damage
        return self.summary

    def _write_pair(self, index: int, headers: tuple[_Header, _Header], img_msg: Any, depth_msg: Any,
                    set_name: str) -> dict[str, Any] | None:
        from PIL import Image as PILImage

        img, _ = headers
        try:
            rgb = compressed_to_rgb8(img_msg) if self.compressed else image_to_rgb8(img_msg)  # [H,W,3]
            depth = depth_to_metres(depth_msg)  # [h,w] m, NaN = none
        except ImageConversionError as err:
            self._fail(f"frame at stamp {img.stamp * 1e-9:.6f} s skipped: {err}")
            return None
        height, width = rgb.shape[:2]
        if depth.shape != (height, width):
            if not self._near_aspect(depth.shape, rgb.shape):  # checked in pass one where the size was known
                self._fail(f"frame at stamp {img.stamp * 1e-9:.6f} s skipped: depth {depth.shape[1]}x"
                           f"{depth.shape[0]} does not scale to the image {width}x{height}")
                return None
            depth = sparse_to_image_grid(depth, width, height)  # [H,W], nearest neighbour, z-buffer
            self.summary.resampled += 1
        mm, far = metres_to_mm16(depth)  # [H,W] uint16
        self.summary.beyond_range_px += far
        name = f"{index:06d}.png"
        PILImage.fromarray(rgb).save(self.out_dir / "rgb" / name)
        PILImage.fromarray(mm).save(self.out_dir / "depth" / name)
        entry: dict[str, Any] = {"rgb": f"rgb/{name}", "depth": f"depth/{name}", "depth_scale": DEPTH_SCALE}
        intr = self._intrinsics(self.info_topic, img.stamp, width, height)
        if intr is not None:
            entry["intrinsics"] = {"fx": intr.fx, "fy": intr.fy, "cx": intr.cx, "cy": intr.cy}
        entry.update({"width": width, "height": height, "set": set_name, "stamp": _seconds(img.stamp),
                      "valid_frac": round(float((mm > 0).mean()), 4)})
        return entry

    @staticmethod
    def _near_aspect(depth_hw: tuple[int, ...], image_hw: tuple[int, ...]) -> bool:
        (dh, dw), (ih, iw) = depth_hw[:2], image_hw[:2]
        return abs(dw * ih / dh - iw) <= 1.0 and abs(dh * iw / dw - ih) <= 1.0

    def _fail(self, text: str) -> None:
        self.summary.failed.append(text)
        LOG.warning("%s", text)


def export_bag(bag: Bag, out_dir: str | Path, opts: ExportOptions,
               progress: Callable[[int], None] | None = None,
               on_scanned: Callable[[ExportSummary], None] | None = None) -> ExportSummary:
    """Export the colour/depth pairs of ``bag`` to ``out_dir`` (new or empty) as a manifest folder.

    ``progress(n)`` is called per written frame; ``on_scanned(summary)`` after the first pass (``summary.kept`` is
    the number of frames the second pass writes). Nothing is written when a check fails.

    Raises:
        BagError: missing topic, wrong type or encoding, no pairs within ``max_dt``, depth not registered to the
            colour camera, ``out_dir`` not empty (each message says what to change).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        msg = f"output folder {out} exists and is not empty; choose a new folder or empty it (export never overwrites)"
        raise BagError(msg)
    exporter = _Exporter(bag, out, opts, progress)
    kept = exporter.scan()
    if on_scanned is not None:
        on_scanned(exporter.summary)
    return exporter.write(kept)
