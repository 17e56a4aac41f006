"""``geodiff_bag process --devices A,B,...``: one bag processed by several devices, one worker process per device.

Only the engine call is spread. The parent process reads the bag, forms exactly the batches one process would
(the queueing rule of bag.process), hands each batch to the least busy worker and writes everything itself, in
the order one process writes it: a copied input message waits in an ordered log behind any batch that is still
being computed. The metric alignment is a temporal filter (EMA over frames in stamp order, spec of the node's
``alignment.*``), so it too stays in the parent, fed in stamp order. The output bag therefore holds the same
messages in the same order as the one-device output; on the CPU in eager fp32 every byte of every message is the
same (each batch has the same frames, so the same arithmetic), on GPUs of one model the values are those of one
GPU within the dtype / optimise mode's stated tolerance (benchmarks/README.md).

Workers are started with ``spawn`` (CUDA cannot be forked), load one engine each on their device, ignore SIGINT
(the parent stops them) and exit when the parent is gone (killed: no orphan holding a GPU). A worker that cannot
load the model, fails on a batch or dies stops the run with a ``WorkerError`` naming the device, instead of hanging
or writing a bag with holes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing as mp
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from geodiff_ros.bag.process import ProcessOptions, ProcessSummary, _Frame, _Processor
from geodiff_ros.bag.storage import Bag, BagWriter, RawMessage

__all__ = ["EnginePool", "WorkerError", "parse_devices", "process_bag_parallel"]

LOG = logging.getLogger(__name__)

_POLL_S = 0.5  # how often a blocked parent checks that its workers are still alive


class WorkerError(RuntimeError):
    """A device worker could not load the model, failed on a batch, or died."""


def parse_devices(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``; entries are cpu, cuda or cuda:N (repeats allowed: two
    workers on one card). Raises ValueError naming the bad entry."""
    devices = [item.strip() for item in text.split(",")]
    for dev in devices:
        kind, _, index = dev.partition(":")
        if kind == "cpu" and not index:
            continue
        if kind == "cuda" and (not index or index.isdigit()):
            continue
        msg = (f"--devices {text!r}: {dev!r} is not a device; give a comma list of cpu, cuda or cuda:N, "
               "e.g. --devices cuda:0,cuda:1")
        raise ValueError(msg)
    return devices


@dataclass
class BatchResult:
    """What a worker sends back for one batch: the engine's arrays and the seconds the call took."""

    key: int
    worker: int
    depth: Any  # [B,H,W] array or list of [H,W] (mixed sizes), None without depth
    normals: Any  # [B,H,W,3] array or list, None without normals
    seconds: float


