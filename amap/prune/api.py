"""``amap.prune``: one call from a trained model to a physically smaller one under a MAC target.

Stages (docs/amap-method.md, section 8): attach indicators -> calibrate (similarity weights, linear-attention
initialisation) -> search (or a baseline criterion) -> target guarantee -> surgery. Every component of the method is
a switch of :class:`PruneConfig`, so an ablation is one flag away.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..macs import count_macs, count_params
from .criteria import CRITERIA, criterion_structure
from .groups import GROUP_KINDS
from .init import attention_difference_init
from .pruner import Pruner
from .search import SearchSettings, search
from .similarity import calibrate_similarity
from .surgery import apply_surgery, describe_structure
from .target import check_target, fit_to_target

__all__ = ['PruneConfig', 'PruneResult', 'prune', 'prepare', 'finalize_structure', 'search_settings', 'resolve_target']


@dataclass
class PruneConfig:
    """Options of :func:`prune`. Defaults are the full method as docs/amap-method.md describes it.

    Args:
        target: MAC target: a ratio in (0, 1) of the unpruned model's MACs, or an absolute MAC count (> 1).
        criterion: ``amap`` (the learned indicators) or a baseline: ``magnitude``, ``magnitude_l2``, ``taylor``,
            ``random``, ``uniform``.
        kinds: Group kinds to prune (``qk``, ``v``, ``mlp``).
        similarity: Fold channel-similarity weights into the indicator (section 4).
        similarity_beta: Strength of the similarity weights.
        head_balance: Every head of a layer keeps the same number of channels during the search (section 3). Off
            (ablation), channels are gated one by one and heads drift to different counts (the paper's channel
            mismatch); the physical model is then balanced afterwards, each head keeping the layer's mean count.
        reweight: Learn a reweight scale per kept channel, folded into the weights at surgery (section 6).
        attn_init: Initialise linear-attention indicators from the attention difference (section 5). Off by
            default: measured on FLatten-DeiT (BENCHMARKS.md), every variant of it ended below the search started
            from ``m = 1`` (-4.9 / -4.9 points at 50% / 70% MACs with ``attn_init_low`` 0.55, -0.5 / -0.1 with
            0.95): Adam moves every indicator at about the same rate, so channels started lower are cut first,
            whatever the task gradient says, and the linear-attention groups start lower than the MLPs.
        attn_init_low: Initial indicator of a layer's least important linear-attention channel (the most important
            gets 1). Times a similarity weight of ``1 - similarity_beta``, a value below ``threshold / (1 -
            similarity_beta)`` gates channels off before the search has seen a gradient.
        calib_batches: Batches of the loader used for calibration (similarity, initialisation, Taylor).
        search_steps: Steps of the search loop (AMAP only).
        lr: Weight learning rate during the search (0 freezes the weights).
        indicator_lr: Indicator learning rate.
        reweight_lr: Reweight learning rate.
        weight_decay: Weight decay of the weights during the search.
        resource_lambda: Final weight of the resource loss.
        lambda_warmup: Fraction of the search over which the resource weight ramps up.
        kd_alpha: Weight of the distillation loss (0: none).
        kd_temperature: Distillation temperature.
        threshold: Indicator score threshold for a kept channel.
        min_keep: Channels every head keeps at least.
        fill: Let the target guarantee grow the structure back up to the target.
        channel_multiple: Round every pruned width (heads x per-head count of q/k or v, the MLP hidden width) to a
            multiple of this in the final structure (8 or 16 suit GEMM kernels); 1 keeps the exact MAC-optimal
            widths. A group left unpruned keeps its full width.
        seed: Seed of everything random in the pruning.
        log_every: Search steps between history records.
    """

    target: float = 0.7
    criterion: str = 'amap'
    kinds: tuple[str, ...] = GROUP_KINDS
    similarity: bool = True
    similarity_beta: float = 0.3
    head_balance: bool = True
    reweight: bool = True
    attn_init: bool = False
    attn_init_low: float = 0.55
    calib_batches: int = 8
    search_steps: int = 200
    lr: float = 5e-5
    indicator_lr: float = 0.02
    reweight_lr: float = 1e-3
    weight_decay: float = 0.05
    resource_lambda: float = 5.0
    lambda_warmup: float = 0.3
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    threshold: float = 0.5
    min_keep: int = 1
    fill: bool = True
    channel_multiple: int = 1
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f'criterion {self.criterion!r} is unknown; choose from {list(CRITERIA)}')
        self.kinds = tuple(self.kinds)
        if not self.kinds or set(self.kinds) - set(GROUP_KINDS):
            raise ConfigError(f'kinds {list(self.kinds)} must be a non-empty subset of {list(GROUP_KINDS)}')
        _check_target_value(self.target)
        if not 0 < self.attn_init_low <= 1:
            raise ConfigError(f'attn_init_low must be in (0, 1], got {self.attn_init_low}')
        if self.channel_multiple < 1:
            raise ConfigError(f'channel_multiple must be >= 1, got {self.channel_multiple}')
        if not self.head_balance and self.criterion != 'amap':
            raise ConfigError('head_balance=False is an ablation of the amap criterion only')


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: The pruned model (an ordinary ``nn.Module``, gates removed, reweights folded).
        structure: Per pruned module: widths per head and kept channel indices.
        macs_before: MACs per image of the original model (counted).
        macs_after: MACs per image of the pruned model (counted).
        target_macs: The target in MACs.
        params_before: Parameters of the original model.
        params_after: Parameters of the pruned model.
        history: Search records (step, losses, MAC ratio, kept channels).
        config: The options used.
        seconds: Wall time per stage.
        base: ``{'architecture': timm name, 'model_kwargs': {...}}`` of the unpruned model (for the artifact).
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

    @property
    def ratio(self) -> float:
        """Achieved MAC ratio (pruned / original)."""
        return self.macs_after / self.macs_before

    def summary(self) -> dict[str, Any]:
        """The numbers, JSON-ready (no model)."""
        return {'macs_before': self.macs_before, 'macs_after': self.macs_after, 'target_macs': self.target_macs,
                'ratio': self.ratio, 'target_ratio': self.target_macs / self.macs_before,
                'params_before': self.params_before, 'params_after': self.params_after, 'seconds': self.seconds,
                'config': self.config}


def _check_target_value(target: float) -> None:
    if not math.isfinite(target) or target <= 0:
        raise ConfigError(f'target {target} must be a MAC ratio in (0, 1), e.g. 0.7 for 70% of the MACs')
    if 1 <= target < 1000:
        raise ConfigError(f'target {target:g} is not a MAC ratio in (0, 1) (e.g. 0.7 for 70% of the MACs); values '
                          f'from 1000 up are read as an absolute MAC count')


def resolve_target(target: float, full_macs: float) -> float:
    """MACs of a target given as a ratio in (0, 1) or as an absolute count (> 1)."""
    _check_target_value(target)
    if target < 1:
        return target * full_macs
    if target >= full_macs:
        raise ConfigError(f'target of {target:.4g} MACs is not below the model\'s {full_macs:.4g} MACs')
    return float(target)


def prepare(model: nn.Module, input_size: tuple[int, int, int], cfg: PruneConfig,
            calib: list[tuple[torch.Tensor, torch.Tensor]]) -> Pruner:
    """Install the indicators and, for the amap criterion, initialise them (attention difference) and fold in the
    similarity weights -- each as the config switches say."""
    pruner = Pruner(model, input_size, kinds=cfg.kinds, head_balance=cfg.head_balance,
                    reweight=cfg.reweight and cfg.criterion == 'amap', threshold=cfg.threshold, min_keep=cfg.min_keep)
    if cfg.criterion == 'amap':
        if cfg.attn_init:
            attention_difference_init(pruner, calib[0][0], low=cfg.attn_init_low, seed=cfg.seed)
        if cfg.similarity:
            calibrate_similarity(pruner, (x for x, _ in calib), beta=cfg.similarity_beta)
    return pruner


def finalize_structure(pruner: Pruner, cfg: PruneConfig, target_macs: float,
                       calib: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fix the final structure at the target: the target guarantee on the searched indicators (amap), or the
    baseline criterion's scores under the same constraints."""
    if cfg.criterion == 'amap':
        counts = None
        if not cfg.head_balance:
            # the physical model needs balanced heads: every head keeps the layer's mean count of the search
            counts = {k: torch.full_like(c, max(1, round(float(c.float().mean()))))
                      for k, c in pruner.hard_counts().items()}
            for ind in pruner.indicators.values():
                ind.head_balance = True
        fit_to_target(pruner, target_macs, counts=counts, fill=cfg.fill, multiple=cfg.channel_multiple)
        return
    criterion_structure(cfg.criterion, pruner, target_macs, batches=calib, seed=cfg.seed, fill=cfg.fill,
                        multiple=cfg.channel_multiple)


