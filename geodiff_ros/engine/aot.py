"""Ahead-of-time compiled network stages (start-up): ``geodiff_compile`` exports each stage of the
compiled engine that torch.compile would compile (VAE encoder, UNet per task, VAE decoder; with the fused VAE path of
accel.FastPaths, on CUDA by default, the UNets only: a hand-scheduled stage needs none) with ``torch.export`` and
compiles it with AOTInductor into a ``.pt2`` package; an engine with a compiled ``optimize`` mode finds the packages
that match at start-up and loads each on its stage's first call with its input signature (seconds: no dynamo
tracing, no inductor); torch.compile, or eager, serves any stage, input size or batch size without one.

A package must never take the process down. Before its first use a package is loaded and run once in a child
process (synthetic weights and inputs of the recorded shapes; the verdict is kept next to it, so once per package
and torch build): a package that crashes, hangs or fails there is never loaded here. In this process a failure to
load is an exception: the stage compiles as usual, with one warning.

A package holds the compiled kernels only, not the weights: at load the stage's live parameters are handed to it
(``load_constants``), checked against the shapes, dtypes and strides it was built for; without a copy where the
torch build's AOT runtime keeps its own handle to them (:func:`user_managed_weights_safe`; older runtimes kept a
pointer into a map freed right after the call, so the package read freed memory), else as a copy. Fine-tuned
weights of the same architecture re-use the packages. A package is found by an identity hash of what its code
depends on: the stage, the model architecture (its diffusers config), the engine's precision and memory format,
the VAE GroupNorm variant, the torch build and the device (GPU model); it is used only for calls whose input
shapes, dtypes and strides equal the exported ones (``stage_signature``).

Packages live in ``$GEODIFF_AOT_DIR``, else ``$XDG_CACHE_HOME/geodiff_ros/aoti/<torch build>-<device>/``
(``~/.cache`` without XDG_CACHE_HOME), next to the inductor cache (startup.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .startup import compile_cache_key

LOG = logging.getLogger(__name__)

__all__ = ["aot_dir", "check_package", "export_stages", "index_packages", "load_stage_package", "stage_signature"]

AOT_ENV = "GEODIFF_AOT_DIR"
_META = ".json"  # sidecar of each package: stage, identity, input signature, weight shapes
_CHECKED = ".checked"  # sidecar: the verdict of the package's check in a child process
CHECK_TIMEOUT_S = 180.0  # a package's check (child: import torch, load, one run) that takes longer has hung


def aot_dir(device: torch.device) -> Path:
    """Where packages for this torch build and device are written and looked up."""
    explicit = os.environ.get(AOT_ENV)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "geodiff_ros" / "aoti" / compile_cache_key(device)


def stage_signature(args: Sequence[Any]) -> tuple:
    """Shapes, dtypes and strides of a stage call's tensor arguments: a package serves exactly these."""
    return tuple((tuple(a.shape), str(a.dtype), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor))


def _stages(acc: Any, include_unused: bool = False) -> dict[str, tuple[Any, torch.nn.Module]]:
    """Stage name -> (the accelerator's _Stage, the module that owns its parameters), for the stages that
    torch.compile would compile (a stage run otherwise, e.g. a hand-scheduled one, needs no package).
    ``include_unused``: also the compiled VAE stages that a fused VAE replaces (switchable at run time)."""
    engine = acc.engine
    vaes = {None: engine.vae, **engine._extra_vaes}
    encoders, decoders = acc.encoders, acc.decoders
    if include_unused:
        encoders = {**acc._compiled_vae_stages[0], **encoders}
        decoders = {**acc._compiled_vae_stages[1], **decoders}
    out = {}
    for key, stage in encoders.items():
        out[stage.name] = (stage, vaes[key])
    for task, stage in acc.unets.items():
        out[stage.name] = (stage, engine.models[task].unet)
    for key, stage in decoders.items():
        out[stage.name] = (stage, vaes[key])
    return {name: item for name, item in out.items() if item[0].compiled}


