"""Packaging as a ROS user meets it: what `colcon test` runs and tests, and what rosdep / pip install."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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
    assert {"ros2launch", "ros2run", "ros2param", "launch_testing", "sensor_msgs_py"} <= {
        e.text for e in root.iter("test_depend")}
    assert {"tf2_ros", "tf2_msgs", "geometry_msgs"} <= exec_deps  # the node's TransformListener


def test_requirements_ml_has_what_rosdep_cannot_install_at_the_tested_versions() -> None:
    pinned, ml = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements-ml.txt")
    assert {"diffusers", "accelerate", "safetensors", "tokenizers"} <= set(ml)  # no rosdep keys for these
    assert {name: pinned.get(name) for name in ml} == ml  # same versions as the venv the suite runs in


def test_launch_stack_dependencies_are_pinned() -> None:
    launch = _pins(REPO / "requirements-ros-launch.txt")
    assert set(launch) == {"osrf-pycommon", "argcomplete", "lark"}
    assert (REPO / "requirements-ros-launch.txt").read_text().count("==") == 3


# Layers of the package, lowest first: a module may import its own layer and the ones below, never one above, and
# no two modules may import each other through any chain (lazy imports inside functions count too).
LAYERS: dict[str, int] = {
    "visualize": 0, "manifest": 0, "engine": 1, "geometry": 1, "pipeline": 2, "testing": 2, "training": 3,
    "evaluation": 3, "ros": 4, "bag": 5, "cli": 6,
}


def _package_imports() -> dict[str, set[str]]:
    """module -> the geodiff_ros modules it imports (relative imports resolved), from the source files."""
    root = REPO / "geodiff_ros"
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_init else parts)
        package = module.split(".") if is_init else module.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                names = [f"{target}.{a.name}" for a in node.names]
                targets.update(n if (REPO / Path(*n.split("."))).with_suffix(".py").is_file()
                               or (REPO / Path(*n.split("."))).is_dir() else target for n in names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        edges[module] = {t for t in targets if t.startswith("geodiff_ros.") and t != module}
    return edges


def test_no_import_goes_up_a_layer_or_round_in_a_circle() -> None:
    """The engine, geometry and per-frame pipeline know nothing of ROS; the node never imports the bag tool; the
    demo sits above both; and no module cycle exists (checked on the sources)."""
    edges = _package_imports()
    up = []
    for module, targets in edges.items():
        mine = module.split(".")[1] if module.count(".") else ""
        for target in targets:
            theirs = target.split(".")[1]
            if mine in LAYERS and theirs in LAYERS and LAYERS[theirs] > LAYERS[mine]:
                up.append(f"{module} -> {target}")
    assert not up, f"imports up a layer: {up}"
    # cycles: depth-first search over the module graph (package __init__ modules included)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_node_parameters_import_without_torch() -> None:
    """Parameter validation (and the engine's defaults it reads) must not load torch: start-up errors stay fast."""
    code = ("import sys; import geodiff_ros.ros.params, geodiff_ros.engine.config; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=120).returncode == 0
