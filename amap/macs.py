"""Counting multiply-accumulates (MACs) by running the model.

:func:`count_macs` runs one eval-mode forward under torch's :class:`~torch.utils.flop_counter.FlopCounterMode` and
reports its count in MACs (FlopCounterMode counts a multiply-add as two FLOPs; every one of its formulas is 2x the
MACs, so the report halves them). Its registry counts ``mm``/``addmm``/``bmm``/``baddbmm`` (what ``nn.Linear``,
``@``/``torch.matmul`` and ``torch.einsum`` lower to), ``convolution`` (dense, grouped, depthwise, transposed) and the
fused ``scaled_dot_product_attention`` kernels; :data:`_EXTRA_FLOPS` adds, through its ``custom_mapping``, the
multiplying operators it lacks (``mv``/``dot``/``addmv``/``addbmm``/``_addmm_activation``, ``mkldnn_convolution`` and
the CPU and "overrideable" fused attention kernels). Norms, activations, softmax, reductions and element-wise products
are not counted (like fvcore, which counts one fused multiply-add as one "flop", so its numbers are MACs too). Because
the count comes from the shapes of the operators that actually ran, it stays exact for any module, including pruned
attention whose heads keep ``qk_dim`` q/k channels and ``v_dim`` value channels.

Every MAC is attributed to the innermost ``nn.Module`` that executed it: forward pre/post hooks keep a stack of the
running modules and every formula of the counter is wrapped to credit its count to the module on top
(:func:`_counter`). FlopCounterMode's own per-module counts are not used for this: its module tracker credits an
operator to *every* running module, and a module's own count derived from those (its count minus its children's) is
wrong, even negative, wherever the call tree is not the module tree: a module registered under two names, or one
called from outside its parent (both count like the hook stack does here). A ``Linear`` owns its matmul, an attention
module owns the matmuls of its own ``forward``. With N tokens, C the width, H heads, per-head widths dq (q/k) and dv
(v), windows of n tokens (N = nW * n; a global attention is one window), what the counter realises is:

* qkv projection: ``N * C * H * (2 * dq + dv)``; output projection: ``N * H * dv * C``; MLP: ``2 * N * C * D``;
* softmax attention (``q @ k^T`` and ``attn @ v``, fused or not): ``nW * H * n^2 * (dq + dv)``;
* focused linear attention (:func:`amap.models.attention.linear_attention`) executes ``q @ mean(k)^T`` (the
  normaliser), ``k^T @ v`` and ``q @ (k^T v)``: ``nW * H * (2 * n * dq * dv + n * dq)``; the token mean itself is a
  sum, not counted; its depthwise conv on v (``HeadDWC``, kernel k): ``N * H * dv * k^2``.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import AmapError, ConfigError

__all__ = ['CATEGORIES', 'MacRecord', 'MacReport', 'check_input_size', 'count_macs', 'count_params']

aten = torch.ops.aten

#: Categories of the breakdown, in display order, with their labels.
CATEGORIES: dict[str, str] = {
    'patch_embed': 'patch embed',
    'attn_proj': 'attention projections (qkv/q/kv/proj)',
    'attn_matmul': 'attention matmuls',
    'dwc': 'DWC / LePE',
    'mlp': 'MLP',
    'downsample': 'patch merging / downsample',
    'head': 'head',
    'other': 'other',
}


# ---------------------------------------------------------------------------------------------------------------------
# Counting: FlopCounterMode, the operators its registry lacks, innermost-module attribution
# ---------------------------------------------------------------------------------------------------------------------

def _sdpa_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], *_: Any, **__: Any) -> int:
    # (B, Hq, Sq, dq) @ (B, Hk, Sk, dq)^T then (B, Hq, Sq, Sk) @ (B, Hk, Sk, dv); Hq is a multiple of Hk (GQA).
    return 2 * math.prod(q[:3]) * k[-2] * (q[-1] + v[-1])


def _native_mha_flops(q: Sequence[int], k: Sequence[int], _v: Sequence[int], _e: int, _h: int, w_in: Sequence[int],
                      _b_in: Any, w_out: Sequence[int], *_: Any, **__: Any) -> int:
    # nn.MultiheadAttention's fused path (batch first): in-projection, q @ k^T and attn @ v, output projection
    rows = math.prod(q[:-1])
    return 2 * (rows * w_in[0] * w_in[1] + 2 * rows * k[-2] * q[-1] + rows * w_out[0] * w_out[1])


def _each_once_flops(a: Sequence[int], *_: Any, **__: Any) -> int:
    return 2 * math.prod(a)  # mv(matrix, vector), dot(vector, vector): each element of ``a`` is multiplied once


def _batched_flops(a: Sequence[int], b: Sequence[int], *_: Any, **__: Any) -> int:
    return 2 * math.prod(a) * b[-1]  # (..., m, k) @ (..., k, n), summed or not over the batch


#: FLOP formulas (FlopCounterMode's unit: 2 per multiply-add) of multiplying operators torch's registry lacks; they get
#: the operands' shapes (``out_shape``: the result's).
_EXTRA_FLOPS: dict[Any, Any] = {
    aten.mv: _each_once_flops,
    aten.dot: _each_once_flops,
    aten.vdot: _each_once_flops,
    aten.addmv: lambda _self, a, *_, **__: _each_once_flops(a),
    aten.addbmm: lambda _self, a, b, *_, **__: _batched_flops(a, b),
    aten._addmm_activation: lambda _self, a, b, *_, **__: _batched_flops(a, b),
    # (x, w, bias, padding, stride, dilation, groups): every output element takes prod(w.shape[1:]) multiply-adds.
    aten.mkldnn_convolution: lambda x, w, *_, out_shape, **__: 2 * math.prod(out_shape) * math.prod(w[1:]),
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flops,
    aten._native_multi_head_attention: _native_mha_flops,
}

# Operator names that suggest multiplications we do not know how to count (reported, never silently dropped).
_SUSPICIOUS = ('mm', 'conv', 'attention', 'linear', 'matmul', 'einsum', 'lstm', 'gru', 'rnn')


def _kind(op: Any) -> str:
    """``'conv'``, ``'attention'`` (fused kernels) or ``'matmul'``: the operator kind of a counted operator."""
    name = getattr(op, '__name__', str(op))
    return 'conv' if 'conv' in name else 'attention' if 'attention' in name else 'matmul'


class _Uncounted(TorchDispatchMode):
    """Notes the operators that ran without a formula although their names suggest they multiply.

    Entered outside the counter, it sees only the operators FlopCounterMode executes, after their decompositions.
    """

    def __init__(self, registry: dict[Any, Any]) -> None:
        super().__init__()
        self.registry = registry
        self.seen: set[Any] = set()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet not in self.seen:
            self.seen.add(packet)
            name = packet.__name__
            if packet not in self.registry and any(s in name for s in _SUSPICIOUS) and not name.endswith('_backward'):
                self.ops.add(str(packet))
        return func(*args, **(kwargs or {}))


def _counter(stack: list[str], counts: dict[tuple[str, str], int]) -> FlopCounterMode:
    """A FlopCounterMode (with :data:`_EXTRA_FLOPS`) that also credits every count to the module on top of ``stack``.

    Each formula of its registry is wrapped: the FLOPs it returns are added to ``counts[module, kind]`` as well.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)

    def credit(formula: Callable[..., int], kind: str) -> Callable[..., int]:
        def count(*args: Any, **kwargs: Any) -> int:
            flops = formula(*args, **kwargs)
            key = (stack[-1], kind)
            counts[key] = counts.get(key, 0) + flops
            return flops
        return count

    counter.flop_registry = {op: credit(formula, _kind(op)) for op, formula in counter.flop_registry.items()}
    return counter


