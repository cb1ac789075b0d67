"""Prunable channel groups.

A transformer block exposes up to three groups (docs/amap-method.md, section 2):

* ``qk``: per head, the channels of the q-k product (channel ``j`` of head ``h`` gates ``q[h, j]`` and ``k[h, j]``);
* ``v``: per head, the value channels (each output channel of a head depends on its own v channel only);
* ``mlp``: the MLP hidden units (one "head").

Groups are plain descriptions; the adapters know where their channels live in a module.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ['ChannelGroup', 'GROUP_KINDS']

GROUP_KINDS = ('qk', 'v', 'mlp')


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable group of channels.

    Args:
        module: Qualified name of the module that owns the channels (e.g. ``blocks.3.attn``).
        kind: ``'qk'``, ``'v'`` or ``'mlp'``.
        num_heads: Number of heads (1 for ``mlp``).
        dim: Channels per head in the unpruned model.
        linear_attention: True when the group belongs to a linear-attention layer (section 5 initialisation).
    """

    module: str
    kind: str
    num_heads: int
    dim: int
    linear_attention: bool = False

    @property
    def key(self) -> str:
        """Unique name of the group, ``<module>.<kind>``."""
        return f'{self.module}.{self.kind}'

    @property
    def size(self) -> int:
        """Total number of channels in the group."""
        return self.num_heads * self.dim