def _worker_main(index: int, config: Any, tasks: Any, results: Any) -> None:
    """Worker process: load one engine on ``config.device``, then answer batches until the ``None`` sentinel."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    logging.basicConfig(level=logging.INFO, format=f"[%(levelname)s] worker {index} ({config.device}): %(message)s")
    from geodiff_ros.engine import GeoDiffEngine

    t0 = time.monotonic()
    try:
        engine = GeoDiffEngine(config)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which names the device
        results.put(("load_failed", index, f"{type(err).__name__}: {err}"))
        return
    results.put(("ready", index, time.monotonic() - t0))
    parent = mp.parent_process()
    while True:
        try:
            item = tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return  # the parent was killed: do not hold a GPU as an orphan
            continue
        if item is None:
            return
        key, rgbs = item
        try:
            t0 = time.monotonic()
            pred = engine.predict(rgbs)  # Model invocation: VAE encode, one UNet step per task, VAE decode
            results.put(("done", index, key, pred.depth, pred.normals, time.monotonic() - t0))
        except Exception as err:  # noqa: BLE001 - the parent stops the run and names the batch
            results.put(("failed", index, key, f"{type(err).__name__}: {err}"))


class EnginePool:
    """One engine per device in its own process; ``submit`` batches, ``next_result`` collects them (any order).

    Use as a context manager: entering starts the workers and waits until every one has loaded its model.
    """

    def __init__(self, config: Any, devices: Sequence[str], max_pending: int = 2,
                 start_timeout_s: float = 900.0) -> None:
        if not devices:
            msg = "EnginePool needs at least one device"
            raise ValueError(msg)
        self.devices = list(devices)
        self.max_pending = max(1, max_pending)  # batches queued per worker: one computing, one waiting
        self.start_timeout_s = start_timeout_s
        # CPU workers keep the thread count one process would use (config.cpu_threads, 0 = torch's default):
        # a different count changes the last bits of CPU reductions, and the split bag must equal the one-process
        # bag byte for byte. A CPU split is a rehearsal of the GPU split, not a speed-up.
        self.configs = [dataclasses.replace(config, device=dev) for dev in self.devices]
        self.pending = [0] * len(self.devices)
        self.frames = [0] * len(self.devices)  # frames each worker computed
        self.load_seconds = [0.0] * len(self.devices)
        self.processes: list[Any] = []
        self._ctx = mp.get_context("spawn")
        self._tasks: list[Any] = []
        self._results: Any = None
        self._sizes: dict[int, int] = {}

    def __enter__(self) -> EnginePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(clean=exc[0] is None)

    def start(self) -> None:
        """Spawn the workers and wait for each model to load (raises WorkerError naming a device that fails)."""
        self._results = self._ctx.Queue()
        for i, cfg in enumerate(self.configs):
            tasks = self._ctx.Queue()
            proc = self._ctx.Process(target=_worker_main, args=(i, cfg, tasks, self._results),
                                     name=f"geodiff_bag_worker{i}", daemon=True)
            proc.start()
            self._tasks.append(tasks)
            self.processes.append(proc)
        LOG.info("loading the model in %d worker processes: %s", len(self.devices), ", ".join(self.devices))
        waiting = set(range(len(self.devices)))
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while waiting:
                if time.monotonic() > deadline:
                    msg = (f'worker(s) on {", ".join(self.devices[i] for i in sorted(waiting))} did not load the '
                           f'model within {self.start_timeout_s:.0f} s')
                    raise WorkerError(msg)
                msg = self._get()
                if msg is None:
                    continue
                if msg[0] == "ready":
                    waiting.discard(msg[1])
                    self.load_seconds[msg[1]] = msg[2]
                elif msg[0] == "load_failed":
                    text = f"cannot load the model on {self.devices[msg[1]]} (worker {msg[1]}): {msg[2]}"
                    raise WorkerError(text)
        except BaseException:
            self.close(clean=False)
            raise

    def has_capacity(self) -> bool:
        return min(self.pending) < self.max_pending

    def submit(self, key: int, rgbs: list[np.ndarray]) -> None:
        """Queue one batch on the least busy worker (the caller waits for ``has_capacity`` first)."""
        self._check_alive()
        worker = min(range(len(self.pending)), key=lambda i: self.pending[i])
        if self.pending[worker] >= self.max_pending:
            msg = "EnginePool.submit without capacity: collect a result first"
            raise RuntimeError(msg)
        self.pending[worker] += 1
        self._sizes[key] = len(rgbs)
        self._tasks[worker].put((key, rgbs))

    def next_result(self, block: bool = True) -> BatchResult | None:
        """The next finished batch (any order); None if none is ready and ``block`` is False."""
        while True:
            msg = self._get(timeout=_POLL_S if block else 0.0)
            if msg is None:
                if not block:
                    return None
                continue
            kind, worker = msg[0], msg[1]
            if kind == "failed":
                text = f"the engine failed on {self.devices[worker]} (worker {worker}) for batch {msg[2]}: {msg[3]}"
                raise WorkerError(text)
            if kind != "done":
                continue
            self.pending[worker] -= 1
            key = msg[2]
            self.frames[worker] += self._sizes.pop(key, 0)
            return BatchResult(key=key, worker=worker, depth=msg[3], normals=msg[4], seconds=msg[5])

    def _get(self, timeout: float = _POLL_S) -> tuple | None:
        """One message from the workers, or None after ``timeout``; a dead worker is an error."""
        try:
            if timeout <= 0:
                return self._results.get_nowait()
            return self._results.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return None

    def _check_alive(self) -> None:
        for i, proc in enumerate(self.processes):
            if not proc.is_alive():
                msg = (f"worker {i} on {self.devices[i]} exited (code {proc.exitcode}) during the run; on a GPU "
                       "this is often out of memory: try a smaller --batch-size or fewer workers per card")
                raise WorkerError(msg)

    def close(self, clean: bool = True) -> None:
        """Stop the workers: a sentinel and a short wait when ``clean``, else terminate at once."""
        for i, proc in enumerate(self.processes):
            if clean and proc.is_alive():
                self._tasks[i].put(None)
            self._tasks[i].cancel_join_thread()  # never block our own exit on a dead reader
        for proc in self.processes:
            proc.join(10.0 if clean else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self._results is not None:
            self._results.cancel_join_thread()
        self.processes = []
        self._tasks = []


class _ParallelProcessor(_Processor):
    """bag.process's single pass with the engine calls sent to an EnginePool and the writes kept in order."""

    def __init__(self, bag: Bag, writer: BagWriter, pool: EnginePool, opts: ProcessOptions,
                 progress: Callable[[int], None] | None) -> None:
        super().__init__(bag, writer, None, opts, progress)
        self.pool = pool
        self.log: collections.deque[tuple[str, Any]] = collections.deque()  # ('copy', raw) | ('batch', key)
        self.inflight: dict[int, tuple[list[_Frame], list[np.ndarray]]] = {}
        self.done: dict[int, BatchResult] = {}
        self.next_key = 0
        self.summary.devices = list(pool.devices)

    def _copy(self, raw: RawMessage) -> None:
        self.log.append(("copy", raw))
        self._collect(block=False)

    def _process(self, frames: list[_Frame]) -> None:
        good, rgbs = self._decode(frames)
        if not good:
            return
        while not self.pool.has_capacity():
            self._collect(block=True)
        key, self.next_key = self.next_key, self.next_key + 1
        self.pool.submit(key, rgbs)
        self.inflight[key] = (good, rgbs)
        self.log.append(("batch", key))
        self._collect(block=False)

    def _finish(self) -> None:
        while self.inflight:
            self._collect(block=True)
        self._flush()
        self.summary.worker_frames = list(self.pool.frames)

    def _collect(self, block: bool) -> None:
        """Take finished batches (one at least when ``block``), then write what the ordered log allows."""
        result = self.pool.next_result(block=block)
        while result is not None:
            self.done[result.key] = result
            self.summary.infer_seconds += result.seconds
            result = self.pool.next_result(block=False)
        self._flush()

    def _flush(self) -> None:
        while self.log:
            kind, item = self.log[0]
            if kind == "copy":
                _Processor._copy(self, item)
            else:
                result = self.done.pop(item, None)
                if result is None:
                    return  # this batch is still computing: later messages wait behind it
                good, rgbs = self.inflight.pop(item)
                self._emit(good, rgbs, result.depth, result.normals)
            self.log.popleft()


def process_bag_parallel(bag: Bag, writer: BagWriter, pool: EnginePool, options: ProcessOptions,
                         progress: Callable[[int], None] | None = None) -> ProcessSummary:
    """``process_bag`` with the engine calls spread over ``pool``'s devices; the output bag is the one-device one.

    Raises:
        BagError: as ``process_bag``.
        WorkerError: a worker failed on a batch or died (the output bag then ends early).
    """
    return _ParallelProcessor(bag, writer, pool, options, progress).run()