# ---------------------------------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------------------------------

_PROJ_NAMES = {'qkv', 'q', 'k', 'v', 'kv', 'qk', 'proj', 'to_qkv', 'to_q', 'to_kv', 'to_out', 'out_proj', 'in_proj',
               'sr', 'query', 'key', 'value'}
_DWC_NAMES = {'dwc', 'lepe', 'get_v', 'pe', 'lepe_conv', 'dwconv_v'}
_HEAD_NAMES = {'head', 'head_dist', 'classifier', 'fc', 'last_linear'}


def _is_attention(name: str, module: nn.Module | None) -> bool:
    last = name.rsplit('.', 1)[-1].lower()
    return 'attn' in last or 'attention' in last or (module is not None and 'Attention' in type(module).__name__)


def _category(name: str, module: nn.Module | None, kind: str) -> str:
    """The breakdown category of MACs of operator ``kind`` executed by module ``name``.

    Decided from the qualified name first (timm and FLatten naming), then from the module type and operator kind.
    """
    parts = [p.lower() for p in name.split('.')] if name else []
    last = parts[-1] if parts else ''
    if any(p.startswith('patch_embed') or p.startswith('stem') or 'conv_embed' in p for p in parts):
        return 'patch_embed'
    if any(p in ('downsample', 'reduction', 'patch_merging') or p.startswith('merge') for p in parts):
        return 'downsample'
    if parts and (parts[0] in _HEAD_NAMES or parts[0].startswith('head')):
        return 'head'
    if any(p == 'mlp' or p == 'ffn' or p.startswith('mlp') for p in parts) or last in ('fc1', 'fc2'):
        return 'mlp'
    in_attention = any('attn' in p or 'attention' in p for p in parts[:-1])
    if last in _DWC_NAMES or (module is not None and type(module).__name__ == 'HeadDWC'):
        return 'dwc'
    if last in _PROJ_NAMES or (in_attention and kind in ('matmul', 'conv') and not _is_attention(name, module)):
        return 'attn_proj'
    if _is_attention(name, module):
        # Convolutions run inline by an attention module are its positional convs (DWC / LePE).
        return 'dwc' if kind == 'conv' else 'attn_matmul'
    return 'other'


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MacRecord:
    """MACs of one operator kind executed by one module.

    Attributes:
        module: Qualified name of the innermost module that ran the operators (``''`` is the model itself).
        module_type: Class name of that module.
        kind: ``'matmul'`` (mm/bmm/... incl. linear), ``'conv'`` or ``'attention'`` (fused SDPA kernels).
        category: One of :data:`CATEGORIES`.
        macs: Multiply-accumulates per image.
    """

    module: str
    module_type: str
    kind: str
    category: str
    macs: int


