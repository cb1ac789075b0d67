"""Accuracy at equal MACs: AMAP against its own ablations, the classic criteria and Torch-Pruning.

For each trained base model (``amap train`` run folders), each MAC target and each method, and several seeds, the
same pipeline budget is spent -- same data, same distillation from the unpruned model (``kd_alpha`` 0.5), same
number of training epochs -- and top-1 is measured before pruning, right after the cut and after fine-tuning:

* ``amap``: the method as shipped; ``amap_no_similarity``, ``amap_no_head_balance``, ``amap_no_reweight``,
  ``amap_binary`` (the paper's straight-through gate instead of our ramp): one component switched off;
  ``amap_attn_init``: the attention-difference initialisation of linear attention switched on (off by default since
  these measurements; :class:`amap.prune.PruneConfig` switches);
* ``magnitude`` (L1), ``taylor``, ``random``, ``uniform`` (per-layer ratio): the engine's baseline criteria, under the
  same groups, head balance and target guarantee;
* ``torch_pruning_magnitude`` / ``torch_pruning_taylor``: Torch-Pruning's MetaPruner with GroupMagnitudeImportance /
  GroupTaylorImportance, head-dim pruning of the attention and MLP hidden dims, its ratio pushed by bisection to the
  same MACs (``benchmarks/torch_pruning_baseline.py``);
* ``unpruned``: the base itself, fine-tuned with the same budget, recipe and teacher (MAC ratio 1): the reference of
  "near-lossless" (one run per base and seed, shown under every target).

Budget: AMAP's search trains the weights (with distillation) while it searches, so it spends ``search_epochs`` +
``finetune_epochs`` epochs of training; the criteria that need no search (every baseline) fine-tune for
``search_epochs + finetune_epochs`` epochs instead, so every method gets the same number of training epochs with the
same teacher. Everything except Torch-Pruning and ``unpruned`` runs through :func:`amap.pipeline.run`; their models
are fine-tuned by the pipeline's own fine-tune loop (same optimiser, schedule, distillation).

Equal work: every run records a curve, top-1 against optimizer steps spent since the unpruned model (AMAP's search
steps count), at the cut (0 steps, or the end of AMAP's search) and at each of ``--curve-epochs`` (epochs of steps,
default 0.25, 1, 3 and the whole budget; AMAP has the points at or after its search). The fine-tune is stopped at
each point (``max_finetune_steps``), evaluated, and continued from its checkpoint there (``resume``: the same
schedule, so the last point is the run's final top-1). One PNG per (base, target) beside the results plots the mean
curves (``<out stem>_<base>_t<target>.png``), linked from the Markdown.

Every run writes ``report.json`` in its own folder (``--work-dir``, default ``~/.cache/amap-bench/quality``); a run
whose report exists is reused, an interrupted one continues (the pipeline resumes), so a killed benchmark picks up
where it stopped. With ``--records DIR`` (e.g. ``benchmarks/results/quality_runs``, committed) every finished run also
leaves a small record there (settings, summary, and for ``amap`` the structure ``amap_structure`` needs) that any
machine reuses when its work folder lacks the run: the grid outlasts a session and a machine. A record names its base
by the SHA-256 of its weights (:func:`amap.utils.runfolder.file_digest`), not by a path, so it matches the same
base wherever it is. The JSON + Markdown results hold every run, the mean and spread (sample std over seeds) per
(base, target, method), the exact command, the machine and the date.

Bases: ``--bases NAME=PATH ...``, or by default ``~/.cache/amap-bench/<model>/`` for flatten_deit_micro,
flatten_swin_micro and timm_deit_micro (the DeiTs at width 96 with 3 heads of 32: flatten_deit_micro with
``embed_dim=96``, and timm's DeiT-Tiny with patch 4, 6 blocks, width 96 and MLP ratio 2 at 32 px); a missing or
unfinished base is skipped with the ``amap train`` command that makes it.

Cost: a run trains ``search_epochs + finetune_epochs`` epochs (plus one evaluation per epoch and about 3 per curve
point); with CIFAR-10 (781 steps of 64 images per epoch) and the micro models' 0.4-1.5 s per step on one core of these
machines, that is 0.5-2 hours per run, and the default grid is 3 bases x (2 targets x 12 methods + ``unpruned``) x 3
seeds = 225 runs (Torch-Pruning is not applicable to the FLatten bases, 24 of them end at once). Cut it with
``--train-subset`` / ``--val-subset``, fewer ``--seeds`` / ``--methods`` / ``--models``, and use both cores with two
processes (``--shard 0/2`` and ``--shard 1/2``), then one plain invocation collects every finished run.

Equal measured latency (``--equal-latency S --latency-batch B``, issue 13): instead of the MAC grid, per base and
seed, AMAP with a latency target (``S`` times faster than the base at batch ``B``, 1 thread) against AMAP with a MAC
target and with a MAC target and ``channel_multiple`` 8, both matched to the latency arm's *measured* latency
(candidate MAC targets run to their cut and timed against it; the closest is continued), every arm with the AMAP
budget above; the table gives each arm's measured latency ratio (with its noise) beside top-1
(``benchmarks/equal_latency.py``; ``--match-probes`` bounds the candidates; resumable like every run here).

``--quick`` (the CI smoke test, about a minute): a small timm DeiT (2 blocks, width 96, patch 8) trained on the
fly for 8 epochs of the embedded digits data, pruned to 70% by amap, magnitude and torch_pruning_magnitude, and
``unpruned``, with 1 seed, on a 960-image training subset (30 steps per epoch): a 3-epoch search (90 steps, about what
the search needs to reach the target) + 2 fine-tune epochs, or 5 fine-tune epochs for the others; curve points 0.25,
1, 3 and 5 epochs.

Usage::

    python benchmarks/quality.py --data ~/data/cifar10 --out benchmarks/results/quality.json         # days
    python benchmarks/quality.py --data ~/data/cifar10 --train-subset 10000 --val-subset 2000 \
        --seeds 0 1 2 --shard 0/2 --out /tmp/q0.json &                                              # + --shard 1/2
    python benchmarks/quality.py --quick --out /tmp/quality_quick.json                               # ~1 minute
    python benchmarks/quality.py --data ~/.cache/amap/cifar10 \
        --bases fdeit_e40=benchmarks/bases/flatten_deit_micro/probe_e40 --seeds 0 --train-subset 10000 \
        --val-subset 2000 --search-epochs 0.5 --curve-epochs 0.25,1,3 --equal-latency 1.6 --latency-batch 32 \
        --records benchmarks/results/quality_runs/probe_fdeit_e40_eqlat \
        --out benchmarks/results/quality_eqlat_probe_fdeit_e40.json                     # equal measured latency
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ''):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from amap.prune.config import LATENCY_SEARCH, TRIM_RANKS  # noqa: E402
from amap.prune.search import RESOURCE_SCALES  # noqa: E402
from amap.utils.io import atomic_write_json, read_json  # noqa: E402
from amap.utils.runfolder import file_digest  # noqa: E402
from benchmarks.common import command_line, loadavg, machine_info, markdown_table, write_results  # noqa: E402

DEFAULT_MODELS = ['flatten_deit_micro', 'flatten_swin_micro', 'timm_deit_micro']
# how each default base is trained (the command printed when its folder is missing)
_RECIPE = '--batch-size 128 --lr 1e-3 --warmup-epochs 1 --label-smoothing 0.1 --workers 0 --threads 1'
TRAIN_COMMANDS = {  # the recipes of the baselines in BENCHMARKS.md (width 96, 3 heads of 32 for the DeiTs)
    'flatten_deit_micro': ('amap train --model flatten_deit_micro --model-kwargs '
                           '\'{{"embed_dim": 96, "num_heads": 3}}\' '
                           f'--data {{data}} --epochs 12 {_RECIPE} --out {{out}}'),
    'flatten_swin_micro': f'amap train --model flatten_swin_micro --data {{data}} --epochs 12 {_RECIPE} --out {{out}}',
    'timm_deit_micro': ('amap train --model deit_tiny_patch16_224 --model-kwargs \'{{"patch_size": 4, "depth": 6, '
                        '"embed_dim": 96, "num_heads": 3, "mlp_ratio": 2.0}}\' --img-size 32 --data {data} '
                        f'--epochs 18 {_RECIPE} --out {{out}}'),
}


def latency_options(batch: int, scale: str = 'total', trim_rank: str = 'cost', search: str = 'table') -> dict[str, Any]:
    """The options of a latency-target method at ``batch``, 1 thread, its search's ``resource_scale`` ``scale``,
    its target guarantee's ``trim_rank`` and its ``latency_search`` ``search`` (the grid's latency variants and the
    equal-latency harness's latency arm). The rank and the search are always explicit, so that a record keeps
    meaning what it measured when their defaults change (they were cost and table until 2026-11-26)."""
    return {'resource': 'latency', 'latency_batch': batch, 'latency_threads': 1,
            **({} if scale == 'total' else {'resource_scale': scale}),
            'trim_rank': trim_rank, 'latency_search': search}


def latency_suffix(scale: str = 'total', trim_rank: str = 'cost', search: str = 'table') -> str:
    """The name suffix of a latency method (and of its equal-latency records): the options that differ from the first
    latency method's (``amap_latency_b<B>``: total, cost, table)."""
    return ('' if scale == 'total' else f'_{scale}') + ('' if trim_rank == 'cost' else f'_rank_{trim_rank}') + \
        ('' if search == 'table' else f'_{search}')


