"""Parameter table, YAML defaults and the validation used by the node's on-set-parameters callback (no DDS)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from geodiff_ros.ros.params import PARAMS, Settings, engine_config_kwargs, validate_changes

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {p.name: p.default for p in PARAMS}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def test_yaml_mirrors_every_declared_default() -> None:
    config = yaml.safe_load((REPO / "config" / "geodiff.yaml").read_text())
    values = _flatten(config["/**"]["ros__parameters"])
    assert set(values) == set(DEFAULTS), f"yaml vs params.py: {set(values) ^ set(DEFAULTS)}"
    for name, default in DEFAULTS.items():
        assert values[name] == default and type(values[name]) is type(default), name


def test_every_parameter_is_described_and_numbers_have_ranges() -> None:
    for spec in PARAMS:
        assert len(spec.description) > 15, spec.name
        if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            assert spec.lo is not None and spec.lo <= spec.default <= spec.hi, spec.name
    assert validate_changes(DEFAULTS, {}, configured=False) is None


@pytest.mark.parametrize(("changes", "match"), [
    ({"dtype": "fp64"}, "'fp64' is not one of fp32, fp16, bf16"),
    ({"device": "gpu0"}, "must be cpu, cuda or cuda:N"),
    ({"processing_res": 100}, "multiple of 8"),
    ({"min_depth": 200.0}, "must be smaller than max_depth"),
    ({"cloud_stride": 0}, r"outside \[1, 64\]"),
    ({"alignment.method": "svd"}, "not one of ransac, irls, lsq"),
    ({"alignment.ema_alpha": 0.0}, "must be > 0"),
    ({"tasks": ["depth"], "model_depth": ""}, "no task left to run"),
    ({"warmup_size": [640]}, r"two integers \[width, height\]"),
    ({"warmup_size": [0, 480]}, r"within \[8, 8192\], or \[0, 0\] to skip"),
    ({"warmup_size": [640, 100000]}, r"within \[8, 8192\]"),
])
def test_invalid_changes_are_rejected_with_a_reason(changes: dict, match: str) -> None:
    reason = validate_changes(changes, DEFAULTS, configured=False)
    assert reason is not None
    assert re.search(match, reason), reason


def test_configure_time_parameters_are_fixed_once_configured() -> None:
    reason = validate_changes({"model_depth": "/other/model"}, DEFAULTS, configured=True)
    assert reason is not None and "cleanup" in reason
    assert validate_changes({"model_depth": "/other/model"}, DEFAULTS, configured=False) is None
    # Runtime parameters stay settable while running, and re-setting a fixed one to its value is harmless.
    assert validate_changes({"cloud_stride": 4, "alignment.ema_alpha": 1.0}, DEFAULTS, configured=True) is None
    assert validate_changes({"device": DEFAULTS["device"]}, DEFAULTS, configured=True) is None


def test_engine_config_follows_tasks_and_models() -> None:
    kwargs = engine_config_kwargs(Settings({**DEFAULTS, "tasks": ["normals"]}))
    assert kwargs["depth_model"] is None and kwargs["normals_model"] == DEFAULTS["model_normals"]
    kwargs = engine_config_kwargs(Settings({**DEFAULTS, "model_normals": ""}))
    assert kwargs["depth_model"] == DEFAULTS["model_depth"] and kwargs["normals_model"] is None
    assert kwargs["match_input_res"] is True  # outputs share the input's pixel grid and CameraInfo


def test_optimize_parameter_reaches_the_engine_and_matches_its_modes() -> None:
    from geodiff_ros.engine import EngineConfig
    from geodiff_ros.engine.accel import parse_optimize

    spec = next(p for p in PARAMS if p.name == "optimize")
    assert spec.default == "auto" and spec.configure_time
    for mode in spec.choices:  # every mode the parameter offers is one the engine runs
        parse_optimize(mode)
    kwargs = engine_config_kwargs(Settings({**DEFAULTS, "optimize": "compile+graph"}))
    assert EngineConfig(**kwargs).optimize == "compile+graph"
    assert "is not one of" in validate_changes({"optimize": "tensorrt"}, DEFAULTS, configured=False)
    assert "fixed while the node is configured" in validate_changes({"optimize": "compile"}, DEFAULTS,
                                                                    configured=True)


def test_defaults_are_fast_on_a_gpu_and_eager_on_the_cpu() -> None:
    """Out of the box fp16 and compile+graph on CUDA; the CPU keeps the official eager path."""
    import torch

    from geodiff_ros.engine.accel import resolve_optimize

    assert DEFAULTS["dtype"] == "fp16" and DEFAULTS["optimize"] == "auto"
    assert resolve_optimize("auto", torch.device("cuda", 0)) == "compile+graph"
    assert resolve_optimize("auto", torch.device("cpu")) == "none"
    assert resolve_optimize("graph", torch.device("cpu")) == "graph"  # an explicit choice is kept


def test_auto_optimize_keeps_the_cpu_engine_eager(tiny_depth_ckpt) -> None:
    from geodiff_ros.engine import EngineConfig, GeoDiffEngine

    engine = GeoDiffEngine(EngineConfig(depth_model=str(tiny_depth_ckpt), normals_model=None, device="cpu",
                                        dtype="fp16", processing_res=64, optimize="auto"))
    assert engine.optimize == "none" and engine.accelerator is None
