"""``amap.prune(model, loader, target)``: one call from a trained model to a physically smaller one under a MAC target
(or a latency target measured on this device: ``resource='latency'``).

It drives the stages of :class:`~amap.prune.staged.StagedPruning` (prepare -> calibrate -> search -> finalize -> cut),
as the ``amap prune`` pipeline does. Every component of the method is a switch of :class:`PruneConfig`, so an ablation
is one flag away.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..macs import count_macs, count_params
from ..utils.config import from_mapping
from .config import PruneConfig, SearchSettings, nest_search_options, resolve_target
from .staged import StagedPruning, finalize_structure, prepare

__all__ = ['PruneConfig', 'PruneResult', 'prune', 'prepare', 'finalize_structure', 'resolve_target']

_logger = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: The pruned model (an ordinary ``nn.Module``, gates removed, reweights folded).
        structure: Per pruned module: widths per head and kept channel indices.
        macs_before: MACs per image of the original model (counted).
        macs_after: MACs per image of the pruned model (counted).
        target_macs: The target in MACs (for a latency target: the MACs of the structure selected for it).
        params_before: Parameters of the original model.
        params_after: Parameters of the pruned model.
        history: Search records (step, losses, MAC ratio, kept channels).
        config: The options used.
        seconds: Wall time per stage.
        base: ``{'architecture': timm name, 'model_kwargs': {...}}`` of the unpruned model (for the artifact).
        latency: For a latency target: predicted and measured latency (ms per batch) before and after, the speed-ups,
            the closed loop's attempts and its verdict (see :func:`amap.latency.closed_loop.close_loop`).
    """

    model: nn.Module
    structure: list[dict]
    macs_before: int
    macs_after: int
    target_macs: float
    params_before: int
    params_after: int
    history: list[dict] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    @property
    def ratio(self) -> float:
        """Achieved MAC ratio (pruned / original)."""
        return self.macs_after / self.macs_before

    def summary(self) -> dict[str, Any]:
        """The numbers, JSON-ready (no model)."""
        return {'macs_before': self.macs_before, 'macs_after': self.macs_after, 'target_macs': self.target_macs,
                'ratio': self.ratio, 'target_ratio': self.target_macs / self.macs_before,
                'params_before': self.params_before, 'params_after': self.params_after, 'seconds': self.seconds,
                'config': self.config, **({'latency': self.latency} if self.latency is not None else {})}


def _input_size(model: nn.Module, input_size: tuple[int, int, int] | None, loader: Iterable) -> tuple[int, int, int]:
    if input_size is not None:
        return tuple(input_size)
    x, _ = next(iter(loader))
    return tuple(x.shape[1:])


