"""Fine-tuning on several processes, rehearsed on the CPU: benchmarks/train_multi.py --tiny.

``accelerate launch --num_processes 2`` (two gloo CPU processes, tiny checkpoint) at accumulation 2 against one
process at accumulation 4: the same effective batch (2 x 2 x 2 = 2 x 1 x 4 = 8) and, through DistributedSampler,
the same samples in every optimiser step. What a user of several GPUs relies on: the LR schedule is the one-process
schedule, the training itself is the same (the loss over all processes equals the one-process loss up to float
rounding), and the logged loss is that loss.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("train_multi") / "train_multi.json"
    cmd = [sys.executable, "benchmarks/train_multi.py", "--tiny", "--processes", "1", "2", "--accumulation", "4",
           "--steps", str(STEPS), "--lr-warmup", "2", "--port", str(_free_port()), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    return {r["processes"]: r for r in result["runs"]}


def test_two_processes_each_take_half_the_accumulation(runs: dict[int, dict]) -> None:
    one, two = runs[1], runs[2]
    assert (one["accumulation"], two["accumulation"]) == (4, 2)
    assert one["effective_batch"] == two["effective_batch"] == 8
    assert [p["world_size"] for p in two["per_process"]] == [2, 2]  # really two processes (not accelerate's --cpu)
    assert all(p["optimizer_steps"] == STEPS and p["global_step"] == STEPS for p in two["per_process"])
    assert len(two["loss_logged"]) == STEPS


def test_lr_schedule_is_the_one_process_schedule(runs: dict[int, dict]) -> None:
    lr1, lr2 = runs[1]["lr"], runs[2]["lr"]
    assert lr2 == lr1  # exactly: the schedule counts optimiser steps, whatever the process count
    assert lr1[0] < lr1[1] > lr1[2]  # warm-up, then the exponential decay (docs/method.md#lr-schedule)


def test_loss_over_all_processes_is_the_one_process_loss(runs: dict[int, dict]) -> None:
    one, two = runs[1], runs[2]
    assert one["loss_all_processes"] == pytest.approx(one["loss_logged"], rel=1e-9)  # the recording is right
    # same samples per step; only the order of the float sums differs (gradient all-reduce, loss mean)
    assert two["loss_all_processes"] == pytest.approx(one["loss_logged"], rel=1e-5)


def test_logged_loss_is_the_loss_over_all_processes(runs: dict[int, dict]) -> None:
    """The logged step loss averages every micro-step of every process (as the official trainer logs it)."""
    two = runs[2]
    assert two["loss_logged"] == pytest.approx(two["loss_all_processes"], rel=1e-5)
    assert two["loss_logged"] == pytest.approx(runs[1]["loss_logged"], rel=1e-5)