def search_settings(cfg: PruneConfig, steps: int | None = None) -> SearchSettings:
    """The search-loop settings of a config (``steps`` overrides ``cfg.search_steps``)."""
    return SearchSettings(
        steps=cfg.search_steps if steps is None else steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        indicator_lr=cfg.indicator_lr, reweight_lr=cfg.reweight_lr, resource_lambda=cfg.resource_lambda,
        lambda_warmup=cfg.lambda_warmup, kd_alpha=cfg.kd_alpha, kd_temperature=cfg.kd_temperature,
        log_every=cfg.log_every, train_weights=cfg.lr > 0)


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
    """Prune a trained model to a MAC target.

    Args:
        model: The trained model (modified in place and returned in the result).
        train_loader: Batches ``(images, labels)`` for calibration and the search.
        target: MAC ratio in (0, 1) or absolute MACs; overrides ``config.target``.
        config: Options (default :class:`PruneConfig`); keyword ``overrides`` set single fields.
        input_size: ``(C, H, W)``; default: taken from the first batch.
        device: Device to run on (default: the model's).
        teacher: Distillation teacher: ``'copy'`` (a frozen copy of the original, default), a module, or None.
        mixup_fn: Optional timm Mixup for the search batches.
        progress: Callback with each search record.
        base: ``{'architecture': ..., 'model_kwargs': ...}`` recorded for :func:`~amap.prune.artifact.save_pruned`
            (default: the timm architecture in ``model.pretrained_cfg`` with no arguments).
        **overrides: Fields of :class:`PruneConfig`.

    Returns:
        A :class:`PruneResult` with the physically smaller model.
    """
    cfg = copy.deepcopy(config) if config is not None else PruneConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f'unknown prune option {k!r}')
        setattr(cfg, k, v)
    cfg.target = target
    cfg.__post_init__()
    torch.manual_seed(cfg.seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    size = _input_size(model, input_size, train_loader)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    macs_before = count_macs(model, size, device=device).total
    params_before = count_params(model)
    if isinstance(teacher, str) and teacher == 'copy':
        teacher = copy.deepcopy(model).eval() if cfg.criterion == 'amap' and cfg.kd_alpha > 0 else None
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    calib = [(x.to(device), y.to(device)) for x, y in itertools.islice(iter(train_loader), cfg.calib_batches)]
    if not calib:
        raise ConfigError('the training loader yielded no batches')
    seconds['setup'] = time.perf_counter() - t0

    history: list[dict] = []
    t0 = time.perf_counter()
    pruner = prepare(model, size, cfg, calib)
    target_macs = resolve_target(cfg.target, pruner.full_macs)
    check_target(pruner, target_macs, cfg.channel_multiple)  # before spending a search on an unreachable target
    if cfg.criterion == 'amap':
        seconds['calibration'] = time.perf_counter() - t0
        t0 = time.perf_counter()
        history = search(pruner, train_loader, target_macs, search_settings(cfg), teacher=teacher, device=device,
                         mixup_fn=mixup_fn, progress=progress)
        seconds['search'] = time.perf_counter() - t0
        t0 = time.perf_counter()
        finalize_structure(pruner, cfg, target_macs, calib)
    else:
        finalize_structure(pruner, cfg, target_macs, calib)
        seconds['calibration'] = time.perf_counter() - t0
        t0 = time.perf_counter()
    structure = describe_structure(pruner)
    apply_surgery(pruner)
    seconds['surgery'] = time.perf_counter() - t0
    macs_after = count_macs(model, size, device=device).total
    return PruneResult(model=model, structure=structure, macs_before=int(macs_before), macs_after=int(macs_after),
                       target_macs=target_macs, params_before=params_before, params_after=count_params(model),
                       history=history, config=asdict(cfg), seconds=seconds, base=base or _base_of(model))


def _base_of(model: nn.Module) -> dict[str, Any]:
    """The timm architecture and the arguments that can be read off the model (other creation arguments, e.g.
    ``img_size``, must be given as ``base=`` to rebuild the artifact)."""
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not arch:
        return {}
    kwargs = {'num_classes': model.num_classes} if isinstance(getattr(model, 'num_classes', None), int) else {}
    return {'architecture': arch, 'model_kwargs': kwargs}
