"""Optimisers of the pruning indicators.

Adam normalises every indicator by its own gradient history, so each one moves by about the learning rate per step
whatever the size of its gradient: the search then orders channels mostly by where they started and by the sign of
their gradient. The alternatives keep the size of the gradient within a group:

* ``adam``: :class:`torch.optim.Adam` (per-channel second moment), the paper's choice;
* ``group_adam``: :class:`GroupAdam`, Adam whose second moment is shared by all channels of a group (one indicator
  tensor), so a group's steps are normalised as a whole and channels with larger gradients move further;
* ``sgd``: SGD with momentum 0.9 (no normalisation: ``indicator_lr`` must then match the gradient's scale).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ['INDICATOR_OPTIMIZERS', 'GroupAdam', 'indicator_optimizer']

INDICATOR_OPTIMIZERS = ('adam', 'group_adam', 'sgd')


class GroupAdam(torch.optim.Optimizer):
    """Adam with one second-moment estimate per parameter tensor (the mean of the squared gradient over the tensor).

    Args:
        params: Parameters (one indicator tensor per channel group).
        lr: Learning rate.
        betas: Decay rates of the first and second moments.
        eps: Added to the root of the second moment.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {'lr': lr, 'betas': betas, 'eps': eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st['step'] = torch.zeros((), dtype=torch.float64)
                    st['exp_avg'] = torch.zeros_like(p)
                    st['exp_avg_sq'] = torch.zeros((), dtype=p.dtype, device=p.device)
                st['step'] += 1
                t = float(st['step'])
                g: Tensor = p.grad
                st['exp_avg'].mul_(b1).add_(g, alpha=1 - b1)
                st['exp_avg_sq'].mul_(b2).add_(g.pow(2).mean(), alpha=1 - b2)
                denom = (st['exp_avg_sq'] / (1 - b2 ** t)).sqrt().add_(group['eps'])
                p.addcdiv_(st['exp_avg'], denom, value=-group['lr'] / (1 - b1 ** t))
        return loss


def indicator_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The indicator optimiser called ``name`` (one of :data:`INDICATOR_OPTIMIZERS`)."""
    if name == 'adam':
        return torch.optim.Adam(params, lr=lr)
    if name == 'group_adam':
        return GroupAdam(params, lr=lr)
    if name == 'sgd':
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ConfigError(f'indicator optimiser {name!r} is unknown; choose from {list(INDICATOR_OPTIMIZERS)}')
