"""Ahead-of-time compiled network stages (issue 14, start-up): ``geodiff_compile`` exports each stage of the
compiled engine that torch.compile would compile (VAE encoder, UNet per task, VAE decoder; with the fused VAE path of
accel.FastPaths, on CUDA by default, the UNets only: a hand-scheduled stage needs none) with ``torch.export`` and
compiles it with AOTInductor into a ``.pt2`` package; an engine with a compiled ``optimize`` mode loads the packages
that match at start-up (seconds: no dynamo tracing, no inductor) and keeps torch.compile, or eager, for any stage,
input size or batch size without one.

A package holds the compiled kernels only, not the weights: at load the stage's live parameters are handed to it
(``load_constants``, no copy), so fine-tuned weights of the same architecture re-use the packages. A package is
found by an identity hash of what its code depends on: the stage, the model architecture (its diffusers config),
the engine's precision and memory format, the VAE GroupNorm variant, the torch build and the device (GPU model);
it is used only for calls whose input shapes, dtypes and strides equal the exported ones (``stage_signature``).
Anything else, or a package that fails to load, falls back to the ordinary path with one log line.

Packages live in ``$GEODIFF_AOT_DIR``, else ``$XDG_CACHE_HOME/geodiff_ros/aoti/<torch build>-<device>/``
(``~/.cache`` without XDG_CACHE_HOME), next to the inductor cache (startup.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .startup import compile_cache_key

LOG = logging.getLogger(__name__)

__all__ = ["aot_dir", "attach_packages", "export_stages", "stage_signature"]

AOT_ENV = "GEODIFF_AOT_DIR"
_META = ".json"  # sidecar of each package: stage, identity, signature


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


def _stages(acc: Any) -> dict[str, tuple[Any, torch.nn.Module]]:
    """Stage name -> (the accelerator's _Stage, the module that owns its parameters), for the stages that
    torch.compile would compile (a stage run otherwise, e.g. a hand-scheduled one, needs no package)."""
    engine = acc.engine
    vaes = {None: engine.vae, **engine._extra_vaes}
    out = {}
    for key, stage in acc.encoders.items():
        out[stage.name] = (stage, vaes[key])
    for task, stage in acc.unets.items():
        out[stage.name] = (stage, engine.models[task].unet)
    for key, stage in acc.decoders.items():
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
        "format": 1,
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
        saved[name] = stage.fn, stage.aot
        stage.aot = {}  # record the stage's own inputs even where a package is loaded

        def record(*args: Any, _name: str = name, _eager: Callable[..., Any] = stage.eager) -> torch.Tensor:
            calls.setdefault(_name, args)  # as they are: strides (channels_last, the expanded context) matter
            return _eager(*args)

        stage.fn = record
    try:
        with torch.no_grad():  # exported graphs must not hold inference-mode tensors
            acc.compute(torch.from_numpy(frames).to(acc.device), engine.tasks)
    finally:
        for name, (stage, _) in stages.items():
            stage.fn, stage.aot = saved[name]
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
        path.with_suffix(_META).write_text(json.dumps({"stage": name, "identity": identity,
                                                       "signature": signature}, indent=1))
        log(f"{name} {signature[0][0]}: compiled in {time.perf_counter() - start:.0f} s -> {path}")
        paths.append(path)
    return paths


def attach_packages(acc: Any, folder: Path | None = None) -> int:
    """Load every package in ``folder`` that fits one of the accelerator's stages; returns how many were loaded."""
    folder = folder or aot_dir(acc.device)
    if not folder.is_dir():
        return 0
    stages = _stages(acc)
    identities = {_identity(acc, name, owner): name for name, (_, owner) in stages.items()}
    loaded = 0
    for meta_path in sorted(folder.glob(f"*{_META}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        name = identities.get(meta.get("identity"))
        if name is None:
            continue  # another model, precision or torch build
        stage, owner = stages[name]
        signature = tuple((tuple(shape), dtype, tuple(stride)) for shape, dtype, stride in meta["signature"])
        try:
            runner = _load(meta_path.with_suffix(".pt2"), owner, acc.device)
        except Exception as err:  # noqa: BLE001 - a stale or broken package: compile as usual
            LOG.warning("AOT package %s not used (%s: %s); %s compiles as usual", meta_path.with_suffix(".pt2"),
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", name)
            continue
        stage.aot[signature] = runner
        loaded += 1
    if loaded:
        LOG.info("loaded %d AOT-compiled stage package(s) from %s", loaded, folder)
    return loaded


def _load(path: Path, owner: torch.nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    index = device.index if device.index is not None else -1
    runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    params = {f"owner.{k}": v for k, v in owner.state_dict(keep_vars=True).items()}
    wanted = runner.get_constant_fqns()
    missing = [fqn for fqn in wanted if fqn not in params]
    if missing:
        raise KeyError(f"the model has no parameter {missing[0]!r} the package needs")
    runner.load_constants({fqn: params[fqn].detach() for fqn in wanted}, check_full_update=True, user_managed=True)
    return runner
