"""Loading errors name the problem and the fix; image conversions; the core imports without rclpy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geodiff_ros.engine import DeviceError, EngineConfig, GeoDiffEngine, ImageFormatError, ModelLoadError
from geodiff_ros.engine.checkpoint import resolve_checkpoint
from geodiff_ros.engine.core import resolve_device
from geodiff_ros.engine.preprocess import to_rgb_uint8


def cpu_config(**kw) -> EngineConfig:
    return EngineConfig(**{"device": "cpu", "dtype": "fp32", "processing_res": 32, **kw})


def test_missing_folder_names_the_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        GeoDiffEngine(cpu_config(depth_model=str(tmp_path / "nope")))
    assert "hf download" in str(err.value)


def test_missing_subfolder_is_named(tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_depth_ckpt, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match=r"has no unet/ subfolder"):
        resolve_checkpoint(str(broken))


def test_hub_id_offline_says_how_to_supply_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint("GonzaloMG/marigold-e2e-ft-depth")
    message = str(err.value)
    assert "GonzaloMG/marigold-e2e-ft-depth" in message and "hf download" in message and "offline" in message


def test_four_channel_unet_is_refused_with_the_reason(tmp_path: Path, tiny_depth_ckpt: Path) -> None:
    import json

    sd_like = tmp_path / "sd-like"
    shutil.copytree(tiny_depth_ckpt, sd_like)
    config_path = sd_like / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"in_channels=4.*fine-tune"):
        GeoDiffEngine(cpu_config(depth_model=str(sd_like)))


def test_normals_checkpoint_given_as_depth_is_refused(tiny_normals_ckpt: Path) -> None:
    with pytest.raises(ModelLoadError, match="normals model but was given as the depth model"):
        GeoDiffEngine(cpu_config(depth_model=str(tiny_normals_ckpt)))


def test_no_model_at_all_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="no model given"):
        GeoDiffEngine(cpu_config(depth_model=None, normals_model=None))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_clear_unless_fallback_allowed() -> None:
    with pytest.raises(DeviceError, match="allow_cpu_fallback"):
        resolve_device("cuda", allow_cpu_fallback=False)
    assert resolve_device("cuda", allow_cpu_fallback=True).type == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu9", allow_cpu_fallback=True)


def test_fp16_on_cpu_runs_in_fp32(tiny_depth_ckpt: Path) -> None:
    import torch

    engine = GeoDiffEngine(cpu_config(depth_model=str(tiny_depth_ckpt), dtype="fp16"))
    assert engine.dtype == torch.float32
    assert np.isfinite(engine.predict(np.zeros((16, 16, 3), np.uint8)).depth).all()


def test_image_conversions() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_rgb_uint8(gray)
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[..., 1] = 7
    assert np.array_equal(to_rgb_uint8(rgba), rgba[..., :3])
    sixteen = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    assert to_rgb_uint8(sixteen)[0, :, 0].tolist() == [0, 255, 100]
    assert to_rgb_uint8(np.full((1, 1, 3), 0.5))[0, 0, 0] == 128
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((2, 2, 2, 2, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageFormatError):
            to_rgb_uint8(bad)
    with pytest.raises(ImageFormatError, match=r"\[0, 1\]"):
        to_rgb_uint8(np.full((2, 2, 3), 3.0))
    with pytest.raises(ImageFormatError, match="NaN"):
        to_rgb_uint8(np.full((2, 2, 3), np.nan))


def test_core_imports_without_rclpy() -> None:
    """engine, geometry, training, evaluation must work where rclpy is not installed."""
    code = (
        "import sys; sys.modules['rclpy'] = None\n"  # any `import rclpy` now raises ImportError
        "import geodiff_ros.engine, geodiff_ros.geometry, geodiff_ros.visualize, geodiff_ros.cli.predict\n"
        "import importlib.util\n"
        "for name in ('geodiff_ros.training', 'geodiff_ros.evaluation'):\n"
        "    if importlib.util.find_spec(name) is not None: importlib.import_module(name)\n"
        "import importlib\n"
        "assert not any(m.startswith(('rclpy.', 'sensor_msgs', 'std_msgs')) for m in sys.modules)\n"
    )
    code = code.replace("import importlib.util\n", "import importlib, importlib.util\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
