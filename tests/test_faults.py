"""Fault tolerance of everything AMAP writes: SIGKILL at any moment, a full disk, a read-only output folder.

Guarantees tested (amap.utils.io, amap.train checkpoints, amap.prune.artifact):

* SIGKILL at any moment leaves either the previous or the new version of a file / folder / checkpoint, never a broken
  one; temp files are never taken for checkpoints and a ``--resume`` run continues from the surviving checkpoint.
* A write that fails (disk full, read-only folder) leaves the previous files byte-identical and no temp file behind,
  and raises :class:`amap.errors.OutputError` (an :class:`~amap.errors.AmapError`) with one line naming the output and
  the fix, which the CLI prints as ``amap: error: ...`` with exit status 2.

Kills come from forked children (a fresh interpreter per kill would spend seconds importing torch) and from real
``python -m amap train`` processes; all random delays are seeded.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from safetensors import SafetensorError

import amap.utils.io as io_mod
from amap import cli
from amap.errors import AmapError, OutputError
from amap.prune import load_pruned, save_pruned
from amap.prune.pruner import Pruner
from amap.prune.surgery import apply_surgery, describe_structure
from amap.prune.target import fit_to_target
from amap.train import (
    TrainConfig,
    TrainState,
    build_optimizer,
    build_scheduler,
    create_model,
    latest_train_state,
    load_train_state,
    load_trained,
    save_train_state,
)
from amap.utils.io import (
    JsonlWriter,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_safetensors,
    read_json,
    read_safetensors,
    remove_stale_temps,
)

torch.set_num_threads(1)  # forked children inherit it; a multi-threaded OpenMP pool does not survive fork()

FORK = multiprocessing.get_context('fork')
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
STEP_DIR = re.compile(r'step_\d{9}')

# Training run used by the kill loop: a checkpoint after every update (~2 MB each) so that kills land in writes.
TRAIN_ARGS = ['train', '--model', 'flatten_deit_nano', '--data', 'digits', '--batch-size', '4', '--workers', '0',
              '--threads', '1', '--checkpoint-every', '1', '--epochs', '20', '--eval-every', '0', '--val-subset', '10',
              '--log-every', '1', '--no-progress', '--quiet']
KILL_LOOP_SECONDS = 22.0  # forked kill/resume rounds; plus two real `python -m amap train` processes


# ------------------------------------------------------------------------------------------------------------ helpers
def _is_temp(name: str) -> bool:
    return name.startswith('.') and (name.endswith('.tmp') or name.endswith('.old'))


def _temps(folder: Path) -> list[str]:
    """Temp entries (``.<name>.<random>.tmp`` / ``.<name>.old``) anywhere under ``folder``."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if _is_temp(p.name))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _fork(target: Callable[..., Any], *args: Any) -> multiprocessing.process.BaseProcess:
    proc = FORK.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _kill(proc: multiprocessing.process.BaseProcess) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode is not None, 'killed child did not exit'


def _redirect_output(log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, 'w', closefd=False)  # noqa: SIM115 (the child exits with os._exit)
    sys.stderr = open(2, 'w', closefd=False)  # noqa: SIM115


def _assert_output_error(exc: BaseException, path: Path, *phrases: str) -> None:
    """One-line OutputError (an AmapError) naming ``path`` and the fix, not a temp file."""
    assert isinstance(exc, OutputError) and isinstance(exc, AmapError), repr(exc)
    msg = str(exc)
    assert '\n' not in msg, msg
    assert str(path) in msg, f'{path} not named in: {msg}'
    assert '.tmp' not in msg, f'a temp name leaked into: {msg}'
    for phrase in phrases:
        assert phrase in msg, f'{phrase!r} not in: {msg}'


DISK_FULL = ('the disk is full', 'free disk space')
NO_PERMISSION = ('permission denied', 'chmod u+w')


