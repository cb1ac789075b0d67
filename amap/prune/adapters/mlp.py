"""Adapter for MLPs: timm ``Mlp`` (``fc1 -> act -> drop -> norm -> fc2``) and MLPs with a depthwise conv between
``fc1`` and the activation (PVTv2's ``fc1 -> dwconv -> act -> fc2``).

The hidden units form one group with a single "head". The gate and the reweight act on the input of ``fc2`` (after
the activation), so removing a unit is exact; they scale ``fc2``'s weight columns, where the reweight then folds.
"""
from __future__ import annotations

import copy

from timm.layers import Mlp
from torch import Tensor, nn

from ..groups import ChannelGroup
from .base import Adapter, Keep, full_counts, row_norms
from .slicing import depthwise_params, linear_params, prefixed

__all__ = ['MlpAdapter']


def _find_dwconv(module: nn.Module) -> tuple[str, nn.Conv2d] | tuple[None, None]:
    """The depthwise conv of a conv-MLP (any Conv2d with groups == channels among the submodules) and its name."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d) and sub.groups == sub.in_channels == sub.out_channels:
            return name, sub
    return None, None


class MlpAdapter(Adapter):
    """Any module with Linear ``fc1`` and ``fc2`` (and optionally one depthwise conv on the hidden units)."""

    module_types = (Mlp,)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        fc1, fc2 = getattr(module, 'fc1', None), getattr(module, 'fc2', None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            return False
        # a norm over the hidden units mixes them: removal would not be exact
        return isinstance(getattr(module, 'norm', nn.Identity()), nn.Identity)

    @property
    def hidden(self) -> int:
        return self.module.fc1.out_features

    def groups(self) -> list[ChannelGroup]:
        return [ChannelGroup(self.name, 'mlp', 1, self.hidden)]

    def _install(self) -> None:
        if 'mlp' in self.indicators:
            self.gate_linear(self.module.fc2, cols=lambda: self.scale('mlp'), record_in=lambda x: self.record('mlp', x))

    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        d = (kept['mlp'] if 'mlp' in kept else full_counts(1, self.hidden, kept)).sum()
        m = self.module
        rows = self.batch_rows * self.tokens
        total = rows * d * (m.fc1.in_features + m.fc2.out_features)
        _, dw = _find_dwconv(m)
        if dw is not None:
            total = total + rows * d * dw.kernel_size[0] * dw.kernel_size[1]
        return total

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        m = self.module
        return (row_norms(m.fc1.weight, slice(None), p) + row_norms(m.fc2.weight.t(), slice(None), p)).unsqueeze(0)

    def build(self, widths: dict[str, int]) -> nn.Module:
        d = widths.get('mlp', self.hidden)
        new = copy.deepcopy(self.module)
        m = self.module
        new.fc1 = nn.Linear(m.fc1.in_features, d, bias=m.fc1.bias is not None)
        new.fc2 = nn.Linear(d, m.fc2.out_features, bias=m.fc2.bias is not None)
        name, dw = _find_dwconv(new)
        if dw is not None:
            new.set_submodule(name, nn.Conv2d(d, d, dw.kernel_size, dw.stride, dw.padding, groups=d,
                                              bias=dw.bias is not None))
        return new

    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        m = self.module
        idx = self._full_keep('mlp', keep).flatten()
        state = {**prefixed('fc1', linear_params(m.fc1, rows=idx)),
                 **prefixed('fc2', linear_params(m.fc2, cols=idx, col_scale=self._fold('mlp', keep)))}
        name, dw = _find_dwconv(m)
        if dw is not None:
            state.update(prefixed(name, depthwise_params(dw, idx)))
        return state
