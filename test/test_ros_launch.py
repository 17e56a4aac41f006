"""launch/depth.launch.py, launch/multi_gpu.launch.py and rviz/geodiff.rviz, checked without running them: against
stand-in launch modules (so this runs where ROS 2 launch is not installed) and, where it is, with ROS launch itself.
Running them for real: test_launch_process.py."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ros_helpers import load_launch_with_stand_ins, run_launch_with_stand_ins

from geodiff_ros.ros import launch_support
from geodiff_ros.ros.launch_support import LaunchArgumentError, parameter_overrides, rviz2_missing, rviz_config
from geodiff_ros.ros.params import LAUNCH_ARGUMENTS, PARAMS, name_launch_arguments

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "depth.launch.py"
MULTI_GPU = REPO / "launch" / "multi_gpu.launch.py"
RVIZ = REPO / "rviz" / "geodiff.rviz"

# What users override most: launch ignores undeclared arguments silently, so each must be declared.
EXPECTED_ARGS = {"namespace", "image", "camera_info", "sparse_depth", "params_file", "model", "model_normals",
                 "device", "dtype", "processing_res", "optimize", "autostart", "allow_cpu_fallback", "use_sim_time",
                 "log_level", "rviz", "batch_size", "input_transport", "local_files_only", "fixed_scale"}


def _node(actions: list, executable: str = "geodiff_node") -> dict:
    return next(a.kwargs for a in actions if type(a).__name__ == "Node" and a.kwargs["executable"] == executable)


def test_depth_launch_declares_the_common_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    declared, actions = run_launch_with_stand_ins(load_launch_with_stand_ins(LAUNCH, monkeypatch))
    assert EXPECTED_ARGS <= set(declared), f"missing launch arguments: {EXPECTED_ARGS - set(declared)}"
    assert declared["rviz"] == "false"  # RViz only on request
    node = _node(actions)
    # Nothing given: the shipped params file alone decides (only use_sim_time is always set).
    assert node["parameters"] == ["/opt/share/geodiff_ros/config/geodiff.yaml", {"use_sim_time": False}]
    assert ("image", "/camera/color/image_raw") in node["remappings"]
    assert not [a for a in actions if type(a).__name__ == "Node" and a.kwargs["executable"] == "rviz2"]


def test_depth_launch_user_params_file_on_top_and_typed_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_launch_with_stand_ins(LAUNCH, monkeypatch)
    _, actions = run_launch_with_stand_ins(
        module, params_file="/home/me/mine.yaml", processing_res="512", optimize="compile+graph", autostart="false",
        allow_cpu_fallback="true", use_sim_time="true", log_level="debug", model_normals="none", fixed_scale="1.5")
    node = _node(actions)
    shipped, mine, overrides = node["parameters"]
    assert shipped.endswith("config/geodiff.yaml") and mine == "/home/me/mine.yaml"  # the user's file on top
    assert overrides == {"use_sim_time": True, "processing_res": 512, "optimize": "compile+graph",
                         "autostart": False, "allow_cpu_fallback": True, "model_normals": "",
                         "alignment.fixed_scale": 1.5}
    assert node["arguments"][-1] == "debug"
    with pytest.raises(LaunchArgumentError, match="processing_res:='big': parameter processing_res takes an integer"):
        run_launch_with_stand_ins(module, processing_res="big")


def test_launch_description_builds_with_ros_launch() -> None:
    """The real thing where ROS 2 launch is installed; skipped here otherwise."""
    if importlib.util.find_spec("launch_ros") is None:
        pytest.skip("ROS 2 launch_ros is not installed (not on PyPI; scripts/setup_venv.sh --dev installs it from "
                    "../shared/ros/wheels when present); the stand-in tests cover the file")
    from launch import LaunchDescription

    for path in (LAUNCH, MULTI_GPU):
        mod_spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        desc = module.generate_launch_description()
        assert isinstance(desc, LaunchDescription)
        names = {a.name for a in desc.get_launch_arguments()}
        assert {"params_file", "model", "model_normals", "device", "allow_cpu_fallback", "rviz"} <= names, path
        if path == LAUNCH:
            assert EXPECTED_ARGS <= names


def test_multi_gpu_launch_cpu_override_model_normals_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """It forced cuda:<gpu> on every node, so it could not run without a GPU."""
    module = load_launch_with_stand_ins(MULTI_GPU, monkeypatch)
    _, actions = run_launch_with_stand_ins(module, cameras="[front, left]", num_gpus="2", device="cpu",
                                           model_normals="none", allow_cpu_fallback="true")
    nodes = {a.kwargs["name"]: a.kwargs["parameters"][-1] for a in actions if type(a).__name__ == "Node"}
    assert {name: (p["device"], p["cameras"], p["model_normals"], p["allow_cpu_fallback"])
            for name, p in nodes.items()} == {"geodiff_gpu0": ("cpu", ["front"], "", True),
                                              "geodiff_gpu1": ("cpu", ["left"], "", True)}
    _, actions = run_launch_with_stand_ins(module, cameras="[front, left]", num_gpus="2")
    assert [a.kwargs["parameters"][-1]["device"] for a in actions if type(a).__name__ == "Node"] == \
        ["cuda:0", "cuda:1"]
    with pytest.raises(LaunchArgumentError, match="device"):
        run_launch_with_stand_ins(module, cameras="[front]", device="cuda:7")


@pytest.mark.parametrize(("path", "args"), [(LAUNCH, {"cameras": "[front, left]"}),
                                            (MULTI_GPU, {"cameras": "[front, left]", "num_gpus": "2"})])
def test_rviz_shows_every_camera(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: Path,
                                 args: dict[str, str]) -> None:
    """rviz/geodiff.rviz showed only the single-camera topics: with cameras:=[front,left] RViz showed nothing."""
    (tmp_path / "rviz").mkdir()
    (tmp_path / "rviz" / "geodiff.rviz").write_text(RVIZ.read_text())
    monkeypatch.setattr(launch_support, "rviz2_missing", lambda: None)  # as if rviz2 were installed
    module = load_launch_with_stand_ins(path, monkeypatch, share=str(tmp_path))
    _, actions = run_launch_with_stand_ins(module, rviz="true", fixed_frame="base_link", **args)
    rviz = _node(actions, "rviz2")
    config_path = Path(rviz["arguments"][rviz["arguments"].index("-d") + 1])
    try:
        config = yaml.safe_load(config_path.read_text())
    finally:
        os.remove(config_path)  # launch removes it at shutdown (OnShutdown)
    assert config["Visualization Manager"]["Global Options"]["Fixed Frame"] == "base_link"
    topics = _display_topics(config)
    for cam in ("front", "left"):
        assert {f"{cam}/depth/image_vis", f"{cam}/normals/image_vis", f"{cam}/points", f"{cam}/depth/image"} <= topics
    assert "points" not in topics  # no single-camera topic that nothing publishes
    assert any(type(a).__name__ == "RegisterEventHandler" for a in actions)  # the layout file is removed


def _display_topics(config: dict) -> set[str]:
    out = set()
    for d in config["Visualization Manager"]["Displays"]:
        if isinstance(d.get("Topic"), dict):
            out.add(d["Topic"]["Value"])
        out.update(d[k] for k in ("Depth Map Topic", "Color Image Topic") if k in d)
    return out


def test_rviz_layout_for_one_camera_and_without_normals() -> None:
    one = yaml.safe_load(rviz_config(RVIZ.read_text(), []))
    assert _display_topics(one) == _display_topics(yaml.safe_load(RVIZ.read_text()))  # the template itself
    no_normals = _display_topics(yaml.safe_load(rviz_config(RVIZ.read_text(), ["front"], normals=False)))
    assert "front/depth/image_vis" in no_normals and not [t for t in no_normals if "normals" in t]


@pytest.mark.parametrize("path", [LAUNCH, MULTI_GPU])
def test_rviz_without_rviz2_fails_before_any_node(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Bug: launch started the node, then failed on rviz2 and exited, leaving the node running as an orphan."""
    monkeypatch.setattr(launch_support, "rviz2_missing", lambda: "rviz:=true, but RViz 2 ... Nothing was started.")
    module = load_launch_with_stand_ins(path, monkeypatch)
    with pytest.raises(RuntimeError, match="Nothing was started"):
        run_launch_with_stand_ins(module, rviz="true", cameras="[front]")