METHODS: dict[str, dict[str, Any] | None] = {  # None: not a pipeline run (Torch-Pruning, unpruned)
    'amap': {},
    'amap_no_similarity': {'similarity': False},
    'amap_no_head_balance': {'head_balance': False},
    'amap_no_reweight': {'reweight': False},
    'amap_attn_init': {'attn_init': True},  # the centred ranking (docs/amap-method.md, section 5)
    'amap_attn_init_paper': {'attn_init': True, 'attn_init_low': 0.55},  # the paper's mapping onto [0.55, 1]
    # variants measured once (BENCHMARKS.md): the search's weight LR raised to the fine-tune LR, a 4x smaller
    # indicator LR (the structure forms later in the search), widths rounded to multiples of 8 (faster GEMMs), the
    # attention-difference init on [0.75, 1] (with similarity weights >= 0.7 no channel starts below the threshold)
    # and on [0.95, 1] (a tie-breaker)
    'amap_lr2e-4': {'lr': 2e-4},
    'amap_ind_lr5e-3': {'indicator_lr': 5e-3},
    'amap_multiple8': {'channel_multiple': 8},
    'amap_init_low0.75': {'attn_init': True, 'attn_init_low': 0.75},
    'amap_init_low0.95': {'attn_init': True, 'attn_init_low': 0.95},
    # the search's parts, one at a time: indicators learned on frozen weights (the cut then starts from the base's
    # weights, so the structure alone is compared), one Adam second moment per channel group, the dual control
    'amap_frozen_weights': {'lr': 0.0},
    'amap_group_adam': {'indicator_opt': 'group_adam'},
    'amap_dual': {'resource_control': 'dual'},
    # the indicator LR decayed to 0 by the end of the search (the structure settles before the cut)
    'amap_ind_cosine': {'indicator_schedule': 'cosine'},
    # the search started at Taylor's structure at the target (indicator_init='taylor'), so its steps refine a structure
    # that already meets the target; with the search's weights at the fine-tune LR, no step trains at a lower LR
    'amap_taylor_init': {'indicator_init': 'taylor'},
    'amap_taylor_init_lr2e-4': {'indicator_init': 'taylor', 'lr': 2e-4},
    # the ramp gate (the default since 2026-11-26): a kept channel fades out as its indicator falls to the threshold, so
    # the task loss resists the cut of an important channel; `amap_ramp` labels the runs made while binary was the
    # default, `amap_binary` is the paper's straight-through gate (the gradient at a kept channel is the unpruned
    # model's), an ablation of the ramp
    'amap_ramp': {'gate': 'ramp'},
    'amap_binary': {'gate': 'binary'},
    'amap_ramp_cosine': {'gate': 'ramp', 'indicator_schedule': 'cosine'},
    'amap_ramp_lr2e-4': {'gate': 'ramp', 'lr': 2e-4},
    # the ramp's restoring force grows with a channel's curvature; a group-shared second moment keeps that size
    'amap_ramp_group_adam': {'gate': 'ramp', 'indicator_opt': 'group_adam'},
    # the search (gates and weights) follows the distillation loss alone: no label noise, and the gates feel the cost
    # of a cut as the departure from the original's outputs (second order, as Taylor's E|g| does)
    'amap_search_kd': {'search_loss': 'kd', 'cut_weights': 'search'},
    # a 4x stronger resource loss: on the converged FLatten-DeiT the ramp's restoring force held the search at 0.567
    # of the MACs for a 0.5 target, leaving the last cut to the target guarantee
    'amap_lambda20': {'resource_lambda': 20.0, 'cut_weights': 'search'},
    # the same two under the cut from the original's weights: the search only chooses, so a search that reaches the
    # target (lambda 20) or follows the distillation loss may choose better without its weights paying for it
    'amap_lambda20_original': {'resource_lambda': 20.0},
    'amap_search_kd_original': {'search_loss': 'kd'},
    # SGD with momentum moves an indicator by its gradient, not by its sign (Adam): the task gradients at a converged
    # base are ~3e-3 per channel and batch (gate_gradients_fdeit_e40.md), so lr 0.5-2 moves them ~0.015-0.06 a step
    'amap_sgd0.5': {'indicator_opt': 'sgd', 'indicator_lr': 0.5},
    'amap_sgd2': {'indicator_opt': 'sgd', 'indicator_lr': 2.0},
    # a latency target of 1.6x at batch 32 whose search measures its excess over the prunable part of the latency
    # (the default latency search stopped at 0.76 of the latency for 0.625 on the converged FLatten-DeiT)
    'amap_latency_b32_prunable': latency_options(32, 'prunable'),
    # the same target trimmed by score per channel: the indicators learned under the latency loss already weigh each
    # channel's cost, and the default trim (score per unit of latency) charged the q/k channels a second time
    'amap_latency_b32_rank_score': latency_options(32, trim_rank='score'),
    'amap_latency_b32_prunable_rank_score': latency_options(32, 'prunable', 'score'),
    # the same ranking under a MAC target: the default since 2026-11-27 (`amap`), named for the runs made before
    'amap_rank_score': {'trim_rank': 'score'},
    # one Adam second moment per channel group: a group's shared latency pull no longer drowns the differences of its
    # channels' task gradients (with per-channel Adam every q/k channel under a latency loss fell at the same rate)
    'amap_latency_b32_group_adam': {**latency_options(32), 'indicator_opt': 'group_adam'},
    # the search reads a least-squares fit of each latency table (one price per channel over the whole range): read
    # through its points, the v table of the converged FLatten-DeiT rises 5x less over its last 8 channels per head
    # than q/k does, so the search left every v group whole and the final trim had to cut v blindly
    'amap_latency_b32_fit': latency_options(32, search='fit'),
    'amap_latency_b32_rank_score_fit': latency_options(32, trim_rank='score', search='fit'),
    # the search under a MAC target (the one of the uniform structure at the latency target), the final structure
    # selected against the latency tables: a MAC search's scores made better cuts than a latency search's at equal
    # measured latency (the MAC arms of the equal-latency harness)
    'amap_latency_b32_macs': latency_options(32, search='macs'),
    'amap_latency_b32_rank_score_macs': latency_options(32, trim_rank='score', search='macs'),
    # since 2026-11-26 the cut starts from the base's own weights (cut_weights='original': the search chooses the
    # structure only); `amap_search_weights` is its ablation, the cut keeping the search's weights and reweights (the
    # paper's way, the default before: its records were moved here from `amap`)
    'amap_search_weights': {'cut_weights': 'search'},
    # since 2026-11-27 the target guarantee trims the searched structure by score per channel (trim_rank='score');
    # `amap_rank_cost` is its ablation, the trim by score per MAC saved (the default before: its records were moved
    # here from `amap`, and those of `amap_rank_score`, which measured the new default, to `amap`)
    'amap_rank_cost': {'trim_rank': 'cost'},
    # the search's loss pure distillation from the base (the default mixes it with the labels) under the trim by score;
    # `amap_search_kd_original` measured it under the per-MAC trim
    'amap_kd': {'search_loss': 'kd'},
    'magnitude': {'criterion': 'magnitude'},
    'taylor': {'criterion': 'taylor'},
    'random': {'criterion': 'random'},
    'uniform': {'criterion': 'uniform'},
    'taylor_uniform': {'criterion': 'taylor_uniform'},
    'torch_pruning_magnitude': None,
    'torch_pruning_taylor': None,
    'unpruned': None,  # the reference: the base itself fine-tuned with the same budget, recipe and teacher
    # AMAP's structure alone: the kept channels of the `amap` run of the same base, target and seed, cut from the
    # base's own weights (no search-trained weights, no reweights) and fine-tuned for the whole budget like every
    # baseline; against `uniform` it says whether the learned structure is better, whatever the search's training
    # (reused like every run: after re-running `amap`, remove the amap_structure folders)
    'amap_structure': None,
}
TARGETLESS = {'unpruned'}  # one run per (base, seed), shown under every target
QUICK_METHODS = ['amap', 'magnitude', 'torch_pruning_magnitude', 'unpruned']
CURVE_EPOCHS = (0.25, 1.0, 3.0)  # default curve points (epochs of optimizer steps), then the whole budget
VARIANTS = ['amap_attn_init_paper', 'amap_lr2e-4', 'amap_ind_lr5e-3', 'amap_multiple8', 'amap_init_low0.75',
            'amap_init_low0.95', 'amap_frozen_weights', 'amap_group_adam', 'amap_dual', 'amap_ind_cosine',
            'amap_taylor_init', 'amap_taylor_init_lr2e-4', 'amap_ramp', 'amap_ramp_cosine',
            'amap_ramp_lr2e-4', 'amap_ramp_group_adam', 'amap_structure', 'amap_search_kd',
            'amap_lambda20', 'amap_lambda20_original', 'amap_search_kd_original', 'amap_sgd0.5',
            'amap_sgd2', 'amap_latency_b32_prunable', 'amap_latency_b32_rank_score',
            'amap_latency_b32_prunable_rank_score', 'amap_latency_b32_group_adam', 'amap_latency_b32_fit',
            'amap_latency_b32_rank_score_fit', 'amap_rank_score', 'amap_latency_b32_macs',
            'amap_latency_b32_rank_score_macs', 'amap_kd']  # not in the default grid
