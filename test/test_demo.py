"""``geodiff_demo``, the project's main job, end to end as a user runs it (``--tiny``: generated CPU checkpoints).

The demo starts the real node as a subprocess, plays the shared TUM bag (or its synthetic bag when ../shared/data
is absent), records the outputs to an mcap bag and prints a summary; it must keep DDS on loopback by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from ros_helpers import module_domain_id, run_dir, source_pythonpath

from geodiff_ros.bag.storage import open_bag

DOMAIN = module_domain_id(73)
NS = f"/geodiff_demo_test_{os.getpid()}"  # our own topics even if another test run shares the domain


def _user_env() -> dict[str, str]:
    """A shell without any DDS settings (the demo must add them), but with this module's own domain."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROS_AUTOMATIC", "ROS_LOCALHOST", "FASTDDS_", "FASTRTPS_"))}
    env["ROS_DOMAIN_ID"] = str(DOMAIN)
    env["PYTHONPATH"] = source_pythonpath(env)
    return env


def _demo(*args: str, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "geodiff_ros.cli.demo", *args], cwd=run_dir(), env=_user_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_demo_tiny_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, seconds = _demo("--tiny", "--out", str(out), "--namespace", NS)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert seconds < 60.0
    # loopback DDS set up by the demo itself, for itself and the node
    assert "ROS_LOCALHOST_ONLY=1" in proc.stderr and "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST" in proc.stderr
    assert "FASTRTPS_DEFAULT_PROFILES_FILE=" in proc.stderr and "fastdds_localhost.xml" in proc.stderr

    summary = json.loads((out / "summary.json").read_text())
    topics = {t.removeprefix(NS): row for t, row in summary["topics"].items()}
    assert topics["/depth/relative"]["encodings"] == "32FC1" and topics["/normals/image"]["encodings"] == "32FC3"
    assert topics["/depth/image"]["encodings"] == "32FC1"  # metric depth from the sparsified depth camera
    assert topics["/points"]["encodings"].startswith("x,y,z,rgb")
    n_out = summary["frames_out"]
    assert n_out >= 1 and summary["frames_metric"] >= 1
    # every played frame is either in the outputs or counted as dropped by the node (newest-frame policy)
    assert n_out + summary["node_counts"].get("dropped", 0) == summary["frames_sent"]
    # The node's own counters at the end count every frame (the demo read a /diagnostics published before the
    # last frames: received/processed 0 or 1 while 2 frames came back), in the summary, the printout and the bag.
    counts = summary["node_counts"]
    assert counts["received"] == summary["frames_sent"] and counts["processed"] == n_out, counts
    assert f'/diagnostics: received {counts["received"]}, processed {n_out}' in proc.stdout, proc.stdout
    assert summary["node_exit"] == 0 and summary["node_stop_s"] < 2.0
    assert summary["scale_median"] is not None and summary["latency_p50_s"] > 0
    for topic in ("/depth/relative", "/depth/image", "/depth/camera_info", "/normals/image", "/points"):
        assert topics[topic]["count"] == n_out, topic
        assert NS + topic in proc.stdout  # the printed table
    with open_bag(out / "outputs") as bag:  # the recorded mcap reads back with the right types
        assert bag.storage == "mcap"
        assert bag.topics[f"{NS}/points"].msgtype == "sensor_msgs/msg/PointCloud2"
        assert bag.topics[f"{NS}/depth/camera_info"].count == n_out
        last = [bag.deserialize(raw) for raw in bag.messages(["/diagnostics"])][-1]
        (pipeline,) = [st for st in last.status if st.name.endswith("pipeline")]
        values = {kv.key: kv.value for kv in pipeline.values}
        assert (values["received"], values["processed"]) == (str(summary["frames_sent"]), str(n_out)), values


def test_demo_without_weights_says_how_to_get_them(tmp_path: Path) -> None:
    proc, _ = _demo("--depth-model", str(tmp_path / "no_depth_model"), "--normals-model",
                    str(tmp_path / "no_normals_model"), "--device", "cpu", "--local-files-only",
                    "--out", str(tmp_path / "run"), timeout=90.0)
    assert proc.returncode == 1
    assert "no_depth_model" in proc.stderr  # the engine's ModelLoadError, naming what is missing
    assert "To supply the weights" in proc.stderr and "--tiny" in proc.stderr
