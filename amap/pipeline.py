"""``amap prune`` end to end: load -> evaluate -> calibrate -> search -> surgery -> fine-tune -> evaluate -> save ->
report, from one :class:`PipelineConfig` (a YAML file, CLI flags, or Python).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_checkpoint
from .data import DataConfig, build_loaders
from .errors import ConfigError, Interrupted
from .latency import measure_latency
from .macs import count_macs, count_params
from .prune.api import PruneConfig, finalize_structure, prepare, resolve_target, search_settings
from .prune.artifact import load_pruned, read_pruned_config, save_pruned
from .prune.search import Search, distillation_loss, task_loss
from .prune.surgery import apply_surgery, describe_structure
from .prune.target import check_target
from .report import REPORT_JSON, REPORT_MD, SEARCH_PNG, STRUCTURE_PNG, write_report
from .train import (
    EpochLoop,
    TrainConfig,
    amp_enabled,
    build_train_state,
    create_model,
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
from .utils.config import check_keys, from_mapping
from .utils.distributed import DistInfo, all_gather_object, barrier, cleanup_distributed, init_distributed
from .utils.interrupt import graceful_stop, stop_reason, stop_requested
from .utils.io import atomic_write_bytes, output_error, remove_dir, to_jsonable
from .utils.runfolder import begin_run, check_resume, file_digest, run_lock, run_record

__all__ = ['PipelineConfig', 'PipelineResult', 'run', 'load_config']

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
    'prune.log_every',
})
"""Settings that may change on ``resume`` (``checkpoint``: the path, whose file's digest must stay the same)."""


@dataclass
class PipelineConfig:
    """One ``amap prune`` job.

    Attributes:
        model: timm name of the model; needed for official/timm weights, optional for a run of ``amap train`` (which
            names its own; a different name is an error).
        checkpoint: The trained weights: an ``amap train`` run folder or ``model.safetensors``, or an official
            FLatten / timm checkpoint (``.pth``, ``.safetensors``) for ``model``.
        model_kwargs: Extra arguments of the model factory.
        data: Data source, augmentation and batch size (per process).
        target: MAC target: ratio in (0, 1) or absolute MACs.
        prune: Options of the pruning method (:class:`amap.prune.PruneConfig` fields: criterion, similarity,
            head_balance, reweight, attn_init, indicator_lr, ...); ``search_steps`` there is overridden by
            ``search_epochs`` unless ``search_steps`` is set here.
        search_epochs: Length of the search in epochs of the training data.
        search_steps: Length of the search in steps (overrides ``search_epochs``).
        finetune_epochs: Fine-tuning epochs after surgery (0: none).
        finetune_lr: Peak fine-tuning learning rate.
        finetune_min_lr: Final fine-tuning learning rate (cosine).
        finetune_warmup_epochs: Fine-tuning warm-up.
        weight_decay: Fine-tuning weight decay.
        clip_grad: Gradient clipping in the fine-tune.
        teacher: ``'original'`` (distil from the unpruned model, in the search and the fine-tune) or ``'none'``.
        kd_alpha: Weight of the distillation loss.
        out: Output folder.
        resume: Continue the run in ``out`` from its last checkpoint.
        overwrite: Replace a previous run in ``out``.
        checkpoint_every: Search steps between search checkpoints (and fine-tune updates between fine-tune
            checkpoints, besides every epoch end); 0 = automatic (about 10 per search).
        seed: Seed of everything.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``.
        amp: ``'auto'`` (float16 autocast + loss scaling on CUDA only), ``'on'``, ``'off'``; search and fine-tune.
        accum_steps: Gradient accumulation: batches per optimiser update, in the search and the fine-tune (a
            step's global batch is ``batch_size x processes x accum_steps``).
        latency: Measure CPU (and CUDA) latency before/after for the report.
        latency_rounds: Timed rounds of the latency measurement.
        max_finetune_steps: Stop the fine-tune after this many updates (quick runs).
        progress: Progress bars on interactive terminals.
    """

    model: str | None = None
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    target: float = 0.7
    prune: dict[str, Any] = field(default_factory=dict)
    search_epochs: float = 1.0
    search_steps: int | None = None
    finetune_epochs: int = 5
    finetune_lr: float = 2e-4
    finetune_min_lr: float = 1e-6
    finetune_warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    teacher: str = 'original'
    kd_alpha: float = 0.5
    out: str = 'runs/prune'
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    seed: int = 0
    device: str = 'auto'
    amp: str = 'auto'
    accum_steps: int = 1
    latency: bool = True
    latency_rounds: int = 15
    max_finetune_steps: int | None = None
    progress: bool = True

    def prune_config(self) -> PruneConfig:
        """The pruning options as a validated :class:`PruneConfig` (target and distillation weight from here)."""
        kd = self.kd_alpha if self.teacher == 'original' else 0.0
        doc = {**self.prune, 'target': self.target, 'kd_alpha': self.prune.get('kd_alpha', kd)}
        return from_mapping(PruneConfig, doc, where='prune options')

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


@dataclass
class PipelineResult:
    """What :func:`run` returns (rank 0 has the files; every rank has the numbers)."""

    model: nn.Module
    report: dict[str, Any]
    out: Path


def _check_contained_out(out: Any, where: str) -> None:
    """A config file may only name an output folder below the current one: a file from someone else must not make
    AMAP write (or, with ``overwrite``, delete its own stage folders) anywhere else. ``--out`` on the command line,
    typed by the user, may point anywhere."""
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f'{where}: out must be a folder name, got {out!r}')
    p = Path(out)
    if p.is_absolute() or p.expanduser() != p or '..' in p.parts:
        raise ConfigError(f'{where}: out {out!r} leaves the current folder; a config file may only name a folder '
                          f'below it (give --out on the command line to write elsewhere)')