@dataclass(frozen=True)
class MacReport:
    """Result of :func:`count_macs`: MACs of one image, with a per-module and per-category breakdown.

    Attributes:
        total: MACs of one image.
        records: One :class:`MacRecord` per (module, operator kind), in execution order.
        input_size: Per-image input shape that was run, e.g. ``(3, 224, 224)``.
        model_name: timm architecture name, or the model's class name.
        params: Number of parameters (:func:`count_params`).
        uncounted_ops: Operators that look like they multiply but have no formula (empty for all supported models).
    """

    total: int
    records: tuple[MacRecord, ...]
    input_size: tuple[int, ...]
    model_name: str
    params: int
    uncounted_ops: tuple[str, ...] = field(default=())

    @property
    def by_module(self) -> dict[str, int]:
        """MACs per innermost module that executed them (qualified name -> MACs)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.module] = out.get(r.module, 0) + r.macs
        return out

    def by_category(self) -> dict[str, int]:
        """MACs per category (every key of :data:`CATEGORIES`, in display order)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.records:
            out[r.category] += r.macs
        return out

    def by_kind(self) -> dict[str, int]:
        """MACs per operator kind (``'matmul'``, ``'conv'``, ``'attention'``)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.kind] = out.get(r.kind, 0) + r.macs
        return out

    def by_prefix(self, depth: int = 1) -> dict[str, int]:
        """MACs grouped by the first ``depth`` components of the module names (``'(model)'`` for the root)."""
        out: dict[str, int] = {}
        for r in self.records:
            key = '.'.join(r.module.split('.')[:depth]) if r.module else '(model)'
            out[key] = out.get(key, 0) + r.macs
        return out

    def macs_under(self, prefix: str) -> int:
        """MACs of module ``prefix`` and everything it contains (``''`` is the whole model)."""
        if not prefix:
            return self.total
        return sum(r.macs for r in self.records if r.module == prefix or r.module.startswith(prefix + '.'))

    def format_table(self, max_depth: int = 2) -> str:
        """A readable table: MACs per module (names cut to ``max_depth`` components), then per category.

        Args:
            max_depth: How many components of the module names to keep (1 = top-level modules).

        Returns:
            A Markdown table as a string.
        """
        total = max(self.total, 1)

        def row(name: str, macs: int) -> str:
            return f'| {name} | {macs / 1e6:,.2f} | {100 * macs / total:.1f}% |'

        shape = 'x'.join(map(str, self.input_size))
        title = f'{self.model_name}, input {shape}: {self.total / 1e9:.3f} GMACs, {self.params / 1e6:.2f} M params'
        lines = [title, '', '| module | MMACs | share |', '|---|---:|---:|']
        lines += [row(k, v) for k, v in self.by_prefix(max(1, max_depth)).items()]
        lines += ['', '| category | MMACs | share |', '|---|---:|---:|']
        lines += [row(CATEGORIES[k], v) for k, v in self.by_category().items() if v or k != 'other']
        lines.append(row('**total**', self.total))
        if self.uncounted_ops:
            lines += ['', 'not counted (no formula): ' + ', '.join(self.uncounted_ops)]
        return '\n'.join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (totals, categories, per-module MACs and the records)."""
        return {
            'model': self.model_name,
            'input_size': list(self.input_size),
            'macs': self.total,
            'gmacs': round(self.total / 1e9, 4),
            'params': self.params,
            'by_category': self.by_category(),
            'by_kind': self.by_kind(),
            'by_module': self.by_module,
            'records': [dict(vars(r)) for r in self.records],
            'uncounted_ops': list(self.uncounted_ops),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------------

def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once; meta tensors work)."""
    return sum(p.numel() for p in model.parameters())


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    return str(cfg.get('architecture') or type(model).__name__)


def _resolve_input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    cfg_size = cfg.get('input_size') if isinstance(cfg, dict) else None
    if input_size is None:
        if not cfg_size:
            raise ConfigError(f'count_macs: model {_model_name(model)} carries no default input size; '
                              'pass input_size=(3, H, W)')
        input_size = cfg_size
    if isinstance(input_size, int):
        in_chans = int(cfg_size[0]) if cfg_size else int(getattr(model, 'in_chans', 3))
        input_size = (in_chans, input_size, input_size)
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f'count_macs: input_size must be an int or a tuple of ints such as (3, 224, 224), '
                          f'got {input_size!r}') from None
    if not size or any(s <= 0 for s in size):
        raise ConfigError(f'count_macs: input_size must be positive, got {input_size!r}')
    return size


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    device, dtype = torch.device('cpu'), torch.get_default_dtype()
    for i, t in enumerate(t for t in (*model.parameters(), *model.buffers())):
        if i == 0:
            device = t.device
        if t.is_floating_point():
            return device, t.dtype
    return device, dtype


_FORWARD_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, TypeError, NotImplementedError)


def _input_error(model: nn.Module, size: tuple[int, ...], err: BaseException, fix: str) -> ConfigError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip('.')
    if len(reason) > 160:
        reason = reason[:157] + '...'
    shape = 'x'.join(map(str, size))
    return ConfigError(f'model {_model_name(model)} does not accept input {shape}: {reason}; {fix}')


@torch.no_grad()
def check_input_size(model: nn.Module, input_size: tuple[int, int, int], *, fix: str = 'pass the size it was '
                     'built for') -> None:
    """Run one forward of a zero image of ``input_size`` (C, H, W) and turn a shape failure into one clear line.

    Args:
        model: The model (its device is used; its train/eval mode is restored).
        input_size: ``(C, H, W)``.
        fix: What the message tells the user to do.

    Raises:
        ConfigError: naming the model, the input size, the model's own complaint and ``fix``.
    """
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else 'cpu')
    was_training = model.training
    model.eval()
    try:
        model(x)
    except AmapError:
        raise
    except _FORWARD_ERRORS as err:
        raise _input_error(model, input_size, err, fix) from err
    finally:
        model.train(was_training)


def _track_modules(modules: dict[str, nn.Module], stack: list[str]) -> list[Any]:
    """Forward hooks that keep the qualified name of the innermost running module on top of ``stack``.

    Returns the hook handles (to remove). A module's own pre-hooks run before the push (their MACs are the caller's),
    its own forward hooks before the pop (their MACs are the module's).
    """
    names = {id(m): n for n, m in modules.items()}

    def push(mod: nn.Module, _args: Any) -> None:
        stack.append(names[id(mod)])

    def pop(mod: nn.Module, _args: Any, _out: Any) -> None:
        if len(stack) > 1:
            stack.pop()

    handles = []
    for mod in modules.values():
        handles.append(mod.register_forward_pre_hook(push))
        handles.append(mod.register_forward_hook(pop, always_call=True))
    return handles


def count_macs(
        model: nn.Module,
        input_size: int | Sequence[int] | None = None,
        *,
        batch_size: int = 1,
        device: str | torch.device | None = None,
) -> MacReport:
    """Count the multiply-accumulates of one image through ``model`` by running it.

    Runs one forward in eval mode without gradients on a zero input of shape ``(batch_size, *input_size)`` and counts
    every multiplying operator (see the module docstring for the exact formulas that result). The model's training
    mode is restored and every hook is removed afterwards, even if the forward raises.

    Args:
        model: Any ``nn.Module`` taking one tensor (a ``DataParallel``/``DistributedDataParallel`` wrapper is
            unwrapped).
        input_size: Per-image input shape, e.g. ``(3, 224, 224)``; an int ``s`` means ``(in_chans, s, s)``. Defaults
            to ``model.pretrained_cfg['input_size']`` (every timm and FLatten zoo model has one).
        batch_size: Images in the counting forward; the report is per image (``batch_size`` only matters for models
            that need more than one image).
        device: Where to run the forward. Defaults to the model's device. If it differs from the model's device, the
            forward uses copies of the parameters there (``torch.func.functional_call``); the model is not moved.
            ``'meta'`` runs on shapes only: no arithmetic, no memory, same count.

    Returns:
        A :class:`MacReport`.

    Raises:
        ConfigError: ``input_size`` is missing and the model has no default, is invalid, or the model does not accept
            it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f'count_macs: batch_size must be a positive int, got {batch_size!r}')
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # count (and name modules as in) the wrapped model
    size = _resolve_input_size(model, input_size)
    model_device, dtype = _model_device_dtype(model)
    run_device = torch.device(device) if device is not None else model_device
    x = torch.zeros((batch_size, *size), device=run_device, dtype=dtype)

    modules = dict(model.named_modules())
    stack: list[str] = ['']
    counts: dict[tuple[str, str], int] = {}
    counter = _counter(stack, counts)
    uncounted = _Uncounted(counter.flop_registry)
    state = None
    if run_device != model_device:  # copies of the parameters where the forward runs
        state = {k: v.detach().to(run_device) for k, v in (*model.named_parameters(), *model.named_buffers())}
    was_training = model.training
    handles = _track_modules(modules, stack)
    try:
        model.eval()
        with torch.no_grad(), uncounted, counter:
            model(x) if state is None else torch.func.functional_call(model, state, (x,))
    except AmapError:
        raise
    except _FORWARD_ERRORS as err:
        raise _input_error(model, size, err, 'pass the size it was built for') from err
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    records = []
    for (name, kind), flops in counts.items():
        if flops % (2 * batch_size):
            raise AssertionError(f'MACs of {name!r} are not proportional to the batch size')
        mod = modules.get(name)
        records.append(MacRecord(module=name, module_type=type(mod).__name__, kind=kind,
                                 category=_category(name, mod, kind), macs=flops // (2 * batch_size)))
    return MacReport(
        total=sum(r.macs for r in records),
        records=tuple(records),
        input_size=size,
        model_name=_model_name(model),
        params=count_params(model),
        uncounted_ops=tuple(sorted(uncounted.ops)),
    )