# the quick base: a small timm DeiT (Torch-Pruning handles it), trained on the fly
QUICK_BASE = {'model': 'deit_tiny_patch16_224',
              'model_kwargs': {'patch_size': 8, 'depth': 2, 'embed_dim': 96, 'num_heads': 3}}
GOAL_GAP = 0.5  # AMAP at 70% within this many top-1 points of the unpruned model
SEARCH_SLACK = 0.05  # a search that ends this far above its target did not converge
# what a run's summary keeps of a latency target's closed loop (amap.latency.closed_loop)
LATENCY_KEYS = ('batch', 'target_ratio', 'predicted_ratio', 'measured_ratio', 'speedup_measured', 'noise', 'verdict')


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _is_amap(method: str) -> bool:
    return METHODS[method] is not None and METHODS[method].get('criterion', 'amap') == 'amap'


# ----------------------------------------------------------------------------------------------------------- bases
def _train_config(path: Path) -> dict[str, Any]:
    """The configuration of an ``amap train`` run (its ``log.jsonl``'s last start/resume record), or {}."""
    log = path / 'log.jsonl' if path.is_dir() else path.parent / 'log.jsonl'
    config: dict[str, Any] = {}
    try:
        with log.open() as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if record.get('event') in ('start', 'resume') and record.get('config'):
                    config = record['config']
    except OSError:
        return {}
    return config


def _base_ok(path: Path, allow_unfinished: bool = False) -> str | None:
    """None when ``path`` is a finished ``amap train`` run, else why not."""
    from amap.errors import AmapError
    from amap.train import read_trained_meta
    if not path.exists():
        return f'{path} does not exist'
    try:
        meta = read_trained_meta(path)
    except AmapError as e:
        return str(e)
    if meta is None:
        return f'{path} is not an amap train run (no model description)'
    cfg = _train_config(path)
    epochs, max_steps = cfg.get('epochs'), cfg.get('max_steps')
    finished = (epochs is None or meta.get('epoch', 0) >= epochs or
                (max_steps is not None and meta.get('step', 0) >= max_steps))
    if not finished and not allow_unfinished:
        return (f'{path} is still training or was stopped (epoch {meta.get("epoch")} of {epochs}); wait for it, '
                f'continue it with amap train --resume, or pass --allow-unfinished')
    return None


def resolve_bases(args: argparse.Namespace) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """``{name: run folder}`` of the bases found, and the skipped ones with the reason and how to make them."""
    if args.bases:
        wanted = {}
        for item in args.bases:
            name, sep, path = item.partition('=')
            if not sep or not name or not path:
                raise SystemExit(f'--bases expects NAME=PATH, got {item!r}')
            wanted[name] = Path(path).expanduser()
    else:
        root = Path(args.bases_dir).expanduser()
        wanted = {m: root / m for m in (args.models or DEFAULT_MODELS)}
    found: dict[str, Path] = {}
    skipped: list[dict[str, str]] = []
    for name, path in wanted.items():
        why = _base_ok(path, args.allow_unfinished)
        if why is None:
            found[name] = path
            continue
        how = TRAIN_COMMANDS.get(name, 'amap train --model <model> --data {data} --out {out}').format(
            data=args.data or 'DIR', out=path)
        skipped.append({'base': name, 'path': str(path), 'reason': why, 'make_it_with': how})
        _log(f'SKIPPED base {name}: {why}. Train it with: {how}')
    return found, skipped


def train_quick_base(work: Path, data: dict[str, Any], epochs: int, threads: int, device: str = 'auto') -> Path:
    """Train the quick base model for ``epochs`` epochs (reused when already trained)."""
    from amap.data import DataConfig
    from amap.train import TrainConfig, train
    out = work / f'quick_base_{Path(data["data"]).name}_e{epochs}'
    if _base_ok(out) is None:
        return out
    shutil.rmtree(out, ignore_errors=True)
    data = {**data, 'train_subset': None}  # the base learns from all the training data
    cfg = TrainConfig(model=QUICK_BASE['model'], model_kwargs=dict(QUICK_BASE['model_kwargs']),
                      data=DataConfig(**data), epochs=epochs, lr=2e-3,
                      warmup_epochs=1.0, out_dir=str(out), progress=False, device=device, seed=0)
    t0 = time.perf_counter()
    train(cfg)
    _log(f'quick base trained in {time.perf_counter() - t0:.1f} s ({epochs} epochs)')
    torch.set_num_threads(threads)
    return out


# -------------------------------------------------------------------------------------------------------- one run
def _whole_if_integer(text: str) -> float | int:
    """argparse type: a number of epochs, an int when it is whole (so budgets and run settings stay as before)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _budget(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Search / fine-tune epochs and curve points of a method: the same total of training epochs (the last curve
    point) for everyone; AMAP's search counts."""
    search = args.search_epochs if _is_amap(method) else 0
    return {'search_epochs': search, 'finetune_epochs': round(args.curve_epochs[-1]) - search,
            'curve_epochs': list(args.curve_epochs)}


@functools.lru_cache
def _steps_per_epoch(data_json: str) -> int:
    """Training batches per epoch of the data settings ``data_json`` (one optimizer step each)."""
    from amap.data import DataConfig, build_loaders
    return build_loaders(DataConfig(**json.loads(data_json))).steps_per_epoch


def _finetune_stops(budget: dict[str, Any], steps_per_epoch: int, search_steps: int) -> list[int]:
    """The fine-tune steps at which the curve is measured: every curve point past the ``search_steps`` spent before
    the cut (the last point ends the fine-tune)."""
    stops = {round(e * steps_per_epoch) - search_steps for e in budget['curve_epochs']}
    return sorted(n for n in stops if n > 0)


def _point(steps: int, steps_per_epoch: int, top1: float) -> dict[str, Any]:
    """One curve point: top-1 after ``steps`` optimizer steps since the unpruned model."""
    return {'steps': steps, 'epochs': steps / steps_per_epoch, 'top1': top1}


def _add_seconds(total: dict[str, float], seconds: dict[str, float] | None) -> None:
    for k, v in (seconds or {}).items():
        total[k] = total.get(k, 0.0) + v


def _summary_of(report: dict[str, Any]) -> dict[str, Any]:
    macs, params = report['macs'], report['params']
    history = report.get('history') or []
    return {'top1': dict(report['top1']),
            'macs': {'before': macs['before'], 'after': macs['after'], 'ratio': macs['ratio'],
                     'target_ratio': macs.get('target_ratio')},
            'params': {'before': params['before'], 'after': params['after'],
                       'ratio': params['after'] / params['before']},
            'seconds': dict(report.get('seconds') or {}),
            'curve': list(report['curve']),
            # where the AMAP search ended: far above the target, the target guarantee cut the rest from indicators
            # that had not learned yet (a search too short for its budget)
            'search_final_mac_ratio': history[-1].get('mac_ratio') if history else None,
            **({'latency_target': {k: report['latency_target'].get(k) for k in LATENCY_KEYS}}
               if report.get('latency_target') else {})}


def run_amap_pipeline(base: Path, out: Path, target: float, method: str, seed: int, data: dict[str, Any],
                      budget: dict[str, Any], device: str = 'auto', progress: dict[str, Any] | None = None,
                      on_progress: Callable[[dict[str, Any]], None] | None = None,
                      cut_only: bool = False) -> dict[str, Any]:
    """The pipeline run, its fine-tune stopped at every curve point (``max_finetune_steps``) and continued from
    there (``resume``: the same schedule) to the next; the report of the last with ``curve`` and the seconds of all.

    ``progress`` (what ``on_progress`` was last given) holds the points measured before an interruption.
    ``cut_only``: stop after the cut and one fine-tune step (the least the pipeline stops at), so that the cut model
    (``out/pruned_init``) can be looked at; the same call without it continues the run from there."""
    from amap.pipeline import CONFIG_FILE, run
    spe = _steps_per_epoch(json.dumps(data, sort_keys=True))
    search_steps = math.ceil(budget['search_epochs'] * spe)  # the pipeline's search length (one batch per update)
    points = {p['steps']: p for p in (progress or {}).get('curve', [])}
    seconds = dict((progress or {}).get('seconds', {}))
    prune = {**METHODS[method], 'seed': seed}
    # a fractional search leaves the fine-tune the rest of the budget's steps (its schedule spans exactly them)
    whole = float(budget['finetune_epochs']).is_integer()
    finetune_steps = None if whole else round(budget['curve_epochs'][-1] * spe) - search_steps
    stops: list[int | None] = [*_finetune_stops(budget, spe, search_steps)] or [None]  # None: no fine-tune
    if cut_only:
        stops = [1]
    for i, stop in enumerate(stops):
        if stop is not None and search_steps + stop in points and i < len(stops) - 1:
            continue  # measured before an interruption (the last is always run: it gives the report)
        report = run(checkpoint=str(base), data=data, target=target, prune=prune,
                     search_epochs=budget['search_epochs'], finetune_epochs=math.ceil(budget['finetune_epochs']),
                     finetune_steps=finetune_steps, out=str(out),
                     resume=(out / CONFIG_FILE).is_file(), latency=False, progress=False, seed=seed, device=device,
                     teacher='original', max_finetune_steps=stop).report
        if cut_only:
            return report
        points.setdefault(search_steps, _point(search_steps, spe, report['top1']['after_surgery']))  # the cut
        if stop is not None:
            points[search_steps + stop] = _point(search_steps + stop, spe, report['top1']['after_finetune'])
        _add_seconds(seconds, report.get('seconds'))
        if on_progress is not None:
            on_progress({'curve': sorted(points.values(), key=lambda p: p['steps']), 'seconds': seconds})
    return {**report, 'curve': sorted(points.values(), key=lambda p: p['steps']), 'seconds': seconds}