def _identity(acc: Any, name: str, owner: torch.nn.Module) -> str:
    """Hash of everything a stage's compiled code depends on, except the input signature and the weight values."""
    config = getattr(owner, "config", None)
    # The architecture, not where it was loaded from (_name_or_path) or which diffusers wrote it.
    architecture = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"} \
        if config is not None else repr(owner)
    parts = {
        "stage": name,
        "architecture": json.dumps(architecture, sort_keys=True, default=str),
        "dtype": str(acc.engine.dtype),
        "channels_last": acc.settings.channels_last,
        "channel_sum_groupnorm": acc.channel_sum_groupnorm,
        "device": compile_cache_key(acc.device),
        "format": 2,  # 2: weight shapes recorded, checked in a child process before use
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _StageModule(torch.nn.Module):
    """A stage function as a module that owns the parameters it reads (their names are the package's constants)."""

    def __init__(self, fn: Callable[..., torch.Tensor], owner: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.owner = owner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def export_stages(engine: Any, frames: Any, folder: Path | None = None,
                  log: Callable[[str], None] = LOG.info) -> list[Path]:
    """Run ``frames`` ([B,H,W,3] uint8) through the engine's accelerator once, recording each stage's inputs, then
    export and AOT-compile every stage for them. Returns the package paths (existing ones are kept)."""
    acc = engine.accelerator
    if acc is None:
        raise ValueError("AOT packages are for the compiled modes: build the engine with optimize compile or "
                         "compile+graph")
    folder = folder or aot_dir(acc.device)
    folder.mkdir(parents=True, exist_ok=True)
    stages = _stages(acc)
    calls: dict[str, tuple] = {}
    saved = {}
    for name, (stage, _) in stages.items():
        saved[name] = stage.fn, stage.aot, stage.aot_paths, stage.gated
        stage.aot, stage.aot_paths, stage.gated = {}, {}, False  # record the stage's own inputs, packages or not

        def record(*args: Any, _name: str = name, _eager: Callable[..., Any] = stage.eager) -> torch.Tensor:
            calls.setdefault(_name, args)  # as they are: strides (channels_last, the expanded context) matter
            return _eager(*args)

        stage.fn = record
    try:
        with torch.no_grad():  # exported graphs must not hold inference-mode tensors
            acc.compute(torch.from_numpy(frames).to(acc.device), engine.tasks)
    finally:
        for name, (stage, _) in stages.items():
            stage.fn, stage.aot, stage.aot_paths, stage.gated = saved[name]
    paths = []
    for name, args in calls.items():
        stage, owner = stages[name]
        identity = _identity(acc, name, owner)
        signature = stage_signature(args)
        tag = hashlib.sha256(f"{identity}{signature}".encode()).hexdigest()[:16]
        path = folder / f'{re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")}-{tag}.pt2'
        if path.is_file() and path.with_suffix(_META).is_file():
            log(f"{name} {signature[0][0]}: {path} exists")
            paths.append(path)
            continue
        start = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(_StageModule(stage.eager, owner), args)
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(path),
                inductor_configs={"aot_inductor.package_constants_in_so": False})
        constants = {f"owner.{k}": [list(v.shape), str(v.dtype), list(v.stride())]
                     for k, v in owner.state_dict().items()}
        path.with_suffix(_META).write_text(json.dumps({"stage": name, "identity": identity, "signature": signature,
                                                       "device_type": acc.device.type, "constants": constants},
                                                      indent=1))
        log(f"{name} {signature[0][0]}: compiled in {time.perf_counter() - start:.0f} s -> {path}")
        # Checked now, in a child process as every package is before its first use, so that a node's first
        # start on it does not pay for the check (its verdict is kept next to the package).
        problem = check_package(path, json.loads(path.with_suffix(_META).read_text()))
        if problem is not None:
            raise RuntimeError(f"the package {path} does not run: {problem}")
        paths.append(path)
    return paths


def index_packages(acc: Any, folder: Path | None = None) -> int:
    """Find the packages in ``folder`` that fit one of the accelerator's compiled stages (their JSON sidecars only:
    nothing is loaded here). Each stage keeps them by input signature and loads one on its first call with that
    signature (accel._Stage.run_fast, through :func:`load_stage_package`). Returns how many were found."""
    folder = folder or aot_dir(acc.device)
    if not folder.is_dir():
        return 0
    stages = _stages(acc, include_unused=True)
    identities = {_identity(acc, name, owner): name for name, (_, owner) in stages.items()}
    found = 0
    for meta_path in sorted(folder.glob(f"*{_META}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        name = identities.get(meta.get("identity"))
        package = meta_path.with_suffix(".pt2")
        if name is None or not package.is_file():
            continue  # another model, precision, torch build or package format
        stage, owner = stages[name]
        signature = tuple((tuple(shape), dtype, tuple(stride)) for shape, dtype, stride in meta["signature"])
        stage.aot_paths[signature] = package
        stage.owner = owner
        found += 1
    if found:
        LOG.info("found %d AOT-compiled stage package(s) in %s (each is checked in a child process, then loaded, "
                 "on first use)", found, folder)
    return found


def load_stage_package(path: Path, owner: torch.nn.Module) -> Callable[..., torch.Tensor] | None:
    """The package at ``path`` with ``owner``'s live parameters as its weights, or None (one warning) when it cannot
    be used: it failed its check in a child process (crash, hang or error there never reaches this process), its
    weights do not fit, or loading raised. Then the stage compiles as usual."""
    stage = path.name
    try:
        meta = json.loads(path.with_suffix(_META).read_text())
        stage = meta.get("stage", stage)
        problem = check_package(path, meta)
        if problem is None:
            start = time.perf_counter()
            device = next(owner.parameters()).device
            runner = _load(path, _weights_for(meta, owner), device)
            LOG.info("loaded AOT package %s in %.1f s", path.name, time.perf_counter() - start)
            return runner
    except Exception as err:  # noqa: BLE001 - a stale or broken package: compile as usual
        problem = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    LOG.warning("AOT package %s not used (%s); %s compiles as usual (run geodiff_compile again to replace it)",
                path, problem, stage)
    return None


def check_package(path: Path, meta: dict, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Load and run the package once in a child process (synthetic weights and inputs of the recorded shapes):
    None when it ran, else what went wrong (exit code, signal, time-out, error). The verdict is kept in a sidecar
    (``.checked``) for this torch build and package file, so a package is checked once, not at every start."""
    marker = path.with_suffix(_CHECKED)
    stamp = {"torch": torch.__version__, "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    try:
        previous = json.loads(marker.read_text())
        if {k: previous.get(k) for k in stamp} == stamp:
            return previous.get("problem")
    except (OSError, ValueError):
        pass
    start = time.perf_counter()
    # faulthandler: a crash there prints the Python stack, whose innermost frames name the failing call
    cmd = [sys.executable, "-X", "faulthandler", "-m", "geodiff_ros.engine.aot", "--check", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        problem = f"its check in a child process did not finish within {timeout_s:.0f} s"
    else:
        if done.returncode == 0:
            problem = None
        else:
            how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                   else f"exit code {done.returncode}")
            problem = f"its check in a child process failed ({how}: {_where(done.stderr or done.stdout or '')})"
    LOG.info("checked AOT package %s in a child process in %.1f s: %s", path.name, time.perf_counter() - start,
             problem or "ok")
    try:
        marker.write_text(json.dumps({**stamp, "problem": problem}))
    except OSError:
        pass  # a read-only folder: checked again next time
    return problem


def _where(output: str) -> str:
    """The innermost Python frames of a crash (faulthandler's 'most recent call first' block), else the last line."""
    lines = output.strip().splitlines()
    for i, line in enumerate(lines):
        if "most recent call first" in line:
            frames = [f.strip() for f in lines[i + 1:i + 4] if f.strip().startswith("File")]
            return " <- ".join(frames)[:400]
    return lines[-1][:200] if lines else ""


def user_managed_weights_safe() -> bool:
    """Whether this torch build's AOTInductor runtime keeps its own handle to weights passed with
    ``load_constants(user_managed=True)``. Older runtimes kept the caller's handle, which points into the argument
    map that torch's Python binding frees when the call returns: the package then reads freed memory at run time
    (crashes or wrong weights). The runtime is compiled into each package from torch's own headers, so the header
    of the running torch build (the one that built the package: aot identity) decides."""
    header = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "inductor" / "aoti_runtime" / "utils.h"
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"if\s*\(\s*user_managed\s*\)\s*\{\s*aoti_torch_new_tensor_handle\(", text) is not None


def _weights_for(meta: dict, owner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's weights from ``owner``'s live parameters, checked against the recorded shapes, dtypes and
    strides (the compiled kernels assume them: a model converted after the export would be read wrongly)."""
    params = {f"owner.{k}": v.detach() for k, v in owner.state_dict(keep_vars=True).items()}
    weights = {}
    for fqn, (shape, dtype, stride) in meta["constants"].items():
        value = params.get(fqn)
        if value is None:
            raise KeyError(f"the model has no parameter {fqn!r} the package needs")
        if (list(value.shape), str(value.dtype), list(value.stride())) != (shape, dtype, stride):
            raise ValueError(f"parameter {fqn} is {list(value.shape)} {value.dtype} stride {list(value.stride())}, "
                             f"the package was built for {shape} {dtype} stride {stride}")
        weights[fqn] = value
    return weights


def _load(path: Path, weights: dict[str, torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """Load the package for ``device`` and hand it ``weights``: without a copy where the runtime keeps its own
    handle to them (:func:`user_managed_weights_safe`), else as a copy the package owns (more memory, no risk)."""
    index = device.index if device.index is not None else -1
    runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    wanted = runner.get_constant_fqns()
    missing = [fqn for fqn in wanted if fqn not in weights]
    if missing:
        raise KeyError(f"the model has no parameter {missing[0]!r} the package needs")
    shared = user_managed_weights_safe()
    if not shared:
        LOG.warning("this torch build's AOT runtime cannot share the model's weights safely: package %s gets its "
                    "own copy (more GPU memory)", path.name)
    runner.load_constants({fqn: weights[fqn] for fqn in wanted}, check_full_update=True, user_managed=shared)
    return runner


def _check_main(path: Path) -> int:
    """Child process of :func:`check_package`: load the package with synthetic weights and run it once."""
    meta = json.loads(path.with_suffix(_META).read_text())
    device = torch.device(meta.get("device_type", "cpu"))
    torch.manual_seed(0)

    def synthetic(shape: list[int], dtype: str, stride: list[int]) -> torch.Tensor:
        value = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype.replace("torch.", "")), device=device)
        return value.normal_(0.0, 0.02) if value.is_floating_point() else value.zero_()

    weights = {fqn: synthetic(*spec) for fqn, spec in meta["constants"].items()}
    runner = _load(path, weights, device)
    args = [synthetic(shape, dtype, stride) for shape, dtype, stride in meta["signature"]]
    with torch.no_grad():
        out = runner(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    shapes = [tuple(o.shape) for o in (out if isinstance(out, (list, tuple)) else [out])]
    print(f"ran {path.name}: outputs {shapes}")  # noqa: T201 - the child process reports to its parent
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="check one AOT stage package in this process (aot.check_package)")
    parser.add_argument("--check", type=Path, required=True)
    sys.exit(_check_main(parser.parse_args().check))
