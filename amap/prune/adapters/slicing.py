"""Slicing primitives, one function per kind of layer (in the style of Torch-Pruning's per-op pruning functions).

Each returns a *new* layer holding the kept channels of the given one (same device and dtype), optionally with a
per-channel factor folded in; adapters compose them. Indices may live on any device.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...models.attention import HeadDWC

__all__ = ['slice_linear', 'slice_depthwise', 'slice_param', 'slice_head_dwc', 'dwc_stays_shared', 'head_rows']


def head_rows(keep: Tensor, head_dim: int, offset: int = 0) -> Tensor:
    """Flat row indices of kept channels ``keep`` (H, k) in a head-major layout of ``head_dim`` per head."""
    H = keep.shape[0]
    base = torch.arange(H, device=keep.device).unsqueeze(1) * head_dim
    return (base + keep).flatten() + offset


def slice_linear(
        linear: nn.Linear,
        rows: Tensor | None = None,
        cols: Tensor | None = None,
        row_scale: Tensor | None = None,
        col_scale: Tensor | None = None,
) -> nn.Linear:
    """A new Linear holding the selected rows (outputs) and columns (inputs), optionally rescaled.

    Args:
        linear: Source layer.
        rows: Output indices to keep (all when None).
        cols: Input indices to keep (all when None).
        row_scale: Per kept output factor folded into weight rows and bias.
        col_scale: Per kept input factor folded into weight columns.
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
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def slice_depthwise(conv: nn.Conv2d, idx: Tensor) -> nn.Conv2d:
    """A new depthwise conv (``groups == channels``) holding channels ``idx`` of ``conv``."""
    n = idx.numel()
    w = conv.weight
    new = nn.Conv2d(n, n, conv.kernel_size, conv.stride, conv.padding, dilation=conv.dilation, groups=n,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    idx = idx.to(w.device)
    with torch.no_grad():
        new.weight.copy_(w[idx])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[idx])
    return new


def slice_param(p: Tensor, idx: Tensor, dim: int = -1) -> nn.Parameter:
    """A new Parameter holding entries ``idx`` of ``p`` along ``dim``."""
    return nn.Parameter(p.detach().index_select(dim, idx.to(p.device)).clone(), requires_grad=p.requires_grad)


def dwc_stays_shared(dwc: HeadDWC, keep_v: Tensor) -> bool:
    """A shared DWC stays shared when every head keeps the same v channels ``keep_v`` (H, k)."""
    return bool(dwc.shared and (keep_v == keep_v[0]).all())


def slice_head_dwc(dwc: HeadDWC, keep_v: Tensor) -> HeadDWC:
    """The DWC for kept v channels ``keep_v`` (H, k): shared when every head keeps the same channels, else un-shared
    (one kernel per kept channel of every head, copied from the shared bank: same MACs, same function)."""
    H, k = keep_v.shape
    same = dwc_stays_shared(dwc, keep_v)
    new = HeadDWC(k, H, kernel_size=dwc.kernel_size[0], shared=same).to(dwc.weight.device, dwc.weight.dtype)
    if same:
        src = keep_v[0]
    else:
        src = keep_v.flatten() if dwc.shared else head_rows(keep_v, dwc.v_dim)
    src = src.to(dwc.weight.device)
    with torch.no_grad():
        new.weight.copy_(dwc.weight[src])
        new.bias.copy_(dwc.bias[src])
    return new
