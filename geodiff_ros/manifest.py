"""The generic RGB-D manifest (no ROS): one JSON file listing a recording's frames.

Read by fine-tuning (training/data.py), evaluation (evaluation/datasets.py) and written by the bag tool's export,
in the format of ``../shared/data/manifest.json``: a list of entries (or ``{"frames": [...]}``) such as
``{"rgb": "rgb/0001.png", "depth": "depth/0001.png", "depth_scale": 1000.0, "intrinsics": {...}}`` with paths
relative to the manifest's folder, metres = stored value / ``depth_scale``, 0 = no measurement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ManifestError", "read_manifest", "write_manifest"]


class ManifestError(ValueError):
    """A manifest is missing or is not a JSON list of frame entries."""


def read_manifest(manifest: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """(folder that entry paths are relative to, entries) of ``manifest`` (a JSON file, or a folder holding
    ``manifest.json``)."""
    path = Path(manifest)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        msg = f"cannot read RGB-D manifest {path} ({err}); pass a manifest.json in the format the README shows"
        raise ManifestError(msg) from err
    if isinstance(entries, dict):
        entries = entries.get("frames", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        msg = f'RGB-D manifest {path} must hold a list of frame entries (or {{"frames": [...]}})'
        raise ManifestError(msg)
    return path.parent, entries


def write_manifest(folder: str | Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Write ``folder/manifest.json`` (a JSON list, the format :func:`read_manifest` reads) and return its path.

    Entry paths should be relative to ``folder`` so the folder can be moved. The file is written to a temporary
    name and renamed, so a reader never sees half a manifest (an export interrupted mid-write leaves the old file).
    """
    items = list(entries)
    if not all(isinstance(e, dict) and "rgb" in e for e in items):
        msg = "every manifest entry must be a dict with at least an 'rgb' path (see read_manifest for the format)"
        raise ManifestError(msg)
    path = Path(folder) / "manifest.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(items, indent=1) + "\n")
    os.replace(tmp, path)
    return path
