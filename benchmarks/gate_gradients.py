"""What the search's indicators see: the gradient of the loss at each channel's gate, batch after batch.

With the binary straight-through gate (docs/amap-method.md, section 3) a kept channel's indicator receives
``dL/db`` at ``b = 1``, the gradient of the unpruned model. At a trained optimum its mean over batches is zero
(scaling a Linear's output row is a direction of its weights, whose gradient vanishes there), so what Adam counts is
mostly the sign of noise; a removal's cost is second order, which the Taylor criterion's ``E|dL/db|`` does measure.
This script measures, on a trained base and training batches as the search draws them (train mode, the training
augmentation), per channel group kind:

* ``E|g|`` (the Taylor score before normalisation) and ``|E g|`` (what a first-order search can follow);
* the t-statistic of the mean, ``E g / (std(g) / sqrt(n))``, over ``n`` batches: its median magnitude, against
  ``t_noise`` (the median ``|t|`` of pure noise with ``n - 1`` degrees of freedom), and the share of channels
  beyond the two-sided 5% point (5% under pure noise);
* the share of channels whose mean gradient asks to close the gate (``E g > 0``).

Usage::

    python benchmarks/gate_gradients.py --base benchmarks/bases/flatten_deit_micro/probe_e40 \\
        --data ~/.cache/amap/cifar10 --batches 16 --out benchmarks/results/gate_gradients_fdeit_e40.json
    python benchmarks/gate_gradients.py --quick --out /tmp/gate_gradients.json   # random weights, digits, seconds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, loadavg, machine_info, markdown_table, write_results  # noqa: E402


def gate_gradients(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   input_size: tuple[int, int, int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{group key: (n_batches, H, d)}`` gradients of the cross-entropy at every gate (all gates open, train mode),
    and the kind of every group."""
    from amap.prune import PruneConfig
    from amap.prune.criteria import gate_gradients as per_batch
    from amap.prune.staged import install
    pruner = install(model, input_size, PruneConfig(reweight=False))
    batches_grads = list(per_batch(pruner, batches, train=True))
    kinds = {k: ind.group.kind for k, ind in pruner.indicators.items()}
    pruner.detach()
    return {k: torch.stack([g[k] for g in batches_grads]) for k in kinds}, kinds


def statistics(grads: torch.Tensor) -> dict[str, float]:
    """Signal-to-noise summary of ``(n, ...)`` per-batch gradients of a set of channels."""
    n = grads.shape[0]
    g = grads.reshape(n, -1).double()
    mean, absmean, std = g.mean(0), g.abs().mean(0), g.std(0).clamp(min=1e-30)
    t = mean / (std / n ** 0.5)
    crit = _t_critical(n - 1)
    return {'channels': g.shape[1], 'mean_abs_g': float(absmean.mean()), 'abs_mean_g': float(mean.abs().mean()),
            'signal_share': float((mean.abs() / absmean.clamp(min=1e-30)).mean()),
            'median_abs_t': float(t.abs().median()), 'share_significant': float((t.abs() > crit).double().mean()),
            'share_closing': float((mean > 0).double().mean())}


def _t_critical(df: int, draws: int = 200000) -> float:
    """The two-sided 5% point of Student's t with ``df`` degrees of freedom (by sampling: torch has no t quantile)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return float(torch.distributions.StudentT(float(df)).sample((draws,)).abs().quantile(0.95))


def noise_median_t(n: int, draws: int = 20000) -> float:
    """Median ``|t|`` of the mean of ``n`` pure-noise samples (Student t with ``n - 1`` degrees of freedom)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return float(torch.distributions.StudentT(float(n - 1)).sample((draws,)).abs().median())


def _batches(args) -> tuple[torch.nn.Module, list, tuple[int, int, int], str]:
    """The model, ``args.batches`` training batches as the search draws them, the input size and the base's name."""
    from amap.data import DataConfig, build_loaders
    from amap.pipeline import _calibration_batches
    from amap.utils.distributed import DistInfo
    torch.manual_seed(args.seed)
    if args.quick:
        import timm

        import amap.models  # noqa: F401 (registers the FLatten models)
        model = timm.create_model('flatten_deit_micro', embed_dim=48, num_heads=2, depth=2, num_classes=10)
        data, base = DataConfig(data='digits', batch_size=args.batch_size, num_workers=0), 'random weights'
    else:
        from amap.train import load_trained
        model, base = load_trained(args.base), args.base
        meta = model.amap_meta  # the base's input size and normalisation, as amap prune reads them
        data = DataConfig(data=str(Path(args.data).expanduser()), img_size=meta['img_size'], mean=tuple(meta['mean']),
                          std=tuple(meta['std']), interpolation=meta['interpolation'], batch_size=args.batch_size,
                          num_workers=0, train_subset=args.train_subset)
    bundle = build_loaders(data, seed=args.seed)
    size = (3, data.img_size, data.img_size)
    return model, _calibration_batches(bundle, args.seed, DistInfo(), args.batches), size, base


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--base', help='a trained base folder (amap train)')
    p.add_argument('--data', help='its dataset folder')
    p.add_argument('--batches', type=int, default=16, help='batches (default %(default)s)')
    p.add_argument('--batch-size', type=int, default=64, help='images per batch (default %(default)s)')
    p.add_argument('--train-subset', type=int, default=None, help='class-balanced training subset')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--quick', action='store_true', help='random-weight model on the digits data (smoke test)')
    p.add_argument('--out', default='benchmarks/results/gate_gradients.json')
    args = p.parse_args(argv)
    if not args.quick and not (args.base and args.data):
        p.error('--base and --data are required (or --quick)')
    if args.batches < 2:
        p.error('--batches must be at least 2 (the t-statistic needs a spread)')
    torch.set_num_threads(args.threads)
    meta = {'machine': machine_info(args.threads), 'command': command_line('gate_gradients.py', argv),
            'quick': args.quick}
    model, batches, size, base = _batches(args)
    grads, kinds = gate_gradients(model, batches, size)
    rows = {kind: statistics(torch.cat([g.reshape(len(batches), -1) for k, g in grads.items() if kinds[k] == kind], 1))
            for kind in dict.fromkeys(kinds.values())}
    rows['all'] = statistics(torch.cat([g.reshape(len(batches), -1) for g in grads.values()], 1))
    per_group = {k: {'kind': kinds[k], **statistics(g)} for k, g in grads.items()}
    t_noise = noise_median_t(len(batches))
    head = ['kind', 'channels', r'E\|g\|', r'\|E g\|', r'mean \|E g\| / E\|g\|', r'median \|t\|',
            rf'median \|t\| of noise (n={len(batches)})',
            'significant (5%)', 'E g > 0 (asks to close)']
    table = markdown_table(head, [[k, r['channels'], f"{r['mean_abs_g']:.2e}", f"{r['abs_mean_g']:.2e}",
                                   f"{r['signal_share']:.2f}", f"{r['median_abs_t']:.2f}", f'{t_noise:.2f}',
                                   f"{100 * r['share_significant']:.0f}%", f"{100 * r['share_closing']:.0f}%"]
                                  for k, r in rows.items()])
    md = (f'# Gate gradients at the unpruned model\n\nBase: `{base}`; {len(batches)} training batches of '
          f'{args.batch_size} (train mode, training augmentation).\n\n{table}\n')
    meta.update(loadavg_end=loadavg(), complete=True)
    payload = {'meta': meta, 'base': base, 'batches': len(batches), 't_noise': t_noise, 'kinds': rows,
               'groups': per_group}
    write_results(args.out, payload, md)
    print(md)
    return payload


if __name__ == '__main__':
    main()
