"""The benchmark bases: trained once, committed under ``benchmarks/bases/<name>/``, used by every benchmark.

Each base is an ``amap train`` run on CIFAR-10 with the recipe below. Training is long (hours of one core per base),
so it is resumable across sessions and machines:

- ``train NAME``  trains (or continues) in ``--work/<name>/`` with ``amap train ... --resume``. When that folder is
  empty but ``benchmarks/bases/<name>/partial/`` holds a committed snapshot, it continues from the snapshot.
- ``snapshot NAME`` copies the run's latest checkpoint and log into ``benchmarks/bases/<name>/partial/`` (a few MB;
  commit it so a new machine can continue).
- ``publish NAME`` writes the finished base: ``model.safetensors`` + ``model.json`` (as ``amap train`` writes them, so
  every AMAP command reads the folder), ``recipe.json`` (the exact command), ``curve.json`` / ``curve.png`` (validation
  top-1 per epoch) and ``SHA256SUMS``; it removes ``partial/``.
- ``status`` prints each base's progress.

Usage (one thread per process; two bases can train side by side, one per core)::

    python benchmarks/bases.py train flatten_deit_micro --data ~/.cache/amap/cifar10 --work ~/.cache/amap-bench/bases
    python benchmarks/bases.py snapshot flatten_deit_micro --work ~/.cache/amap-bench/bases
    python benchmarks/bases.py publish flatten_deit_micro --work ~/.cache/amap-bench/bases
    python benchmarks/bases.py train flatten_swin_micro --device cuda --workers 12   # on a GPU machine

``--data`` is a folder with ``train/`` and ``test/`` class folders (``../shared/datasets/cifar10/cifar10-jpg.zip``
unpacked); the test split is the validation set, as in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASES_DIR = ROOT / 'benchmarks' / 'bases'

# width 96, 3 heads of 32 for the DeiTs; the recipe is shared, the amp setting is per base (bfloat16 autocast is 1.6x
# faster for the FLatten models on these CPUs and no faster for the timm DeiT, which then stays in float32)
_COMMON = ['--epochs', '100', '--batch-size', '128', '--lr', '1e-3', '--warmup-epochs', '5', '--weight-decay', '0.05',
           '--label-smoothing', '0.1', '--randaugment', 'rand-m7-mstd0.5', '--workers', '0', '--threads', '1']
RECIPES: dict[str, list[str]] = {
    'flatten_deit_micro': ['--model', 'flatten_deit_micro', '--model-kwargs', '{"embed_dim": 96, "num_heads": 3}',
                           '--amp', 'on'],
    'timm_deit_micro': ['--model', 'deit_tiny_patch16_224', '--model-kwargs',
                        '{"patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 2.0}',
                        '--img-size', '32', '--amp', 'off'],
    'flatten_swin_micro': ['--model', 'flatten_swin_micro', '--amp', 'on'],
}


def command(name: str, data: str, out: str) -> list[str]:
    """The ``amap train`` arguments that make base ``name``."""
    return ['train', *RECIPES[name], '--data', data, *_COMMON, '--out', out]


def _log_records(run: Path) -> list[dict[str, Any]]:
    path = run / 'log.jsonl'
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run: Path) -> list[dict[str, float]]:
    """Validation top-1 per evaluation: ``[{'epoch', 'step', 'top1'}]`` from the run's log."""
    points = {}
    for rec in _log_records(run):
        if rec.get('event') == 'eval':
            points[rec['step']] = {'epoch': rec['epoch'], 'step': rec['step'], 'top1': rec['top1']}
    return [points[k] for k in sorted(points)]


def _latest_checkpoint(run: Path) -> Path | None:
    latest = run / 'checkpoints' / 'latest.json'
    if not latest.is_file():
        return None
    folder = run / 'checkpoints' / json.loads(latest.read_text())['dir']
    return folder if folder.is_dir() else None


def cmd_train(args: argparse.Namespace) -> int:
    run = Path(args.work).expanduser() / args.name
    partial = BASES_DIR / args.name / 'partial'
    if not (run / 'checkpoints').is_dir() and partial.is_dir():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(partial / 'checkpoints', run / 'checkpoints', dirs_exist_ok=True)
        if (partial / 'log.jsonl').is_file():
            shutil.copy2(partial / 'log.jsonl', run / 'log.jsonl')
        print(f'continuing {args.name} from the committed snapshot {partial}', file=sys.stderr)
    argv = command(args.name, str(Path(args.data).expanduser()), str(run))
    # where it trains may change between resumes (amap train allows it); the recipe stays the same
    argv += [*(['--device', args.device] if args.device else []),
             *(['--workers', str(args.workers)] if args.workers is not None else [])]
    if (run / 'checkpoints').is_dir():
        argv.append('--resume')
    print('python -m amap ' + shlex.join(argv), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, '-m', 'amap', *argv, '--quiet'])  # signals reach the training itself


