"""A broken AOT package for the start-up tests: its compiled model library is one that kills the loading process
(SIGSEGV), as a broken package did on a GPU."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path


def crashing_library(folder: Path) -> Path:
    """A shared library whose loading kills the process with SIGSEGV."""
    source = folder / "crash.c"
    source.write_text("#include <signal.h>\n__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }\n")
    library = folder / "crash.so"
    compiler = shutil.which("cc") or shutil.which("gcc") or "c++"
    subprocess.run([compiler, "-shared", "-fPIC", "-x", "c", str(source), "-o", str(library)], check=True)
    return library


def replace_library(package: Path, library: Path) -> None:
    """The package with its compiled model library replaced by ``library`` (same archive layout)."""
    with zipfile.ZipFile(package) as archive:
        data = {info.filename: archive.read(info) for info in archive.infolist()}
    libraries = [name for name in data if name.endswith(".so")]
    assert libraries, list(data)
    for name in libraries:
        data[name] = library.read_bytes()
    with zipfile.ZipFile(package, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in data.items():
            archive.writestr(name, payload)
