"""Torch-Pruning as a baseline of the quality benchmark: prune a loaded model to a MAC target with
``tp.pruner.MetaPruner`` and its group importances, then fine-tune it with the same budget and distillation as the
AMAP pipeline.

What is pruned (the same groups AMAP prunes): the head dimensions of every attention layer (``num_heads`` mapping of
each ``qkv`` Linear, ``prune_head_dims=True``, ``prune_num_heads=False``: every head keeps the same number of
q/k/v channels, the same channels of q, k and v) and the hidden width of every MLP. The residual width is kept: every
layer writing the residual stream (patch embedding, attention output projections, second MLP layers) and the
classifier are ignored layers, so Torch-Pruning never forms the embedding group.

Torch-Pruning's ``pruning_ratio`` is a channel ratio, not a MAC ratio: it is pushed by bisection until our counter
(:func:`amap.count_macs`, the one every method is judged by) gives MACs at or just below the target. One ratio for
every layer moves the MACs in coarse steps (every head loses a channel at once), which left the model 1.4-1.6% under
a 0.5 target; a second bisection then gives the next ratio to the first ``t`` prunable layers only (Torch-Pruning's
``pruning_ratio_dict``), so the result lands within a layer's step of the target like every other method.

After pruning, each timm ``Attention`` gets its new ``head_dim`` / ``attn_dim`` (Torch-Pruning changes the Linear
layers only) and ``scale = head_dim ** -0.5``, which is what timm's fused attention (``scaled_dot_product_attention``
with its default scale) computes anyway, so the fused and unfused paths agree.

Torch-Pruning has no notion of FLatten's focused linear attention (its per-channel ``scale``, positional encoding
and depth-wise convolution are tied to the q/k/v channels): when it cannot produce a model that runs and gives the
right output shape, :class:`NotApplicable` says why, and the benchmark records the method as not applicable.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amap.macs import count_macs, count_params

__all__ = ['NotApplicable', 'TPResult', 'prune_to_target', 'IMPORTANCES']

IMPORTANCES = ('magnitude', 'taylor')


class NotApplicable(Exception):
    """Torch-Pruning cannot prune this model into a valid one; the message says why."""


@dataclass
class TPResult:
    """A model pruned by Torch-Pruning to a MAC target."""

    model: nn.Module
    pruning_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target_macs: float
    bisection: list[dict[str, float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before


def _importance(kind: str) -> Any:
    import torch_pruning as tp
    if kind == 'magnitude':
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == 'taylor':
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f'importance {kind!r} is unknown; choose from {IMPORTANCES}')


def _attention_layers(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """``{qkv Linear: attention module}`` of every attention module with a fused ``qkv`` Linear and ``num_heads``."""
    out = {}
    for m in model.modules():
        qkv = getattr(m, 'qkv', None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(m, 'num_heads', None), int):
            out[qkv] = m
    return out


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer that writes the residual stream, and the classifier: the embedding width is never pruned."""
    ignored: list[nn.Module] = []
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(head, nn.Module):
        ignored.append(head)
    patch = getattr(getattr(model, 'patch_embed', None), 'proj', None)
    if isinstance(patch, nn.Module):
        ignored.append(patch)
    for name, m in model.named_modules():
        leaf = name.rsplit('.', 1)[-1]
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (
                leaf in ('proj', 'fc2', 'reduction', 'downsample') or '.downsample' in name or 'head' in leaf):
            ignored.append(m)
    return list(dict.fromkeys(ignored))


def _fix_attention(attn_layers: dict[nn.Module, nn.Module], num_heads: dict[nn.Module, int]) -> None:
    for qkv, attn in attn_layers.items():
        heads = num_heads.get(qkv, attn.num_heads)
        attn.num_heads = heads
        head_dim = qkv.out_features // (3 * heads)
        attn.head_dim = head_dim
        if hasattr(attn, 'attn_dim'):
            attn.attn_dim = heads * head_dim
        if hasattr(attn, 'scale') and not isinstance(attn.scale, (nn.Parameter, torch.Tensor)):
            attn.scale = head_dim ** -0.5


def _prunable_roots(model: nn.Module) -> list[str]:
    """Names of the Linear layers that root a prunable group, in model order: every attention's ``qkv`` and every
    MLP's ``fc1``."""
    qkvs = {id(q) for q in _attention_layers(model)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
            (id(m) in qkvs or n.rsplit('.', 1)[-1] == 'fc1')]


