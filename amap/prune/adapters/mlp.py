"""Adapter for MLPs: timm ``Mlp`` (``fc1 -> act -> drop -> norm -> fc2``), MLPs with a depthwise conv between ``fc1``
and the activation (PVTv2's ``fc1 -> dwconv -> act -> fc2``), Hugging Face ViT/DeiT/Swin MLPs (``fc1``/``fc2``) and
torchvision's ``MLP`` / ``MLPBlock`` (a Sequential ``Linear -> act -> Dropout -> Linear -> Dropout``).

The hidden units form one group with a single "head". The gate and the reweight act on the input of ``fc2`` (after
the activation), so removing a unit is exact; they scale ``fc2``'s weight columns, where the reweight then folds.
"""
from __future__ import annotations

import copy

from timm.layers import Mlp
from torch import Tensor, nn
from torchvision.ops import MLP as TorchvisionMLP

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


def _linear_names(module: nn.Module) -> tuple[str, str] | None:
    """The names of an MLP's two Linears: ``fc1``/``fc2``, or the only two Linears of a torchvision ``MLP`` whose
    other layers act element-wise (activations, dropout)."""
    if isinstance(getattr(module, 'fc1', None), nn.Linear) and isinstance(getattr(module, 'fc2', None), nn.Linear):
        return 'fc1', 'fc2'
    if isinstance(module, TorchvisionMLP):
        linears = [name for name, sub in module.named_children() if isinstance(sub, nn.Linear)]
        others = [sub for sub in module.children() if not isinstance(sub, nn.Linear)]
        elementwise = all(isinstance(sub, (nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Identity)) for sub in others)
        if len(linears) == 2 and elementwise:
            return linears[0], linears[1]
    return None


class MlpAdapter(Adapter):
    """Any module with Linear ``fc1`` and ``fc2`` (and optionally one depthwise conv on the hidden units), or a
    torchvision ``MLP`` of two Linears with element-wise layers between them."""

    module_types = (Mlp,)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if _linear_names(module) is None:
            return False
        # a norm over the hidden units mixes them: removal would not be exact
        return isinstance(getattr(module, 'norm', nn.Identity()), nn.Identity)

    @property
    def names(self) -> tuple[str, str]:
        return _linear_names(self.module)

    @property
    def fc1(self) -> nn.Linear:
        return self.module.get_submodule(self.names[0])

    @property
    def fc2(self) -> nn.Linear:
        return self.module.get_submodule(self.names[1])

    @property
    def hidden(self) -> int:
        return self.fc1.out_features

    def groups(self) -> list[ChannelGroup]:
        return [ChannelGroup(self.name, 'mlp', 1, self.hidden)]

    def _install(self) -> None:
        if 'mlp' in self.indicators:
            self.gate_linear(self.fc2, cols=lambda: self.scale('mlp'), record_in=lambda x: self.record('mlp', x))

    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        d = (kept['mlp'] if 'mlp' in kept else full_counts(1, self.hidden, kept)).sum()
        rows = self.batch_rows * self.tokens
        total = rows * d * (self.fc1.in_features + self.fc2.out_features)
        _, dw = _find_dwconv(self.module)
        if dw is not None:
            total = total + rows * d * dw.kernel_size[0] * dw.kernel_size[1]
        return total

    def _record_shape(self, x: Tensor) -> None:
        if self.tokens is None and isinstance(x, Tensor):  # rows of tokens (any leading layout, e.g. (B, H, W, C))
            self.tokens = x.numel() // x.shape[-1] // x.shape[0] if x.dim() >= 3 else 1
            self.batch_rows = x.shape[0]

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        norms = row_norms(self.fc1.weight, slice(None), p) + row_norms(self.fc2.weight.t(), slice(None), p)
        return norms.unsqueeze(0)

    def build(self, widths: dict[str, int]) -> nn.Module:
        d = widths.get('mlp', self.hidden)
        new = copy.deepcopy(self.module)
        fc1, fc2 = self.fc1, self.fc2
        new.set_submodule(self.names[0], nn.Linear(fc1.in_features, d, bias=fc1.bias is not None))
        new.set_submodule(self.names[1], nn.Linear(d, fc2.out_features, bias=fc2.bias is not None))
        name, dw = _find_dwconv(new)
        if dw is not None:
            new.set_submodule(name, nn.Conv2d(d, d, dw.kernel_size, dw.stride, dw.padding, groups=d,
                                              bias=dw.bias is not None))
        return new

    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        idx = self._full_keep('mlp', keep).flatten()
        state = {**prefixed(self.names[0], linear_params(self.fc1, rows=idx)),
                 **prefixed(self.names[1], linear_params(self.fc2, cols=idx, col_scale=self._fold('mlp', keep)))}
        name, dw = _find_dwconv(self.module)
        if dw is not None:
            state.update(prefixed(name, depthwise_params(dw, idx)))
        return state
