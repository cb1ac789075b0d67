"""Run folders you can trust (amap.utils.runfolder): one writer per folder, --resume only of the same run, only the
names AMAP owns, each warning once. Tiny runs on the embedded digits data."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import amap
from amap.cli import main
from amap.errors import ConfigError, FolderInUse
from amap.utils.runfolder import LOCK_FILE, MANIFEST_FILE, check_resume, lock_holder, read_manifest, run_lock

TRAIN = ['train', '--model', 'flatten_deit_nano', '--data', 'digits', '--batch-size', '16', '--train-subset', '64',
         '--val-subset', '32', '--workers', '0', '--no-progress', '-q', '--threads', '1']


def _prune(checkpoint: Path, out: Path, *extra: str, target: str = '0.6') -> list[str]:
    return ['prune', '--checkpoint', str(checkpoint), '--data', 'digits', '--train-subset', '64', '--val-subset',
            '32', '--batch-size', '16', '--workers', '0', '--search-steps', '2', '--finetune-epochs', '0',
            '--no-latency', '--no-progress', '--threads', '1', '-q', '--target', target, '--out', str(out), *extra]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('amap: error: ') and 'Traceback' not in err, err
    return lines[0]


def _cli_child(argv: list[str], log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, 'w', closefd=False)  # noqa: SIM115 (the child exits with os._exit)
    sys.stderr = open(2, 'w', closefd=False)  # noqa: SIM115
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Child:
    """``target(*args)`` in a forked process: another process for the lock, without an interpreter's start-up.
    (Not multiprocessing, whose ``join`` also waits for the grandchildren, which hold its sentinel pipe.)"""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.status: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            try:
                target(*args)
            finally:
                os._exit(70)

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is None

    def wait(self, timeout: float) -> int:
        """Exit code (-N: killed by signal N) once this process (not its children) has ended."""
        deadline = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < deadline, f'process {self.pid} still running after {timeout} s'
            time.sleep(0.005)
        return os.waitstatus_to_exitcode(self.status)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait(30)


def _spawn(argv: list[str], log: Path) -> _Child:
    return _Child(_cli_child, argv, log)


def _wait_for_lock(folder: Path, proc: _Child, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while lock_holder(folder) != proc.pid:
        assert proc.alive(), f'ended before taking the lock: {log.read_text()[-2000:]}'
        assert time.monotonic() < deadline, 'the run never took the lock'
        time.sleep(0.01)


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('trained')
    assert main([*TRAIN, '--max-steps', '2', '--out', str(out), '--overwrite']) == 0
    return out


# ------------------------------------------------------------------------------------------------------ the lock
def test_lock_excludes_a_second_writer_and_leaves_nothing(tmp_path):
    """In one process too (flock locks open files, not processes): the second writer is refused naming the PID; on
    release the lock file is gone; a folder created for a run that failed at once is removed again."""
    run = tmp_path / 'run'
    with run_lock(run):
        assert lock_holder(run) == os.getpid()
        with pytest.raises(FolderInUse, match=rf'--out {run} is in use by another AMAP process \(PID {os.getpid()}\)'):
            with run_lock(run):
                pass
    assert lock_holder(run) is None and not (run / LOCK_FILE).exists()
    with run_lock(run):  # released: the next writer proceeds
        pass
    fresh = tmp_path / 'a' / 'b'
    with pytest.raises(ConfigError), run_lock(fresh):
        raise ConfigError('bad argument')
    assert not (tmp_path / 'a').exists()


def test_two_concurrent_prunes_on_one_folder(trained, tmp_path, capsys):
    """The second `amap prune --out runs/x` is refused with one line naming the folder and the first one's PID; the
    first finishes and its result (target 0.6) is what the folder holds."""
    out = tmp_path / 'x'
    log = tmp_path / 'first.log'
    first = _spawn(_prune(trained, out, target='0.6'), log)
    try:
        _wait_for_lock(out, first, log)
        assert main(_prune(trained, out, target='0.4')) == 2
        line = _error_line(capsys.readouterr().err)
        assert str(out) in line and f'PID {first.pid}' in line, line
        assert first.wait(300) == 0, log.read_text()
    finally:
        first.kill()
    assert f'pruned model: {out / "model"}' in log.read_text()
    report = json.loads((out / 'report.json').read_text())
    assert report['macs']['target_ratio'] == pytest.approx(0.6)
    assert report['config']['prune']['target'] == 0.6  # the job's target (in prune since 'search' nested)
    assert amap.count_macs(amap.load_pruned(out / 'model'), (3, 32, 32)).total == report['macs']['after']
    assert lock_holder(out) is None and not (out / LOCK_FILE).exists()


def test_sigkilled_run_leaves_no_lock(tmp_path):
    """SIGKILL `amap train` (data loaded by a worker process, which outlives its parent for a while): the lock is
    free at once and the next run on the folder (--resume, other thread and worker counts) proceeds."""
    out = tmp_path / 'run'
    log = tmp_path / 'killed.log'
    args = [*TRAIN, '--epochs', '1000', '--checkpoint-every', '1', '--out', str(out)]
    args[args.index('--workers') + 1] = '1'
    proc = _spawn(args, log)
    try:
        _wait_for_lock(out, proc, log)
        deadline = time.monotonic() + 120
        while not (out / 'checkpoints' / 'latest.json').exists():
            assert proc.alive() and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        assert lock_holder(out) is None
    finally:
        proc.kill()
    step = json.loads((out / 'checkpoints' / 'latest.json').read_text())['step']
    threads = torch.get_num_threads()
    try:
        assert main([*TRAIN, '--threads', '2', '--out', str(out), '--resume', '--epochs', '1000',
                     '--checkpoint-every', '1', '--max-steps', str(step + 1)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / 'model.json').read_text())['step'] == step + 1


def _hold_and_fork(folder: Path, ready: Path) -> None:
    with run_lock(folder):
        if os.fork() == 0:  # a child that outlives its parent, as data-loader workers do for a few seconds
            time.sleep(8)
            os._exit(0)
        ready.touch()
        time.sleep(60)


def test_a_killed_holders_forked_children_do_not_keep_the_lock(tmp_path):
    run, ready = tmp_path / 'run', tmp_path / 'ready'
    proc = _Child(_hold_and_fork, run, ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.alive() and time.monotonic() < deadline
            time.sleep(0.01)
        assert lock_holder(run) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        assert lock_holder(run) is None  # at once, while the holder's child still runs
        with run_lock(run):
            pass
    finally:
        proc.kill()


# ------------------------------------------------------------------------------------------------------ --resume
def test_resume_refuses_changed_settings_and_accepts_free_ones(trained, tmp_path, capsys):
    out = tmp_path / 'y'
    assert main(_prune(trained, out, target='0.6')) == 0
    capsys.readouterr()
    before = (out / 'report.json').read_bytes()
    assert main(_prune(trained, out, '--resume', '--seed', '3', target='0.4')) == 2
    line = _error_line(capsys.readouterr().err)
    assert '--resume' in line and 'target=0.6, not 0.4' in line and 'seed=0, not 3' in line, line
    assert (out / 'report.json').read_bytes() == before  # refused before writing anything
    # thread count, loader workers and progress may change
    threads = torch.get_num_threads()
    try:
        args = _prune(trained, out, '--resume', target='0.6')
        args[args.index('--threads') + 1] = '2'
        args[args.index('--workers') + 1] = '1'
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert 'Target 0.600' in capsys.readouterr().out
    # the weights the run started from changed under the same path: refused too
    retrained = tmp_path / 'retrained'
    assert main([*TRAIN, '--max-steps', '3', '--out', str(retrained)]) == 0
    assert main(_prune(retrained, out, '--resume')) == 2
    assert 'checkpoint_sha256=' in _error_line(capsys.readouterr().err)


def test_check_resume_lists_every_changed_key_on_one_line():
    saved = {'target': 0.6, 'seed': 0, 'data': {'batch_size': 32, 'num_workers': 2}, 'kinds': ['qk', 'v']}
    check_resume(saved, {**saved, 'data': {'batch_size': 32, 'num_workers': 8}, 'kinds': ('qk', 'v')},
                 free={'data.num_workers'}, where='runs/y')
    with pytest.raises(ConfigError) as exc:
        check_resume(saved, {**saved, 'target': 0.4, 'data': {'batch_size': 64, 'num_workers': 2}}, free=(),
                     where='runs/y')
    message = str(exc.value)
    assert '\n' not in message and message.startswith('--resume: the run in runs/y was started with ')
    assert 'data.batch_size=32, not 64' in message and 'target=0.6, not 0.4' in message


@pytest.mark.parametrize('command', ['prune', 'train'])
def test_resume_with_nothing_to_resume_is_an_error(trained, tmp_path, capsys, command):
    empty = tmp_path / 'empty'
    empty.mkdir()
    missing = tmp_path / 'missing'
    for out in (empty, missing):
        args = _prune(trained, out, '--resume') if command == 'prune' else [*TRAIN, '--out', str(out), '--resume']
        assert main(args) == 2
        line = _error_line(capsys.readouterr().err)
        assert '--resume' in line and str(out) in line and f'no {command} run to continue' in line, line
    assert list(empty.iterdir()) == [] and not missing.exists()  # nothing written, no folder created


# ------------------------------------------------------------------------------------------------- owned names
def test_a_users_file_is_never_replaced(trained, tmp_path, capsys):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'report.md').write_text('my notes\n')
    (out / 'data.csv').write_text('1,2\n')  # a name AMAP does not write: no obstacle
    assert main(_prune(trained, out)) == 2
    line = _error_line(capsys.readouterr().err)
    assert 'report.md' in line and 'did not write' in line and '--overwrite' in line and '--out' in line, line
    assert (out / 'report.md').read_text() == 'my notes\n'
    assert sorted(p.name for p in out.iterdir()) == ['data.csv', 'report.md']
    # what AMAP writes is recorded, so its own files never block the next run in the folder
    other = tmp_path / 'other'
    assert main(_prune(trained, other)) == 0
    manifest = read_manifest(other)
    assert {'report.md', 'model', 'config.yaml', 'search_state'} <= set(manifest['names'])
    assert [p.name for p in other.iterdir() if p.name.startswith('.')] == [MANIFEST_FILE]
    assert main(_prune(trained, other, '--overwrite')) == 0
    # --overwrite is the explicit way to replace the user's file
    assert main(_prune(trained, out, '--overwrite')) == 0
    assert (out / 'report.md').read_text().startswith('# AMAP pruning report')
    assert (out / 'data.csv').read_text() == '1,2\n'


def test_train_refuses_a_foreign_model_file(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"mine": true}\n')
    assert main([*TRAIN, '--max-steps', '1', '--out', str(out)]) == 2
    assert 'log.jsonl' in _error_line(capsys.readouterr().err)
    assert (out / 'log.jsonl').read_text() == '{"mine": true}\n'


# ------------------------------------------------------------------------------------------------ warnings once
def test_a_corrupt_images_warning_prints_once(tmp_path, capfd):
    """Three epochs read the unreadable file three times, in two loader worker processes: one line says so (it was
    printed by the logger and again by Python's warnings, and again in each epoch)."""
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (tmp_path / 'ds' / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (16, 16), (30 * i, 10, 0)).save(tmp_path / 'ds' / split / c / f'{i}.png')
    (tmp_path / 'ds' / 'train' / 'a' / 'bad.jpg').write_bytes(b'not a jpeg')
    (tmp_path / 'ds' / 'train' / 'b' / 'notes.txt').write_text('x')
    with warnings.catch_warnings():
        warnings.simplefilter('always')  # Python's once-per-place filter must not be what keeps it to one line
        assert main(['train', '--model', 'flatten_deit_nano', '--data', str(tmp_path / 'ds'), '--batch-size', '4',
                     '--epochs', '3', '--workers', '2', '--no-progress', '--threads', '1', '--out',
                     str(tmp_path / 'run')]) == 0
    err = capfd.readouterr().err  # the workers' output too
    assert err.count('unreadable image') == 1, err
    assert err.count('skipped 1 non-image file') == 1, err
    line = next(x for x in err.splitlines() if 'unreadable image' in x)
    assert line.startswith('unreadable image ') and 'bad.jpg' in line  # one plain line, not Python's two