def load_config(source: PipelineConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> PipelineConfig:
    """A :class:`PipelineConfig` from a config object, a mapping or a YAML file, with keyword overrides.

    YAML is parsed with ``yaml.safe_load`` (no object tags); unknown keys are errors that name the closest valid key,
    and values are checked against the fields' types (:mod:`amap.utils.config`). A YAML file's ``out`` must stay
    below the current folder (no absolute path, ``~`` or ``..``) unless ``out`` is overridden (``--out``).
    """
    if isinstance(source, PipelineConfig):
        doc: dict[str, Any] = dataclasses.asdict(source)
        where = 'config'
    elif source is None:
        doc, where = {}, 'config'
    elif isinstance(source, Mapping):
        doc, where = dict(source), 'config'
    else:
        import yaml
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f'config file {path} not found')
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'{path}: not valid YAML ({str(e).splitlines()[0]}); only plain YAML is accepted') \
                from None
        if not isinstance(doc, dict):
            raise ConfigError(f'{path}: expected a mapping of options at the top level')
        where = str(path)
        if 'out' in doc and overrides.get('out') is None:
            _check_contained_out(doc['out'], where)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == 'data' and isinstance(value, Mapping):
            doc['data'] = {**(doc.get('data') or {}), **value}
        elif key == 'prune' and isinstance(value, Mapping):
            doc['prune'] = {**(doc.get('prune') or {}), **value}
        else:
            doc[key] = value
    check_keys(PipelineConfig, doc, where)
    data = doc.get('data') or {}
    if isinstance(data, DataConfig):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f'{where}: data must be a mapping of data options, got {data!r}')
    doc['data'] = from_mapping(DataConfig, data, where=f'{where} (data)')
    if not isinstance(doc.get('prune') or {}, Mapping):
        raise ConfigError(f"{where}: prune must be a mapping of pruning options, got {doc['prune']!r}")
    cfg = from_mapping(PipelineConfig, doc, where=where)
    if cfg.accum_steps < 1:
        raise ConfigError(f'{where}: accum_steps must be >= 1, got {cfg.accum_steps}')
    if cfg.teacher not in ('original', 'none'):
        raise ConfigError(f"{where}: teacher must be 'original' or 'none', got {cfg.teacher!r}")
    cfg.prune_config()  # validates the pruning options and the target
    return cfg


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
    model, kwargs = create_model(cfg.model, num_classes=num_classes, img_size=cfg.data.img_size,
                                 model_kwargs=cfg.model_kwargs)
    load_checkpoint(model, cfg.checkpoint)
    return model, cfg.model, kwargs


def _kd_loss_fn(teacher: nn.Module | None, alpha: float):
    def compute_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        loss = task_loss(logits, targets)
        if teacher is not None and alpha > 0:
            with torch.no_grad():
                t_logits = teacher(images)
            loss = (1 - alpha) * loss + alpha * distillation_loss(logits, t_logits)
        return loss, logits
    return compute_loss


