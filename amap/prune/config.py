"""The options of the pruning method (:class:`PruneConfig`, with the search loop's :class:`SearchSettings` nested as
``search``) and the target (MACs, or latency measured on the device).

Every field is declared once: ``amap.prune(..., **overrides)``, the ``prune:`` section of an ``amap prune`` YAML file
and the ``amap prune`` flags are read off these dataclasses. The field metadata says what the command line needs
beyond the docstring (``flags``: option strings; ``choices``; ``min``; ``cli``: False keeps a field off the command
line).

Before the search settings were nested, they were fields of :class:`PruneConfig` itself (``search_steps``, ``lr``,
``kd_alpha``, ...); :func:`nest_search_options` maps those flat names, the one place that knows them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..utils.config import check_value
from .criteria import CRITERIA
from .criterion_init import INDICATOR_INITS
from .groups import GROUP_KINDS
from .search import SearchSettings

__all__ = ['PruneConfig', 'SearchSettings', 'FLAT_SEARCH_KEYS', 'nest_search_options', 'resolve_target',
           'resolve_cost_target', 'RESOURCES', 'LATENCY_BACKENDS', 'LATENCY_SEARCH']

RESOURCES = ('macs', 'latency')
LATENCY_BACKENDS = ('eager', 'onnxruntime')
LATENCY_SEARCH = ('table', 'fit', 'macs')  # what the search of a latency target follows
CUT_WEIGHTS = ('search', 'original')
TRIM_RANKS = ('auto', 'cost', 'score')

# flat option name (before ``search`` was nested) -> field of SearchSettings
FLAT_SEARCH_KEYS = {'search_steps': 'steps', **{f.name: f.name for f in dataclasses.fields(SearchSettings)
                                                   if f.name != 'steps'}}


def nest_search_options(options: Mapping[str, Any], where: str = 'prune options') -> dict[str, Any]:
    """``options`` with the flat search-setting names (:data:`FLAT_SEARCH_KEYS`) moved into ``search``.

    ``search`` may be a :class:`SearchSettings` or a mapping; a flat value replaces the nested one. Values are
    checked under the name they were given by (``search_steps must be an integer or null``).
    """
    out = dict(options)
    flat = {FLAT_SEARCH_KEYS[k]: check_value(SearchSettings, FLAT_SEARCH_KEYS[k], out.pop(k), where, key=k)
            for k in list(out) if k in FLAT_SEARCH_KEYS}
    if not flat:
        return out
    search = out.get('search')
    if isinstance(search, SearchSettings):
        out['search'] = dataclasses.replace(search, **flat)
    elif search is None or isinstance(search, Mapping):
        out['search'] = {**(search or {}), **flat}
    else:
        raise ConfigError(f'{where}: search must be a mapping of search settings, got {search!r}')
    return out


def _accepts_flat_search_options(cls: type) -> type:
    """``PruneConfig(search_steps=50, lr=0)`` keeps working: the flat names go into ``search``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **nest_search_options(kwargs))

    cls.__init__ = __init__
    return cls


