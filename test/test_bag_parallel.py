"""``geodiff_bag process --devices``: one bag split over several devices.

What a user relies on: the output bag of a split run is the one-device output. On the CPU in eager fp32 that
means every message byte for byte, in the same order; the split is rehearsed with ``--devices cpu,cpu`` (two
worker processes) and the tiny checkpoints. A worker that dies or cannot load the model must stop the run with
the device named, never hang or write a bag with holes.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from geodiff_ros.bag.cli import main as bag_main
from geodiff_ros.bag.parallel import (
    EnginePool,
    WorkerError,
    _ParallelProcessor,
    parse_devices,
    process_bag_parallel,
)
from geodiff_ros.bag.process import ProcessOptions, process_bag
from geodiff_ros.bag.storage import BagWriter, open_bag
from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, write_synthetic_bag

TINY = ["--tiny", "--processing-res", "64", "--fixed-scale", "10"]  # random weights: no sparse fit, a fixed scale


def _raw(path: Path) -> list[tuple[str, int, bytes]]:
    """Every message of a bag as read back (topic, bag time, serialized bytes), in read order."""
    with open_bag(path) as bag:
        return [(m.topic, m.timestamp, bytes(m.data)) for m in bag.messages()]


@pytest.fixture(scope="module")
def bag6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp("in") / "synth6", frames=6)


def test_parse_devices() -> None:
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("cuda") == ["cuda"]
    for bad in ("gpu0", "cuda:x", "cpu,,cpu", "cpu:1"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)


def test_two_cpu_workers_write_the_one_process_bag_byte_for_byte(bag6: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert bag_main(["process", str(bag6), str(one), "--image-topic", IMAGE_TOPIC, *TINY, "--batch-size", "2"]) == 0
    text_one = capsys.readouterr().out
    assert bag_main(["process", str(bag6), str(two), "--image-topic", IMAGE_TOPIC, *TINY, "--batch-size", "2",
                     "--devices", "cpu,cpu"]) == 0
    text_two = capsys.readouterr().out
    assert "frames: 6 in, 6 out, 6 metric, 0 failed" in text_one and "frames: 6 in, 6 out, 6 metric" in text_two
    assert "frames/s on cpu\n" in text_one
    assert "frames/s on cpu, cpu (frames per worker: " in text_two
    shares = text_two.split("frames per worker: ")[1].split(")")[0]
    per_worker = [int(n) for n in shares.split(", ")]
    assert sum(per_worker) == 6 and min(per_worker) >= 2  # 3 batches of 2: both workers computed, each frame once
    a, b = _raw(one), _raw(two)
    assert len(a) == len(b) == 6 * 3 + 6 * 5  # inputs (image, depth, info) copied + 5 outputs per frame
    assert a == b  # same messages, same order, same bytes


class _ReversingPool:
    """A stand-in EnginePool that returns batches newest first (as a fast GPU overtaking a slow one)."""

    def __init__(self, engine: object, hold: int = 3) -> None:
        self.engine, self.hold = engine, hold
        self.devices = ["fake:0", "fake:1"]
        self.frames = [0, 0]
        self.queue: list[tuple[int, list]] = []

    def has_capacity(self) -> bool:
        return len(self.queue) < self.hold

    def submit(self, key: int, rgbs: list) -> None:
        self.queue.append((key, rgbs))

    def next_result(self, block: bool = True) -> SimpleNamespace | None:
        if not self.queue or (not block and len(self.queue) < self.hold):
            return None
        key, rgbs = self.queue.pop()  # newest first: out of order
        self.frames[key % 2] += len(rgbs)
        pred = self.engine.predict(rgbs)
        return SimpleNamespace(key=key, worker=key % 2, depth=pred.depth, normals=pred.normals, seconds=0.0)


def test_batches_finishing_out_of_order_are_written_in_order(tmp_path: Path) -> None:
    from test_bag_process import AffineEngine

    src = write_synthetic_bag(tmp_path / "synth", frames=9)
    opts = ProcessOptions(image_topic=IMAGE_TOPIC, sparse_topic=DEPTH_TOPIC, batch_size=1)
    with open_bag(src) as bag, BagWriter(tmp_path / "one", typestore=bag.typestore) as writer:
        process_bag(bag, writer, AffineEngine(src), opts)
    pool = _ReversingPool(AffineEngine(src))
    with open_bag(src) as bag, BagWriter(tmp_path / "split", typestore=bag.typestore) as writer:
        summary = _ParallelProcessor(bag, writer, pool, opts, None).run()  # type: ignore[arg-type]
    assert summary.frames_out == 9 and summary.worker_frames == [5, 4]
    assert _raw(tmp_path / "split") == _raw(tmp_path / "one")


def test_a_worker_that_dies_stops_the_run_naming_it(bag6: Path, tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    from geodiff_ros.engine import EngineConfig

    cfg = EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=None, device="cpu", dtype="fp32",
                       processing_res=64, batch_size=1)
    opts = ProcessOptions(image_topic=IMAGE_TOPIC, batch_size=1)
    with EnginePool(cfg, ["cpu", "cpu"]) as pool:
        def kill_worker_1(_n: int) -> None:
            proc = pool.processes[1]
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10.0)

        with open_bag(bag6) as bag, BagWriter(tmp_path / "o", typestore=bag.typestore) as writer, \
                pytest.raises(WorkerError, match=r"worker 1 on cpu exited \(code -9\)"):
            process_bag_parallel(bag, writer, pool, opts, progress=kill_worker_1)
    assert pool.processes == []  # all stopped


def test_cli_worker_load_failure_exits_1(bag6: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    code = bag_main(["process", str(bag6), str(tmp_path / "o"), "--image-topic", IMAGE_TOPIC, "--depth-model",
                     str(tmp_path / "no_such_model"), "--normals-model", "", "--devices", "cpu,cpu",
                     "--local-files-only"])
    assert code == 1
    assert "cannot load the model on cpu (worker " in caplog.text and "no_such_model" in caplog.text
    assert not (tmp_path / "o").exists()  # nothing written before every model loaded


def test_cli_bad_devices_exit_2(bag6: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    out = str(tmp_path / "o")
    assert bag_main(["process", str(bag6), out, "--image-topic", IMAGE_TOPIC, "--devices", "cpu,gpu1"]) == 2
    assert "'gpu1' is not a device" in caplog.text
    assert bag_main(["process", str(bag6), out, "--image-topic", IMAGE_TOPIC, "--device", "cpu",
                     "--devices", "cpu,cpu"]) == 2
    assert "either --device or --devices" in caplog.text
    assert bag_main(["process", str(bag6), out, "--image-topic", IMAGE_TOPIC, "--optimize", "fast"]) == 2
    assert "--optimize 'fast' is not a mode" in caplog.text


_KILLED_PARENT = """
import sys
from geodiff_ros.engine import EngineConfig
from geodiff_ros.bag.parallel import EnginePool
cfg = EngineConfig(depth_model=sys.argv[1], normals_model=None, device='cpu', dtype='fp32', processing_res=64)
pool = EnginePool(cfg, ['cpu', 'cpu']).__enter__()
print(' '.join(str(p.pid) for p in pool.processes), flush=True)
sys.stdin.read()  # until killed
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody may reap it in a container)


def test_workers_exit_when_the_parent_is_killed(tiny_depth_ckpt: Path) -> None:
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, str(tiny_depth_ckpt)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(pid) for pid in pids)
    finally:
        parent.kill()  # SIGKILL: no clean-up code runs in the parent
        parent.wait()
    deadline = time.monotonic() + 20.0
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in pids if _running(pid)]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed parent (orphans holding a device)"