def run_direct(base: Path, out: Path, target: float, method: str, seed: int, data: dict[str, Any],
               budget: dict[str, Any], device: str = 'auto', amap_record: Path | None = None) -> dict[str, Any]:
    """Torch-Pruning to the target (on the CPU), or no pruning (``unpruned``), then the pipeline's fine-tune (same
    optimiser, schedule, distillation) on ``device``, stopped at every curve point (``max_finetune_steps``) and
    continued from its checkpoint there (``resume``) to the next."""
    from amap.data import build_loaders
    from amap.macs import count_macs, count_params
    from amap.pipeline import FINETUNE, _calibration_batches, _finetune, load_config
    from amap.prune.api import PruneConfig
    from amap.train import evaluate, load_trained
    from amap.utils.distributed import DistInfo, resolve_device
    from benchmarks.torch_pruning_baseline import prune_to_target

    cfg = load_config(checkpoint=str(base), data=data, target=target, search_epochs=0,
                      finetune_epochs=budget['finetune_epochs'], out=str(out), latency=False, progress=False,
                      seed=seed, device=device, teacher='original')
    info = DistInfo(device=resolve_device(device))
    dev = info.device
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    bundle = build_loaders(cfg.data, seed=seed)
    original = load_trained(base).eval()
    top1_before = evaluate(original.to(dev), bundle.val_loader, device=dev)['top1']
    original.cpu()
    seconds['load_and_evaluate'] = time.perf_counter() - t0
    size = (3, cfg.data.img_size, cfg.data.img_size)
    extra: dict[str, Any] = {}
    if method == 'unpruned':
        model = copy.deepcopy(original).to(dev)
        macs_before = count_macs(original, size).total
        macs = {'before': macs_before, 'target': macs_before, 'target_ratio': 1.0}
        params_before, top1_surgery = count_params(original), top1_before
    elif method == 'amap_structure':
        model, macs, params_before = _cut_to_structure(original, _amap_structure(out, seed, amap_record), size)
        model = model.to(dev)
        top1_surgery = evaluate(model, bundle.val_loader, device=dev)['top1']
    else:
        importance = method.removeprefix('torch_pruning_')
        t0 = time.perf_counter()
        calib = _calibration_batches(bundle, seed, DistInfo(), PruneConfig().calib_batches)  # on the CPU
        tp = prune_to_target(original, target, size, importance=importance, calib=calib, log=_log)
        seconds['torch_pruning'] = time.perf_counter() - t0
        model = tp.model.to(dev)
        macs = {'before': tp.macs_before, 'target': tp.target_macs, 'target_ratio': target}
        params_before, top1_surgery = tp.params_before, evaluate(model, bundle.val_loader, device=dev)['top1']
        extra['torch_pruning'] = {'importance': importance, 'pruning_ratio': tp.pruning_ratio,
                                  'bisection': tp.bisection}
    teacher = copy.deepcopy(original).to(dev).eval().requires_grad_(False)
    t0 = time.perf_counter()
    shutil.rmtree(out / FINETUNE, ignore_errors=True)  # the structure is recomputed: never resume a stale fine-tune
    spe = bundle.steps_per_epoch
    curve, ft_history = [_point(0, spe, top1_surgery)], []
    for stop in _finetune_stops(budget, spe, 0):  # each continues the previous one's checkpoint
        model, ft_history, top1 = _finetune(dataclasses.replace(cfg, max_finetune_steps=stop, resume=True), info,
                                            bundle, model, teacher)
        curve.append(_point(stop, spe, top1))
    seconds['finetune'] = time.perf_counter() - t0
    seconds['total'] = time.perf_counter() - t_start
    model.eval()
    macs_after = count_macs(model, size, device=dev).total
    return {
        'macs': {**macs, 'after': macs_after, 'ratio': macs_after / macs['before']},
        'params': {'before': params_before, 'after': count_params(model)},
        'top1': {'before': top1_before, 'after_surgery': top1_surgery, 'after_finetune': curve[-1]['top1']},
        'seconds': seconds, 'finetune_history': ft_history, 'curve': curve, **extra, 'config': cfg.to_dict(),
    }


def _amap_structure(out: Path, seed: int, record: Path | None = None) -> list[dict]:
    """The structure records of the finished ``amap`` run beside ``out`` (same base, target and seed), or of its
    committed record (``record``: the ``amap`` run's record file) when the work folder lacks it."""
    report = out.parent.parent / 'amap' / f'seed{seed}' / 'report.json'
    if report.is_file():
        return read_json(report)['structure']
    if record is not None and record.is_file() and 'structure' in read_json(record):
        return read_json(record)['structure']
    raise SystemExit(f'amap_structure needs the finished amap run of seed {seed} ({report}); run amap first')


def _cut_to_structure(original: torch.nn.Module, structure: list[dict], size: tuple[int, int, int]):
    """A copy of ``original`` cut to ``structure`` (kept indices per module and kind) from its own weights; returns
    the cut model, the MAC record and the parameter count before."""
    from amap.macs import count_macs, count_params
    from amap.prune import PruneConfig
    from amap.prune.staged import install
    from amap.prune.surgery import apply_surgery

    model = copy.deepcopy(original)
    pruner = install(model, size, PruneConfig(criterion='uniform'))  # indicators without reweights
    kept = {(r['module'], kind): idx for r in structure for kind, idx in r['indices'].items()}
    for key, ind in pruner.indicators.items():
        idx = kept.get((pruner.adapter_of(key).name, ind.group.kind))
        mask = torch.ones_like(ind.m) if idx is None else torch.zeros_like(ind.m).scatter_(
            1, torch.tensor(idx, device=ind.m.device), 1.0)
        ind.fixed = mask
    before = count_macs(original, size).total
    ratio = float(pruner.macs()) / pruner.full_macs
    return apply_surgery(pruner), {'before': before, 'target': before * ratio, 'target_ratio': ratio}, \
        count_params(original)


# the method's defaults (PruneConfig, search settings as ``search.<name>``) under which the committed run records were
# made; a run of a pipeline method records how today's defaults differ from these (``defaults_changed``), so a record
# made under an old default is never reused for a new one
RECORDED_DEFAULTS = Path(__file__).resolve().parent / 'results' / 'quality_runs' / 'defaults.json'


def method_defaults() -> dict[str, Any]:
    """Today's defaults of the pruning method, flat (``search.<name>`` for the search settings), as JSON values."""
    from amap.prune.api import PruneConfig
    doc = dataclasses.asdict(PruneConfig())
    flat = {**{k: v for k, v in doc.items() if k != 'search'}, **{f'search.{k}': v for k, v in doc['search'].items()}}
    return json.loads(json.dumps(flat))


# options of the learned method only: a baseline criterion's run does not depend on them
_AMAP_ONLY = ('similarity', 'similarity_beta', 'head_balance', 'reweight', 'attn_init', 'attn_init_spread',
              'attn_init_low', 'indicator_init', 'init_margin', 'cut_weights')


def _effective(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``trim_rank='auto'`` resolved to what it does under the options' resource (score under a
    latency target, cost under MACs): a record names the trim it ran with, whatever the default was called then."""
    if options.get('trim_rank') != 'auto':
        return options
    from amap.prune.api import PruneConfig
    by_cost = PruneConfig(trim_rank='auto', resource=options.get('resource', 'macs')).trim_by_cost
    return {**options, 'trim_rank': 'cost' if by_cost else 'score'}


def defaults_changed(options: dict[str, Any] | None = None, recorded: Path = RECORDED_DEFAULTS) -> dict[str, Any]:
    """The method's effective options (today's defaults with ``options``, a METHODS entry, applied) that differ from
    those under the defaults the committed records were made under (new fields included); for a baseline criterion
    the learned method's options and the search settings are left out."""
    from amap.prune.config import FLAT_SEARCH_KEYS
    opts = {(f'search.{FLAT_SEARCH_KEYS[k]}' if k in FLAT_SEARCH_KEYS else k): v for k, v in (options or {}).items()}
    opts = json.loads(json.dumps(opts))
    before = _effective({**(read_json(recorded) if recorded.is_file() else {}), **opts})
    now = _effective({**method_defaults(), **opts})
    if now.get('criterion', 'amap') != 'amap':
        # a criterion's scores are trimmed by score under a MAC target, whatever trim_rank says
        unused = _AMAP_ONLY + (('trim_rank',) if now.get('resource') != 'latency' else ())
        now = {k: v for k, v in now.items() if not k.startswith('search.') and k not in unused}
    return {k: v for k, v in now.items() if k not in before or before[k] != v}


