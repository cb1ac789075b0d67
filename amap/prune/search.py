"""The search: train weights, indicators and reweights jointly under a MAC target (docs/amap-method.md, section 3).

Loss per step::

    (1 - kd_alpha) * task + kd_alpha * KD(student, frozen original) + lambda_t * (R(b) / R_target - 1) ** 2

with ``R(b)`` the analytic MACs of the gated structure (differentiable through the straight-through masks) and
``lambda_t`` ramped linearly from 0 to ``resource_lambda`` over the first ``lambda_warmup`` fraction of the steps.
Indicators have their own optimiser (Adam, ``indicator_lr``) and are clamped to ``[0, 1]``; reweights stay positive.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pruner import Pruner

__all__ = ['SearchSettings', 'search', 'distillation_loss', 'task_loss']


@dataclass
class SearchSettings:
    """Hyper-parameters of the search loop (see :class:`amap.prune.api.PruneConfig` for the user-facing options)."""

    steps: int = 200
    lr: float = 5e-5
    weight_decay: float = 0.05
    indicator_lr: float = 0.02
    reweight_lr: float = 1e-3
    resource_lambda: float = 5.0
    lambda_warmup: float = 0.3
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    clip_grad: float | None = 5.0
    log_every: int = 10
    train_weights: bool = True


def task_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with hard labels, or soft-target cross-entropy for mixup/cutmix targets."""
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(teacher || student)`` on temperature-softened distributions, times ``T^2``."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction='batchmean') * t * t


def kept_by_kind(pruner: Pruner) -> dict[str, int]:
    """Total kept channels per group kind (``qk``, ``v``, ``mlp``)."""
    out: dict[str, int] = {}
    groups = pruner.groups()
    for key, counts in pruner.hard_counts().items():
        kind = groups[key].kind
        out[kind] = out.get(kind, 0) + int(counts.sum())
    return out


def _cycle(loader: Iterable) -> Iterable:
    epoch = 0
    while True:
        sampler = getattr(loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def search(
        pruner: Pruner,
        loader: Iterable,
        target_macs: float,
        settings: SearchSettings,
        *,
        teacher: nn.Module | None = None,
        device: torch.device | str = 'cpu',
        mixup_fn: Callable | None = None,
        progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the search loop; returns the history (one record per ``log_every`` steps and the last step).

    Args:
        pruner: The pruner (gates installed, indicators initialised).
        loader: Training batches ``(images, labels)``.
        target_macs: MACs per image to reach.
        settings: Loop hyper-parameters.
        teacher: Frozen original model for distillation (None: no distillation).
        device: Device of the model.
        mixup_fn: Optional timm Mixup applied to each batch.
        progress: Called with each step's record (e.g. to update a progress bar).
    """
    model = pruner.model[0]
    s = settings
    ind_params = pruner.indicator_parameters()
    rw_params = pruner.reweight_parameters()
    weights = [p for p in model.parameters() if p.requires_grad] if s.train_weights else []
    groups = []
    if weights:
        groups.append({'params': weights, 'lr': s.lr, 'weight_decay': s.weight_decay})
    if rw_params:
        groups.append({'params': rw_params, 'lr': s.reweight_lr, 'weight_decay': 0.0})
    opt = torch.optim.AdamW(groups) if groups else None
    opt_ind = torch.optim.Adam(ind_params, lr=s.indicator_lr)
    kd_alpha = s.kd_alpha if teacher is not None else 0.0
    if teacher is not None:
        teacher.eval()
    history: list[dict] = []
    model.train()
    batches = _cycle(loader)
    for step in range(s.steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        logits = model(x)
        task = task_loss(logits, y)
        loss = task
        kd = torch.zeros((), device=logits.device)
        if kd_alpha > 0:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = distillation_loss(logits, t_logits, s.kd_temperature)
            loss = (1 - kd_alpha) * task + kd_alpha * kd
        lam = s.resource_lambda * min(1.0, (step + 1) / max(1, math.ceil(s.lambda_warmup * s.steps)))
        macs = pruner.macs()
        res = lam * (macs / target_macs - 1) ** 2
        loss = loss + res.to(loss.device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f'non-finite loss at search step {step}: lower the learning rate '
                                     '(--lr / --indicator-lr) or disable AMP')
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        opt_ind.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad and weights:
            torch.nn.utils.clip_grad_norm_(weights, s.clip_grad)
        if opt is not None:
            opt.step()
        opt_ind.step()
        with torch.no_grad():
            for p in ind_params:
                p.clamp_(0.0, 1.0)
            for p in rw_params:
                p.clamp_(min=1e-2)
        if step % s.log_every == 0 or step == s.steps - 1:
            with torch.no_grad():
                hard = pruner.hard_macs()
            rec = {'step': step, 'loss': loss.item(), 'task': task.item(), 'kd': kd.item(), 'resource': res.item(),
                   'lambda': lam, 'mac_ratio': hard / pruner.full_macs, 'target_ratio': target_macs / pruner.full_macs,
                   'kept': kept_by_kind(pruner)}
            history.append(rec)
            if progress is not None:
                progress(rec)
    return history