def prune(
        model: nn.Module,
        train_loader: Iterable,
        target: float = 0.7,
        *,
        config: PruneConfig | None = None,
        input_size: tuple[int, int, int] | None = None,
        device: torch.device | str | None = None,
        teacher: nn.Module | None | str = 'copy',
        mixup_fn: Callable | None = None,
        progress: Callable[[dict], None] | None = None,
        base: dict[str, Any] | None = None,
        **overrides: Any,
) -> PruneResult:
    """Prune a trained model to a MAC target, or to a latency target measured on this device.

    ``amap.prune(model, loader, target=0.6, resource='latency', latency_batch=32, latency_threads=1,
    latency_backend='eager')`` asks for 0.6 of the unpruned model's latency at batch 32 (also ``speedup=1.6`` or
    ``target_ms=...``); the result's ``latency`` holds the predicted and measured latency before and after.

    Args:
        model: The trained model (modified in place and returned in the result).
        train_loader: Batches ``(images, labels)`` for calibration and the search.
        target: MAC ratio in (0, 1) or absolute MACs (a latency ratio with ``resource='latency'``); overrides
            ``config.target``.
        config: Options (default :class:`PruneConfig`); keyword ``overrides`` set single fields.
        input_size: ``(C, H, W)``; default: taken from the first batch.
        device: Device to run on (default: the model's).
        teacher: Distillation teacher: ``'copy'`` (a frozen copy of the original, default), a module, or None.
        mixup_fn: Optional timm Mixup for the search batches.
        progress: Callback with each search record.
        base: ``{'architecture': ..., 'model_kwargs': ...}`` recorded for :func:`~amap.prune.artifact.save_pruned`,
            completed from the model (default: its timm, Hugging Face or torchvision architecture and every argument
            that shapes it, read off the model).
        **overrides: Fields of :class:`PruneConfig`, and of its ``search`` settings by name (``search_steps``,
            ``lr``, ``indicator_lr``, ``kd_alpha``, ...).

    Returns:
        A :class:`PruneResult` with the physically smaller model.
    """
    cfg = _config(config, target, overrides)
    torch.manual_seed(cfg.seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    size = _input_size(model, input_size, train_loader)
    base = _base_of(model, base, size)

    t0 = time.perf_counter()
    macs_before = count_macs(model, size, device=device).total
    params_before = count_params(model)
    teacher = _frozen_teacher(teacher, model, cfg)
    calib = [(x.to(device), y.to(device)) for x, y in itertools.islice(iter(train_loader), cfg.calib_batches)]
    if not calib:
        raise ConfigError('the training loader yielded no batches')
    setup = time.perf_counter() - t0

    job = StagedPruning(model, size, cfg)
    job.prepare()
    job.calibrate(calib)
    job.search(train_loader, teacher=teacher, device=device, mixup_fn=mixup_fn, progress=progress)
    job.finalize()
    structure = job.cut()
    macs_after = count_macs(model, size, device=device).total
    return PruneResult(model=model, structure=structure, macs_before=int(macs_before), macs_after=int(macs_after),
                       target_macs=job.target_macs, params_before=params_before, params_after=count_params(model),
                       history=job.history, config=asdict(cfg), seconds={'setup': setup, **job.seconds},
                       base=base, latency=job.latency)


def _config(config: PruneConfig | None, target: float, overrides: dict[str, Any]) -> PruneConfig:
    """``config`` (default :class:`PruneConfig`) with ``target`` and the keyword overrides, validated."""
    cfg = copy.deepcopy(config) if config is not None else PruneConfig()
    overrides = nest_search_options(overrides)
    unknown = [k for k in overrides if k not in PruneConfig.__dataclass_fields__]
    if unknown:
        raise ConfigError(f'unknown prune option {unknown[0]!r}')
    search = overrides.pop('search', {})
    cfg = dataclasses.replace(cfg, **overrides, target=target)
    if search:
        cfg.search = search if isinstance(search, SearchSettings) else \
            from_mapping(SearchSettings, {**asdict(cfg.search), **search}, where='prune options (search)')
    return cfg


def _frozen_teacher(teacher: nn.Module | None | str, model: nn.Module, cfg: PruneConfig) -> nn.Module | None:
    """The distillation teacher: ``'copy'`` is a frozen copy of ``model`` when the search distils, else None."""
    if isinstance(teacher, str) and teacher == 'copy':
        distils = cfg.search.kd_alpha > 0 or cfg.search.search_loss == 'kd'
        teacher = copy.deepcopy(model).eval() if cfg.searches and distils else None
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    return teacher


def _base_of(model: nn.Module, base: dict[str, Any] | None, size: tuple[int, int, int]) -> dict[str, Any]:
    """The unpruned model's complete description for the artifact (:func:`~amap.train.factory.describe_model`,
    starting from ``base``), read before any pruning; one warning when it does not reproduce the model's shapes
    (``save_pruned`` then refuses to write an artifact that would not load)."""
    from ..train.factory import describe_model
    base = dict(base or {})
    arch, kwargs, bad = describe_model(model, base.get('architecture'), base.get('model_kwargs'))
    out: dict[str, Any] = {'architecture': arch, 'model_kwargs': kwargs, 'input_size': list(size)}
    if bad and arch is None:
        _logger.warning('the architecture of %s cannot be read off it: save_pruned will need architecture= and '
                        'model_kwargs= (or pass base=)', type(model).__name__)
    elif bad:
        out['incomplete'] = bad
        _logger.warning('the pruned model will not be saveable: %s built with %s differs from the model in %s; '
                        "pass base={'architecture': ..., 'model_kwargs': {...}} with the arguments it was created "
                        'with', arch, kwargs, ', '.join(bad[:3]))
    return out