def _prune_once(base: nn.Module, ratio: float, kind: str, example: torch.Tensor,
                calib: list[tuple[torch.Tensor, torch.Tensor]], layer_ratios: dict[str, float] | None = None
                ) -> nn.Module:
    """A copy of ``base`` pruned by Torch-Pruning at channel ratio ``ratio`` (``layer_ratios``: other ratios for the
    groups rooted at these named layers)."""
    import torch_pruning as tp
    model = copy.deepcopy(base).eval()
    modules = dict(model.named_modules())
    ratio_dict = {modules[n]: r for n, r in (layer_ratios or {}).items()} or None
    attn_layers = _attention_layers(model)
    if not attn_layers:
        raise NotApplicable('no attention module with a fused qkv Linear and num_heads (Torch-Pruning\'s num_heads '
                            'mapping needs one)')
    num_heads = {qkv: attn.num_heads for qkv, attn in attn_layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tp_logger = logging.getLogger('torch_pruning')
        level = tp_logger.level
        tp_logger.setLevel(logging.ERROR)
        try:
            pruner = tp.pruner.MetaPruner(
                model, example, importance=_importance(kind), pruning_ratio=ratio, pruning_ratio_dict=ratio_dict,
                global_pruning=False, ignored_layers=_ignored_layers(model), num_heads=num_heads, prune_head_dims=True,
                prune_num_heads=False)
            if kind == 'taylor':
                model.zero_grad(set_to_none=True)
                for x, y in calib:
                    F.cross_entropy(model(x), y).backward()
            pruner.step()
        finally:
            tp_logger.setLevel(level)
    model.zero_grad(set_to_none=True)
    _fix_attention(attn_layers, pruner.num_heads)
    return model


def _where(e: BaseException) -> str:
    """``Type: message, in file:function`` of the innermost frame of an exception."""
    import traceback
    msg = str(e).splitlines()[0][:200] if str(e) else ''
    frames = traceback.extract_tb(e.__traceback__)
    where = ''
    if frames:
        f = frames[-1]
        parts = f.filename.replace('\\', '/').split('/')
        short = '/'.join(parts[parts.index('torch_pruning'):]) if 'torch_pruning' in parts else parts[-1]
        where = f', in {short}:{f.name}'
    return f'{type(e).__name__}: {msg}{where}'


def _check_valid(model: nn.Module, example: torch.Tensor, expected: torch.Size) -> None:
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # any failure of the pruned model is the reason it is not applicable
        raise NotApplicable(f'the pruned model does not run ({_where(e)})') from None
    if not isinstance(out, torch.Tensor) or out.shape != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NotApplicable(f'the pruned model gives output {shape}, expected {tuple(expected)}')
    if not torch.isfinite(out).all():
        raise NotApplicable('the pruned model gives non-finite outputs')


def prune_to_target(model: nn.Module, target: float, input_size: tuple[int, int, int], *, importance: str,
                    calib: list[tuple[torch.Tensor, torch.Tensor]], iterations: int = 14,
                    log: Callable[[str], None] | None = None) -> TPResult:
    """Prune a copy of ``model`` with Torch-Pruning to at most ``target`` (MAC ratio) of its MACs.

    Bisection on ``pruning_ratio`` in [0, 1): the MACs fall (in steps) as the ratio grows; the smallest ratio
    whose MACs are at or below the target is kept (the largest model meeting the target).

    Args:
        model: The trained model (not modified).
        target: MAC ratio in (0, 1).
        input_size: ``(C, H, W)``.
        importance: ``'magnitude'`` (GroupMagnitudeImportance, L1) or ``'taylor'`` (GroupTaylorImportance, from a
            backward of the cross-entropy on ``calib``).
        calib: Calibration batches (the first one's images are the tracing input).
        iterations: Bisection steps.
        log: Optional progress callback.

    Raises:
        NotApplicable: Torch-Pruning cannot produce a valid model of this architecture.
    """
    if not 0 < target < 1:
        raise ValueError(f'target {target} must be a MAC ratio in (0, 1)')
    model = model.eval()
    example = calib[0][0][:2]
    with torch.no_grad():
        expected = model(example).shape
    macs_before = count_macs(model, input_size).total
    target_macs = target * macs_before
    trials: list[dict[str, float]] = []

    def trial(ratio: float, layer_ratios: dict[str, float] | None = None) -> tuple[nn.Module, int]:
        try:
            pruned = _prune_once(model, ratio, importance, example, calib, layer_ratios)
        except NotApplicable:
            raise
        except Exception as e:  # Torch-Pruning's tracing/pruning failed on this architecture
            raise NotApplicable(f'Torch-Pruning fails on this architecture ({_where(e)})') from None
        _check_valid(pruned, example, expected)
        macs = count_macs(pruned, input_size).total
        trials.append({'pruning_ratio': ratio, 'layers_at_next_ratio': len(layer_ratios or {}),
                       'mac_ratio': macs / macs_before})
        if log is not None:
            log(f'  torch-pruning {importance}: pruning_ratio {ratio:.4f}, {len(layer_ratios or {})} layer(s) at the '
                f'next ratio -> MAC ratio {macs / macs_before:.4f}')
        return pruned, macs

    lo, hi = 0.0, 0.95
    best, best_macs = trial(hi)
    widths = [qkv.out_features for qkv in _attention_layers(best)]
    if widths == [qkv.out_features for qkv in _attention_layers(model)]:
        raise NotApplicable(f'Torch-Pruning pruned only the MLPs: every attention qkv Linear kept its full width even '
                            f'at pruning_ratio {hi} (the dependency group it traces from the q/k/v channels, through '
                            'this attention\'s matmuls, is not prunable), so it cannot prune the groups the other '
                            'methods prune')
    if best_macs > target_macs:
        raise NotApplicable(f'pruning_ratio {hi} leaves {best_macs / macs_before:.3f} of the MACs, above the target '
                            f'{target}: the prunable groups are too small a share of the MACs')
    best_ratio = hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        pruned, macs = trial(mid)
        if macs <= target_macs:
            hi, best, best_macs, best_ratio = mid, pruned, macs, mid
        else:
            lo = mid
        if hi - lo < 1e-4 or math.isclose(best_macs, target_macs, rel_tol=1e-4):
            break
    # finer: the first t prunable layers at the ratio that meets the target, the others at the one just below it
    roots = _prunable_roots(model)
    t_lo, t_hi = 0, len(roots)
    while lo > 0 and t_hi - t_lo > 1 and not math.isclose(best_macs, target_macs, rel_tol=1e-3):
        t = (t_lo + t_hi) // 2
        pruned, macs = trial(lo, {n: best_ratio for n in roots[:t]})
        if macs <= target_macs:
            t_hi, best, best_macs = t, pruned, macs
        else:
            t_lo = t
    return TPResult(model=best, pruning_ratio=best_ratio, macs_before=macs_before, macs_after=best_macs,
                    params_before=count_params(model), params_after=count_params(best), target_macs=target_macs,
                    bisection=trials)
