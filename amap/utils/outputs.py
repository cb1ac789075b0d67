"""Logits from whatever a classifier returns: a tensor (timm, torchvision), a Hugging Face ``ModelOutput`` (its
``logits``), or a tuple whose first entry is the logits (``return_dict=False``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ['Logits', 'logits_of']


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output (the output itself when it is a tensor)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, 'logits', None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f'cannot find logits in a model output of type {type(output).__name__}')


class Logits(nn.Module):
    """``model`` returning only its logits (for exporters that need a tensor output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))
