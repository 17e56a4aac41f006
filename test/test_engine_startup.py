"""Where the compiled engine keeps its kernels (issue 14): a persistent per-user folder keyed by torch build and
device unless TORCHINDUCTOR_CACHE_DIR says otherwise. No compiling here (test_ros_warmup.py compiles for real)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from geodiff_ros.engine.startup import compile_cache_key, default_compile_cache_dir, prepare_compile


@pytest.fixture(autouse=True)
def _no_worker_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import config

    monkeypatch.setattr(config, 'compile_threads', 1)  # prepare_compile would start worker processes


def test_default_folder_is_persistent_per_user_and_keyed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    key = compile_cache_key(torch.device('cpu'))
    assert key.startswith(f'torch{torch.__version__}'.lower()) and 'cpu' in key and '/' not in key
    folder = prepare_compile(torch.device('cpu'))
    assert folder == tmp_path / 'xdg' / 'geodiff_ros' / 'inductor' / key and folder.is_dir()
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(folder)  # what inductor reads
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert default_compile_cache_dir(torch.device('cpu')) == tmp_path / 'home' / '.cache' / 'geodiff_ros' / \
        'inductor' / key
    assert not str(default_compile_cache_dir(torch.device('cpu'))).startswith('/tmp/torchinductor')


def test_an_explicit_cache_folder_is_respected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'mine'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert prepare_compile(torch.device('cpu')) == tmp_path / 'mine'
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path / 'mine')
    assert not (tmp_path / 'xdg').exists()