@pytest.mark.parametrize("path", [LAUNCH, MULTI_GPU])
@pytest.mark.parametrize("argument", ["rviz", "use_sim_time"])
def test_a_boolean_argument_that_is_not_one_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, path: Path,
                                                                argument: str) -> None:
    """Bug: rviz:=maybe stopped launch with "'maybe' is not a boolean", without saying which argument."""
    module = load_launch_with_stand_ins(path, monkeypatch)
    with pytest.raises(LaunchArgumentError, match=rf"^{argument}:='maybe' is not a boolean: use true or false$"):
        run_launch_with_stand_ins(module, cameras="[front]", **{argument: "maybe"})


@pytest.mark.parametrize(("path", "args", "nodes"), [(LAUNCH, {}, 1),
                                                     (MULTI_GPU, {"cameras": "[front, left]", "num_gpus": "2"}, 2)])
def test_each_node_exiting_with_an_error_ends_the_launch(monkeypatch: pytest.MonkeyPatch, path: Path,
                                                         args: dict[str, str], nodes: int) -> None:
    """Every geodiff node has an OnProcessExit handler that ends the launch on an error exit (test_launch_process
    runs it for real: launch exit 1 instead of 0)."""
    _, actions = run_launch_with_stand_ins(load_launch_with_stand_ins(path, monkeypatch), **args)
    geodiff = [a for a in actions if type(a).__name__ == "Node" and a.kwargs["executable"] == "geodiff_node"]
    handlers = [a.args[0] for a in actions if type(a).__name__ == "RegisterEventHandler"
                and type(a.args[0]).__name__ == "OnProcessExit"]
    assert len(geodiff) == nodes
    assert [h.kwargs["target_action"] for h in handlers] == geodiff
    assert all(h.kwargs["on_exit"] is launch_support.end_launch_if_node_failed for h in handlers)