def _save_search_state(folder: Path, loop: Search, info: DistInfo) -> None:
    """Checkpoint the search into ``folder`` with the trainer's codec (``step_<N>/`` folders and ``latest.json``)."""
    state = loop.state_dict()
    tensors = {f'{part}.{k}': v for part in ('model', 'pruner') for k, v in state[part].items()}
    doc: dict[str, Any] = {'history': state['history'], 'scaler': state['scaler']}
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
                             'scaler': doc.get('scaler')}
    for part in ('model', 'pruner'):
        state[part] = tensors_under(tensors, part)
    for name in ('opt', 'opt_ind'):
        if name in doc:
            state[name] = optimizer_from_files(tensors, doc[name], prefix=f'{name}.optim')
    loop.load_state_dict(state)
    restore_rng_states(doc, info)


def _settings(cfg: PipelineConfig) -> dict[str, Any]:
    """Every option, the pruning options in full (defaults included; the target once), as JSON values."""
    method = {k: v for k, v in dataclasses.asdict(cfg.prune_config()).items() if k != 'target'}
    return to_jsonable({**dataclasses.asdict(cfg), 'prune': method})


def _begin_run(cfg: PipelineConfig, out: Path, info: DistInfo) -> None:
    """Claim the output folder's names (refusing ones AMAP did not write); resume only the same run."""
    record = {'checkpoint_sha256': file_digest(cfg.checkpoint)}
    begin_run(out, command='prune', names=OWNED_NAMES, resume=cfg.resume, overwrite=cfg.overwrite,
              resumable=(out / CONFIG_FILE).is_file(), record=record, info=info)
    if cfg.resume:
        saved = {**_settings(load_config(out / CONFIG_FILE, out=cfg.out)), **record, **run_record(out, 'prune')}
        check_resume(saved, {**_settings(cfg), **record}, free=RESUME_FREE, where=str(out))


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
    import yaml

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    device = info.device
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
    pcfg = cfg.prune_config()
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    data = build_loaders(cfg.data, distributed=info.distributed, seed=cfg.seed)
    original, arch, arch_kwargs = _load_model(cfg, data.num_classes)
    original.to(device).eval()
    size = (3, cfg.data.img_size, cfg.data.img_size)
    macs_before = count_macs(original, size, device=device).total
    params_before = count_params(original)
    top1_before = evaluate(original, data.val_loader, device=device)['top1']
    seconds['load_and_evaluate'] = time.perf_counter() - t0
    teacher = copy.deepcopy(original).eval() if cfg.teacher == 'original' else None
    if teacher is not None:
        teacher.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ calibrate + search
    t0 = time.perf_counter()
    history: list[dict] = []
    init_dir = out / PRUNED_INIT
    if cfg.resume and (init_dir / 'config.json').exists():
        model = load_pruned(init_dir, device=device)
        init_cfg = read_pruned_config(init_dir)
        structure = init_cfg['structure']
        history = init_cfg['extra'].get('history', [])
        target_macs = init_cfg['extra']['target_macs']
    else:
        model = copy.deepcopy(original)
        calib = _calibration_batches(data, cfg.seed, info, pcfg.calib_batches)
        pruner = prepare(model, size, pcfg, calib)
        target_macs = resolve_target(pcfg.target, pruner.full_macs)
        check_target(pruner, target_macs, pcfg.channel_multiple)  # before spending a search on an unreachable target
        seconds['calibration'] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if pcfg.criterion == 'amap':
            steps = cfg.search_steps or max(1, math.ceil(cfg.search_epochs * data.steps_per_epoch / cfg.accum_steps))
            settings = dataclasses.replace(search_settings(pcfg, steps), accum_steps=cfg.accum_steps,
                                           amp=amp_enabled(cfg.amp, device))
            loop = Search(pruner, target_macs, settings, teacher=teacher, device=device,
                          grad_sync=_average_grads if info.distributed else None,
                          reduce=_mean_over_ranks if info.distributed else None)
            state_dir = out / SEARCH_STATE
            if cfg.resume:
                _load_search_state(state_dir, loop, info)
            every = cfg.checkpoint_every or max(1, steps // 10)
            bar = _progress(cfg, info, total=steps, initial=loop.step, desc='search')

            def on_step(lp: Search) -> None:
                if bar is not None:
                    bar.update(1)
                if lp.done:
                    return
                if lp.step % every == 0:
                    _save_search_state(state_dir, lp, info)
                if stop_requested():
                    if lp.step % every != 0:
                        _save_search_state(state_dir, lp, info)
                    raise Interrupted(f'{stop_reason() or "stopped"} at search step {lp.step}/{steps}: state saved in '
                                      f'{state_dir}; continue with --resume (same --out)', checkpoint=str(state_dir),
                                      step=lp.step)

            def on_record(rec: dict) -> None:
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", macs=f"{rec['mac_ratio']:.3f}",
                                    kept=rec['kept'].get('qk', 0) + rec['kept'].get('v', 0))
                elif info.is_main:
                    _logger.info('search step %d/%d: loss %.4f, MAC ratio %.4f (target %.3f)', rec['step'] + 1,
                                 steps, rec['loss'], rec['mac_ratio'], rec['target_ratio'])

            loop.run(data.train_loader, steps_per_epoch=data.steps_per_epoch, progress=on_record, on_step=on_step)
            if bar is not None:
                bar.close()
            history = loop.history
            seconds['search'] = time.perf_counter() - t0
            t0 = time.perf_counter()
        finalize_structure(pruner, pcfg, target_macs, calib)
        structure = describe_structure(pruner)
        _check_ranks_agree(structure, info)
        apply_surgery(pruner)
        if info.is_main:
            save_pruned(model, init_dir, architecture=arch, model_kwargs=arch_kwargs, structure=structure,
                        extra={'history': history, 'target_macs': target_macs})
        barrier()
        seconds['surgery'] = time.perf_counter() - t0
    model.to(device)
    top1_surgery = evaluate(model, data.val_loader, device=device)['top1']

    # ---------------------------------------------------------------------------------------------- fine-tune
    t0 = time.perf_counter()
    ft_history: list[dict] = []
    top1_final = top1_surgery
    if cfg.finetune_epochs > 0:
        model, ft_history, top1_final = _finetune(cfg, info, data, model, teacher)
    seconds['finetune'] = time.perf_counter() - t0
    model.eval()

    # ------------------------------------------------------------------------------------------- save + report
    macs_after = count_macs(model, size, device=device).total
    report: dict[str, Any] = {
        'model': arch, 'model_kwargs': arch_kwargs, 'checkpoint': cfg.checkpoint,
        'macs': {'before': macs_before, 'after': macs_after, 'ratio': macs_after / macs_before,
                 'target': target_macs, 'target_ratio': target_macs / macs_before},
        'params': {'before': params_before, 'after': count_params(model)},
        'top1': {'before': top1_before, 'after_surgery': top1_surgery, 'after_finetune': top1_final},
        'world_size': info.world_size,
        'structure': structure, 'history': history, 'finetune_history': ft_history,
        'config': cfg.to_dict(),
    }
    if info.is_main:
        t0 = time.perf_counter()
        if cfg.latency:
            report['latency'] = {'cpu': _latency(original, model, size, 'cpu', cfg.latency_rounds)}
            if torch.cuda.is_available():
                report['latency']['cuda'] = _latency(original, model, size, device, cfg.latency_rounds)
        seconds['latency'] = time.perf_counter() - t0
        seconds['total'] = time.perf_counter() - t_start
        report['seconds'] = seconds
        data_info = {'img_size': cfg.data.img_size, 'mean': list(data.mean), 'std': list(data.std),
                     'interpolation': cfg.data.interpolation, 'num_classes': data.num_classes,
                     'class_names': list(data.class_names)}
        save_pruned(model, out / FINAL, architecture=arch, model_kwargs=arch_kwargs, structure=structure,
                    extra={'top1': report['top1'], 'macs': report['macs'], 'params': report['params'],
                           'data': data_info})
        write_report(out, report)
    barrier()
    return PipelineResult(model=model, report=report, out=out)


