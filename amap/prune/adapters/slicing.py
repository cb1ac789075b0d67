"""Slicing primitives, one function per kind of layer (in the style of Torch-Pruning's per-op pruning functions).

Each returns the kept part of a layer's parameters as ``{parameter name: tensor}`` (detached, on the layer's device),
optionally with a per-channel factor folded in. An adapter's ``shrink`` builds the smaller module (its ``build``) and
loads these into it (:meth:`~amap.prune.adapters.base.Adapter.shrink`): one construction path. Indices may live on any
device.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...models.attention import HeadDWC

__all__ = ['linear_params', 'depthwise_params', 'select', 'head_dwc_params', 'dwc_stays_shared', 'head_rows',
           'prefixed']


def head_rows(keep: Tensor, head_dim: int, offset: int = 0) -> Tensor:
    """Flat row indices of kept channels ``keep`` (H, k) in a head-major layout of ``head_dim`` per head."""
    H = keep.shape[0]
    base = torch.arange(H, device=keep.device).unsqueeze(1) * head_dim
    return (base + keep).flatten() + offset


def prefixed(prefix: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``params`` under the submodule name ``prefix`` (state-dict keys ``prefix.name``)."""
    return {f'{prefix}.{k}': v for k, v in params.items()}


def linear_params(
        linear: nn.Linear,
        rows: Tensor | None = None,
        cols: Tensor | None = None,
        row_scale: Tensor | None = None,
        col_scale: Tensor | None = None,
) -> dict[str, Tensor]:
    """The selected rows (outputs) and columns (inputs) of a Linear, optionally rescaled.

    Args:
        linear: Source layer.
        rows: Output indices to keep (all when None).
        cols: Input indices to keep (all when None).
        row_scale: Per kept output factor folded into weight rows and bias.
        col_scale: Per kept input factor folded into weight columns.

    Returns:
        ``{'weight': ..., 'bias': ...}`` (no bias when the layer has none).
    """
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        rows = rows.to(w.device)
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if row_scale is not None:
        w = w * row_scale.unsqueeze(1)
        b = b * row_scale if b is not None else None
    if col_scale is not None:
        w = w * col_scale.unsqueeze(0)
    return {'weight': w} if b is None else {'weight': w, 'bias': b}


def depthwise_params(conv: nn.Conv2d, idx: Tensor) -> dict[str, Tensor]:
    """Channels ``idx`` of a depthwise conv (``groups == channels``; also a :class:`HeadDWC` by flat index)."""
    idx = idx.to(conv.weight.device)
    out = {'weight': conv.weight.detach()[idx]}
    if conv.bias is not None:
        out['bias'] = conv.bias.detach()[idx]
    return out


def select(p: Tensor, idx: Tensor, dim: int = -1) -> Tensor:
    """Entries ``idx`` of a parameter along ``dim`` (e.g. the q/k channels of ``scale``)."""
    return p.detach().index_select(dim, idx.to(p.device))


def dwc_stays_shared(dwc: HeadDWC, keep_v: Tensor) -> bool:
    """A shared DWC stays shared when every head keeps the same v channels ``keep_v`` (H, k)."""
    return bool(dwc.shared and (keep_v == keep_v[0]).all())


def head_dwc_params(dwc: HeadDWC, keep_v: Tensor, shared: bool | None = None) -> dict[str, Tensor]:
    """The DWC for kept v channels ``keep_v`` (H, k): shared when every head keeps the same channels
    (:func:`dwc_stays_shared`; ``shared=False`` un-shares it all the same), else un-shared (one kernel per kept channel
    of every head, copied from the shared bank: same MACs, same function)."""
    if dwc_stays_shared(dwc, keep_v) and shared is not False:
        return depthwise_params(dwc, keep_v[0])
    return depthwise_params(dwc, keep_v.flatten() if dwc.shared else head_rows(keep_v, dwc.v_dim))
