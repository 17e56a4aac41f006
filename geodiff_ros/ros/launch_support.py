"""What the launch files compute, in plain Python so it is unit-tested without ROS launch.

- Launch arguments -> typed node parameters (``processing_res:=512`` is an integer parameter, ``autostart:=false``
  a boolean), from the one table in params.py (``LAUNCH_ARGUMENTS``), with errors that name the argument.
- The RViz layout of one run: ``rviz/geodiff.rviz`` shows one camera's relative topics; with ``cameras`` every
  camera gets its displays (``front/depth/image_vis``, ``front/points``, ...), and normals displays only when
  normals are computed.
- Whether RViz 2 is installed, checked before anything starts, so ``rviz:=true`` without it stops launch with a
  clear message instead of failing half-way and leaving the node running without its launch.
- What depth.launch.py and multi_gpu.launch.py share: the per-camera topic pattern arguments, the params files
  (shipped, then the user's), the ``rviz`` check and the run's RViz layout file.
- A node that exits with an error ends the launch with a non-zero exit code (:func:`end_launch_if_node_failed`),
  so a script or CI step running ``ros2 launch`` sees the failure.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from geodiff_ros.ros.params import LAUNCH_ARGUMENTS, PARAMS

__all__ = ["INPUT_PATTERNS", "LaunchArgumentError", "NodeFailed", "end_launch_if_node_failed", "params_files",
           "parameter_overrides", "rviz2_missing", "rviz_config", "rviz_requested", "truthy", "write_rviz_layout"]

_SPECS = {spec.name: spec for spec in PARAMS}
# Several cameras: the launch argument of each per-camera input topic pattern -> the node input topic it remaps.
INPUT_PATTERNS = (("image_pattern", "image"), ("camera_info_pattern", "camera_info"),
                  ("sparse_depth_pattern", "sparse_depth"), ("sparse_points_pattern", "sparse_points"))
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class LaunchArgumentError(ValueError):
    """A launch argument value that cannot become its parameter; the message names the argument and the fix."""


class NodeFailed(RuntimeError):
    """A geodiff node exited with an error; raised inside launch's event loop to end the launch with exit code 1."""


# The node's exit codes (geodiff_node: ros/node.py main) and what they mean for a launch user.
_NODE_EXIT_CODES = {1: "configure failed: the model could not be loaded or the device is unusable",
                    2: "invalid parameters"}


def end_launch_if_node_failed(event: Any, context: Any) -> None:
    """``OnProcessExit`` handler of a geodiff node: a non-zero exit ends the whole launch (the other processes get
    launch's orderly shutdown) and makes ``ros2 launch`` exit with 1, which is all ROS 2 launch 3.4 can return: its
    run() gives 1 when an exception reaches its event loop (logged as "Caught exception in launch ...: <this
    message>"), while a Shutdown action or a launch that merely runs out of processes exits 0. Exits during a
    shutdown already under way (Ctrl-C, another node's failure) are left alone.

    Raises:
        NodeFailed: naming the process, its exit code and what the code means.
    """
    code = int(event.returncode)
    if code == 0 or context.is_shutdown:
        return
    meaning = _NODE_EXIT_CODES.get(code, f"killed by signal {-code}" if code < 0 else "error")
    msg = (f"{event.process_name} exited with code {code} ({meaning}; its log above says why): launch stopped, "
           "exit code 1")
    raise NodeFailed(msg)


