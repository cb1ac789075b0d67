"""The search: train weights, indicators and reweights jointly under a resource target (docs/amap-method.md, section 3).

Loss per step::

    (1 - kd_alpha) * task + kd_alpha * KD(student, frozen original) + lambda_t * (r - 1) ** 2 + mu_t * (r - 1)

with ``r = R(b) / R_target``, ``R(b)`` the cost of the gated structure in the pruner's resource
(:meth:`~amap.prune.pruner.Pruner.cost`: the analytic MACs, or the smooth latency model; differentiable through the
straight-through masks) and ``lambda_t`` ramped linearly from 0 to ``resource_lambda`` over the first
``lambda_warmup`` fraction of the steps. The quadratic penalty alone settles above the target wherever the task's
gradient outweighs its shrinking pull near ``r = 1``; with ``resource_control='dual'`` the multiplier ``mu`` (a
Lagrange multiplier, 0 with ``'penalty'``) grows while the structure is above the target after the warm-up and shrinks
below it (never under 0), to keep pushing where the penalty stalls; not shown to help yet (on a random-weight model
it overshot the target, docs/amap-method.md section 11). Indicators have their own optimiser
(``indicator_opt``, ``indicator_lr``; :mod:`amap.prune.indicator_opt`) and are clamped to ``[0, upper]`` (``upper``
is 1 unless an initialisation started them above it); reweights stay positive.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AmapError, ConfigError
from ..utils.outputs import logits_of
from .indicator_opt import INDICATOR_OPTIMIZERS, indicator_optimizer
from .pruner import Pruner
from .resource import Resource
from .target import min_cost

__all__ = ['DEFAULT_STEPS', 'GATES', 'INDICATOR_SCHEDULES', 'RESOURCE_CONTROLS', 'RESOURCE_SCALES', 'SearchSettings',
           'Search', 'distillation_loss', 'task_loss', 'kept_by_kind']

RESOURCE_CONTROLS = ('penalty', 'dual')
GATES = ('binary', 'ramp')
INDICATOR_SCHEDULES = ('constant', 'cosine')
SEARCH_LOSSES = ('mixed', 'kd')
RESOURCE_SCALES = ('total', 'prunable')


DEFAULT_STEPS = 200


@dataclass
class SearchSettings:
    """Settings of the search loop: the one declaration of each (``PruneConfig.search``, the ``amap prune`` flags and
    the ``prune: search:`` section of its YAML all come from these fields).

    Attributes:
        steps: Search length in optimiser steps (null: 200). ``amap prune`` sets it from its ``search_steps`` or
            ``search_epochs``, lengths in steps or epochs of its data.
        lr: Weight learning rate during the search (0 freezes the weights).
        weight_decay: Weight decay of the weights during the search.
        indicator_lr: Indicator learning rate.
        indicator_schedule: Indicator learning rate over the search: constant, or cosine (decayed to 0 by the last
            step, so the structure settles and the weights adapt to it before the cut; an option under evaluation).
        indicator_opt: Indicator optimiser: adam (per-channel normalisation), group_adam (one second moment per
            channel group) or sgd (momentum 0.9).
        gate: How the search gates a kept channel: ramp (ours, the default: scaled by
            ``clip((s - threshold) / (w - threshold), 0, 1)``, 1 at the start and 0 at the threshold, so a falling
            indicator fades its channel out and the task loss pushes back as the channel matters; folded into the
            reweights at the cut, exactly) or binary (1, the paper's straight-through gate; the gradient at a kept
            channel is then the unpruned model's, mostly noise at a trained optimum). Ramp: +0.54 top-1 over binary
            at 50% of the MACs on FLatten-DeiT micro (6 seeds, BENCHMARKS.md).
        reweight_lr: Reweight learning rate.
        resource_lambda: Final weight of the resource loss.
        lambda_warmup: Fraction of the search over which the resource weight ramps up.
        resource_control: penalty (the quadratic resource loss alone) or dual (plus a multiplier that grows while the
            structure is above the target; an option under evaluation).
        dual_rate: Growth of the dual multiplier: 10% above the target for a tenth of the search adds
            ``dual_rate * resource_lambda`` to it.
        resource_scale: What ``r`` measures: total (``R(b) / R_target``) or prunable (the part the structure can
            change: ``(R(b) - R_min) / (R_target - R_min)``, ``R_min`` the cost of the smallest structure allowed).
            A latency model carries a large fixed part at a large batch (norms, activations, reshapes), so a total
            ratio pulls weakly: a 1.6x latency search on the converged FLatten-DeiT micro at batch 32 stopped at 0.76
            of the latency for 0.625, and the target guarantee's trim cut the q/k channels to half (an option under
            evaluation, BENCHMARKS.md).
        search_loss: What the search minimises besides the resource loss: mixed (``(1 - kd_alpha) task + kd_alpha
            KD``, the fine-tune's loss) or kd (distillation from the original alone: its gradient is zero at the
            start, so a gate feels only how far its fading moves the outputs from the original's, free of the label
            noise of the task loss; needs a teacher).
        kd_alpha: Weight of the distillation loss (0: none); ``amap prune`` also fine-tunes with it.
        kd_temperature: Distillation temperature.
        clip_grad: Gradient-norm clipping of the weights during the search (null: none).
        log_every: Search steps between history records.
        accum_steps: Batches per optimiser step (``amap prune`` sets it from its own ``accum_steps``).
        amp: Float16 autocast with loss scaling on CUDA (``amap prune`` sets it from its own ``amp``).
    """

    steps: int | None = field(default=None, metadata={'cli': False})
    lr: float = field(default=5e-5, metadata={'flags': ('--search-lr',)})
    weight_decay: float = field(default=0.05, metadata={'flags': ('--search-weight-decay',)})
    indicator_lr: float = 0.02
    indicator_schedule: str = field(default='constant', metadata={'choices': INDICATOR_SCHEDULES})
    indicator_opt: str = field(default='adam', metadata={'choices': INDICATOR_OPTIMIZERS})
    gate: str = field(default='ramp', metadata={'choices': GATES, 'flags': ('--search-gate',)})
    reweight_lr: float = 1e-3
    resource_lambda: float = 5.0
    lambda_warmup: float = 0.3
    resource_control: str = field(default='penalty', metadata={'choices': RESOURCE_CONTROLS})
    dual_rate: float = 0.1
    resource_scale: str = field(default='total', metadata={'choices': RESOURCE_SCALES})
    search_loss: str = field(default='mixed', metadata={'choices': SEARCH_LOSSES})
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    clip_grad: float | None = field(default=5.0, metadata={'flags': ('--search-clip-grad',)})
    log_every: int = field(default=10, metadata={'min': 1})
    accum_steps: int = field(default=1, metadata={'cli': False})
    amp: bool = field(default=False, metadata={'cli': False})

    @property
    def train_weights(self) -> bool:
        """Whether the search trains the weights (``lr > 0``) besides the indicators and reweights."""
        return self.lr > 0

    @property
    def total_steps(self) -> int:
        """``steps``, or the default length when it is not set."""
        return DEFAULT_STEPS if self.steps is None else self.steps


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


def _epoch_batches(loader: Iterable, start_step: int, steps_per_epoch: int) -> Iterator:
    """Batches from global step ``start_step`` on, epoch after epoch (``sampler.set_epoch(e)`` each epoch).

    With :mod:`amap.data` loaders a resumed run skips the consumed samples without loading them
    (``set_epoch(e, skip=...)``) and gets the very batches an uninterrupted run would have; other loaders are
    replayed and the consumed batches dropped.
    """
    epoch, within = divmod(start_step, steps_per_epoch)
    while True:
        sampler = getattr(loader, 'sampler', None)
        skipped = 0
        if hasattr(sampler, 'set_epoch'):
            try:
                sampler.set_epoch(epoch, skip=within * loader.batch_size)
                skipped = within
            except TypeError:
                sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i + skipped >= steps_per_epoch:
                break
            if i + skipped >= within:
                yield batch
        epoch, within = epoch + 1, 0


class Search:
    """The search loop as an object whose state can be saved and restored between any two steps.

    Args:
        pruner: The pruner (gates installed, indicators initialised).
        target_macs: Cost to reach, in the pruner's resource units (MACs per image by default).
        settings: Loop hyper-parameters.
        teacher: Frozen original model for distillation (None: no distillation).
        device: Device of the model.
        mixup_fn: Optional timm Mixup applied to each batch.
        grad_sync: Called after every backward (e.g. an all-reduce of the gradients of the weights, indicators
            and reweights under DDP, so that every rank keeps identical indicators and masks).
        reduce: Averages logged losses over ranks (under DDP), so the history describes the global batch.
    """

    def __init__(
            self,
            pruner: Pruner,
            target_macs: float,
            settings: SearchSettings,
            *,
            teacher: nn.Module | None = None,
            device: torch.device | str = 'cpu',
            mixup_fn: Callable | None = None,
            grad_sync: Callable[[list[nn.Parameter]], None] | None = None,
            reduce: Callable[[Tensor], Tensor] | None = None,
            report: Resource | None = None,
    ) -> None:
        self.pruner, self.target_macs, self.settings = pruner, target_macs, settings
        self.report = report  # another resource whose ratio the history records (a latency target searched on MACs)
        self.reduce = reduce
        self.teacher, self.device, self.mixup_fn, self.grad_sync = teacher, torch.device(device), mixup_fn, grad_sync
        s = settings
        model = pruner.model[0]
        for ind in pruner.indicators.values():
            ind.ramp = s.gate == 'ramp'
        self.ind_params = pruner.indicator_parameters()
        self.rw_params = pruner.reweight_parameters()
        self.weights = [p for p in model.parameters() if p.requires_grad] if s.train_weights else []
        groups = []
        if self.weights:
            groups.append({'params': self.weights, 'lr': s.lr, 'weight_decay': s.weight_decay})
        if self.rw_params:
            groups.append({'params': self.rw_params, 'lr': s.reweight_lr, 'weight_decay': 0.0})
        self.opt = torch.optim.AdamW(groups) if groups else None
        self.opt_ind = indicator_optimizer(s.indicator_opt, self.ind_params, s.indicator_lr)
        if s.search_loss == 'kd' and teacher is None:
            raise ConfigError("search_loss='kd' distils from the original model: give the search a teacher "
                              '(kd_alpha > 0, or --teacher original)')
        self.kd_alpha = 0.0 if teacher is None else 1.0 if s.search_loss == 'kd' else s.kd_alpha
        # the cost no structure can go below: subtracted from both sides of r with resource_scale='prunable'
        # (at most 0.9 of the target, so that r stays finite when the target is the smallest structure itself)
        self.floor = min(min_cost(pruner), 0.9 * target_macs) if s.resource_scale == 'prunable' else 0.0
        self.amp = bool(s.amp and self.device.type == 'cuda')  # float16 autocast + loss scaling on CUDA only
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.step = 0
        self.mu = 0.0  # the dual multiplier of the MAC constraint (resource_control='dual')
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return self.step >= self.settings.total_steps

    def lam(self, step: int) -> float:
        """Resource-loss weight at ``step`` (linear ramp over the first ``lambda_warmup`` of the steps)."""
        s = self.settings
        return s.resource_lambda * min(1.0, (step + 1) / self._warmup_steps())

    def indicator_lr_at(self, step: int) -> float:
        """Indicator learning rate at ``step`` (``indicator_schedule``)."""
        s = self.settings
        if s.indicator_schedule == 'cosine':
            return s.indicator_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, s.total_steps)))
        return s.indicator_lr

    def _warmup_steps(self) -> int:
        return max(1, math.ceil(self.settings.lambda_warmup * self.settings.total_steps))

    def _update_mu(self, step: int, excess: float) -> None:
        """Dual ascent on the MAC constraint after the warm-up: ``mu += rate * (r - 1)``, never below 0."""
        s = self.settings
        if s.resource_control != 'dual' or step + 1 < self._warmup_steps():
            return
        rate = s.dual_rate * s.resource_lambda * 100.0 / s.total_steps
        self.mu = max(0.0, self.mu + rate * excess)

    def train_step(self, x: Tensor | list[tuple[Tensor, Tensor]], y: Tensor | None = None) -> dict | None:
        """One search step (one optimiser update); returns the history record when one is logged at this step.

        Args:
            x: Images, or a list of ``(images, labels)`` micro-batches whose gradients are accumulated (the loss of
                each is divided by their number, so the update equals one step on their union when they are of
                equal size).
            y: Labels (when ``x`` is a tensor).
        """
        s, pruner, model = self.settings, self.pruner, self.pruner.model[0]
        micro = [(x, y)] if isinstance(x, Tensor) else list(x)
        model.train()
        if self.teacher is not None:
            self.teacher.eval()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.opt_ind.zero_grad(set_to_none=True)
        step = self.step
        lam = self.lam(step)
        for g in self.opt_ind.param_groups:  # a function of the step alone: a resumed search continues it exactly
            g['lr'] = self.indicator_lr_at(step)
        sums = torch.zeros(3, dtype=torch.float64)
        for xb, yb in micro:
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            if self.mixup_fn is not None:
                xb, yb = self.mixup_fn(xb, yb)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = logits_of(model(xb))
                task = task_loss(logits.float(), yb)
                kd = torch.zeros((), device=logits.device)
                loss = task
                if self.kd_alpha > 0:
                    with torch.no_grad():
                        t_logits = logits_of(self.teacher(xb))
                    kd = distillation_loss(logits.float(), t_logits.float(), s.kd_temperature)
                    loss = (1 - self.kd_alpha) * task + self.kd_alpha * kd
            if not torch.isfinite(loss):
                raise AmapError(f'non-finite loss ({loss.item()}) at search step {step}; the last search checkpoint '
                                'is intact: lower the learning rate (--search-lr / --indicator-lr) or turn AMP off '
                                '(--amp off), then --resume')
            self.scaler.scale(loss / len(micro)).backward()
            sums += torch.tensor([loss.item(), task.item(), kd.item()], dtype=torch.float64) / len(micro)
        excess = (pruner.cost() - self.floor) / (self.target_macs - self.floor) - 1  # once per update, float64
        res = lam * excess ** 2 + self.mu * excess
        self.scaler.scale(res.float()).backward()
        if self.grad_sync is not None:
            self.grad_sync(self.weights + self.rw_params + self.ind_params)
        if self.opt is not None:
            self.scaler.unscale_(self.opt)
        self.scaler.unscale_(self.opt_ind)
        if s.clip_grad and self.weights:
            torch.nn.utils.clip_grad_norm_(self.weights, s.clip_grad)
        if self.opt is not None:
            self.scaler.step(self.opt)
        self.scaler.step(self.opt_ind)
        self.scaler.update()
        with torch.no_grad():
            for ind in pruner.indicators.values():
                ind.m.clamp_(0.0, ind.upper)
            for p in self.rw_params:
                p.clamp_(min=1e-2)
        mu = self.mu
        self._update_mu(step, float(excess.detach()))
        self.step += 1
        if step % s.log_every == 0 or step == s.total_steps - 1:
            return self._record(step, sums, res, lam, mu)
        return None

    @torch.no_grad()
    def _record(self, step: int, sums: Tensor, res: Tensor, lam: float, mu: float) -> dict:
        """The history record of ``step``: losses (averaged over ranks), weights of the resource loss, structure."""
        pruner = self.pruner
        logged = torch.cat([sums, res.detach().double().cpu().reshape(1)]).to(self.device)
        if self.reduce is not None:
            logged = self.reduce(logged)
        loss_v, task_v, kd_v, res_v = logged.tolist()
        rec = {'step': step, 'loss': loss_v + res_v, 'task': task_v, 'kd': kd_v, 'resource': res_v,
               'lambda': lam, 'mu': mu, 'mac_ratio': pruner.hard_macs() / pruner.full_macs,
               'target_ratio': self.target_macs / pruner.resource.full, 'search_resource': pruner.resource.name,
               'kept': kept_by_kind(pruner)}
        for r in (pruner.resource, self.report):  # the ratio the target is set in, e.g. latency_ratio
            if r is not None and r.name != 'macs':
                rec[f'{r.name}_ratio'] = float(pruner.cost(pruner.hard_counts(), exact=True, resource=r)) / r.full
        self.history.append(rec)
        return rec

    def run(
            self,
            loader: Iterable,
            *,
            steps_per_epoch: int | None = None,
            until: int | None = None,
            progress: Callable[[dict], None] | None = None,
            on_step: Callable[[Search], None] | None = None,
    ) -> list[dict]:
        """Run from the current step to ``until`` (default: the end); returns the history.

        Args:
            loader: Training batches ``(images, labels)``; epochs are re-iterated as needed.
            steps_per_epoch: Batches per epoch (default ``len(loader)``); a step consumes ``accum_steps`` batches.
            until: Stop after this global step.
            progress: Called with every logged record.
            on_step: Called after every step (e.g. to checkpoint).
        """
        until = self.settings.total_steps if until is None else min(until, self.settings.total_steps)
        per_epoch = steps_per_epoch or len(loader)
        accum = max(1, self.settings.accum_steps)
        batches = _epoch_batches(loader, self.step * accum, per_epoch)
        while self.step < until:
            micro = [tuple(next(batches)[:2]) for _ in range(accum)]
            rec = self.train_step(micro)
            if rec is not None and progress is not None:
                progress(rec)
            if on_step is not None:
                on_step(self)
        return self.history

    # -------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue: weights, indicators, optimisers, step, history (tensors and plain data)."""
        return {
            'model': self.pruner.model[0].state_dict(),
            'pruner': self.pruner.state_dict(),
            'opt': self.opt.state_dict() if self.opt is not None else None,
            'opt_ind': self.opt_ind.state_dict(),
            'step': self.step,
            'mu': self.mu,
            'history': list(self.history),
            'scaler': self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""
        self.pruner.model[0].load_state_dict(state['model'])
        self.pruner.load_state_dict(state['pruner'])
        if self.opt is not None and state.get('opt') is not None:
            self.opt.load_state_dict(state['opt'])
        self.opt_ind.load_state_dict(state['opt_ind'])
        self.step = int(state['step'])
        self.mu = float(state.get('mu', 0.0))
        self.history = list(state['history'])
        if state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