def _settings(base: Path, target: float, method: str, seed: int, data: dict[str, Any],
              budget: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a run's result: a finished run is reused only when these are unchanged."""
    from amap.train import read_trained_meta
    meta = read_trained_meta(base) or {}
    doc = {'base': str(base), 'base_step': meta.get('step'), 'target': None if method in TARGETLESS else target,
           'method': method,
           'options': METHODS[method], 'seed': seed, 'data': data, 'budget': budget}
    changed = defaults_changed(METHODS[method]) if METHODS[method] is not None else {}
    if changed:
        doc['defaults_changed'] = changed
    return json.loads(json.dumps(doc))


def _record_path(args: argparse.Namespace, base_name: str, target: float, method: str, seed: int) -> Path | None:
    """Where the committed record of a run lives (``--records``), or None without records."""
    if not args.records:
        return None
    folder = Path(args.records) / base_name
    return (folder if method in TARGETLESS else folder / f't{target:g}') / method / f'seed{seed}.json'


def _portable(settings: dict[str, Any], sha: str | None) -> dict[str, Any]:
    """The run's settings with the base named by its weights' hash instead of a path on this machine."""
    return {**{k: v for k, v in settings.items() if k != 'base'}, 'base_sha256': sha}


class NotRun(Exception):
    """With ``--collect``: the run has no finished result."""


def run_folder(args: argparse.Namespace, base_name: str, target: float, method: str, seed: int) -> Path:
    """The work folder of one run."""
    out = Path(args.work_dir).expanduser() / base_name
    return (out if method in TARGETLESS else out / f't{target:g}') / method / f'seed{seed}'


def run_to_cut(args: argparse.Namespace, base_name: str, base: Path, target: float, method: str, seed: int,
               data: dict[str, Any]) -> Path:
    """An AMAP pipeline run (``method`` in :data:`METHODS`) taken as far as its cut: returns its folder, whose
    ``pruned_init`` holds the cut model. Reused when the run got there before with the same settings; :func:`one_run`
    with the same arguments continues it to the end of the budget."""
    from amap.pipeline import PRUNED_INIT
    out = run_folder(args, base_name, target, method, seed)
    marker = out / 'benchmark.json'
    budget = _budget(args, method)
    settings = _settings(base, target, method, seed, data, budget)
    same = marker.is_file() and read_json(marker).get('settings') == settings
    if same and (out / PRUNED_INIT / 'config.json').is_file():
        return out
    if args.collect:
        raise NotRun(f'{base_name} {target:g} {method} seed {seed} has not reached its cut (--collect runs nothing)')
    if not same and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {'settings': settings})
    _log(f'run {base_name} target {target:g} {method} seed {seed} to its cut')
    run_amap_pipeline(base, out, target, method, seed, data, budget, args.device, cut_only=True)
    return out


def one_run(args: argparse.Namespace, base_name: str, base: Path, target: float, method: str, seed: int,
            data: dict[str, Any]) -> dict[str, Any]:
    """The summary of one run: reused when it finished before with the same settings, else run (or continued:
    an interrupted run with the same settings resumes) now.

    ``benchmark.json`` in the run folder holds the settings (written when the run starts) and, once it finished,
    the summary (or why the method is not applicable).
    """
    from benchmarks.torch_pruning_baseline import NotApplicable
    out = run_folder(args, base_name, target, method, seed)
    marker = out / 'benchmark.json'
    budget = _budget(args, method)
    settings = _settings(base, target, method, seed, data, budget)
    key = {'base': base_name, 'target': target, 'method': method, 'seed': seed, 'folder': str(out), 'budget': budget}
    record = _record_path(args, base_name, target, method, seed)
    portable = _portable(settings, file_digest(base)) if record is not None else None

    def keep(doc: dict[str, Any], report: dict[str, Any] | None = None) -> None:
        if record is not None:
            rec = {**{k: v for k, v in doc.items() if k != 'settings'}, 'settings': portable}
            if report is not None and 'structure' in report:  # kept channels: amap_structure, the overlap table
                rec['structure'] = report['structure']
            atomic_write_json(record, rec)

    if record is not None and record.is_file():  # a committed record of these settings wins over the work folder's
        doc = read_json(record)                    # run, which may be of other settings (or of no record yet)
        if doc.get('settings') == portable:
            if 'not_applicable' in doc:
                return {**key, 'not_applicable': doc['not_applicable'], 'reused': True}
            if 'structure' not in doc and marker.is_file() and read_json(marker) == {'settings': settings,
                                                                                      'summary': doc['summary']}:
                keep(doc, read_json(out / 'report.json'))  # a record made before records kept every cut's channels
                doc = read_json(record)
            return {**key, **doc['summary'], 'reused': True, **_structure_key(doc)}
        _log(f'{record}: a record with other settings; running the run afresh')
    fresh, progress = True, None
    if marker.is_file():
        doc = read_json(marker)
        if doc.get('settings') == settings:
            if 'not_applicable' in doc:
                if record is not None and not record.is_file():
                    keep({'not_applicable': doc['not_applicable']})
                return {**key, 'not_applicable': doc['not_applicable'], 'reused': True}
            if 'summary' in doc:
                report = read_json(out / 'report.json') if (out / 'report.json').is_file() else {}
                if record is not None:  # finished before --records, or the record is of other settings: record it
                    keep({'summary': doc['summary']}, report)
                return {**key, **doc['summary'], 'reused': True, **_structure_key(report)}
            fresh, progress = False, doc.get('progress')  # interrupted with the same settings: continue it
        else:
            _log(f'{out}: settings changed since the last run; running it afresh')
    elif out.exists() and any(out.iterdir()):
        _log(f'{out}: an earlier run of unknown settings; running it afresh')
    if args.collect:
        raise NotRun(f'{base_name} {target:g} {method} seed {seed} has not finished (--collect runs nothing)')
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {'settings': settings})
    _log(f'run {base_name} target {target:g} {method} seed {seed} ({budget}){"" if fresh else ", resumed"}')
    t0 = time.perf_counter()
    if METHODS[method] is None:
        try:
            report = run_direct(base, out, target, method, seed, data, budget, args.device,
                                amap_record=_record_path(args, base_name, target, 'amap', seed))
        except NotApplicable as e:
            _log(f'  not applicable: {e}')
            atomic_write_json(marker, {'settings': settings, 'not_applicable': str(e)})
            keep({'not_applicable': str(e)})
            return {**key, 'not_applicable': str(e), 'reused': False}
        atomic_write_json(out / 'report.json', report)
    else:
        report = run_amap_pipeline(base, out, target, method, seed, data, budget, args.device, progress,
                                   lambda done: atomic_write_json(marker, {'settings': settings, 'progress': done}))
    report.setdefault('seconds', {}).setdefault('total', time.perf_counter() - t0)
    summary = _summary_of(report)
    atomic_write_json(marker, {'settings': settings, 'summary': summary})
    keep({'summary': summary}, report)
    _log(f'  top-1 {summary["top1"]["before"]:.2f} -> {summary["top1"]["after_surgery"]:.2f} -> '
         f'{summary["top1"]["after_finetune"]:.2f}, MAC ratio {summary["macs"]["ratio"]:.4f}, '
         f'{summary["seconds"].get("total", float("nan")):.1f} s')
    return {**key, **summary, 'reused': False, **_structure_key(report)}


def _structure_key(doc: dict[str, Any]) -> dict[str, Any]:
    """``{'structure': ...}`` when the report or record ``doc`` has the cut's kept channels, else {} (main takes it
    out of the run after the overlap table is made: the runs in the results JSON stay small)."""
    return {'structure': doc['structure']} if doc.get('structure') else {}


# -------------------------------------------------------------------------------------------------------- summary
def kept_channels(structure: list[dict[str, Any]]) -> frozenset[tuple]:
    """The kept channels of a cut as ``(module, group, head, channel)`` tuples (from a report's ``structure``)."""
    kept = set()
    for module in structure:
        for group, heads in module.get('indices', {}).items():
            for head, channels in enumerate(heads):
                kept.update((module['module'], group, head, c) for c in channels)
    return frozenset(kept)