def test_node_failure_handler_raises_only_for_an_error_exit_outside_a_shutdown() -> None:
    def exited(code: int) -> SimpleNamespace:
        return SimpleNamespace(returncode=code, process_name="geodiff_node-1")

    running, stopping = SimpleNamespace(is_shutdown=False), SimpleNamespace(is_shutdown=True)
    assert launch_support.end_launch_if_node_failed(exited(0), running) is None
    assert launch_support.end_launch_if_node_failed(exited(-2), stopping) is None  # Ctrl-C, another node failed
    for code, meaning in ((2, "invalid parameters"), (1, "configure failed"), (-11, "killed by signal 11")):
        with pytest.raises(launch_support.NodeFailed, match=rf"^geodiff_node-1 exited with code {code} \({meaning}"):
            launch_support.end_launch_if_node_failed(exited(code), running)


def test_rviz2_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    reason = rviz2_missing()
    assert reason and "ros-jazzy-rviz2" in reason and "without rviz:=true" in reason


def test_launch_arguments_are_typed_from_the_parameter_table() -> None:
    specs = {p.name: p for p in PARAMS}
    assert set(LAUNCH_ARGUMENTS) <= set(specs)
    assert parameter_overrides({}) == {}
    got = parameter_overrides({"model": "/m", "model_normals": "none", "batch_size": "2", "autostart": "False",
                               "cloud_stride": "4", "max_depth": "40", "device": "cuda:1"})
    assert got == {"model_depth": "/m", "model_normals": "", "batch_size": 2, "autostart": False, "cloud_stride": 4,
                   "max_depth": 40.0, "device": "cuda:1"}
    assert type(got["max_depth"]) is float
    with pytest.raises(LaunchArgumentError, match="autostart:='maybe'"):
        parameter_overrides({"autostart": "maybe"})


def test_messages_naming_a_parameter_name_its_launch_argument() -> None:
    text = name_launch_arguments("device cuda requested but 0 CUDA device(s) are visible; set device to cpu, or "
                                 "allow CPU fallback (node parameter allow_cpu_fallback)")
    assert text.endswith("(ros2 launch: device:=..., allow_cpu_fallback:=...)")
    assert "model:=..." in name_launch_arguments("check model_depth / model_normals")
    assert name_launch_arguments("nothing to name") == "nothing to name"
    assert name_launch_arguments("camera.front.max_depth: bad") == "camera.front.max_depth: bad"


def test_rviz_config_has_the_promised_displays() -> None:
    config = yaml.safe_load(RVIZ.read_text())
    displays = config["Visualization Manager"]["Displays"]
    by_class: dict[str, list[dict]] = {}
    for d in displays:
        by_class.setdefault(d["Class"], []).append(d)
    image_topics = {d["Topic"]["Value"] for d in by_class["rviz_default_plugins/Image"]}
    assert {"depth/image_vis", "normals/image_vis"} <= image_topics
    (cloud,) = by_class["rviz_default_plugins/PointCloud2"]
    assert cloud["Topic"]["Value"] == "points"
    assert cloud["Topic"]["Reliability Policy"] == "Best Effort"
    assert cloud["Color Transformer"] == "RGB8"
    (depth_cloud,) = by_class["rviz_default_plugins/DepthCloud"]
    assert depth_cloud["Depth Map Topic"] == "depth/image"
