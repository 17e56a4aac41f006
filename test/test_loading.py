"""Loading errors name the problem and the fix; image conversions; the core imports without rclpy."""

from __future__ import annotations

import os
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


# ---------------------------------------------------------------- task check: guard, stated task, override


def _copy_without_task_entry(src: Path, dst: Path) -> Path:
    """A checkpoint copy whose model_index.json does not state its task (the name must tell, or nothing)."""
    import json

    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index.pop("geodiff_task", None)
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_task_is_read_from_the_checkpoints_own_name_not_its_parent_folders(tmp_path: Path,
                                                                           tiny_normals_ckpt: Path) -> None:
    folder = _copy_without_task_entry(tiny_normals_ckpt, tmp_path / "depth_and_normals" / "normals_v2")
    engine = GeoDiffEngine(cpu_config(depth_model=None, normals_model=str(folder)))
    assert engine.tasks == ("normals",)
    with pytest.raises(ModelLoadError) as err:  # the guard against swapped settings stays
        GeoDiffEngine(cpu_config(depth_model=str(folder)))
    message = str(err.value)
    assert "normals model but was given as the depth model" in message and "'normals_v2'" in message
    # ... and the error says how to state the task or turn the check off
    assert '"geodiff_task": "depth"' in message and "check_model_task:=false" in message


def test_stated_task_wins_over_a_misleading_name(tmp_path: Path, tiny_normals_ckpt: Path) -> None:
    folder = tmp_path / "team-depth-models"
    shutil.copytree(tiny_normals_ckpt, folder)  # model_index.json says geodiff_task "normals"
    assert GeoDiffEngine(cpu_config(depth_model=None, normals_model=str(folder))).tasks == ("normals",)
    with pytest.raises(ModelLoadError, match=r'declares geodiff_task "normals".*correct it in'):
        GeoDiffEngine(cpu_config(depth_model=str(folder)))


def test_check_model_task_false_trusts_the_slot(tiny_normals_ckpt: Path) -> None:
    engine = GeoDiffEngine(cpu_config(depth_model=str(tiny_normals_ckpt), check_model_task=False))
    assert engine.tasks == ("depth",)


def test_tiny_checkpoints_state_their_task(tiny_depth_ckpt: Path, tiny_normals_ckpt: Path) -> None:
    import json

    for folder, task in ((tiny_depth_ckpt, "depth"), (tiny_normals_ckpt, "normals")):
        assert json.loads((folder / "model_index.json").read_text())["geodiff_task"] == task


# ---------------------------------------------------------------- loading is quiet and says what failed


def _load_in_a_fresh_process(checkpoint: Path, *, close_stderr: bool) -> tuple[int, str, str]:
    """Load an engine as a user's process would: library defaults (progress bars on), stderr a pipe."""
    code = (
        "import sys, time\n"
        f"time.sleep({0.3 if close_stderr else 0})\n"  # by then the parent has closed its end of the pipe
        "from geodiff_ros.engine import EngineConfig, GeoDiffEngine\n"
        f"engine = GeoDiffEngine(EngineConfig(depth_model={str(checkpoint)!r}, normals_model=None, "
        "device='cpu', dtype='fp32', processing_res=32))\n"
        "print('loaded', engine.tasks, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # the tests set it
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    if close_stderr:
        proc.stderr.close()
        out, err = proc.communicate(timeout=120)[0], ""
    else:
        out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_loading_prints_no_noise(tiny_depth_ckpt: Path) -> None:
    """No 'should be kept in float32: []' lines (weights load in their dtype, no cast) and no progress bars."""
    code, out, err = _load_in_a_fresh_process(tiny_depth_ckpt, close_stderr=False)
    assert code == 0 and "loaded ('depth',)" in out
    assert "should be kept in float32" not in err
    assert "Loading weights" not in err and "it/s" not in err


def test_closed_stderr_does_not_break_loading(tiny_depth_ckpt: Path) -> None:
    """A broken log pipe (closed stderr) made loading fail with advice to delete good weights."""
    code, out, _ = _load_in_a_fresh_process(tiny_depth_ckpt, close_stderr=True)
    assert code == 0 and "loaded ('depth',)" in out


@pytest.mark.parametrize(("damage", "named"), [
    ("truncate unet/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"),
    ("delete unet/diffusion_pytorch_model.safetensors", "no weights file"),
    ("delete vae/config.json", "config.json missing"),
])
def test_unreadable_files_say_download_again(tmp_path: Path, tiny_depth_ckpt: Path, damage: str,
                                             named: str) -> None:
    broken = tmp_path / "broken-depth"
    shutil.copytree(tiny_depth_ckpt, broken)
    action, rel = damage.split()
    target = broken / rel
    if action == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    with pytest.raises(ModelLoadError) as err:
        GeoDiffEngine(cpu_config(depth_model=str(broken)))
    message = str(err.value)
    assert f"{rel.split('/')[0]} files" in message and named in message
    assert "download it again" in message


@pytest.mark.parametrize(("raised", "says"), [
    (BrokenPipeError(32, "Broken pipe"), "writing to this process's log stream failed"),
    (RuntimeError("Error(s) in loading state_dict: unexpected key"), "its files read fine"),
])
def test_load_errors_blame_the_files_only_when_they_are_unreadable(
        monkeypatch: pytest.MonkeyPatch, tiny_depth_ckpt: Path, raised: Exception, says: str) -> None:
    from diffusers import UNet2DConditionModel

    def failing(*_args, **_kwargs):
        raise raised

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", failing)
    with pytest.raises(ModelLoadError) as err:
        GeoDiffEngine(cpu_config(depth_model=str(tiny_depth_ckpt)))
    message = str(err.value)
    assert says in message and "unet" in message
    assert "download" not in message  # good weights must not be deleted on this advice