def truthy(text: str, argument: str = "") -> bool:
    """A launch argument as a boolean (true/false, 1/0, yes/no, on/off); the error names ``argument`` when given,
    so a user of ``ros2 launch`` sees which of their arguments to fix."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    msg = f"{argument}:={text!r} is not a boolean: use true or false" if argument else (
        f"{text!r} is not a boolean: use true or false")
    raise LaunchArgumentError(msg)


def _typed(arg: str, param: str, text: str) -> Any:
    default = _SPECS[param].default
    try:
        if isinstance(default, bool):
            return truthy(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except (ValueError, LaunchArgumentError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
        msg = f"{arg}:={text!r}: parameter {param} takes {kind}"
        raise LaunchArgumentError(msg) from None
    if param in ("model_depth", "model_normals") and text == "none":
        return ""  # 'none' disables a model ('' as a launch argument means "keep the params file's")
    return text


def parameter_overrides(given: Mapping[str, str], skip: Sequence[str] = ()) -> dict[str, Any]:
    """{parameter: typed value} for the launch arguments of ``LAUNCH_ARGUMENTS`` that were given (non-empty).

    Args:
        given: launch argument name -> its text ('' = not given: the params files decide).
        skip: parameters the launch file sets itself (e.g. multi_gpu.launch.py's per-node device).
    """
    out: dict[str, Any] = {}
    for param, arg in LAUNCH_ARGUMENTS.items():
        text = given.get(arg, "")
        if param in skip or text == "":
            continue
        out[param] = _typed(arg, param, text)
    return out


_CAMERA_CLASSES = ("rviz_default_plugins/Image", "rviz_default_plugins/PointCloud2",
                   "rviz_default_plugins/DepthCloud")
_TOPIC_KEYS = ("Depth Map Topic", "Color Image Topic")  # DepthCloud's topics (strings, not Topic: {Value: ...})


def _is_normals(display: dict) -> bool:
    topic = display.get("Topic", {}).get("Value", "") if isinstance(display.get("Topic"), dict) else ""
    return topic.startswith("normals/")


def _for_camera(display: dict, camera: str) -> dict:
    out = copy.deepcopy(display)
    out["Name"] = f'{camera}: {display["Name"]}'
    if isinstance(out.get("Topic"), dict) and out["Topic"].get("Value"):
        out["Topic"]["Value"] = f'{camera}/{out["Topic"]["Value"]}'
    for key in _TOPIC_KEYS:
        if out.get(key):
            out[key] = f"{camera}/{out[key]}"
    return out


def rviz_config(template: str, cameras: Sequence[str], normals: bool = True, fixed_frame: str | None = None) -> str:
    """The RViz layout for one run, from ``rviz/geodiff.rviz`` (one camera, relative topic names).

    Args:
        template: text of the shipped layout.
        cameras: camera names of the node(s); [] = the single camera on the template's topics.
        normals: whether normals are computed (False drops the normals displays: no such topics then).
        fixed_frame: RViz fixed frame (None keeps the template's).
    """
    config = yaml.safe_load(template)
    manager = config["Visualization Manager"]
    displays = []
    per_camera = []
    for display in manager["Displays"]:
        if display.get("Class") in _CAMERA_CLASSES:
            if normals or not _is_normals(display):
                per_camera.append(display)
        else:
            displays.append(display)  # grid, ...: once
    if cameras:
        displays += [_for_camera(d, cam) for cam in cameras for d in per_camera]
    else:
        displays += per_camera
    manager["Displays"] = displays
    if fixed_frame:
        manager["Global Options"]["Fixed Frame"] = fixed_frame
    return yaml.safe_dump(config, sort_keys=False)


def rviz2_missing() -> str | None:
    """Why ``rviz2`` cannot be started (None when it can), looked up as launch_ros looks up executables."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        prefix = get_package_prefix("rviz2")
    except PackageNotFoundError:
        where = os.environ.get("AMENT_PREFIX_PATH", "")
        return (f"rviz:=true, but RViz 2 (package rviz2) is not installed in this ROS environment "
                f"(AMENT_PREFIX_PATH={where!r}): install it (`sudo apt install ros-jazzy-rviz2`, or "
                "`rosdep install --from-paths src --ignore-src -y` in a workspace) and source its setup file, or "
                "launch without rviz:=true and start rviz2 elsewhere. Nothing was started.")
    if shutil.which("rviz2", path=os.path.join(prefix, "lib", "rviz2")) is None:
        return (f"rviz:=true, but the rviz2 package in {prefix} has no executable lib/rviz2/rviz2: reinstall "
                "ros-jazzy-rviz2, or launch without rviz:=true. Nothing was started.")
    return None


def rviz_requested(text: str) -> bool:
    """The ``rviz`` launch argument as a boolean. When true, rviz2 must be installed: RuntimeError with
    :func:`rviz2_missing`'s reason, raised before any process starts, so nothing is left running when launch stops."""
    if not truthy(text, "rviz"):
        return False
    missing = rviz2_missing()
    if missing:
        raise RuntimeError(missing)
    return True


def params_files(share: str, user_file: str) -> list[str]:
    """The node's params files: the shipped config/geodiff.yaml, then ``user_file`` (launch argument params_file;
    '' = none) on top, so the user's file only needs what it changes."""
    files = [os.path.join(share, "config", "geodiff.yaml")]
    if user_file:
        files.append(user_file)
    return files


def write_rviz_layout(share: str, cameras: Sequence[str], normals: bool, fixed_frame: str) -> str:
    """This run's layout (:func:`rviz_config` of the shipped rviz/geodiff.rviz) in a new temporary file; returns its
    path. The launch file removes it at shutdown."""
    with open(os.path.join(share, "rviz", "geodiff.rviz")) as template:
        text = rviz_config(template.read(), cameras, normals=normals, fixed_frame=fixed_frame)
    fd, path = tempfile.mkstemp(prefix="geodiff_", suffix=".rviz")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path
