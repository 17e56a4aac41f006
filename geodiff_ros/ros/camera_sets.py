"""Camera lists of a multi-camera ``geodiff`` node and their spread over GPUs (pure Python, no ROS imports).

Shared by the node (parameter ``cameras``), ``launch/depth.launch.py`` and ``launch/multi_gpu.launch.py``, so the
rules a launch file applies are the ones the node validates, and both are unit-tested without ROS launch.
A camera name becomes a topic prefix (``front`` -> ``front/image``, ``front/depth/image``) and part of parameter
names (``camera.front.max_depth``), so it must be one ROS name token.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CameraListError",
    "assign_cameras",
    "camera_prefix",
    "camera_remappings",
    "parse_assignment",
    "parse_camera_list",
    "parse_gpu_list",
    "visible_gpu_count",
]

# One token of a ROS name (REP 144: alphanumerics and underscores, not starting with a digit); no '.' because the
# name is also a parameter-name segment, no '/' so one camera is one prefix level (remap for deeper topics).
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CameraListError(ValueError):
    """A camera list or GPU assignment that cannot be used; the message names the fix."""


def parse_camera_list(value: Any) -> list[str]:
    """Camera names from a parameter or launch-argument value.

    Accepts a list of strings, one string with names separated by commas or spaces (``"front,left"``), the
    launch form ``"[front, left]"``, and None / ``[]`` / ``""`` for no cameras (the single-camera node). ROS turns
    an empty YAML list into an unset parameter and a declared ``[]`` into a byte array, so both mean "none".
    """
    if value is None or isinstance(value, (bytes, bytearray)) and len(value) == 0:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        names = [part.strip().strip('\'"') for part in re.split(r"[,\s]+", text)]
        names = [n for n in names if n]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise CameraListError(f"cameras={value!r} must be a list of names like [front, left] (or [] for one camera)")
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CameraListError(
                f"camera name {name!r} is not a ROS name token: use letters, digits and underscores, not starting "
                "with a digit (remap the topics if the camera publishes elsewhere)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CameraListError(f'camera name(s) {", ".join(dupes)} given twice in cameras; each camera needs its own')
    return names


def camera_prefix(name: str) -> str:
    """Topic prefix of a camera: ``'front/'``, or ``''`` for the single unnamed camera (today's topics)."""
    return f"{name}/" if name else ""


def parse_assignment(value: Any) -> list[list[str]] | None:
    """An explicit camera-to-GPU list: ``[[front, left], [rear]]`` or ``"front,left;rear"``; None if empty.

    Group i runs on GPU i (of the ``gpus`` given to :func:`assign_cameras`). Empty groups are allowed (an idle GPU).
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[["):  # YAML-ish nested list as typed on a command line
            groups_text = re.findall(r"\[([^\[\]]*)\]", text)
        else:
            groups_text = text.split(";")
        return [parse_camera_list(g) for g in groups_text]
    if isinstance(value, (list, tuple)):
        return [parse_camera_list(g) for g in value]
    raise CameraListError(f'assignment={value!r} must look like "front,left;rear" or [[front, left], [rear]]')


def assign_cameras(cameras: Sequence[str], gpus: Sequence[int] | int,
                   assignment: Sequence[Sequence[str]] | None = None) -> dict[int, list[str]]:
    """GPU index -> cameras served by the node on that GPU (GPUs without cameras are left out).

    Without ``assignment`` cameras go round-robin in list order (camera k on ``gpus[k % len(gpus)]``), which
    balances equal-rate cameras. With it, group i goes to ``gpus[i]``; every camera must appear exactly once.
    """
    gpu_list = list(range(gpus)) if isinstance(gpus, int) else list(gpus)
    if not gpu_list:
        raise CameraListError("no GPU to assign cameras to: give num_gpus >= 1 (or a gpus list)")
    if len(set(gpu_list)) != len(gpu_list):
        raise CameraListError(f"gpus {gpu_list} lists a GPU twice")
    names = parse_camera_list(list(cameras))
    if not names:
        raise CameraListError('no cameras given: set cameras:="[front, left, ...]"')
    out: dict[int, list[str]] = {}
    if assignment is None:
        for k, name in enumerate(names):
            out.setdefault(gpu_list[k % len(gpu_list)], []).append(name)
        return out
    groups = [parse_camera_list(list(g)) for g in assignment]
    if len(groups) > len(gpu_list):
        raise CameraListError(f"assignment has {len(groups)} groups but only {len(gpu_list)} GPU(s): "
                              "give fewer groups or more GPUs")
    placed = [n for g in groups for n in g]
    missing = [n for n in names if n not in placed]
    extra = [n for n in placed if n not in names]
    twice = sorted({n for n in placed if placed.count(n) > 1})
    if missing or extra or twice:
        raise CameraListError(
            "assignment must place every camera exactly once: "
            + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                          f"not in cameras {extra}" if extra else "",
                                          f"twice {twice}" if twice else "") if part))
    for gpu, group in zip(gpu_list, groups, strict=False):
        if group:
            out[gpu] = list(group)
    return out


def camera_remappings(cameras: Sequence[str], patterns: Mapping[str, str]) -> list[tuple[str, str]]:
    """Remap rules from per-camera topic patterns: ``{'image': '/{camera}/color/image_raw'}`` gives
    ``('front/image', '/front/color/image_raw')`` for each camera. Empty patterns leave the node's own topic
    (``<namespace>/<camera>/image``). Inputs are ``image``, ``camera_info``, ``sparse_depth``, ``sparse_points``.
    """
    known = ("image", "camera_info", "sparse_depth", "sparse_points")
    rules = []
    for topic, pattern in patterns.items():
        if topic not in known:
            raise CameraListError(f'no input topic {topic!r} to remap; use one of {", ".join(known)}')
        if not pattern:
            continue
        if "{camera}" not in pattern:
            raise CameraListError(f"pattern {pattern!r} for {topic} must contain {{camera}} (else every camera "
                                  "would read the same topic)")
        rules += [(f"{name}/{topic}", pattern.replace("{camera}", name)) for name in cameras]
    return rules


def parse_gpu_list(value: Any) -> list[int] | None:
    """GPU indices from ``"[0, 2]"`` / ``"0,2"`` / a list; None if empty (then use ``num_gpus``)."""
    if value is None or value == "" or value == []:
        return None
    parts = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value).strip().strip("[]"))
    try:
        gpus = [int(p) for p in parts if str(p).strip() != ""]
    except ValueError:
        raise CameraListError(f"gpus={value!r} must be GPU indices like [0, 1]") from None
    if any(g < 0 for g in gpus):
        raise CameraListError(f"gpus={value!r}: indices must be >= 0")
    return gpus or None


def visible_gpu_count() -> int:
    """CUDA GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else ``nvidia-smi -L``; 0 if unknown.

    Avoids importing torch (seconds, and a CUDA context) in a launch process.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
