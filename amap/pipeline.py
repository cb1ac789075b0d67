"""``amap prune`` end to end: load -> calibrate -> search -> cut -> fine-tune -> report (:func:`_run`, top-down), from
one :class:`PipelineConfig` (a YAML file, CLI flags, or Python). The pruning stages are those of
:class:`~amap.prune.staged.StagedPruning`, which :func:`amap.prune` drives too; the pipeline adds the data, the
fine-tune, the evaluations and the report around them.

Runs the same on one CPU and under ``torchrun --nproc_per_node N`` (DDP): every rank computes the same indicators and
masks (gradients of weights, indicators and reweights are averaged over ranks at every search step), metrics are
reduced over ranks, and only rank 0 writes.

Resumable: the search state is checkpointed atomically every ``checkpoint_every`` steps (``out/search_state``), the
structure after surgery is an artifact (``out/pruned_init``) and the fine-tune uses the trainer's checkpoints
(``out/finetune``); ``resume=True`` continues from whichever stage was reached, and ends with the same structure and
weights as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data import DataConfig, build_loaders
from .errors import ConfigError, Interrupted
from .latency import measure_latency
from .macs import count_macs, count_params
from .pipeline_config import CLI_OPTIONS, PipelineConfig, load_config
from .prune.artifact import save_pruned
from .prune.search import Search, distillation_loss, task_loss
from .prune.staged import CutModel, StagedPruning, load_cut
from .report import REPORT_JSON, REPORT_MD, SEARCH_PNG, STRUCTURE_PNG, write_report
from .train import (
    EpochLoop,
    TrainConfig,
    amp_enabled,
    build_train_state,
    evaluate,
    latest_train_state,
    load_trained,
    optimizer_from_files,
    optimizer_to_files,
    read_state,
    read_trained_meta,
    restore_rng_states,
    tensors_under,
    write_state,
)
from .train.factory import describe_model
from .train.from_checkpoint import create_for_checkpoint, fit_image_size
from .utils.distributed import DistInfo, all_gather_object, barrier, cleanup_distributed, init_distributed
from .utils.interrupt import graceful_stop, stop_reason, stop_requested
from .utils.io import atomic_write_bytes, output_error, remove_dir
from .utils.outputs import logits_of
from .utils.runfolder import begin_run, check_resume, file_digest, run_lock, run_record

__all__ = ['PipelineConfig', 'PipelineResult', 'CLI_OPTIONS', 'run', 'load_config']

_logger = logging.getLogger(__name__)

SEARCH_STATE = 'search_state'
PRUNED_INIT = 'pruned_init'
FINETUNE = 'finetune'
FINAL = 'model'
CONFIG_FILE = 'config.yaml'
OWNED_NAMES = (CONFIG_FILE, SEARCH_STATE, PRUNED_INIT, FINETUNE, FINAL, REPORT_JSON, REPORT_MD, STRUCTURE_PNG,
               SEARCH_PNG)
"""Every name ``amap prune`` writes in its output folder (see :mod:`amap.utils.runfolder`)."""
RESUME_FREE = frozenset({
    'out', 'resume', 'overwrite', 'device', 'progress', 'latency', 'latency_rounds', 'checkpoint_every',
    'max_finetune_steps', 'checkpoint', 'data.num_workers', 'data.eval_batch_size', 'data.val_subset',
    'prune.search.log_every',
})
"""Settings that may change on ``resume`` (``checkpoint``: the path, whose file's digest must stay the same)."""


@dataclass
class PipelineResult:
    """What :func:`run` returns (rank 0 has the files; every rank has the numbers)."""

    model: nn.Module
    report: dict[str, Any]
    out: Path


# ---------------------------------------------------------------------------------------------------------- helpers
def _average_grads(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` over ranks, so every rank takes the same step."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _calibration_batches(data: Any, seed: int, info: DistInfo, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` *global* batches of epoch 0, identical on every rank.

    Calibration statistics (similarity weights, the linear-attention initialisation, Taylor scores) must not depend
    on the rank, or the ranks would start from different indicators: every rank reads the same global batches (the
    union of the ranks' batches, in the order a single process with the same global batch would read them).
    """
    from torch.utils.data import DataLoader

    from .data import EpochSampler
    dataset = data.train_loader.dataset
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, seed=seed, shuffle=True)
    sampler.set_epoch(0)
    loader = DataLoader(dataset, batch_size=data.train_loader.batch_size * info.world_size, sampler=sampler,
                        num_workers=0)
    return [(x.to(info.device), y.to(info.device)) for x, y in itertools.islice(iter(loader), n)]


def _check_ranks_agree(structure: list[dict], info: DistInfo) -> None:
    """Under DDP every rank must have found the same structure; a difference is a bug, never silently shipped."""
    if not info.distributed:
        return
    structures = all_gather_object(structure)
    if any(s != structures[0] for s in structures[1:]):
        raise RuntimeError('ranks found different pruning structures; indicators diverged across processes')


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _load_model(cfg: PipelineConfig, num_classes: int) -> tuple[nn.Module, str, dict[str, Any]]:
    """The trained model, its timm name and the exact arguments it was created with."""
    if cfg.checkpoint is None:
        raise ConfigError('no checkpoint: pass --checkpoint (an amap train run, or official/timm weights for '
                          '--model)')
    meta = read_trained_meta(cfg.checkpoint) if Path(cfg.checkpoint).exists() else None
    if meta is not None:
        if cfg.model and cfg.model != meta['model']:
            raise ConfigError(f'--model {cfg.model} does not match --checkpoint {cfg.checkpoint}, which holds '
                              f'{meta["model"]}; drop --model (an amap run names its model)')
        trained_at = meta.get('img_size')
        if trained_at and int(trained_at) != cfg.data.img_size:
            raise ConfigError(f'--img-size {cfg.data.img_size} does not match the {trained_at} px --checkpoint '
                              f'{cfg.checkpoint} was trained at; pass --img-size {trained_at}')
        model = load_trained(cfg.checkpoint)
        return model, meta['model'], dict(meta.get('model_kwargs') or {})
    if not cfg.model:
        raise ConfigError(f'--checkpoint {cfg.checkpoint} is not an amap train run; pass --model NAME to build its '
                          f'architecture')
    model, kwargs = create_for_checkpoint(cfg.model, cfg.checkpoint, data_classes=num_classes,
                                          img_size=cfg.data.img_size, num_classes=cfg.num_classes,
                                          reset_head=cfg.reset_head, model_kwargs=cfg.model_kwargs)
    name, kwargs, _ = describe_model(model, cfg.model, kwargs)  # hf:/torchvision: models by class + every argument
    return model, name or cfg.model, kwargs


def _fit_img_size(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with the input size resolved: ``--img-size`` where given, else the size the checkpoint was made for
    (an ``amap train`` run's, or a foreign checkpoint's position embedding), else 32. A given size that contradicts
    the checkpoint is an error naming both (here for foreign checkpoints, in :func:`_load_model` for runs)."""
    given = cfg.data.img_size
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    size = given
    if ckpt is not None and ckpt.exists():
        meta = read_trained_meta(ckpt)
        if meta is not None:
            size = given or meta.get('img_size')
        elif cfg.model and ckpt.is_file():
            size = fit_image_size(ckpt, given or DataConfig().img_size, given=given is not None)
    size = size or DataConfig().img_size
    return cfg if size == given else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, img_size=size))


def _kd_loss_fn(teacher: nn.Module | None, alpha: float):
    def compute_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = logits_of(model(images))
        loss = task_loss(logits, targets)
        if teacher is not None and alpha > 0:
            with torch.no_grad():
                t_logits = logits_of(teacher(images))
            loss = (1 - alpha) * loss + alpha * distillation_loss(logits, t_logits)
        return loss, logits
    return compute_loss


def _save_search_state(folder: Path, loop: Search, info: DistInfo) -> None:
    """Checkpoint the search into ``folder`` with the trainer's codec (``step_<N>/`` folders and ``latest.json``)."""
    state = loop.state_dict()
    tensors = {f'{part}.{k}': v for part in ('model', 'pruner') for k, v in state[part].items()}
    doc: dict[str, Any] = {'history': state['history'], 'scaler': state['scaler'], 'mu': state['mu']}
    for name, opt in (('opt', loop.opt), ('opt_ind', loop.opt_ind)):
        if opt is not None:
            opt_tensors, doc[name] = optimizer_to_files(opt, prefix=f'{name}.optim')
            tensors.update(opt_tensors)
    write_state(folder, step=loop.step, tensors=tensors, doc=doc, info=info)


def _load_search_state(folder: Path, loop: Search, info: DistInfo) -> None:
    """Continue the search from the latest checkpoint in ``folder``, if there is one."""
    latest = latest_train_state(folder)
    if latest is None:
        return
    tensors, doc = read_state(latest)
    state: dict[str, Any] = {'step': doc['step'], 'history': doc['history'], 'opt': None,
                             'scaler': doc.get('scaler'), 'mu': doc.get('mu', 0.0)}
    for part in ('model', 'pruner'):
        state[part] = tensors_under(tensors, part)
    for name in ('opt', 'opt_ind'):
        if name in doc:
            state[name] = optimizer_from_files(tensors, doc[name], prefix=f'{name}.optim')
    loop.load_state_dict(state)
    restore_rng_states(doc, info)


def _begin_run(cfg: PipelineConfig, out: Path, info: DistInfo) -> None:
    """Claim the output folder's names (refusing ones AMAP did not write); resume only the same run."""
    record = {'checkpoint_sha256': file_digest(cfg.checkpoint)}
    begin_run(out, command='prune', names=OWNED_NAMES, resume=cfg.resume, overwrite=cfg.overwrite,
              resumable=(out / CONFIG_FILE).is_file(), record=record, info=info)
    if cfg.resume:
        saved = {**load_config(out / CONFIG_FILE, out=cfg.out).to_dict(), **record, **run_record(out, 'prune')}
        check_resume(saved, {**cfg.to_dict(), **record}, free=RESUME_FREE, where=str(out))


def _prepare_out(cfg: PipelineConfig, out: Path, info: DistInfo) -> None:
    leftovers = [p for p in (SEARCH_STATE, PRUNED_INIT, FINETUNE, FINAL) if (out / p).exists()]
    if leftovers and not cfg.resume:
        if not cfg.overwrite:
            raise ConfigError(f'{out} holds a previous run ({", ".join(leftovers)}); pass --resume to continue it or '
                              f'--overwrite to start afresh')
        if info.is_main:
            for p in leftovers:
                remove_dir(out / p)
    barrier()


# ---------------------------------------------------------------------------------------------------------- the run
def run(config: PipelineConfig | Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any) -> \
        PipelineResult:
    """Run the pipeline (see the module docstring); under ``torchrun`` every process calls it.

    Raises:
        ConfigError / ModelError / DataError / CheckpointError: invalid configuration, model, data or checkpoint.
        Interrupted: SIGINT/SIGTERM arrived; the run stopped after a complete step and saved its state
            (``resume=True`` continues it).
    """
    cfg = load_config(config, **overrides)
    info = init_distributed(cfg.device)
    try:
        with run_lock(cfg.out, info=info), graceful_stop():  # run folder: one writer
            return _run(cfg, info)
    finally:
        cleanup_distributed(info)


def _run(cfg: PipelineConfig, info: DistInfo) -> PipelineResult:
    """load -> calibrate -> search -> cut -> fine-tune -> report, each stage resumed where a previous run stopped."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    cfg = _fit_img_size(cfg)
    device, size = info.device, (3, cfg.data.img_size, cfg.data.img_size)
    out = _open_out(cfg, info)
    torch.manual_seed(cfg.seed)

    # load the trained model and measure it
    t0 = time.perf_counter()
    data = build_loaders(cfg.data, distributed=info.distributed, seed=cfg.seed)
    original, arch, arch_kwargs = _load_model(cfg, data.num_classes)
    original.to(device).eval()
    before = {'macs': count_macs(original, size, device=device).total, 'params': count_params(original),
              'top1': evaluate(original, data.val_loader, device=device)['top1']}
    seconds['load_and_evaluate'] = time.perf_counter() - t0
    teacher = copy.deepcopy(original).eval().requires_grad_(False) if cfg.teacher == 'original' else None

    # calibrate -> search -> cut (the stages of StagedPruning), or the cut model a previous run saved
    cut = _prune(cfg, info, data, original, teacher, size, base=(arch, arch_kwargs), seconds=seconds)
    model = cut.model.to(device)
    top1_surgery = evaluate(model, data.val_loader, device=device)['top1']

    # fine-tune
    t0 = time.perf_counter()
    tuned = cfg.finetune_steps is not None or cfg.finetune_epochs > 0
    model, ft_history, top1_final = _finetune(cfg, info, data, model, teacher) if tuned else (model, [], top1_surgery)
    seconds['finetune'] = time.perf_counter() - t0
    model.eval()

    # report (rank 0 writes it with the final model)
    macs_after = count_macs(model, size, device=device).total
    report: dict[str, Any] = {
        'model': arch, 'model_kwargs': arch_kwargs, 'checkpoint': cfg.checkpoint,
        'macs': {'before': before['macs'], 'after': macs_after, 'ratio': macs_after / before['macs'],
                 'target': cut.target_macs, 'target_ratio': cut.target_macs / before['macs']},
        'params': {'before': before['params'], 'after': count_params(model)},
        'top1': {'before': before['top1'], 'after_surgery': top1_surgery, 'after_finetune': top1_final},
        'world_size': info.world_size,
        'structure': cut.structure, 'history': cut.history, 'finetune_history': ft_history,
        'config': cfg.to_dict(),
    }
    if cut.latency is not None:  # a latency target: predicted and measured latency (amap.latency.closed_loop)
        report['latency_target'] = cut.latency
    if info.is_main:
        _write_results(cfg, out, data, original, model, report, base=(arch, arch_kwargs), seconds=seconds)
        seconds['total'] = time.perf_counter() - t_start
        write_report(out, report)
    barrier()
    return PipelineResult(model=model, report=report, out=out)


def _open_out(cfg: PipelineConfig, info: DistInfo) -> Path:
    """The output folder, created, checked for a previous run (see :func:`_prepare_out`), with the config saved."""
    import yaml

    out = Path(cfg.out)
    if info.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(out, e, atomic=False) from None
    _begin_run(cfg, out, info)  # run folder: owned names, --resume of the same run
    _prepare_out(cfg, out, info)
    if info.is_main:
        atomic_write_bytes(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    return out


def _prune(cfg: PipelineConfig, info: DistInfo, data: Any, original: nn.Module, teacher: nn.Module | None,
           size: tuple[int, int, int], *, base: tuple[str, dict[str, Any]], seconds: dict[str, float]) -> CutModel:
    """The pruning stages on a copy of ``original``; the cut model is saved in ``out/pruned_init``, and a run
    resumed after that stage loads it from there."""
    folder = Path(cfg.out) / PRUNED_INIT
    if cfg.resume and (folder / 'config.json').exists():
        return load_cut(folder, device=info.device)
    t0 = time.perf_counter()
    calib = _calibration_batches(data, cfg.seed, info, cfg.prune.calib_batches)  # identical on every rank
    seconds['calibration'] = time.perf_counter() - t0
    job = StagedPruning(copy.deepcopy(original), size, cfg.prune, progress=cfg.progress and info.is_main)
    job.prepare()
    job.calibrate(calib)
    _search(cfg, info, data, job, teacher)
    job.finalize()
    _check_ranks_agree(job.cut(), info)
    if info.is_main:
        job.save_cut(folder, architecture=base[0], model_kwargs=base[1])
    barrier()
    for stage, s in job.seconds.items():
        seconds[stage] = seconds.get(stage, 0.0) + s
    return job.result()


def _search(cfg: PipelineConfig, info: DistInfo, data: Any, job: StagedPruning, teacher: nn.Module | None) -> None:
    """The search stage over ``search_steps`` (or ``search_epochs``), checkpointed in ``out/search_state``."""
    steps = cfg.search_steps or max(1, math.ceil(cfg.search_epochs * data.steps_per_epoch / cfg.accum_steps))
    checkpoints = _SearchCheckpoints(cfg, info, steps)
    job.search(data.train_loader, teacher=teacher, device=info.device,
               grad_sync=_average_grads if info.distributed else None,
               reduce=_mean_over_ranks if info.distributed else None, restore=checkpoints.restore,
               steps_per_epoch=data.steps_per_epoch, progress=checkpoints.on_record, on_step=checkpoints.on_step,
               steps=steps, accum_steps=cfg.accum_steps, amp=amp_enabled(cfg.amp, info.device))
    checkpoints.close()


class _SearchCheckpoints:
    """The search loop's state in ``out/search_state``: loaded on ``--resume``, saved every ``checkpoint_every``
    steps and when a stop is requested (then the run ends with :class:`Interrupted`); progress shown on the way."""

    def __init__(self, cfg: PipelineConfig, info: DistInfo, steps: int) -> None:
        self.cfg, self.info, self.steps = cfg, info, steps
        self.folder = Path(cfg.out) / SEARCH_STATE
        self.every = cfg.checkpoint_every or max(1, steps // 10)
        self.bar = None

    def restore(self, loop: Search) -> None:
        if self.cfg.resume:
            _load_search_state(self.folder, loop, self.info)
        self.bar = _progress(self.cfg, self.info, total=self.steps, initial=loop.step, desc='search')

    def on_step(self, loop: Search) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if loop.done:
            return
        if loop.step % self.every == 0:
            _save_search_state(self.folder, loop, self.info)
        if stop_requested():
            if loop.step % self.every != 0:
                _save_search_state(self.folder, loop, self.info)
            raise Interrupted(f'{stop_reason() or "stopped"} at search step {loop.step}/{self.steps}: state saved in '
                              f'{self.folder}; continue with --resume (same --out)', checkpoint=str(self.folder),
                              step=loop.step)

    def on_record(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", macs=f"{rec['mac_ratio']:.3f}",
                                 kept=rec['kept'].get('qk', 0) + rec['kept'].get('v', 0))
        elif self.info.is_main:
            _logger.info('search step %d/%d: loss %.4f, MAC ratio %.4f (target %.3f)', rec['step'] + 1, self.steps,
                         rec['loss'], rec['mac_ratio'], rec['target_ratio'])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_results(cfg: PipelineConfig, out: Path, data: Any, original: nn.Module, model: nn.Module,
                   report: dict[str, Any], *, base: tuple[str, dict[str, Any]], seconds: dict[str, float]) -> None:
    """Rank 0: the latency measurement and the final artifact ``out/model`` (the report then gets ``seconds``)."""
    t0 = time.perf_counter()
    size = (3, cfg.data.img_size, cfg.data.img_size)
    if cfg.latency:
        checked = report.get('latency_target') or {}  # a latency target's batch was timed in its check: not again
        skip = checked.get('batch') if checked.get('device_type') == 'cpu' else None
        report['latency'] = {'cpu': _latency(original, model, size, 'cpu', cfg.latency_rounds,
                                             tuple(b for b in (1, 32) if b != skip))}
        if torch.cuda.is_available():
            report['latency']['cuda'] = _latency(original, model, size, next(model.parameters()).device,
                                                 cfg.latency_rounds)
    seconds['latency'] = time.perf_counter() - t0
    report['seconds'] = seconds
    data_info = {'img_size': cfg.data.img_size, 'mean': list(data.mean), 'std': list(data.std),
                 'interpolation': cfg.data.interpolation, 'num_classes': data.num_classes,
                 'class_names': list(data.class_names)}
    save_pruned(model, out / FINAL, architecture=base[0], model_kwargs=base[1], structure=report['structure'],
                extra={'top1': report['top1'], 'macs': report['macs'], 'params': report['params'], 'data': data_info})


def _latency(original: nn.Module, pruned: nn.Module, size: tuple[int, int, int], device: Any,
             rounds: int, batches: tuple[int, ...] = (1, 32)) -> dict[str, Any]:
    o = copy.deepcopy(original).to(device)
    p = copy.deepcopy(pruned).to(device)
    res = measure_latency({'original': o, 'pruned': p}, size, device=device, rounds=rounds, batch_sizes=batches)
    return {'original': res['original'], 'pruned': res['pruned'], '_meta': res['_meta']}


def _progress(cfg: PipelineConfig, info: DistInfo, **kwargs: Any):
    import sys

    if not (cfg.progress and info.is_main and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm
    return tqdm(**kwargs)


def _finetune(cfg: PipelineConfig, info: DistInfo, data: Any, model: nn.Module,
              teacher: nn.Module | None) -> tuple[nn.Module, list[dict], float]:
    """Fine-tune ``model`` with the trainer's epoch loop (distilling from ``teacher``), checkpointing in
    ``out/finetune``; returns the model, the per-epoch evaluations and the final top-1."""
    per_epoch = max(1, data.steps_per_epoch // cfg.accum_steps)
    steps, epochs = cfg.finetune_steps, cfg.finetune_epochs
    # the cosine schedule in timm's terms: epochs of updates, and the warm-up in those epochs
    sched_epochs, sched_per_epoch, sched_warmup = epochs, per_epoch, cfg.finetune_warmup_epochs
    if steps is not None:  # exactly `steps` updates: one schedule "epoch" of that many, the last data epoch cut short
        epochs = math.ceil(steps / per_epoch)
        sched_epochs, sched_per_epoch, sched_warmup = 1, steps, cfg.finetune_warmup_epochs * per_epoch / steps
    tcfg = TrainConfig(epochs=sched_epochs, lr=cfg.finetune_lr, min_lr=cfg.finetune_min_lr, warmup_epochs=sched_warmup,
                       weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad, seed=cfg.seed, amp=cfg.amp)
    state = build_train_state(model, tcfg, updates_per_epoch=sched_per_epoch, info=info)
    stop = min((n for n in (steps, cfg.max_finetune_steps) if n is not None), default=None)
    loop = EpochLoop(state, data, epochs=epochs, ckpt_dir=Path(cfg.out) / FINETUNE, info=info,
                     compute_loss=_kd_loss_fn(teacher, cfg.kd_alpha if teacher is not None else 0.0),
                     amp=amp_enabled(cfg.amp, info.device), clip_grad=cfg.clip_grad, accum_steps=cfg.accum_steps,
                     seed=cfg.seed, max_steps=stop, checkpoint_every=cfg.checkpoint_every,
                     progress=cfg.progress and info.is_main, desc='fine-tune', step_name='fine-tune step')
    latest = latest_train_state(loop.ckpt_dir) if cfg.resume else None
    if latest is not None:
        loop.resume(latest)

    def end_of_epoch() -> float:
        metrics = evaluate(state.model, data.val_loader, device=info.device)
        state.history.append({'epoch': state.epoch, 'step': state.step, **metrics})
        if info.is_main:
            _logger.info('fine-tune epoch %d: val top-1 %.2f%%', state.epoch, metrics['top1'])
        return metrics['top1']

    top1 = loop.run(end_of_epoch)
    if top1 is None:  # stopped by max_finetune_steps inside an epoch: evaluate the final weights
        top1 = evaluate(state.model, data.val_loader, device=info.device)['top1']
    return state.module, list(state.history), top1