def structure_overlap(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How much each method's cut shares with AMAP's, per (base, target, method): the mean Jaccard index of the
    kept channels against the ``amap`` run of the same seed and, as the yardstick, against ``amap`` runs of other
    seeds (what a seed alone changes). A component that moves the structure less than a seed does cannot change the
    accuracy by more than the seed noise."""
    kept = {(r['base'], r['target'], r['method'], r['seed']): kept_channels(r['structure'])
            for r in runs if r.get('structure')}
    jaccard = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    rows = []
    for base, target, method in dict.fromkeys(k[:3] for k in kept):
        amap = {k[3]: v for k, v in kept.items() if k[:3] == (base, target, 'amap')}
        mine = {k[3]: v for k, v in kept.items() if k[:3] == (base, target, method)}
        same = [jaccard(v, amap[s]) for s, v in mine.items() if s in amap]
        other = [jaccard(v, a) for s, v in mine.items() for t, a in amap.items() if t != s]
        if same or other:
            rows.append({'base': base, 'target': target, 'method': method, 'seeds': sorted(mine),
                         'same_seed': _stats(same) if same else None, 'other_seeds': _stats(other) if other else None})
    return rows


def _stats(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
            'min': min(values), 'max': max(values), 'n': len(values)}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (base, target, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r['base'], r['target'], r['method']), []).append(r)
    rows = []
    for (base, target, method), rs in groups.items():
        row: dict[str, Any] = {'base': base, 'target': target, 'method': method, 'seeds': [r['seed'] for r in rs]}
        na = [r['not_applicable'] for r in rs if 'not_applicable' in r]
        if na:
            row['not_applicable'] = na[0]
            rows.append(row)
            continue
        for stage in ('before', 'after_surgery', 'after_finetune'):
            row[f'top1_{stage}'] = _stats([r['top1'][stage] for r in rs])
        row['mac_ratio'] = _stats([r['macs']['ratio'] for r in rs])
        row['macs'] = _stats([r['macs']['after'] for r in rs])
        row['params'] = _stats([r['params']['after'] for r in rs])
        row['param_ratio'] = _stats([r['params']['ratio'] for r in rs])
        row['seconds'] = _stats([r['seconds'].get('total', float('nan')) for r in rs])
        by_steps: dict[int, list[dict]] = {}
        for r in rs:
            for point in r['curve']:
                by_steps.setdefault(point['steps'], []).append(point)
        row['curve'] = [{'steps': n, 'epochs': ps[0]['epochs'], 'top1': _stats([q['top1'] for q in ps])}
                        for n, ps in sorted(by_steps.items())]
        finals = [r['search_final_mac_ratio'] for r in rs if r.get('search_final_mac_ratio') is not None]
        if finals:
            row['search_final_mac_ratio'] = _stats(finals)
        rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quality goals per (base, target): AMAP's mean top-1 against the best of the other methods (its own
    ablations and variants are not competitors: they tell which component matters, nor is ``unpruned``: it is the
    reference); at 70% it is within 0.5 points of the unpruned model. ``margin`` is AMAP's mean minus the best other
    method's, ``spread`` the larger of their seed stds (the goal: ``margin`` above ``spread``, never below
    ``-spread``). With ``unpruned`` run, ``gap_to_unpruned_finetuned`` is the gap to the unpruned model fine-tuned
    with the same budget (the reference of "near-lossless"), ``lead_needs`` the least AMAP must reach to lead beyond
    the std, and ``lead_reachable`` whether that is below the unpruned model fine-tuned with the same budget."""
    out = []
    for base, target in dict.fromkeys((r['base'], r['target']) for r in rows):
        rs = {r['method']: r for r in rows if r['base'] == base and r['target'] == target and 'not_applicable' not in r}
        others = [m for m in rs if not _is_amap(m) and m not in TARGETLESS]
        if 'amap' not in rs or not others:
            continue
        amap_top1 = rs['amap']['top1_after_finetune']['mean']
        other = max(others, key=lambda m: rs[m]['top1_after_finetune']['mean'])
        other_top1 = rs[other]['top1_after_finetune']['mean']
        amap_best = bool(amap_top1 >= other_top1)
        g: dict[str, Any] = {'base': base, 'target': target, 'best_method': 'amap' if amap_best else other,
                             'runner_up': other, 'amap_is_best': amap_best,
                             'margin': amap_top1 - other_top1,
                             'spread': max(rs['amap']['top1_after_finetune']['std'],
                                           rs[other]['top1_after_finetune']['std']),
                             'amap_top1': amap_top1, 'unpruned_top1': rs['amap']['top1_before']['mean']}
        g['gap_to_unpruned'] = g['unpruned_top1'] - amap_top1
        if 'unpruned' in rs:
            g['unpruned_finetuned_top1'] = rs['unpruned']['top1_after_finetune']['mean']
            g['gap_to_unpruned_finetuned'] = g['unpruned_finetuned_top1'] - amap_top1
            # the least AMAP must reach to lead beyond the std (the best other's mean plus its own std, AMAP's std
            # can only raise it): when that is not below the unpruned model fine-tuned with the same budget, no
            # choice of structure can lead beyond the noise without beating the model it prunes
            g['lead_needs'] = other_top1 + rs[other]['top1_after_finetune']['std']
            g['lead_reachable'] = bool(g['lead_needs'] < g['unpruned_finetuned_top1'])
        if math.isclose(target, 0.7):
            g['within_0.5_of_unpruned'] = bool(g['gap_to_unpruned'] <= GOAL_GAP)
            if 'unpruned' in rs:
                g['within_0.5_of_unpruned_finetuned'] = bool(g['gap_to_unpruned_finetuned'] <= GOAL_GAP)
        out.append(g)
    return out


def _pm(s: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std`` (just the value for a single seed)."""
    if s['n'] < 2:
        return f'{s["mean"]:.{digits}f}'
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'


def plot_curves(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """One PNG per (base, target) beside ``out`` (``<stem>_<base>_t<target>.png``): mean top-1 over seeds against
    epochs of optimizer steps since the unpruned model, one line per method; returns ``[{base, target, png}]``."""
    from amap.utils.figures import pyplot, save_png
    plt = pyplot()

    plots = []
    for base, target in dict.fromkeys((r['base'], r['target']) for r in rows):
        rs = [r for r in rows if r['base'] == base and r['target'] == target and r.get('curve')]
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in rs:
            ax.plot([q['epochs'] for q in r['curve']], [q['top1']['mean'] for q in r['curve']], marker='o',
                    linestyle='--' if r['method'] in TARGETLESS else '-', label=r['method'])
        ax.set_xlabel('epochs of optimizer steps since the unpruned model (AMAP: search + fine-tune)')
        ax.set_ylabel('top-1 (%)')
        ax.set_title(f'{base}, MAC target {target:g} (mean over seeds)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = save_png(fig, out.parent / f'{out.stem}_{base}_t{target:g}.png')
        plots.append({'base': base, 'target': target, 'png': path.name})
    return plots


def _curve_tables(payload: dict[str, Any]) -> list[str]:
    """Markdown: per (base, target) its plot and the curve points (mean ± std top-1) of every method."""
    lines = ['## Top-1 against optimizer steps', '',
             'Top-1 after N epochs of optimizer steps since the unpruned model (AMAP\'s search counts: its first '
             'point is the cut after the search; every other method\'s first point, 0, is its cut, or the unpruned '
             'model itself). Mean ± sample std over seeds.', '']
    for plot in payload.get('plots', []):
        rs = [r for r in payload['rows'] if r['base'] == plot['base'] and r['target'] == plot['target']
              and r.get('curve')]
        steps = sorted({(q['steps'], q['epochs']) for r in rs for q in r['curve']})
        head = ['method'] + [f'{e:.3g} ep ({n} steps)' for n, e in steps]
        table = [[r['method']] + [next((_pm(q['top1']) for q in r['curve'] if q['steps'] == n), '') for n, _ in steps]
                 for r in rs]
        lines += [f'### {plot["base"]}, target {plot["target"]:g}', '', f'![top-1 against steps]({plot["png"]})', '',
                  markdown_table(head, table), '']
    return lines


def _overlap_table(overlap: list[dict[str, Any]]) -> list[str]:
    """Markdown: how much of AMAP's cut each method keeps (:func:`structure_overlap`)."""
    if not overlap:
        return []
    fmt = lambda s: '' if s is None else f'{s["mean"]:.3f} (n={s["n"]})'  # noqa: E731
    table = [[r['base'], f'{r["target"]:g}', r['method'], fmt(r['same_seed']), fmt(r['other_seeds'])]
             for r in overlap]
    return ['## How much each cut shares with AMAP\'s', '',
            'Jaccard index of the kept channels (q/k, v and MLP channels of every head and block) against the `amap` '
            'run of the same seed, and against `amap` runs of the other seeds: the second column is what a seed '
            'alone changes, so a method above it keeps a structure closer to AMAP\'s than a rerun of AMAP does.', '',
            markdown_table(['base', 'target', 'method', 'vs amap, same seed', 'vs amap, other seeds'], table, left=3),
            '']


def render_markdown(payload: dict[str, Any]) -> str:
    meta = payload['meta']
    m = meta['machine']
    b = meta['budget']
    lines = [
        '# Quality: top-1 at equal MACs', '',
        f'Command: `{meta["command"]}`', '',
        f'Date {m["date"]}; {m["cpu"]}, {m["cpu_count"]} cores, {m["torch_threads"]} torch thread(s); torch '
        f'{m["torch"]}, timm {m["timm"]}, torch-pruning {meta.get("torch_pruning_version")}; commit '
        f'{m.get("git_commit")}; load average at start {m["loadavg_start"]}, at end {meta["loadavg_end"]}.', '',
        f'Data: `{meta["data"]["data"]}` (train subset {meta["data"].get("train_subset")}, val subset '
        f'{meta["data"].get("val_subset")}, batch {meta["data"]["batch_size"]}). Budget: AMAP (and its ablations) '
        f'search {b["search_epochs"]} epoch(s) (weights trained with distillation; the cut starts from the base\'s '
        f'weights unless the method sets cut_weights=search) + fine-tune '
        f'{b["finetune_epochs"]} epoch(s); every other method fine-tunes {b["search_epochs"] + b["finetune_epochs"]} '
        f'epoch(s) (`unpruned`: the base itself, MAC ratio 1). Curve points: {b["curve_epochs"]} epochs of optimizer '
        f'steps. Distillation from the unpruned model (kd_alpha 0.5) for everyone. Seeds: {meta["seeds"]}. '
        'Values: mean ± sample std over seeds. Top-1 in %. Wall time: whole run (load, calibrate, search/prune, '
        'fine-tune, evaluations).', '']
    if meta['bases']:
        lines += ['Bases:', '']
        for name, bi in meta['bases'].items():
            top1 = (bi.get('metrics') or {}).get('top1')
            lines.append(f'- {name}: `{bi["model"]}` {bi["model_kwargs"]}, trained {bi["epoch"]} epoch(s) / '
                         f'{bi["step"]} steps on `{bi["data"]}`' + (f', top-1 {top1:.2f}%' if top1 is not None else '')
                         + f' (`{bi["path"]}`)')
        lines.append('')
    if meta['skipped_bases']:
        lines += ['Skipped bases (not found):', '']
        lines += [f'- {s["base"]}: {s["reason"]}. Make it with `{s["make_it_with"]}`' for s in meta['skipped_bases']]
        lines.append('')
    head = ['base', 'target', 'method', 'top-1 before', 'after cut', 'after fine-tune', 'MAC ratio', 'params (M)',
            'wall (s)', 'seeds']
    table = []
    for r in payload['rows']:
        if 'not_applicable' in r:
            table.append([r['base'], f'{r["target"]:g}', r['method'], '', '', f'not applicable: {r["not_applicable"]}',
                          '', '', '', len(r['seeds'])])
            continue
        p = r['params']
        table.append([r['base'], f'{r["target"]:g}', r['method'], _pm(r['top1_before']), _pm(r['top1_after_surgery']),
                      _pm(r['top1_after_finetune']),
                      f'{r["mac_ratio"]["mean"]:.4f} (max {r["mac_ratio"]["max"]:.4f})',
                      f'{p["mean"] / 1e6:.3f}', _pm(r['seconds'], 0), len(r['seeds'])])
    lines += [markdown_table(head, table, left=3), '']
    if payload['goals']:
        lines += ['Goals: AMAP above the best other method after fine-tuning by more than the larger seed std, never '
                  f'below it by more (compare the margin with its std); at 70% within {GOAL_GAP} points of the '
                  'unpruned model.', '']
        gt = []
        for g in payload['goals']:
            within = g.get('within_0.5_of_unpruned')
            gt.append([g['base'], f'{g["target"]:g}', g['best_method'], 'yes' if g['amap_is_best'] else 'NO',
                       f'{g["margin"]:+.2f} vs {g["runner_up"]} (std {g["spread"]:.2f})',
                       f'{g["gap_to_unpruned"]:+.2f}', '' if within is None else ('yes' if within else 'NO')])
        lines += [markdown_table(['base', 'target', 'best method', 'AMAP best', 'AMAP - best other (points)',
                                  'original - AMAP (points; the base as given, not fine-tuned)',
                                  'within 0.5 at 70%'], gt, left=3), '']
        ref = [g for g in payload['goals'] if 'gap_to_unpruned_finetuned' in g]
        if ref:
            lines += ['Against the unpruned model fine-tuned with the same budget, recipe and teacher (`unpruned`):',
                      '']
            lines += [markdown_table(['base', 'target', 'unpruned fine-tuned', 'AMAP', 'gap (points)',
                                      'within 0.5 at 70%', 'a lead beyond the std needs (reachable below unpruned)'],
                                     [[g['base'], f'{g["target"]:g}', f'{g["unpruned_finetuned_top1"]:.2f}',
                                       f'{g["amap_top1"]:.2f}', f'{g["gap_to_unpruned_finetuned"]:+.2f}',
                                       {True: 'yes', False: 'NO', None: ''}[
                                           g.get('within_0.5_of_unpruned_finetuned')],
                                       f'{g["lead_needs"]:.2f} ({"yes" if g["lead_reachable"] else "no"})']
                                      for g in ref], left=2), '']
    lines += _curve_tables(payload)
    lines += _overlap_table(payload.get('overlap') or [])
    short = [r for r in payload['rows'] if 'search_final_mac_ratio' in r
             and r['search_final_mac_ratio']['max'] > r['target'] + SEARCH_SLACK]
    if short:
        lines += [f'**Search too short**: the AMAP search ended more than {SEARCH_SLACK} above the target (the target '
                  'guarantee then cut the rest from indicators that had not learned yet): '
                  + ', '.join(f'{r["base"]} {r["target"]:g} {r["method"]} (ended at '
                              f'{r["search_final_mac_ratio"]["max"]:.3f})' for r in short)
                  + '. Give the search more steps (--search-epochs, or a larger --train-subset).', '']
    if payload['failed']:
        lines += [f'**Incomplete**: {len(payload["failed"])} run(s) failed; see `failed` in the JSON.', '']
    if meta.get('not_run'):
        lines += [f'**Not run** ({len(meta["not_run"])} of the grid, collected with --collect): '
                  + ', '.join(f'{r["base"]} {r["target"]:g} {r["method"]} seed {r["seed"]}' for r in meta['not_run'])
                  + '.', '']
    if meta['shard'][1] > 1:
        lines += [f'**Partial**: shard {meta["shard"][0]}/{meta["shard"][1]} only; run once more without --shard to '
                  'collect every run.', '']
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------------ main
def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split('/'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected K/N, got {text!r}') from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f'expected 0 <= K < N, got {text!r}')
    return k, n


def _epochs(text: str) -> list[float]:
    try:
        points = [float(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated epochs such as 0.25,1,3, got {text!r}') from None
    if any(e <= 0 for e in points) or points != sorted(set(points)):
        raise argparse.ArgumentTypeError(f'expected increasing positive epochs, got {text!r}')
    return points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help="ImageFolder dataset (e.g. CIFAR-10) or 'digits'; required unless "
                                                '--quick (which defaults to digits)')
    p.add_argument('--bases', nargs='*', default=None, metavar='NAME=PATH',
                   help='trained base models: amap train run folders (default: BASES_DIR/<model> for --models)')
    p.add_argument('--bases-dir', default='~/.cache/amap-bench', help='where default bases live (%(default)s)')
    p.add_argument('--models', nargs='*', default=None, help=f'default bases to use (default: {DEFAULT_MODELS})')
    p.add_argument('--targets', nargs='*', type=float, default=None, help='MAC ratios (default: 0.5 0.7)')
    p.add_argument('--methods', nargs='*', default=None, choices=list(METHODS), help='default: all but VARIANTS')
    p.add_argument('--seeds', nargs='*', type=int, default=None, help='seeds (default: 0 1 2)')
    p.add_argument('--search-epochs', type=_whole_if_integer, default=None,
                   help='AMAP search epochs, may be fractional: the fine-tune gets the rest of the budget in steps '
                        "(default 0.5, as amap prune searches; quick 3)")
    p.add_argument('--finetune-epochs', type=_whole_if_integer, default=None,
                   help='fine-tune epochs after the AMAP search (default: the rest of 6 epochs in all, quick 5; or '
                        'set by --curve-epochs); search + fine-tune is a whole number of epochs')
    p.add_argument('--curve-epochs', type=_epochs, default=None, metavar='E,E,...',
                   help="top-1 is recorded after these epochs of optimizer steps since the unpruned model (AMAP's "
                        'search counts); the last ends every run, so it sets the budget (default: 0.25,1,3 below '
                        'search + fine-tune epochs, then that total)')
    p.add_argument('--batch-size', type=int, default=None, help='batch size (default 64; quick 32)')
    p.add_argument('--train-subset', type=int, default=None, help='class-balanced training subset (default: all)')
    p.add_argument('--val-subset', type=int, default=None, help='class-balanced evaluation subset (default: all)')
    p.add_argument('--augment', default=None, choices=['none', 'basic', 'strong'],
                   help="training augmentation (default 'basic'; 'none' for digits)")
    p.add_argument('--workers', type=int, default=0, help='data loader processes (default %(default)s)')
    p.add_argument('--work-dir', default=None, help='folder of the runs (default ~/.cache/amap-bench/quality, '
                                                    'quick: ~/.cache/amap-bench/quality_quick)')
    p.add_argument('--records', default=None, metavar='DIR',
                   help='keep a small record of every finished run in DIR and reuse the records found there when the '
                        'work folder lacks the run (commit DIR, e.g. benchmarks/results/quality_runs, so the grid '
                        'continues on another machine)')
    p.add_argument('--collect', action='store_true', help='run nothing: gather the finished runs of the grid into '
                   'one result (e.g. after sharded or separate invocations)')
    p.add_argument('--allow-unfinished', action='store_true', help='use bases whose training has not finished')
    p.add_argument('--shard', type=_shard, default=(0, 1), metavar='K/N',
                   help='run only every N-th run starting at K (e.g. 0/2 and 1/2 in two processes, one per core); '
                        'then run once more without --shard to collect every finished run into one table')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when present), 'cpu', 'cuda' (default %(default)s)")
    p.add_argument('--threads', type=int, default=1, help='torch threads (default %(default)s)')
    p.add_argument('--quick', action='store_true', help='smoke test: a quick base trained on the fly, 1 seed, '
                                                        'target 0.7, amap + magnitude + torch_pruning_magnitude')
    p.add_argument('--quick-base-epochs', type=int, default=8, help='training epochs of the quick base')
    p.add_argument('--equal-latency', type=float, default=None, metavar='S',
                   help='top-1 at equal measured latency instead of the MAC grid: a latency target of S times faster '
                        'than the base against MAC targets (plain and channel_multiple 8) matched to its measured '
                        'latency (benchmarks/equal_latency.py); --targets and --methods are not used')
    p.add_argument('--latency-batch', type=int, default=32, help='batch of --equal-latency (default %(default)s)')
    p.add_argument('--latency-scale', default='total', choices=RESOURCE_SCALES,
                   help="the --equal-latency latency arm's resource_scale (default %(default)s)")
    p.add_argument('--latency-trim-rank', default='score', choices=[r for r in TRIM_RANKS if r != 'auto'],
                   help="the --equal-latency latency arm's trim_rank (default %(default)s)")
    p.add_argument('--latency-search', default='macs', choices=LATENCY_SEARCH,
                   help="the --equal-latency latency arm's latency_search (default %(default)s)")
    p.add_argument('--match-probes', type=int, default=None,
                   help='--equal-latency: candidate MAC targets per MAC arm at most (default 4)')
    p.add_argument('--out', default=None, help='JSON output (default benchmarks/results/quality.json, quick: '
                                               'benchmarks/results/quality_quick.json); Markdown beside it')
    args = p.parse_args(argv)
    q = args.quick
    args.data = args.data or ('digits' if q else None)
    if args.data is None:
        p.error('--data is required (an ImageFolder dataset such as CIFAR-10, or digits)')
    args.augment = args.augment or ('none' if args.data == 'digits' else 'basic')  # flips and crops hurt digits
    args.targets = args.targets or ([0.7] if q else [0.5, 0.7])
    args.methods = args.methods or (QUICK_METHODS if q else [m for m in METHODS if m not in VARIANTS])
    args.seeds = args.seeds if args.seeds else ([0] if q else [0, 1, 2])
    # the search as `amap prune` runs it by default (half an epoch); quick: 3 epochs of the 960-image subset = 90
    # search steps, about what the search needs to reach the target
    args.search_epochs = args.search_epochs if args.search_epochs is not None else (3 if q else 0.5)
    if args.curve_epochs is None:
        if args.finetune_epochs is None:
            args.finetune_epochs = (5 if q else 6) - args.search_epochs
        total = args.search_epochs + args.finetune_epochs
        if total != round(total):
            p.error(f'--search-epochs + --finetune-epochs is the budget of every method: a whole number of epochs; '
                    f'got {total:g}')
        args.curve_epochs = [e for e in CURVE_EPOCHS if e < total] + [float(total)]
    else:
        last = args.curve_epochs[-1]
        if last != round(last) or last < args.search_epochs:
            p.error(f'--curve-epochs: the last point ends the budget: a whole number of epochs, at least '
                    f'--search-epochs ({args.search_epochs}); got {last:g}')
        if args.finetune_epochs is not None and args.search_epochs + args.finetune_epochs != last:
            p.error(f'--curve-epochs ends at {last:g} epochs but --search-epochs + --finetune-epochs is '
                    f'{args.search_epochs + args.finetune_epochs}; pass one of them')
        args.finetune_epochs = round(last) - args.search_epochs
    args.batch_size = args.batch_size or (32 if q else 64)
    if q:
        args.train_subset = args.train_subset or 960
        args.val_subset = args.val_subset or 200
    args.work_dir = args.work_dir or f'~/.cache/amap-bench/{"quality_quick" if q else "quality"}'
    args.out = args.out or f'benchmarks/results/{"quality_quick" if q else "quality"}.json'
    if any(not 0 < t < 1 for t in args.targets):
        p.error('--targets are MAC ratios in (0, 1)')
    if args.equal_latency is not None:
        from benchmarks.equal_latency import MAX_PROBES
        if not args.equal_latency > 1:
            p.error(f'--equal-latency is a speed-up above 1 (e.g. 1.6), got {args.equal_latency:g}')
        if args.latency_batch < 1:
            p.error(f'--latency-batch must be at least 1, got {args.latency_batch}')
        args.match_probes = args.match_probes or MAX_PROBES
        if args.out == f'benchmarks/results/{"quality_quick" if q else "quality"}.json':
            args.out = f'benchmarks/results/{"quality_quick" if q else "quality"}_eqlat.json'
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import version
    tp_version = version('torch-pruning')

    info = machine_info(args.threads)
    data = {'data': str(Path(args.data).expanduser()) if args.data != 'digits' else 'digits', 'img_size': 32,
            'batch_size': args.batch_size, 'num_workers': args.workers, 'train_subset': args.train_subset,
            'val_subset': args.val_subset, 'augment': args.augment}
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.quick and not args.bases:
        bases = {'quick_timm_deit': train_quick_base(work, data, args.quick_base_epochs, args.threads, args.device)}
        skipped: list[dict[str, str]] = []
    else:
        bases, skipped = resolve_bases(args)
        if not bases:
            _log('no base model found: train them first (commands above) or pass --bases NAME=PATH')
            return 2
    if args.equal_latency is not None:
        from benchmarks import equal_latency
        return equal_latency.main(args, bases, data, {
            'command': command_line('quality.py', argv), 'machine': info, 'quick': args.quick, 'data': data,
            'budget': {'search_epochs': args.search_epochs, 'finetune_epochs': args.finetune_epochs,
                       'curve_epochs': args.curve_epochs, 'kd_alpha': 0.5, 'teacher': 'original'},
            'work_dir': str(work), 'bases': {name: str(path) for name, path in bases.items()}})
    from amap.train import read_trained_meta
    plan = [(b, t, m, s) for b in bases for t in args.targets for m in args.methods for s in args.seeds]
    shard, shards = args.shard
    owner: dict[tuple, int] = {}  # a run without a target (unpruned) is one folder: one shard runs all its entries
    mine = [e for i, e in enumerate(plan)
            if owner.setdefault((e[0], e[2], e[3]) if e[2] in TARGETLESS else e, i % shards) == shard]
    _log(f'{len(plan)} runs planned ({len(bases)} bases x {len(args.targets)} targets x {len(args.methods)} methods x '
         f'{len(args.seeds)} seeds)' + (f'; this shard ({shard}/{shards}) runs {len(mine)}' if shards > 1 else ''))
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    from amap.errors import Interrupted
    interrupted = None
    not_run: list[dict[str, Any]] = []
    for i, (base_name, target, method, seed) in enumerate(mine):
        base = bases[base_name]
        base_data = {**data, 'img_size': (read_trained_meta(base) or {}).get('img_size') or data['img_size']}
        _log(f'[{i + 1}/{len(mine)}] {time.perf_counter() - t_start:.0f} s elapsed')
        try:
            runs.append(one_run(args, base_name, base, target, method, seed, base_data))
        except NotRun as e:
            _log(f'not run: {e}')
            not_run.append({'base': base_name, 'target': target, 'method': method, 'seed': seed})
        except Interrupted as e:  # Ctrl-C: the run saved its state; stop the benchmark, keep what is finished
            _log(f'interrupted: {e}; run the same command again to continue')
            interrupted = str(e)
            break
        except Exception as e:  # one broken run must not lose the others: record it and go on
            _log(f'FAILED {base_name} {target:g} {method} seed {seed}: {type(e).__name__}: {e}')
            failed.append({'base': base_name, 'target': target, 'method': method, 'seed': seed,
                           'error': f'{type(e).__name__}: {e}'})
    rows = aggregate(runs)
    overlap = structure_overlap(runs)
    for r in runs:
        r.pop('structure', None)
    plots = plot_curves(rows, Path(args.out))
    base_info = {}
    for name, path in bases.items():
        meta = read_trained_meta(path) or {}
        base_info[name] = {'path': str(path), 'model': meta.get('model'), 'model_kwargs': meta.get('model_kwargs'),
                           'epoch': meta.get('epoch'), 'step': meta.get('step'), 'metrics': meta.get('metrics'),
                           'data': meta.get('data')}
    payload = {
        'meta': {'command': command_line('quality.py', argv), 'machine': info, 'loadavg_end': loadavg(),
                 'quick': args.quick,
                 'complete': not failed and not interrupted and not not_run and args.shard[1] == 1,
                 'interrupted': interrupted, 'not_run': not_run,
                 'shard': list(args.shard), 'seconds': time.perf_counter() - t_start,
                 'data': data, 'targets': args.targets, 'methods': args.methods, 'seeds': args.seeds,
                 'budget': {'search_epochs': args.search_epochs, 'finetune_epochs': args.finetune_epochs,
                            'baseline_finetune_epochs': args.search_epochs + args.finetune_epochs,
                            'curve_epochs': args.curve_epochs,
                            'kd_alpha': 0.5, 'teacher': 'original'},
                 'work_dir': str(work), 'bases': base_info, 'skipped_bases': skipped,
                 'torch_pruning_version': tp_version},
        'rows': rows, 'goals': goals(rows), 'plots': plots, 'overlap': overlap, 'runs': runs, 'failed': failed,
    }
    json_path, md_path = write_results(args.out, payload, render_markdown(payload))
    _log(f'wrote {json_path} and {md_path} ({payload["meta"]["seconds"]:.0f} s)')
    return 130 if interrupted else (1 if failed else 0)


if __name__ == '__main__':
    sys.exit(main())
