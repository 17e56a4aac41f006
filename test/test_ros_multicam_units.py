"""Multi-camera pieces without DDS: camera lists and GPU assignment, the fair batch scheduler, per-camera
parameters, and the two launch files executed against stand-in ``launch`` modules (ROS launch is not on PyPI)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ros_helpers import load_launch_with_stand_ins, run_launch_with_stand_ins

from geodiff_ros.ros.camera_sets import (
    CameraListError,
    assign_cameras,
    camera_remappings,
    parse_assignment,
    parse_camera_list,
    parse_gpu_list,
    visible_gpu_count,
)
from geodiff_ros.ros.params import PARAMS, Settings, camera_override_key, engine_config_kwargs, validate_changes
from geodiff_ros.ros.scheduler import BatchStats, FrameScheduler

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {p.name: p.default for p in PARAMS}


# ------------------------------------------------------------------------------------------- camera lists

@pytest.mark.parametrize(("value", "names"), [
    (None, []), ([], []), (b"", []), ("", []), ("[]", []),
    (["front", "left"], ["front", "left"]), ("[front, left]", ["front", "left"]), ("front,left rear", [
        "front", "left", "rear"]), ("['front', 'left']", ["front", "left"]),
])
def test_camera_lists_in_every_spelling(value: Any, names: list[str]) -> None:
    assert parse_camera_list(value) == names


@pytest.mark.parametrize(("value", "match"), [
    (["front", "front"], "given twice"), (["2cam"], "not a ROS name token"), (["a/b"], "not a ROS name token"),
    (["cam.x"], "not a ROS name token"), (42, "must be a list"),
])
def test_bad_camera_lists_name_the_fix(value: Any, match: str) -> None:
    with pytest.raises(CameraListError, match=match):
        parse_camera_list(value)


def test_round_robin_assignment_over_gpus() -> None:
    cams = ["front", "left", "rear", "right", "top"]
    assert assign_cameras(cams, 2) == {0: ["front", "rear", "top"], 1: ["left", "right"]}
    assert assign_cameras(cams, [1, 3]) == {1: ["front", "rear", "top"], 3: ["left", "right"]}
    # More GPUs than cameras: idle GPUs get no node.
    assert assign_cameras(["front", "left"], 4) == {0: ["front"], 1: ["left"]}
    # Loads differ by at most one camera.
    sizes = [len(g) for g in assign_cameras([f"c{i}" for i in range(11)], 4).values()]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 11


def test_explicit_assignment() -> None:
    cams = ["front", "left", "rear", "right"]
    groups = parse_assignment("front,left; rear,right")
    assert groups == [["front", "left"], ["rear", "right"]]
    assert parse_assignment("[[front, left], [rear, right]]") == groups
    assert assign_cameras(cams, [0, 2], groups) == {0: ["front", "left"], 2: ["rear", "right"]}
    assert assign_cameras(cams, 3, [[], cams]) == {1: cams}  # an idle GPU is allowed
    assert parse_assignment("") is None
    for bad, match in (([["front"], ["left"]], "missing"), ([cams, ["front"]], "twice"),
                       ([["front", "left", "rear", "right", "x"]], "not in cameras"),
                       ([["front"], ["left"], ["rear"], ["right"]], "only 3 GPU")):
        with pytest.raises(CameraListError, match=match):
            assign_cameras(cams, 3, bad)
    with pytest.raises(CameraListError, match="no GPU"):
        assign_cameras(cams, 0)


def test_gpu_lists_remaps_and_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_gpu_list("[0, 2]") == [0, 2] and parse_gpu_list("1,3") == [1, 3] and parse_gpu_list("") is None
    with pytest.raises(CameraListError):
        parse_gpu_list("[a]")
    rules = camera_remappings(["front", "left"], {"image": "/{camera}/color/image_raw", "camera_info": ""})
    assert rules == [("front/image", "/front/color/image_raw"), ("left/image", "/left/color/image_raw")]
    with pytest.raises(CameraListError, match="{camera}"):
        camera_remappings(["front"], {"image": "/cam/image_raw"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert visible_gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_count() == 0


# ------------------------------------------------------------------------------------------- scheduler

def test_latest_frame_slots_count_drops_and_batch_up_to_max() -> None:
    sched = FrameScheduler(3)
    assert not sched.put(0, "a0") and sched.put(0, "a1")  # a1 replaced a0: one drop
    sched.put(1, "b0")
    sched.put(2, "c0")
    got = sched.take(max_batch=2, timeout=0.1)
    assert got == [(0, "a1"), (1, "b0")]  # newest frame per camera, longest-waiting cameras first
    assert sched.take(max_batch=2, timeout=0.1) == [(2, "c0")]
    assert sched.take(max_batch=2, timeout=0.05) == []


def test_fast_camera_cannot_starve_the_others() -> None:
    """4 cameras, batches of 2: a camera with a frame waiting is served within ceil(4/2) = 2 engine calls, however
    often a faster camera overwrites its own slot."""
    now = [0.0]
    sched = FrameScheduler(4, clock=lambda: now[0])
    waited = [0] * 4  # takes a camera's pending frame has sat through
    worst = 0
    for step in range(200):
        for cam in (1, 2, 3, 0):  # every camera has a new frame each step, camera 0 always arrives last
            if step % 50 < 25 or cam in (0, 1):  # and half the time only cameras 0 and 1 stream
                now[0] += 0.001
                sched.put(cam, (cam, step))
        pending = set(sched.pending())
        served = {i for i, _ in sched.take(max_batch=2, timeout=0.0)}
        for cam in pending:
            waited[cam] = 0 if cam in served else waited[cam] + 1
            worst = max(worst, waited[cam] + (cam in served))
    assert worst <= math.ceil(4 / 2)


def test_batch_window_waits_for_the_other_camera_only_when_idle() -> None:
    sched = FrameScheduler(2)
    sched.put(0, "left")
    threading.Timer(0.03, sched.put, args=(1, "right")).start()
    t0 = time.monotonic()
    got = sched.take(max_batch=4, window_s=0.5, timeout=1.0)
    assert sorted(got) == [(0, "left"), (1, "right")] and time.monotonic() - t0 < 0.4
    # The first frame already waited longer than the window (the worker was busy): no extra wait.
    sched.put(0, "late")
    time.sleep(0.06)
    t0 = time.monotonic()
    assert sched.take(max_batch=4, window_s=0.05, timeout=1.0) == [(0, "late")]
    assert time.monotonic() - t0 < 0.03


def test_close_wakes_the_worker() -> None:
    sched = FrameScheduler(2)
    threading.Timer(0.05, sched.close).start()
    t0 = time.monotonic()
    assert sched.take(max_batch=2, timeout=5.0) == [] and time.monotonic() - t0 < 1.0
    sched.reopen()
    sched.put(1, "x")
    assert sched.take(1, timeout=0.1) == [(1, "x")]


def test_batch_stats_mirror_the_engine_grouping() -> None:
    stats = BatchStats()
    stats.record([(120, 160, 3), (120, 160, 3), (72, 96, 3)], batch_size=4)  # pair + a smaller camera
    stats.record([(120, 160, 3)] * 5, batch_size=4)  # 5 same-size frames: passes of 4 and 1
    snap = stats.snapshot()
    assert (snap["engine_calls"], snap["network_passes"], snap["frames"]) == (2, 4, 8)
    assert snap["max_batch"] == 4 and snap["batched_frames"] == 6
    assert snap["frames_per_pass"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------- parameters

def test_per_camera_parameters_are_validated() -> None:
    assert camera_override_key("camera.front.max_depth") == ("front", "max_depth")
    assert camera_override_key("camera.front.alignment.fixed_scale") == ("front", "alignment.fixed_scale")
    assert camera_override_key("camera.front.model_depth") is None  # not per camera
    current = {**DEFAULTS, "cameras": ["front"]}
    assert validate_changes({"camera.front.max_depth": 30.0}, current, configured=True) is None
    reason = validate_changes({"camera.front.cloud_stride": 0}, current, configured=True)
    assert reason and "camera.front.cloud_stride" in reason
    reason = validate_changes({"camera.front.max_depth": 0.05}, current, configured=True)
    assert reason and "camera front: min_depth" in reason
    reason = validate_changes({"cameras": ["front", "front"]}, DEFAULTS, configured=False)
    assert reason and "given twice" in reason
    assert "cleanup" in validate_changes({"cameras": ["x"]}, DEFAULTS, configured=True)


def test_settings_per_camera_and_engine_batch_size() -> None:
    s = Settings({**DEFAULTS, "cameras": ["front", "left"], "batch_size": 3})
    assert s.cameras() == ["front", "left"] and Settings({**DEFAULTS, "cameras": None}).cameras() == []
    front = s.for_camera({"max_depth": 20.0})
    assert front["max_depth"] == 20.0 and s["max_depth"] == DEFAULTS["max_depth"]
    assert engine_config_kwargs(s)["batch_size"] == 3


# ------------------------------------------------------------------------------------------- launch files

def test_multi_gpu_launch_one_node_per_gpu_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_launch_with_stand_ins(REPO / "launch" / "multi_gpu.launch.py", monkeypatch)
    declared, actions = run_launch_with_stand_ins(module, cameras="[front, left, rear, right, top]", num_gpus="2",
                                    image_pattern="/{camera}/color/image_raw", model="/models/depth")
    assert {"cameras", "num_gpus", "gpus", "assignment", "image_pattern", "camera_info_pattern", "params_file",
            "model", "dtype", "batch_size", "namespace"} <= set(declared)
    nodes = [a.kwargs for a in actions if type(a).__name__ == "Node"]
    assert [n["name"] for n in nodes] == ["geodiff_gpu0", "geodiff_gpu1"]
    for gpu, node in enumerate(nodes):
        params = node["parameters"][-1]
        assert node["executable"] == "geodiff_node" and node["parameters"][0].endswith("config/geodiff.yaml")
        assert params["device"] == f"cuda:{gpu}" and params["model_depth"] == "/models/depth"
        assert params["cameras"] == [["front", "rear", "top"], ["left", "right"]][gpu]
        assert node["remappings"] == [(f"{c}/image", f"/{c}/color/image_raw") for c in params["cameras"]]


def test_multi_gpu_launch_explicit_assignment_and_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_launch_with_stand_ins(REPO / "launch" / "multi_gpu.launch.py", monkeypatch)
    _, actions = run_launch_with_stand_ins(module, cameras="front,left,rear", assignment="rear;front,left",
                                           gpus="[1, 3]")
    nodes = {a.kwargs["name"]: a.kwargs["parameters"][-1] for a in actions if type(a).__name__ == "Node"}
    assert nodes == {"geodiff_gpu1": {"use_sim_time": False, "device": "cuda:1", "cameras": ["rear"]},
                     "geodiff_gpu3": {"use_sim_time": False, "device": "cuda:3", "cameras": ["front", "left"]}}
    with pytest.raises(CameraListError, match="missing"):
        run_launch_with_stand_ins(module, cameras="front,left,rear", assignment="rear;front", gpus="[1, 3]")


def test_depth_launch_single_camera_unchanged_and_cameras_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_launch_with_stand_ins(REPO / "launch" / "depth.launch.py", monkeypatch)
    declared, actions = run_launch_with_stand_ins(module)
    geodiff = next(a.kwargs for a in actions if a.kwargs.get("executable") == "geodiff_node")
    assert declared["cameras"] == "[]" and "cameras" not in geodiff["parameters"][-1]
    assert ("image", "/camera/color/image_raw") in geodiff["remappings"]
    _, actions = run_launch_with_stand_ins(module, cameras="[front,left]", image_pattern="/{camera}/color/image_raw",
                             camera_info_pattern="/{camera}/color/camera_info", batch_size="2")
    geodiff = next(a.kwargs for a in actions if a.kwargs.get("executable") == "geodiff_node")
    assert geodiff["parameters"][-1]["cameras"] == ["front", "left"] and geodiff["parameters"][-1]["batch_size"] == 2
    assert ("left/camera_info", "/left/color/camera_info") in geodiff["remappings"]
    assert all(not src.startswith("image") for src, _ in geodiff["remappings"])
