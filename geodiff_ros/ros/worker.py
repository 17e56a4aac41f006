"""The ``geodiff`` node's two worker threads: the engine thread and the post-processing thread.

Subscription callbacks only store messages (the newest image in a per-camera one-slot mailbox of the
``FrameScheduler``). The ENGINE thread takes the frames that are ready (fairly, the longest-waiting camera first),
decodes them and runs them through the engine in one call (same-size frames share a network pass); the POST thread
aligns, builds the colour views and the cloud (on the engine's device) and publishes per camera. So frame N+1 runs
through the network while frame N is post-processed; a one-slot hand-off between them keeps at most one finished
frame waiting, so nothing stale piles up. The executor thread stays free for parameter and lifecycle services
during inference.

The threads live from the first activation until cleanup or shutdown; deactivate only pauses them, so however often
the node is cycled there is one pipeline. Lifecycle transitions never wait for an engine call: a cleanup leaves a
frame in flight to finish on its own (it publishes nothing: every activation has its own epoch), and the next
activation's engine thread waits for that old thread itself, so ``activate`` returns at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geodiff_ros.ros.camera import CameraChannel
from geodiff_ros.ros.conversions import ImageConversionError
from geodiff_ros.ros.params import Settings
from geodiff_ros.ros.scheduler import BatchStats, FrameScheduler, Handoff

__all__ = ["FramePipeline"]

THROTTLE_S = 5.0  # per-frame warnings at most this often
_JOIN_TIMEOUT_S = 1.5  # a stop waits at most this long in all (the process must exit within 2 s of a signal)
_POLL_S = 0.2  # worker threads re-check their stop flag this often while idle
_OLD_THREAD_LOG_S = 5.0  # a new pipeline waiting for the previous one's last engine call says so after this long


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


class FramePipeline:
    """The engine and post-processing threads of one node, for its cameras.

    Args:
        log: the node's logger.
        cameras: the node's camera channels (index = slot in ``scheduler``).
        scheduler: the per-camera newest-frame mailboxes the subscriptions fill.
        settings: returns the node's current settings (read per frame: runtime parameters apply at once).
        ros_ok: whether the node's ROS context is still valid (an error while it is not is a shutdown, not a fault).
    """

    def __init__(self, log: Any, cameras: list[CameraChannel], scheduler: FrameScheduler,
                 settings: Callable[[], Settings], ros_ok: Callable[[], bool]) -> None:
        self._log = log
        self._cams = cameras
        self._sched = scheduler
        self._settings = settings
        self._ros_ok = ros_ok
        self.batch_stats = BatchStats()
        self._threads: list[threading.Thread] = []
        self._quit = threading.Event()
        self._active = threading.Event()
        self._epoch = 0  # +1 on every activate/pause: frames of an earlier activation are never published
        self._handoff = Handoff()
        self._builder: Any = None  # engine/serving.PathBuilder of a compiled engine (serve while compiling)
        self._status = ""  # what the engine thread is doing before serving, '{elapsed}' filled in by status()
        self._status_since = 0.0

    @property
    def _multi(self) -> bool:
        return bool(self._cams[0].name)

    # ------------------------------------------------------------------ lifecycle

    def activate(self, engine: Any) -> None:
        """Serve frames with ``engine``: resume the threads, or start new ones (never blocks on an engine call)."""
        self._sched.reopen()
        self._epoch += 1
        self._active.set()
        if self._threads and all(t.is_alive() for t in self._threads) and not self._quit.is_set():
            return  # paused by a deactivate: they simply resume
        previous = [t for t in self._threads if t.is_alive()]  # stopped but still finishing an engine call
        self._quit = threading.Event()  # a new flag: a thread that outlived its stop keeps its own, set one
        self._handoff = Handoff()
        self._threads = [
            threading.Thread(target=self._engine_main, args=(engine, self._quit, self._handoff, previous),
                             name="geodiff-engine", daemon=True),
            threading.Thread(target=self._post_main, args=(engine, self._quit, self._handoff), name="geodiff-post",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def pause(self) -> None:
        """Stop taking frames (a frame in flight is finished and discarded, never waited for)."""
        self._active.clear()
        self._epoch += 1
        self._sched.close()
        self._handoff.clear()

    def stop(self) -> None:
        """Stop the threads, waiting at most _JOIN_TIMEOUT_S in all (an engine call may run longer: the thread then
        ends after it, publishing nothing)."""
        self.pause()
        self._quit.set()
        if self._builder is not None:  # after its step in progress (a compile cannot be interrupted)
            self._builder.stop(timeout=0.0)
            self._builder = None
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def status(self) -> str:
        """What the engine thread does before serving ('' while it serves), e.g. 'compiling (stage 2 of 4: ...)'."""
        status = self._status
        return status.replace("{elapsed}", f"{time.monotonic() - self._status_since:.0f}") if status else ""

    def _set_status(self, text: str) -> None:
        self._status_since = time.monotonic()
        self._status = text

    # ------------------------------------------------------------------ engine thread

    def _engine_main(self, engine: Any, quit_: threading.Event, handoff: Handoff,
                     previous: list[threading.Thread]) -> None:
        """Engine thread: wait for the previous pipeline's last call, warm up, then decode -> engine -> hand on."""
        if not self._wait_for_previous(previous, quit_):
            return
        self._warm_up(engine, quit_)
        while not quit_.is_set():
            if not self._active.wait(_POLL_S) or not handoff.wait_free(_POLL_S):
                continue
            s = self._settings()
            window = float(s["batch_window_s"]) if self._multi else 0.0
            picked = self._sched.take(int(s["batch_size"]), window, timeout=_POLL_S)
            if not picked or quit_.is_set():
                continue
            epoch = self._epoch
            frames = self._run_engine(engine, picked, int(s["batch_size"]), quit_)
            if frames is None:
                return  # shutting down
            if frames and epoch == self._epoch and not quit_.is_set():
                handoff.put(_Batch(epoch, frames))

    def _wait_for_previous(self, previous: list[threading.Thread], quit_: threading.Event) -> bool:
        """Never two engine calls at once (GPU memory): the threads of a cleaned-up pipeline that are still in an
        engine call finish first. Waits here, not in the lifecycle transition; False if stopped meanwhile."""
        if not any(t.is_alive() for t in previous):
            return True
        self._set_status("waiting for the previous activation's frame to finish ({elapsed} s)")
        start = time.monotonic()
        logged = False
        try:
            while any(t.is_alive() for t in previous):
                if quit_.is_set():
                    return False
                for thread in previous:
                    thread.join(_POLL_S)
                if not logged and time.monotonic() - start > _OLD_THREAD_LOG_S:
                    logged = True
                    self._log.info("waiting for the previous activation's engine call to finish before serving")
            return True
        finally:
            self._set_status("")

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
                decoded = cam.prepare(msg, compressed, self._settings().for_camera(cam.overrides))
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
        self.batch_stats.record([f.rgb.shape for f in frames], batch_size)
        for j, frame in enumerate(frames):
            frame.relative = pred.depth[j] if pred.depth is not None else None
            frame.normals = pred.normals[j] if pred.normals is not None else None
            frame.cam.stats.on_stage("engine", elapsed)
        return frames

    def _warm_up(self, engine: Any, quit_: threading.Event) -> None:
        """Prepare the engine for ``warmup_size`` frames before (or while) serving camera frames.

        Eager engine (optimize none): one dummy frame, so lazy CUDA/cuDNN initialisation does not land on the first
        camera frame. Compiled engine (engine/serving.py): with ``startup_mode`` serve_eager (default) a builder
        thread compiles and captures the optimised path for every batch size the cameras can form while frames are
        served eagerly from the first one, each batch size switching when it is built (/diagnostics 'serving');
        with wait_compiled it is built here first, frames waiting, and /diagnostics shows "compiling (stage k of
        n: ..., N s)". A failure is logged and serving goes on.
        """
        from geodiff_ros.engine.serving import start_serving
        from geodiff_ros.engine.startup import warm_up_stages

        s = self._settings()
        width, height = (int(v) for v in s["warmup_size"])
        if engine is None or width <= 0 or height <= 0 or quit_.is_set():
            self._log.info("ready: no warm-up (warmup_size [0, 0]); processing frames")
            return
        batches = [1]
        if engine.accelerator is not None:  # optimize set: code compiled / captured per batch size
            batches = list(range(1, min(int(s["batch_size"]), len(self._cams)) + 1))
        mode = str(s["startup_mode"])
        start = time.monotonic()
        self._set_status("warming up")
        current: list[Any] = []  # (k, n, label, start) of the running stage

        def stage_done() -> None:
            if current:
                k, n, label, t0 = current.pop()
                self._log.info(f"warm-up {k}/{n} {label}: {time.monotonic() - t0:.1f} s")

        def progress(k: int, n: int, label: str) -> None:
            stage_done()
            if quit_.is_set():
                raise _WarmUpStopped
            current.append((k, n, label, time.monotonic()))
            if engine.accelerator is not None and engine.accelerator.settings.compile:
                self._status = f"compiling (stage {k} of {n}: {label}, {{elapsed}} s)"

        try:
            if engine.accelerator is None:
                warm_up_stages(engine, height, width, batches, progress=progress)
            else:
                self._builder = start_serving(engine, height, width, batches, mode, progress=progress,
                                              on_change=self._log.info)
            stage_done()
        except _WarmUpStopped:
            return
        except Exception as err:  # noqa: BLE001 - e.g. out of GPU memory: real frames may still fit
            self._log.error(
                f"warm-up at {width}x{height} failed ({type(err).__name__}: {err}); processing frames anyway, "
                "the first ones may be slow (set warmup_size to your camera size, or [0, 0] to skip the warm-up)")
        else:
            if engine.accelerator is not None and mode == "serve_eager":
                self._log.info(
                    f'ready: serving from the first frame (eager) while the optimised path for {width}x{height} '
                    f'(batch {", ".join(map(str, batches))}) builds in the background (startup_mode serve_eager)')
            else:
                self._log.info(
                    f'ready: warm-up at {width}x{height} (batch {", ".join(map(str, batches))}) took '
                    f"{time.monotonic() - start:.2f} s; processing frames")
        finally:
            self._set_status("")

    def serving(self) -> Any:
        """What serves and what is still building (engine/serving.BuildStatus), None without a builder."""
        builder = self._builder
        return builder.status() if builder is not None else None

    # ------------------------------------------------------------------ post-processing thread

    def _post_main(self, engine: Any, quit_: threading.Event, handoff: Handoff) -> None:
        """Post-processing thread: per camera, align -> metric depth, views, cloud -> publish (camera.finish)."""
        from geodiff_ros.geometry.device import HostStaging

        staging = HostStaging(engine.device)
        while not quit_.is_set():
            batch = handoff.take(_POLL_S)
            if batch is None:
                continue
            for frame in batch.frames:
                if batch.epoch != self._epoch or quit_.is_set():
                    break  # deactivated meanwhile: its publishers are off
                cam = frame.cam
                rebuild = cam.take_aligner_dirty()  # before reading the settings (camera.take_aligner_dirty)
                s = self._settings().for_camera(cam.overrides)
                try:
                    cam.finish(s, frame.msg, frame.rgb, frame.relative, frame.normals, staging,
                               rebuild_aligner=rebuild, latency_from=frame.t_recv, camera=frame.camera)
                except Exception as err:  # noqa: BLE001 - bad input must never kill the worker
                    if not self._drop(cam, err, quit_):
                        return

    def _drop(self, cam: CameraChannel, err: Exception, quit_: threading.Event) -> bool:
        """Count and log a frame that could not be processed; False if this happened because we are stopping."""
        if isinstance(err, ImageConversionError):
            cam.stats.on_bad_input(str(err))
            cam.log.warning(f"dropped a frame: {err}", throttle_duration_sec=THROTTLE_S)
            return True
        if quit_.is_set() or not self._ros_ok():
            return False
        cam.stats.on_bad_input(f"{type(err).__name__}: {err}")
        cam.log.error(f"dropped a frame: {type(err).__name__}: {err}", throttle_duration_sec=THROTTLE_S)
        return True