def _enospc(path: Any = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


def _fail_text_writes(monkeypatch: pytest.MonkeyPatch, when: Callable[[Path], bool] = lambda p: True) -> None:
    """``Path.write_bytes`` / ``write_text`` write half of the data and then fail like a full disk."""
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def write_bytes(self: Path, data: bytes) -> int:
        if not when(self):
            return real_bytes(self, data)
        real_bytes(self, data[:len(data) // 2])
        raise _enospc(self)

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if not when(self):
            return real_text(self, data, *args, **kwargs)
        real_text(self, data[:len(data) // 2], *args, **kwargs)
        raise _enospc(self)

    monkeypatch.setattr(Path, 'write_bytes', write_bytes)
    monkeypatch.setattr(Path, 'write_text', write_text)


def _fail_safetensors(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """safetensors' writer fails like it does on a full disk (a truncated file, then a SafetensorError carrying the
    OS error) on every call after the first ``after`` ones."""
    real = safetensors.torch.save_file
    calls = [0]

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        calls[0] += 1
        real(tensors, filename, metadata=metadata)
        if calls[0] <= after:
            return
        size = os.path.getsize(filename)
        with open(filename, 'r+b') as f:
            f.truncate(size // 2)
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(io_mod, 'save_file', save_file)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync reports the full disk (delayed allocation: the data did not fit when it was flushed)."""
    def fsync(fd: int) -> None:
        raise _enospc()

    monkeypatch.setattr(os, 'fsync', fsync)


# --------------------------------------------------------------------------------- SIGKILL: the atomic writers
_PAYLOAD = 300_000


def _bytes_version(n: int) -> bytes:
    return f'{n}\n'.encode() + bytes([n % 251]) * (_PAYLOAD + 7 * (n % 1000))  # the length differs per version


def _tensors_version(n: int) -> dict[str, torch.Tensor]:
    return {'w': torch.full((_PAYLOAD // 4 + n % 1000,), float(n)), 'n': torch.tensor([n])}


def _write_version(kind: str, target: Path, n: int) -> None:
    if kind == 'bytes':
        atomic_write_bytes(target, _bytes_version(n))
    elif kind == 'json':
        atomic_write_json(target, {'n': n, 'fill': 'x' * (_PAYLOAD + n % 1000)})
    elif kind == 'safetensors':
        atomic_write_safetensors(target, _tensors_version(n), metadata={'n': str(n)})
    else:  # a folder of two files, like save_pruned
        with atomic_dir(target) as tmp:
            (tmp / 'config.json').write_text(json.dumps({'n': n, 'fill': 'y' * (n % 1000)}))
            atomic_write_safetensors(tmp / 'model.safetensors', _tensors_version(n), metadata={'n': str(n)})


def _read_version(kind: str, target: Path) -> int:
    """The complete version stored in ``target``; fails on anything partial or mixed."""
    if kind == 'bytes':
        data = target.read_bytes()
        n = int(data.split(b'\n', 1)[0])
        assert data == _bytes_version(n), f'{target}: truncated or corrupt ({len(data)} bytes)'
        return n
    if kind == 'json':
        doc = read_json(target)
        assert doc == {'n': doc['n'], 'fill': 'x' * (_PAYLOAD + doc['n'] % 1000)}
        return doc['n']
    if kind == 'safetensors':
        tensors, meta = read_safetensors(target)
        n = int(meta['n'])
        assert sorted(tensors) == ['n', 'w'] and all(torch.equal(tensors[k], v) for k, v in _tensors_version(n).items())
        return n
    assert sorted(p.name for p in target.iterdir()) == ['config.json', 'model.safetensors'], list(target.iterdir())
    n = _read_version('safetensors', target / 'model.safetensors')
    assert read_json(target / 'config.json') == {'n': n, 'fill': 'y' * (n % 1000)}, 'files of different versions'
    return n


def _rewrite_forever(kind: str, target: Path, ready: Any) -> None:
    """Child: rewrite ``target`` with versions n, n+1, ... (n: one past the stored version) until killed."""
    n = _read_version(kind, target) + 1 if target.exists() else 0
    while True:
        _write_version(kind, target, n)
        if n % 2 == 0:
            ready.set()
        n += 1


@pytest.mark.parametrize('kind', ['bytes', 'json', 'safetensors', 'dir'])
def test_sigkill_during_rewrites_leaves_old_or_new(tmp_path, kind):
    """SIGKILL a child that rewrites a file/folder in a tight loop at seeded random moments: the target always holds
    one complete version, never older than before the kill, and cleanup removes only the temp entries."""
    rng = random.Random(f'kill-{kind}')
    target = tmp_path / ('target' if kind == 'dir' else f'target.{kind}')
    last, mid_write, rounds = -1, 0, 0
    deadline = time.monotonic() + 4.0
    while rounds < 24 and (rounds < 8 or time.monotonic() < deadline):
        ready = FORK.Event()
        proc = _fork(_rewrite_forever, kind, target, ready)
        if rounds % 3:  # usually after the child's first complete write, else at any point (its first write too)
            assert ready.wait(30), 'writer child never finished a write'
        time.sleep(rng.uniform(0.0, 0.03))
        _kill(proc)
        rounds += 1
        mid_write += bool(_temps(tmp_path))
        if not target.exists():
            assert last == -1, f'{target} vanished after version {last}'
            continue
        n = _read_version(kind, target)
        assert n >= last, f'{target} went back from version {last} to {n}'
        last = n
        remove_stale_temps(tmp_path)
        assert _temps(tmp_path) == [] and _read_version(kind, target) == n
    assert last >= 0, 'no version was ever written'
    assert mid_write >= 1, f'no kill out of {rounds} landed while a temp file existed: the test did not exercise writes'


def _crash_at(crash_at: int, action: Callable[[], Any], *, exchange: bool = True) -> None:
    """Child: run ``action``, SIGKILLing itself just before its ``crash_at``-th file-system operation (every operation
    the writers use is counted); exit 0 if it completes first."""
    calls = [0]

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    if not exchange:  # a platform / file system without renameat2(RENAME_EXCHANGE)
        io_mod._exchange = lambda a, b: False
    for owner, name in [(os, 'replace'), (os, 'fsync'), (os, 'chmod'), (os, 'close'), (os, 'mkdir'), (os, 'unlink'),
                        (os, 'rmdir'), (io_mod.tempfile, 'mkstemp'), (io_mod.tempfile, 'mkdtemp'),
                        (io_mod, 'save_file'), (io_mod, '_exchange'), (io_mod.shutil, 'rmtree'), (Path, 'write_text')]:
        setattr(owner, name, counted(getattr(owner, name)))
    action()
    os._exit(0)


def _sweep(action: Callable[[], Any], check: Callable[[int], None], **kwargs: Any) -> int:
    """Kill ``action`` before each of its file-system operations in turn (``check(crash_at)`` after each kill);
    returns the number of operations."""
    crash_at = 1
    while True:
        assert crash_at < 200, 'the action never completed'
        proc = _fork(functools.partial(_crash_at, crash_at, action, **kwargs))
        proc.join(30)
        if proc.exitcode == 0:
            return crash_at - 1
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
        check(crash_at)
        crash_at += 1


@pytest.mark.parametrize('mode', ['exchange', 'fallback'])
def test_sigkill_at_every_step_of_a_folder_replacement(tmp_path, mode):
    """Kill the replacement of an existing folder (atomic_dir, as save_pruned over an artifact) before each of its
    file-system operations in turn. With renameat2 the folder is the old or the new one right after the kill; the
    rename-aside fallback has a moment with no folder, which the next cleanup must repair by restoring the old one."""
    target = tmp_path / 'artifact'
    _write_version('dir', target, 1)
    missing = []

    def check(crash_at: int) -> None:
        if mode == 'exchange':
            assert _read_version('dir', target) in (1, 2), f'broken folder after a kill at operation {crash_at}'
        elif not target.exists():
            missing.append(crash_at)
        remove_stale_temps(tmp_path)
        assert _read_version('dir', target) in (1, 2), f'cleanup did not recover the folder (kill at {crash_at})'
        assert _temps(tmp_path) == []
        if _read_version('dir', target) == 2:
            _write_version('dir', target, 1)  # every round starts from the old version

    operations = _sweep(lambda: _write_version('dir', target, 2), check, exchange=mode == 'exchange')
    assert operations > 10, f'only {operations} operations were interrupted: the hooks did not count the writes'
    assert _read_version('dir', target) == 2
    if mode == 'fallback':
        assert missing, 'the fallback never exposed a missing folder: the sweep missed its renames'


@pytest.mark.parametrize('remover', ['remove_dir', 'shutil.rmtree'])
def test_sigkill_while_removing_a_folder(tmp_path, remover):
    """remove_dir (for pruning old checkpoint folders): a kill at any point leaves the folder complete or gone, and
    cleanup removes the rest. shutil.rmtree, the control, leaves a half-deleted folder under the old name."""
    target = tmp_path / 'step_000000001'
    partial = []

    def make() -> None:
        target.mkdir()
        for name in ('state.json', 'state.safetensors', 'extra.bin'):
            (target / name).write_bytes(name.encode() * 1000)

    def check(crash_at: int) -> None:
        if target.exists() and sorted(p.name for p in target.iterdir()) != ['extra.bin', 'state.json',
                                                                             'state.safetensors']:
            partial.append(crash_at)
        remove_stale_temps(tmp_path)
        if remover == 'remove_dir':
            assert _temps(tmp_path) == []
        if target.exists():
            shutil.rmtree(target)
        make()

    make()
    remove = io_mod.remove_dir if remover == 'remove_dir' else shutil.rmtree
    operations = _sweep(lambda: remove(target), check)
    assert operations >= 4 and not target.exists()
    if remover == 'remove_dir':
        assert partial == [], f'a half-deleted folder under the checkpoint name after kills at {partial}'
    else:
        assert partial, 'the control never saw a half-deleted folder: the sweep is blind'


# ------------------------------------------------------------------------------ SIGKILL: training and --resume
class _CheckpointLoader:
    """Loads checkpoints as ``amap train --resume`` does: a model and optimizer built from the saved config, then
    :func:`amap.train.load_train_state` (strict: every tensor of the model and the optimizer)."""

    def __init__(self) -> None:
        self.state: TrainState | None = None

    def load(self, folder: Path) -> int:
        if self.state is None:
            cfg = TrainConfig.from_dict(read_json(folder / 'state.json')['config'])
            model, _ = create_model(cfg.model, num_classes=10, img_size=cfg.data.img_size,
                                    model_kwargs=cfg.model_kwargs)
            optimizer = build_optimizer(model, cfg)
            self.state = TrainState(model=model, optimizer=optimizer,
                                    scheduler=build_scheduler(optimizer, cfg, updates_per_epoch=1))
        load_train_state(folder, self.state)
        assert self.state.step == int(folder.name[len('step_'):]), f'{folder}: holds step {self.state.step}'
        assert self.state.optimizer.state, f'{folder}: no optimizer state restored'
        return self.state.step


def _check_run(run: Path, loader: _CheckpointLoader, previous: int | None) -> int | None:
    """After a kill: the latest checkpoint loads completely, is never older than before, and is a real step folder
    published in latest.json (never a temp entry); every step folder present is complete."""
    ckpt = run / 'checkpoints'
    folder = latest_train_state(run)
    if folder is None:
        assert previous is None, f'the checkpoint of step {previous} disappeared'
        return None
    assert folder.parent == ckpt and STEP_DIR.fullmatch(folder.name), f'{folder} is not a checkpoint folder'
    step = loader.load(folder)
    if previous is not None:
        assert step >= previous, f'the latest checkpoint went back from step {previous} to {step}'
    if (ckpt / 'latest.json').exists():  # published: the pointer must be readable and name a complete folder
        pointer = read_json(ckpt / 'latest.json')
        assert pointer['dir'] == folder.name and pointer['step'] == step, (pointer, folder.name)
    for other in ckpt.glob('step_*'):  # folders appear and disappear complete (old ones are removed by remove_dir)
        assert (other / 'state.json').is_file() and (other / 'state.safetensors').is_file(), f'{other} is incomplete'
        loader.load(other)
    return step


def _train_child(argv: list[str], log: Path) -> None:
    _redirect_output(log)
    os._exit(cli.main(argv))


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f'timed out waiting for {what}'
        time.sleep(0.0005)


DECOY = '0123abcd'


def _live_temps(ckpt: Path) -> list[str]:
    """Temp entries of checkpoint writes in progress (or killed), not the test's decoys."""
    return [p.name for p in [*ckpt.glob('.*.tmp'), *ckpt.glob('*/.*.tmp')] if DECOY not in str(p)]


def _log_records(run: Path) -> list[dict[str, Any]]:
    """log.jsonl records; a line torn by SIGKILL is skipped (JsonlWriter terminates it before appending)."""
    records = []
    for line in (run / 'log.jsonl').read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def test_sigkill_training_at_random_moments_then_resume(tmp_path):
    """Kill `amap train --checkpoint-every 1` with SIGKILL again and again at seeded random moments (during start-up
    and resume, inside checkpoint writes, right after a checkpoint is published); after every kill the latest
    checkpoint loads completely and the next `--resume` run continues from exactly that step."""
    rng = random.Random(2024)
    run = tmp_path / 'run'
    ckpt = run / 'checkpoints'
    loader = _CheckpointLoader()
    args = [*TRAIN_ARGS, '--out', str(run)]

    # 1. A real `python -m amap train`, killed at a random moment once it has published a checkpoint.
    with open(tmp_path / 'first.log', 'wb') as out:
        proc = subprocess.Popen([sys.executable, '-m', 'amap', *args, '--max-steps', '100000'], cwd=REPO, env=ENV,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: (ckpt / 'latest.json').exists() or proc.poll() is not None, 240, 'a first checkpoint')
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'first.log').read_text()[-2000:]
    step = _check_run(run, loader, None)
    assert step is not None and step >= 1

    # 2. Forked `amap train --resume` runs (the CLI entry point, no interpreter start-up), each SIGKILLed.
    modes = ['startup', 'in_write', 'in_write', 'after_publish', 'random']
    kills: dict[str, int] = dict.fromkeys(modes, 0)
    temps_seen, rounds, resumes = 0, 0, []
    deadline = time.monotonic() + KILL_LOOP_SECONDS
    while time.monotonic() < deadline or rounds < 5:
        mode = modes[rounds % len(modes)] if rounds < len(modes) else rng.choice(modes)
        if rounds == 2:  # decoys a careless reader could take for the newest checkpoint
            decoy = ckpt / f'.step_999999999.{DECOY}.tmp'
            decoy.mkdir()
            (decoy / 'state.json').write_text((ckpt / f'step_{step:09d}' / 'state.json').read_text())
            (decoy / 'state.safetensors').write_bytes(b'\x00' * 100)
            (ckpt / f'.latest.json.{DECOY}.tmp').write_text(json.dumps({'step': 999999999, 'dir': decoy.name}))
            assert latest_train_state(run) == ckpt / f'step_{step:09d}'
        published = (ckpt / 'latest.json').stat().st_mtime_ns
        n_records = len(_log_records(run))
        proc = _fork(_train_child, [*args, '--resume', '--max-steps', '100000'], tmp_path / 'forked.log')
        if mode == 'startup':
            time.sleep(rng.uniform(0.0, 2.0))
        elif mode == 'random':
            time.sleep(rng.uniform(0.0, 4.0))
        else:
            if mode == 'in_write':
                _wait_for(lambda p=proc: bool(_live_temps(ckpt)) or not p.is_alive(), 120, 'a checkpoint write')
            else:
                _wait_for(lambda p=proc, t=published: (ckpt / 'latest.json').stat().st_mtime_ns != t
                          or not p.is_alive(), 120, 'a new checkpoint')
            time.sleep(rng.uniform(0.0, 0.06 if mode == 'in_write' else 0.004))  # a checkpoint takes ~40 ms
        _kill(proc)
        assert proc.exitcode == -signal.SIGKILL, \
            f'the training child ended by itself ({proc.exitcode}): {(tmp_path / "forked.log").read_text()[-2000:]}'
        kills[mode] += 1
        rounds += 1
        temps_seen += bool(_live_temps(ckpt))
        new = [r for r in _log_records(run)[n_records:] if r.get('event') == 'resume']
        if new:  # this run got as far as resuming: from exactly the checkpoint checked before it started
            assert new[0]['step'] == step, f'resumed at step {new[0]["step"]}, the latest checkpoint was {step}'
            resumes.append(step)
        step = _check_run(run, loader, step)
    print(f'{rounds} kills {kills}, {len(resumes)} resumed runs, {temps_seen} kills inside a checkpoint write, '
          f'latest checkpoint: step {step}')
    assert len(resumes) >= 3, f'only {len(resumes)} of {rounds} killed runs got as far as resuming'
    assert temps_seen >= 1, f'none of {rounds} kills landed inside a checkpoint write ({kills})'
    assert step > resumes[0], 'the killed runs never made progress'

    # 3. A real `python -m amap train --resume` finishes 3 updates after the last surviving checkpoint.
    final = subprocess.run([sys.executable, '-m', 'amap', *args, '--resume', '--max-steps', str(step + 3)], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert 'Traceback' not in final.stderr
    records = _log_records(run)
    start = max(i for i, r in enumerate(records) if r.get('event') == 'resume')
    assert records[start]['step'] == step
    assert [r['step'] for r in records[start:] if r.get('event') == 'train'] == [step + 1, step + 2, step + 3]
    assert _check_run(run, loader, step) == step + 3
    assert load_trained(run).amap_meta['step'] == step + 3
    assert _temps(run) == [], 'temp entries (decoys, killed writes) survived a completed checkpoint'
    assert len(list(ckpt.glob('step_*'))) <= 2  # keep_checkpoints


# ------------------------------------------------------------------------------------------- disk full: writers
@pytest.mark.parametrize('fault', ['write', 'fsync'])
def test_disk_full_writing_safetensors_keeps_previous_file(tmp_path, monkeypatch, fault):
    path = tmp_path / 'weights.safetensors'
    atomic_write_safetensors(path, _tensors_version(1), metadata={'n': '1'})
    before = _snapshot(tmp_path)
    (_fail_safetensors if fault == 'write' else _fail_fsync)(monkeypatch)
    with pytest.raises(OutputError) as info:
        atomic_write_safetensors(path, _tensors_version(2), metadata={'n': '2'})
    _assert_output_error(info.value, path, *DISK_FULL)
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []
    assert _read_version('safetensors', path) == 1


@pytest.mark.parametrize('fault', ['write', 'fsync'])
def test_disk_full_writing_json_keeps_previous_file(tmp_path, monkeypatch, fault):
    path = tmp_path / 'state.json'
    atomic_write_json(path, {'n': 1, 'fill': 'x' * (_PAYLOAD + 1)})
    before = _snapshot(tmp_path)
    if fault == 'write':
        _fail_text_writes(monkeypatch)
    else:
        _fail_fsync(monkeypatch)
    with pytest.raises(OutputError) as info:
        atomic_write_json(path, {'n': 2, 'fill': 'x' * (_PAYLOAD + 2)})
    _assert_output_error(info.value, path, *DISK_FULL)
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []
    assert _read_version('json', path) == 1


def _fail_folder_write(monkeypatch, fault: str) -> None:
    """Make a folder write fail with ENOSPC at one point: a text file, a safetensors file, fsync, or the swap."""
    if fault == 'text':
        _fail_text_writes(monkeypatch)
    elif fault == 'safetensors':
        _fail_safetensors(monkeypatch)
    elif fault == 'fsync':
        _fail_fsync(monkeypatch)
    else:  # the rename itself fails (a full directory block)
        def exchange(a: Path, b: Path) -> bool:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(b))
        monkeypatch.setattr(io_mod, '_exchange', exchange)


@pytest.mark.parametrize('fault', ['first_file', 'second_file', 'fsync', 'swap'])
def test_disk_full_replacing_a_folder_keeps_previous_folder(tmp_path, monkeypatch, fault):
    target = tmp_path / 'artifact'
    _write_version('dir', target, 1)
    before = _snapshot(tmp_path)
    _fail_folder_write(monkeypatch, {'first_file': 'text', 'second_file': 'safetensors'}.get(fault, fault))
    with pytest.raises(OutputError) as info:
        _write_version('dir', target, 2)
    _assert_output_error(info.value, target, *DISK_FULL)
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []
    assert _read_version('dir', target) == 1


def test_real_file_size_limit_in_safetensors_and_json_writers(tmp_path):
    """A kernel-level write failure (RLIMIT_FSIZE -> EFBIG, raised inside safetensors' Rust writer and Python's file
    write): the previous files are intact, no temp file is left and the error is one OutputError line."""
    st, js = tmp_path / 'w.safetensors', tmp_path / 'd.json'
    atomic_write_safetensors(st, _tensors_version(1), metadata={'n': '1'})
    atomic_write_json(js, {'n': 1, 'fill': 'x' * (_PAYLOAD + 1)})
    before = _snapshot(tmp_path)
    receiver, sender = FORK.Pipe(duplex=False)

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        results = []
        for write in (lambda: atomic_write_safetensors(st, _tensors_version(2), metadata={'n': '2'}),
                      lambda: atomic_write_json(js, {'n': 2, 'fill': 'x' * (_PAYLOAD + 2)})):
            try:
                write()
                results.append(('no error', ''))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                results.append((type(e).__name__, str(e)))
        sender.send(results)
        os._exit(0)

    proc = _fork(child)
    results = receiver.recv()
    proc.join(30)
    for (kind, msg), path in zip(results, (st, js)):
        assert kind == 'OutputError', (kind, msg)
        _assert_output_error(OutputError(msg), path, 'file-size limit')
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []
    assert _read_version('safetensors', st) == 1 and _read_version('json', js) == 1


def test_disk_full_in_the_log_is_one_clear_line(tmp_path, monkeypatch):
    class FullFile:
        def __init__(self, real: Any) -> None:
            self.real = real

        def write(self, text: str) -> int:
            raise _enospc()

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.real.close()

    real_open = open
    monkeypatch.setattr(io_mod, 'open', lambda *a, **k: FullFile(real_open(*a, **k)), raising=False)
    log = JsonlWriter(tmp_path / 'log.jsonl')
    with pytest.raises(OutputError) as info:
        log.write({'event': 'train', 'step': 1})
    log.close()
    _assert_output_error(info.value, tmp_path / 'log.jsonl', *DISK_FULL)


# ------------------------------------------------------------------------------ disk full: training checkpoints
def _train_state() -> TrainState:
    torch.manual_seed(0)
    cfg = TrainConfig(model='flatten_deit_nano')
    model, _ = create_model(cfg.model, num_classes=10, img_size=32)
    optimizer = build_optimizer(model, cfg)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    optimizer.step()
    return TrainState(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, updates_per_epoch=4),
                      step=1)


@pytest.mark.parametrize('fault', ['state.safetensors', 'state.json', 'latest.json', 'fsync'])
def test_disk_full_during_checkpoint_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fault):
    ckpt = tmp_path / 'checkpoints'
    state = _train_state()
    save_train_state(ckpt, state)
    before = _snapshot(ckpt)
    state.step = 2
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)
    if fault == 'state.safetensors':
        _fail_safetensors(monkeypatch)
        failed = ckpt / 'step_000000002' / 'state.safetensors'
    elif fault == 'state.json':
        _fail_text_writes(monkeypatch, lambda p: p.name.startswith('.state.json.'))
        failed = ckpt / 'step_000000002' / 'state.json'
    elif fault == 'latest.json':
        _fail_text_writes(monkeypatch, lambda p: p.name.startswith('.latest.json.'))
        failed = ckpt / 'latest.json'
    else:
        _fail_fsync(monkeypatch)
        failed = ckpt / 'step_000000002'
    with pytest.raises(OutputError) as info:
        save_train_state(ckpt, state)
    _assert_output_error(info.value, failed, *DISK_FULL)
    monkeypatch.undo()
    after = _snapshot(ckpt)
    assert {k: after.get(k) for k in before} == before, 'a file of the previous checkpoint changed'
    if fault != 'latest.json':  # else the new step folder is complete but unpublished: nothing else may appear
        assert after == before
    assert _temps(ckpt) == []
    folder = latest_train_state(tmp_path)
    assert folder == ckpt / 'step_000000001'
    fresh = _train_state()
    fresh.step = 0
    load_train_state(folder, fresh)
    assert fresh.step == 1


def _cli_disk_full_child(out: Path, log: Path) -> None:
    _redirect_output(log)
    _fail_safetensors(pytest.MonkeyPatch(), after=1)  # the checkpoint of update 1 fits, that of update 2 does not
    os._exit(cli.main([*TRAIN_ARGS, '--out', str(out), '--max-steps', '3']))


def test_cli_disk_full_during_training_prints_one_line_and_exits_2(tmp_path):
    out, log = tmp_path / 'run', tmp_path / 'stderr.log'
    proc = _fork(_cli_disk_full_child, out, log)
    proc.join(300)
    stderr = log.read_text()
    assert proc.exitcode == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert 'Traceback' not in stderr and len(lines) == 1, stderr
    failed = out / 'checkpoints' / 'step_000000002' / 'state.safetensors'
    assert lines[0].startswith(f'amap: error: cannot write {failed}: the disk is full'), lines[0]
    assert _temps(out) == []
    assert latest_train_state(out) == out / 'checkpoints' / 'step_000000001'
    assert _CheckpointLoader().load(out / 'checkpoints' / 'step_000000001') == 1


# ---------------------------------------------------------------------------- disk full: the pruned artifact
@pytest.fixture(scope='module')
def pruned() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = timm.create_model('flatten_deit_nano', num_classes=10).eval()
    pruner = Pruner(model, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    for ind in pruner.indicators.values():
        ind.m.data.copy_(torch.rand(ind.m.shape, generator=g))
    fit_to_target(pruner, 0.6 * pruner.full_macs)
    structure = describe_structure(pruner)
    apply_surgery(pruner)
    return model.eval(), structure


@pytest.mark.parametrize('fault', ['config.json', 'model.safetensors', 'fsync', 'swap'])
def test_disk_full_in_save_pruned_keeps_previous_artifact(tmp_path, monkeypatch, pruned, fault):
    model, structure = pruned
    art = tmp_path / 'art'
    save_pruned(model, art, architecture='flatten_deit_nano', model_kwargs={'num_classes': 10}, structure=structure)
    before = _snapshot(tmp_path)
    _fail_folder_write(monkeypatch, {'config.json': 'text', 'model.safetensors': 'safetensors'}.get(fault, fault))
    with pytest.raises(OutputError) as info:
        save_pruned(model, art, architecture='flatten_deit_nano', model_kwargs={'num_classes': 10},
                    structure=structure, extra={'new': True})
    _assert_output_error(info.value, art, *DISK_FULL)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before and _temps(tmp_path) == []
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(art)(x), model(x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- read-only output folder
@contextlib.contextmanager
def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """chmod 0o500; as root (which chmod does not stop) creating entries in ``folder`` also fails with EACCES."""
    folder.chmod(0o500)
    if os.geteuid() == 0:
        def inside(path: Any) -> bool:
            return Path(os.fsdecode(path)).parent.resolve() == folder.resolve()

        real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, open

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & os.O_CREAT and inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_mkdir(path, *args, **kwargs)

        def builtin_open(path: Any, mode: str = 'r', *args: Any, **kwargs: Any) -> Any:
            if set(mode) & set('wax+') and inside(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real_builtin_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, 'open', os_open)
        monkeypatch.setattr(os, 'mkdir', mkdir)
        monkeypatch.setattr(io_mod, 'open', builtin_open, raising=False)
    try:
        yield
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)


def test_read_only_output_folder(tmp_path, monkeypatch, pruned):
    model, structure = pruned
    out = tmp_path / 'out'
    out.mkdir()
    atomic_write_json(out / 'report.json', {'n': 1})
    atomic_write_safetensors(out / 'w.safetensors', _tensors_version(1), metadata={'n': '1'})
    before = _snapshot(out)
    assert sorted(before) == ['report.json', 'w.safetensors']
    writes = {
        out / 'report.json': lambda: atomic_write_json(out / 'report.json', {'n': 2}),
        out / 'w.safetensors': lambda: atomic_write_safetensors(out / 'w.safetensors', _tensors_version(2)),
        out / 'new.bin': lambda: atomic_write_bytes(out / 'new.bin', b'data'),
        out / 'art': lambda: save_pruned(model, out / 'art', architecture='flatten_deit_nano',
                                         model_kwargs={'num_classes': 10}, structure=structure),
        out / 'log.jsonl': lambda: JsonlWriter(out / 'log.jsonl'),
    }
    with _read_only(out, monkeypatch):
        for path, write in writes.items():
            with pytest.raises(OutputError) as info:
                write()
            _assert_output_error(info.value, path, *NO_PERMISSION)
    assert _snapshot(out) == before and _temps(out) == []