def _latency(original: nn.Module, pruned: nn.Module, size: tuple[int, int, int], device: Any,
             rounds: int) -> dict[str, Any]:
    o = copy.deepcopy(original).to(device)
    p = copy.deepcopy(pruned).to(device)
    res = measure_latency({'original': o, 'pruned': p}, size, device=device, rounds=rounds)
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
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, min_lr=cfg.finetune_min_lr,
                       warmup_epochs=cfg.finetune_warmup_epochs, weight_decay=cfg.weight_decay,
                       clip_grad=cfg.clip_grad, seed=cfg.seed, amp=cfg.amp)
    state = build_train_state(model, tcfg, updates_per_epoch=max(1, data.steps_per_epoch // cfg.accum_steps),
                              info=info)
    loop = EpochLoop(state, data, epochs=cfg.finetune_epochs, ckpt_dir=Path(cfg.out) / FINETUNE, info=info,
                     compute_loss=_kd_loss_fn(teacher, cfg.kd_alpha if teacher is not None else 0.0),
                     amp=amp_enabled(cfg.amp, info.device), clip_grad=cfg.clip_grad, accum_steps=cfg.accum_steps,
                     seed=cfg.seed, max_steps=cfg.max_finetune_steps, checkpoint_every=cfg.checkpoint_every,
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
