"""Parameter requests that set several parameters at once, on the real node over DDS.

min_depth and max_depth constrain each other (min < max). A request that sets both must be judged as one change,
against the values of the same request and the current ones: accepted whole when the combination is valid,
refused whole (every result says why) when it is not. rclpy's ``set_parameters`` service hands the node one
parameter at a time, so min_depth could be applied and max_depth refused (a range that leaves every metric pixel
NaN), or a valid pair refused half-way. Checked through both services (``set_parameters``, what ``ros2 param
set`` and ``ros2 param load`` call, and ``set_parameters_atomically``) and ``ros2 param load`` of a dump.

The node runs with ``autostart:=false``: parameter handling needs no model, so no weights are loaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy-rclpy) not installed")
from rcl_interfaces.srv import GetParameters, SetParametersAtomically
from rclpy.parameter import Parameter
from ros_helpers import (
    Collector,
    NodeProcess,
    call_service,
    module_domain_id,
    node_remaps,
    ros_env,
    set_parameters,
)

DOMAIN = module_domain_id(43)
NS, NAME = f"/param_requests_{os.getpid()}", "geodiff_params"
NODE = f"{NS}/{NAME}"
START = {"min_depth": 0.1, "max_depth": 4.0}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Collector]]:
    proc = NodeProcess(DOMAIN, {"autostart": False, "cameras": ["front"], **START},
                       tmp_path_factory.mktemp("node") / "geodiff.log", remaps=node_remaps(NS, NAME))
    col = Collector(DOMAIN)
    try:
        call_service(col, GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=["min_depth"]),
                     timeout=60.0)
        yield proc, col
    finally:
        col.close()
        code, _ = proc.stop()
        assert code == 0, proc.log()[-3000:]


def _get(col: Collector, *names: str) -> dict[str, Any]:
    res = call_service(col, GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=list(names)))
    return {name: msg.double_value for name, msg in zip(names, res.values, strict=True)}  # double parameters


def _atomically(col: Collector, values: dict[str, Any]) -> Any:
    req = SetParametersAtomically.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                      for k, v in values.items()])
    return call_service(col, SetParametersAtomically, f"{NODE}/set_parameters_atomically", req).result


def _reset(col: Collector) -> None:
    """Back to START whatever the state (max first when it grows, min first when it shrinks)."""
    now = _get(col, "min_depth", "max_depth")
    order = ("max_depth", "min_depth") if START["max_depth"] >= now["max_depth"] else ("min_depth", "max_depth")
    for name in order:
        (res,) = set_parameters(col, NODE, {name: START[name]})
        assert res.successful, res.reason
    assert _get(col, "min_depth", "max_depth") == START


# request -> whether its combination is valid; each starts from min 0.1, max 4.0.
REQUESTS = {
    # both move above the current max: min_depth alone (150 >= 4) would be refused, with max_depth it is valid
    "raise_both": ({"min_depth": 150.0, "max_depth": 200.0}, True),
    # max_depth first, below the current min's new value: valid together
    "lower_both_max_first": ({"max_depth": 0.5, "min_depth": 0.2}, True),
    # an invalid pair whose first half alone is valid (2 < 4): min_depth was applied, max_depth refused
    "min_above_max": ({"min_depth": 2.0, "max_depth": 1.0}, False),
    # the same pair in the other order: max_depth alone (1 > 0.1) was applied
    "max_below_min": ({"max_depth": 1.0, "min_depth": 2.0}, False),
}


@pytest.mark.parametrize("service", ["set_parameters", "set_parameters_atomically"])
@pytest.mark.parametrize("case", list(REQUESTS))
def test_a_request_setting_min_and_max_depth_is_judged_as_a_whole(node: tuple[NodeProcess, Collector], case: str,
                                                                  service: str) -> None:
    proc, col = node
    values, valid = REQUESTS[case]
    _reset(col)
    mark = len(proc.log())
    if service == "set_parameters":
        results = set_parameters(col, NODE, values)
        assert len(results) == len(values)
    else:
        results = [_atomically(col, values)]
    after = _get(col, "min_depth", "max_depth")
    if valid:
        assert all(r.successful for r in results), [r.reason for r in results]
        assert after == values, after
    else:
        assert after == START, f"a refused request changed the parameters: {after}"
        for res in results:  # every parameter of the request is refused, with the reason
            assert not res.successful and "min_depth" in res.reason and "max_depth" in res.reason, res.reason
        assert "rejected parameter change" in proc.log_since(mark)


def test_a_camera_override_pair_is_judged_as_a_whole(node: tuple[NodeProcess, Collector]) -> None:
    """camera.front.min_depth / max_depth (declared without a value until set) against the node-wide range."""
    proc, col = node
    _reset(col)
    bad = set_parameters(col, NODE, {"camera.front.min_depth": 3.0, "camera.front.max_depth": 2.0})
    assert [r.successful for r in bad] == [False, False], [r.reason for r in bad]
    assert all("camera front: min_depth (3.0) must be smaller than max_depth (2.0)" in r.reason for r in bad), bad
    # camera.front.min_depth stayed unset (3.0 would refuse this max of 2.0)
    (alone,) = set_parameters(col, NODE, {"camera.front.max_depth": 2.0})
    assert alone.successful, alone.reason
    # both above the node-wide max of 4 m and the camera's max of 2 m: valid only as a pair
    good = set_parameters(col, NODE, {"camera.front.min_depth": 5.0, "camera.front.max_depth": 9.0})
    assert all(r.successful for r in good), [r.reason for r in good]
    res = call_service(col, GetParameters, f"{NODE}/get_parameters",
                       GetParameters.Request(names=["camera.front.min_depth", "camera.front.max_depth"]))
    assert [v.double_value for v in res.values] == [5.0, 9.0], res.values
    assert proc.proc.poll() is None, proc.log()[-3000:]


def test_ros2_param_load_of_a_dump_with_a_new_range(node: tuple[NodeProcess, Collector], tmp_path: Path) -> None:
    """``ros2 param load`` sends every parameter of the file in one set_parameters request: a dump of the node
    (configure-time and read-only parameters included, at their values) with a new depth range loads."""
    for module in ("ros2param", "ros2cli"):
        pytest.importorskip(module, reason=f"{module} not installed (the ros2 CLI is not on PyPI; "
                                           "scripts/setup_venv.sh --dev installs it from ../shared/ros/wheels)")
    ros2 = shutil.which("ros2") or shutil.which("ros2", path=str(Path(sys.executable).parent))
    if ros2 is None:
        pytest.skip("`ros2` not found on PATH")
    _, col = node
    _reset(col)
    env = ros_env(DOMAIN)
    dump = subprocess.run([ros2, "param", "dump", NODE, "--no-daemon", "--spin-time", "3"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    params = yaml.safe_load(dump.stdout)
    values = params[NODE]["ros__parameters"]
    # A tabletop range: max_depth (first in the file) is below the current min_depth, so valid only together.
    values["min_depth"], values["max_depth"] = 0.02, 0.05
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    load = subprocess.run([ros2, "param", "load", NODE, str(path), "--no-daemon", "--spin-time", "3"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert load.returncode == 0, load.stdout + load.stderr
    # rclpy's read-only start_type_description_service is refused alone, as for any rclpy node; nothing else fails
    failed = [ln for ln in (load.stdout + load.stderr).splitlines() if "failed" in ln]
    assert all("start_type_description_service" in ln for ln in failed), "\n".join(failed)
    assert _get(col, "min_depth", "max_depth") == {"min_depth": 0.02, "max_depth": 0.05}