def cmd_snapshot(args: argparse.Namespace) -> int:
    run = Path(args.work).expanduser() / args.name
    ckpt = _latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f'{run} has no checkpoint yet')
    dest = BASES_DIR / args.name / 'partial'
    tmp = dest.with_name('partial.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / 'checkpoints').mkdir(parents=True)
    shutil.copytree(ckpt, tmp / 'checkpoints' / ckpt.name)
    shutil.copy2(run / 'checkpoints' / 'latest.json', tmp / 'checkpoints' / 'latest.json')
    shutil.copy2(run / 'log.jsonl', tmp / 'log.jsonl')
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f'{args.name}: snapshot of {ckpt.name} in {dest}')
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plot(points: list[dict[str, float]], name: str, path: Path) -> None:
    from amap.utils.figures import pyplot, save_png
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p['epoch'] for p in points], [p['top1'] for p in points], marker='.')
    ax.set_xlabel('epoch')
    ax.set_ylabel('CIFAR-10 test top-1 (%)')
    ax.set_title(name)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def segments(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each stretch of the run trained: ``[{'from_step', 'from_epoch', 'device', 'amp', 'workers'}]``, one
    entry per change (a resume on another machine); ``device`` is the resolved device where the log has it (runs
    since 2026-11-27), else the configured one (``'auto'``: the CPU on the machines the recipes ran on)."""
    out: list[dict[str, Any]] = []
    spe = _steps_per_epoch(records)
    for rec in records:
        if rec.get('event') not in ('start', 'resume'):
            continue
        cfg = rec.get('config', {})
        amp = rec.get('amp_dtype') if 'amp_dtype' in rec else cfg.get('amp')
        seg = {'device': rec.get('device', cfg.get('device')), 'amp': amp,
               'workers': cfg.get('data', {}).get('num_workers')}
        if not out or {k: out[-1][k] for k in seg} != seg:
            out.append({'from_step': rec['step'],
                        'from_epoch': round(rec['step'] / spe, 2) if spe else rec.get('epoch'), **seg})
    return out


def _steps_per_epoch(records: list[dict[str, Any]]) -> float | None:
    evals = [r for r in records if r.get('event') == 'eval' and r.get('epoch')]
    return evals[-1]['step'] / evals[-1]['epoch'] if evals else None


def recipe(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``recipe.json``: the exact command and where each stretch of the run trained (:func:`segments`)."""
    return {'command': 'amap ' + shlex.join(command(name, '<cifar10>', '<out>')), 'segments': segments(records)}


def cmd_publish(args: argparse.Namespace) -> int:
    run = Path(args.work).expanduser() / args.name
    records = _log_records(run)
    epochs = next((r['config']['epochs'] for r in records if r.get('event') == 'start'), None)
    points = curve(run)
    if not points or epochs is None or points[-1]['epoch'] < epochs or not (run / 'model.safetensors').is_file():
        raise SystemExit(f'{run}: training has not finished (see `bases.py status`)')
    dest = BASES_DIR / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ('model.safetensors', 'model.json', 'log.jsonl'):
        shutil.copy2(run / f, dest / f)
    (dest / 'curve.json').write_text(json.dumps(points, indent=1) + '\n')
    _plot(points, args.name, dest / 'curve.png')
    (dest / 'recipe.json').write_text(json.dumps(recipe(args.name, records), indent=1) + '\n')
    sums = ''.join(f'{_sha256(dest / f)}  {f}\n' for f in ('model.safetensors', 'model.json'))
    (dest / 'SHA256SUMS').write_text(sums)
    shutil.rmtree(dest / 'partial', ignore_errors=True)
    print(f'{args.name}: published to {dest} (top-1 {points[-1]["top1"] if points else "?"})')
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    for name in RECIPES:
        run = Path(args.work).expanduser() / name
        points = curve(run) or curve(BASES_DIR / name / 'partial') or curve(BASES_DIR / name)
        last = points[-1] if points else None
        done = (BASES_DIR / name / 'model.safetensors').is_file()
        state = 'published' if done else ('training' if last else 'not started')
        print(f'{name}: {state}' + (f', epoch {last["epoch"]}, top-1 {last["top1"]:.2f}%' if last else ''))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('action', choices=('train', 'snapshot', 'publish', 'status'))
    p.add_argument('name', nargs='?', choices=sorted(RECIPES))
    p.add_argument('--data', default='~/.cache/amap/cifar10', help='CIFAR-10 folder with train/ and test/')
    p.add_argument('--work', default='~/.cache/amap-bench/bases', help='where the runs train (%(default)s)')
    p.add_argument('--device', default=None, help="train: 'cuda' to continue on a GPU (float16 autocast there; the "
                                                  "recipe's CPU runs use bfloat16), default the recipe's CPU")
    p.add_argument('--workers', type=int, default=None, help='train: data loader processes (the recipe: 0)')
    args = p.parse_args(argv)
    if args.action != 'status' and not args.name:
        p.error(f'{args.action} needs a base name')
    return {'train': cmd_train, 'snapshot': cmd_snapshot, 'publish': cmd_publish, 'status': cmd_status}[args.action](
        args)


if __name__ == '__main__':
    raise SystemExit(main())
