"""Packaging as a ROS user meets it: what `colcon test` runs and tests, and what rosdep / pip install."""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    """name (lower case, - and _ alike) -> version of the ``name==version`` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def test_the_suite_tests_the_package_it_should() -> None:
    """`colcon test` runs pytest in the source folder, which put src/ first on sys.path: it tested the sources, not
    the install. Under colcon (or GEODIFF_TEST_INSTALLED=1) the installed package must be the one imported."""
    import geodiff_ros

    where = Path(geodiff_ros.__file__).absolute()  # a --symlink-install build links src files: not resolved here
    sources = REPO / "geodiff_ros"
    flag = os.environ.get("GEODIFF_TEST_INSTALLED")  # set by conftest from COLCON (or by hand)
    if flag == "1" or (flag is None and os.environ.get("COLCON")):
        assert not where.is_relative_to(sources), f"testing the install, but imported {where}"
    else:
        assert where.is_relative_to(sources), f"testing the checkout {REPO}, but imported {where}"


def test_colcon_test_runs_pytest() -> None:
    """colcon runs pytest only for packages that declare it as a test dependency; otherwise it ran unittest, which
    found 0 tests and reported success."""
    tree = ast.parse((REPO / "setup.py").read_text())
    setup_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {kw.arg: kw.value for kw in setup_call.keywords}
    extras = ast.literal_eval(kwargs["extras_require"])
    assert any(re.split(r"[ <=>!]", dep)[0] == "pytest" for dep in extras["test"])


def test_package_xml_uses_the_rosdep_keys_that_exist() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    exec_deps = {e.text for e in root.iter("exec_depend")}
    # python3-pytorch-pip also installs torchvision; python3-torch is the apt package.
    assert "python3-pytorch-pip" not in exec_deps and "python3-torch" in exec_deps
    assert {"python3-transformers-pip", "python3-huggingface-hub-pip", "python3-rosbags-pip"} <= exec_deps
    assert {"ros2launch", "ros2run", "ros2param", "launch_testing"} <= {e.text for e in root.iter("test_depend")}


def test_requirements_ml_has_what_rosdep_cannot_install_at_the_tested_versions() -> None:
    pinned, ml = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements-ml.txt")
    assert {"diffusers", "accelerate", "safetensors", "tokenizers"} <= set(ml)  # no rosdep keys for these
    assert {name: pinned.get(name) for name in ml} == ml  # same versions as the venv the suite runs in


def test_launch_stack_dependencies_are_pinned() -> None:
    launch = _pins(REPO / "requirements-ros-launch.txt")
    assert set(launch) == {"osrf-pycommon", "argcomplete", "lark"}
    assert (REPO / "requirements-ros-launch.txt").read_text().count("==") == 3