@_accepts_flat_search_options
@dataclass
class PruneConfig:
    """Options of :func:`amap.prune`. Defaults are the full method as docs/amap-method.md describes it.

    Args:
        target: The target: a ratio in (0, 1) of the unpruned model's MACs (or, with ``resource='latency'``, of its
            measured latency), or an absolute MAC count (> 1).
        resource: What the target counts: macs (analytic) or latency (measured on this device at
            ``latency_batch``; the search, the target guarantee and a closed-loop check then use it).
        speedup: Latency target as a speed-up over the unpruned model (1.6 is a target of 1/1.6); replaces
            ``target``; needs ``resource='latency'``.
        target_ms: Latency target in milliseconds per batch of ``latency_batch``; replaces ``target``; needs
            ``resource='latency'``.
        latency_batch: Batch size the latency target is for.
        latency_threads: Intra-op threads the latency is measured with (1 suits a shared CPU).
        latency_backend: What runs the model when timing: eager (PyTorch; CUDA events on a GPU) or onnxruntime.
        latency_calib_rounds: Timed rounds of the latency calibration (rounds are added when the device is noisy)
            and of each check of the cut model.
        latency_search: What the search of a latency target follows: macs (the default: MACs, under the MAC count
            of the uniform structure that meets the latency target), table (the latency model, multilinear through
            its measured points: the local slope) or fit (the latency model's value at full width plus a least-squares
            multilinear fit of each table: one price per channel over the whole range). In every case the final
            structure is selected against the measured, step-shaped latency table and checked on the device. On the
            converged FLatten-DeiT micro at 1.6x and batch 32 (equal measured latency, BENCHMARKS.md), with the score
            trim: macs 84.34 +- 0.54 (6 seeds), table 83.28 +- 0.67, fit 83.25 +- 1.86 (3 seeds); a MAC target with
            ``channel_multiple`` 8 matched to the same latency 84.16 +- 0.59. Read through its points, a table whose
            last channels time cheap near full width gives them no pull, so a latency search left every v channel
            in and the trim cut v blind.
        latency_cache: Reuse (and write) the calibration cached under ``$AMAP_CACHE`` (default ``~/.cache/amap``).
        criterion: ``amap`` (the learned indicators) or a baseline importance criterion under the same constraints:
            ``magnitude``, ``magnitude_l2``, ``taylor``, ``random`` (global allocation), ``uniform``,
            ``taylor_uniform`` (per layer).
        kinds: Group kinds to prune (``qk``, ``v``, ``mlp``).
        similarity: Fold channel-similarity weights into the indicator (section 4).
        similarity_beta: Strength of the similarity weights.
        head_balance: Every head of a layer keeps the same number of channels during the search (section 3). Off
            (ablation), channels are gated one by one and heads drift to different counts (the paper's channel
            mismatch); the physical model is then balanced afterwards, each head keeping the layer's mean count.
        reweight: Learn a reweight scale per kept channel, folded into the weights at surgery (section 6).
        cut_weights: The weights the cut model starts its fine-tune from (amap criterion): original (ours, the
            default: the searched structure cut from the unpruned model's own weights; the search's weight updates
            and reweights are dropped, so the search only chooses the structure) or search (the weights and
            reweights as the search left them, its ramp factors folded in, as the paper does). On the converged
            FLatten-DeiT micro at 50% of the MACs: 84.08 +- 0.18 against 83.35 +- 0.31 (BENCHMARKS.md).
        attn_init: Initialise linear-attention indicators from the attention difference (section 5): ranked within
            each head and centred on the common start 1 (``attn_init_spread``), or the paper's mapping onto
            ``[attn_init_low, 1]``. Off by default until measured to help: the paper's mapping cost 4.9 top-1 points
            on FLatten-DeiT at 50% and 70% MACs (BENCHMARKS.md), because Adam moves every indicator at about the
            same rate, so the linear-attention groups, started lower than the MLPs, were cut first.
        attn_init_spread: Width of the centred ranking: a head's channels start in ``[1 - spread/2, 1 + spread/2]``
            by their attention difference.
        attn_init_low: The paper's mapping instead of the centred ranking: a layer's least important
            linear-attention channel starts at this value, the most important at 1 (null: the centred ranking).
            Times a similarity weight of ``1 - similarity_beta``, a value below ``threshold / (1 - similarity_beta)``
            gates channels off before the search has seen a gradient.
        indicator_init: Where the search starts: constant (every indicator at 1, or the attention-difference init as
            ``attn_init`` says) or taylor (ours: at the structure the Taylor criterion gives at the target, kept
            channels ``init_margin`` above the threshold and the others below it, so the search refines a structure
            that already meets the target; docs/amap-method.md, section 5b).
        init_margin: Distance of the start scores from the threshold under a criterion init.
        calib_batches: Batches of the loader used for calibration (similarity, initialisation, Taylor).
        threshold: Indicator score threshold for a kept channel.
        min_keep: Channels every head keeps at least.
        fill: Let the target guarantee grow the structure back up to the target.
        trim_rank: What the target guarantee ranks the searched channels by when it trims (or fills) to the target:
            score (the default: score per channel; the indicators were learned under the resource loss, so their
            scores already weigh each channel's cost), cost (score per unit of the resource saved: it charges the
            cost a second time, so the last cuts fall on the costliest groups, the high-resolution linear attention
            of FLatten-Swin's first stage and the q/k of every softmax layer; measured on the three converged micro
            bases in BENCHMARKS.md: 79.45 +- 0.33 against 81.40 +- 0.59 top-1 on FLatten-Swin at 50% of the MACs)
            or auto (the default before 2026-11-27: score under a latency target, cost under a MAC target).
        channel_multiple: Round every pruned width (heads x per-head count of q/k or v, the MLP hidden width) to a
            multiple of this in the final structure (8 or 16 suit GEMM kernels); 1 keeps the exact MAC-optimal
            widths. A group left unpruned keeps its full width.
        seed: Seed of everything random in the pruning.
        search: Settings of the search loop (amap criterion only).
    """

    target: float = field(default=0.7, metadata={'flags': ('--target', '-t')})
    resource: str = field(default='macs', metadata={'choices': RESOURCES})
    speedup: float | None = None
    target_ms: float | None = None
    latency_batch: int = field(default=1, metadata={'min': 1})
    latency_threads: int = field(default=1, metadata={'min': 1})
    latency_backend: str = field(default='eager', metadata={'choices': LATENCY_BACKENDS})
    latency_calib_rounds: int = field(default=5, metadata={'min': 1})
    latency_search: str = field(default='macs', metadata={'choices': LATENCY_SEARCH})
    latency_cache: bool = True
    criterion: str = field(default='amap', metadata={'choices': CRITERIA})
    kinds: tuple[str, ...] = GROUP_KINDS
    similarity: bool = True
    similarity_beta: float = 0.3
    head_balance: bool = True
    reweight: bool = True
    cut_weights: str = field(default='original', metadata={'choices': CUT_WEIGHTS})
    attn_init: bool = False
    attn_init_spread: float = 0.1
    attn_init_low: float | None = None
    indicator_init: str = field(default='constant', metadata={'choices': INDICATOR_INITS})
    init_margin: float = 0.1
    calib_batches: int = field(default=8, metadata={'min': 1})
    threshold: float = 0.5
    min_keep: int = 1
    fill: bool = True
    trim_rank: str = field(default='score', metadata={'choices': TRIM_RANKS})
    channel_multiple: int = field(default=1, metadata={'min': 1, 'metavar': 'N'})
    seed: int = field(default=0, metadata={'cli': False})
    search: SearchSettings = field(default_factory=SearchSettings)

    def __post_init__(self) -> None:
        if isinstance(self.search, Mapping):
            from ..utils.config import from_mapping
            self.search = from_mapping(SearchSettings, self.search, where='prune options (search)')
        if self.criterion not in CRITERIA:
            raise ConfigError(f'criterion {self.criterion!r} is unknown; choose from {list(CRITERIA)}')
        self.kinds = tuple(self.kinds)
        if not self.kinds or set(self.kinds) - set(GROUP_KINDS):
            raise ConfigError(f'kinds {list(self.kinds)} must be a non-empty subset of {list(GROUP_KINDS)}')
        self._check_latency_options()
        _check_target_value(self.target)
        if self.attn_init_low is not None and not 0 < self.attn_init_low <= 1:
            raise ConfigError(f'attn_init_low must be in (0, 1] or null, got {self.attn_init_low}')
        if not 0 <= self.attn_init_spread < 1:
            raise ConfigError(f'attn_init_spread must be in [0, 1), got {self.attn_init_spread}')
        if self.indicator_init not in INDICATOR_INITS:
            raise ConfigError(f'indicator_init {self.indicator_init!r} is unknown; choose from {list(INDICATOR_INITS)}')
        if self.indicator_init != 'constant' and self.attn_init:
            raise ConfigError(f'indicator_init={self.indicator_init!r} sets every start itself: turn attn_init off')
        if not 0 < self.init_margin < 1:
            raise ConfigError(f'init_margin must be in (0, 1), got {self.init_margin}')
        if self.trim_rank not in TRIM_RANKS:
            raise ConfigError(f'trim_rank {self.trim_rank!r} is unknown; choose from {list(TRIM_RANKS)}')
        if self.channel_multiple < 1:
            raise ConfigError(f'channel_multiple must be >= 1, got {self.channel_multiple}')
        if not self.head_balance and self.criterion != 'amap':
            raise ConfigError('head_balance=False is an ablation of the amap criterion only')

    @property
    def trim_by_cost(self) -> bool:
        """Whether the target guarantee ranks by score per unit of cost (``trim_rank``, ``auto`` resolved)."""
        return self.trim_rank == 'cost' or (self.trim_rank == 'auto' and self.resource != 'latency')

    def _check_latency_options(self) -> None:
        if self.resource not in RESOURCES:
            raise ConfigError(f'resource {self.resource!r} is unknown; choose from {list(RESOURCES)}')
        if self.latency_search not in LATENCY_SEARCH:
            raise ConfigError(f'latency_search {self.latency_search!r} is unknown; choose from {list(LATENCY_SEARCH)}')
        if self.latency_backend not in LATENCY_BACKENDS:
            raise ConfigError(f'latency_backend {self.latency_backend!r} is unknown; choose from '
                              f'{list(LATENCY_BACKENDS)}')
        for name in ('speedup', 'target_ms'):
            if getattr(self, name) is not None and self.resource != 'latency':
                raise ConfigError(f"{name} is a latency target: add resource='latency' (--resource latency)")
        if self.speedup is not None and self.target_ms is not None:
            raise ConfigError('give either speedup or target_ms, not both')
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise ConfigError(f'speedup {self.speedup} must be above 1, e.g. 1.6 for 1.6x faster')
        if self.target_ms is not None and not (math.isfinite(self.target_ms) and self.target_ms > 0):
            raise ConfigError(f'target_ms {self.target_ms} must be a positive number of milliseconds')
        if self.resource == 'latency' and self.speedup is None and self.target_ms is None and self.target >= 1:
            raise ConfigError(f'target {self.target:g} is not a latency ratio in (0, 1); give an absolute latency '
                              f'as target_ms (--target-ms)')
        for name in ('latency_batch', 'latency_threads', 'latency_calib_rounds'):
            if getattr(self, name) < 1:
                raise ConfigError(f'{name} must be >= 1, got {getattr(self, name)}')

    @property
    def searches(self) -> bool:
        """Whether the structure comes from the search (the amap criterion) rather than a baseline's scores."""
        return self.criterion == 'amap'


