"""Shared test fixtures. Everything from ../shared is located here and nowhere else."""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # noqa: E402

# `pytest -n 2` on 2 cores: one thread per worker; more oversubscribes the CPU (a tiny forward then takes seconds).
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The workplace's shared folder (override with AMAP_SHARED)."""
    return Path(os.environ.get('AMAP_SHARED', REPO.parent / 'shared'))


def reference_dir() -> Path:
    return shared_dir() / 'reference' / 'flatten'


def cache_dir() -> Path:
    """Where extracted test data is cached between runs (outside the clone)."""
    base = os.environ.get('AMAP_TEST_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'amap-tests')
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cifar10_root() -> Path:
    """CIFAR-10 from ../shared extracted once (atomically, safe under pytest-xdist) to the cache.

    Returns the folder holding ``train/`` and ``test/`` class folders.
    """
    dest = cache_dir() / 'cifar10'
    if (dest / 'test').is_dir() and (dest / 'train').is_dir():
        return dest
    zpath = shared_dir() / 'datasets' / 'cifar10' / 'cifar10-jpg.zip'
    if not zpath.is_file():
        raise FileNotFoundError(f'CIFAR-10 zip not found at {zpath}; set AMAP_SHARED to the shared folder')
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix='cifar10.tmp.'))
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(tmp)
    inner = tmp / 'cifar10' if (tmp / 'cifar10').is_dir() else tmp
    try:
        os.rename(inner, dest)
    except OSError:  # another worker won the race
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


@pytest.fixture(scope='session')
def cifar10() -> Path:
    return cifar10_root()


@pytest.fixture(scope='session')
def flatten_reference() -> Path:
    return reference_dir()