def _check_target_value(target: float) -> None:
    if not math.isfinite(target) or target <= 0:
        raise ConfigError(f'target {target} must be a MAC ratio in (0, 1), e.g. 0.7 for 70% of the MACs')
    if 1 <= target < 1000:
        raise ConfigError(f'target {target:g} is not a MAC ratio in (0, 1) (e.g. 0.7 for 70% of the MACs); values '
                          f'from 1000 up are read as an absolute MAC count')


def resolve_target(target: float, full_macs: float) -> float:
    """MACs of a target given as a ratio in (0, 1) or as an absolute count (> 1)."""
    _check_target_value(target)
    if target < 1:
        return target * full_macs
    if target >= full_macs:
        raise ConfigError(f'target of {target:.4g} MACs is not below the model\'s {full_macs:.4g} MACs')
    return float(target)


def resolve_cost_target(cfg: PruneConfig, full: float) -> float:
    """The target in the units of ``cfg.resource`` (MACs, or ms per batch) given the unpruned model's ``full`` cost:
    ``target_ms``, ``1 / speedup`` or ``target`` as a ratio of ``full`` (MACs: also an absolute count)."""
    if cfg.resource == 'macs':
        return resolve_target(cfg.target, full)
    if cfg.target_ms is not None:
        if cfg.target_ms >= full:
            raise ConfigError(f'target_ms {cfg.target_ms:g} is not below the unpruned model\'s measured {full:.4g} ms '
                              f'at batch {cfg.latency_batch}; lower --target-ms')
        return float(cfg.target_ms)
    return full / cfg.speedup if cfg.speedup is not None else cfg.target * full
