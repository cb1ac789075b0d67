"""The options of the pruning method (:class:`PruneConfig`, with the search loop's :class:`SearchSettings` nested as
``search``) and the MAC target.

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
from .groups import GROUP_KINDS
from .search import SearchSettings

__all__ = ['PruneConfig', 'SearchSettings', 'FLAT_SEARCH_KEYS', 'nest_search_options', 'resolve_target']

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
        target: MAC target: a ratio in (0, 1) of the unpruned model's MACs, or an absolute MAC count (> 1).
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
        calib_batches: Batches of the loader used for calibration (similarity, initialisation, Taylor).
        threshold: Indicator score threshold for a kept channel.
        min_keep: Channels every head keeps at least.
        fill: Let the target guarantee grow the structure back up to the target.
        channel_multiple: Round every pruned width (heads x per-head count of q/k or v, the MLP hidden width) to a
            multiple of this in the final structure (8 or 16 suit GEMM kernels); 1 keeps the exact MAC-optimal
            widths. A group left unpruned keeps its full width.
        seed: Seed of everything random in the pruning.
        search: Settings of the search loop (amap criterion only).
    """

    target: float = field(default=0.7, metadata={'flags': ('--target', '-t')})
    criterion: str = field(default='amap', metadata={'choices': CRITERIA})
    kinds: tuple[str, ...] = GROUP_KINDS
    similarity: bool = True
    similarity_beta: float = 0.3
    head_balance: bool = True
    reweight: bool = True
    attn_init: bool = False
    attn_init_spread: float = 0.1
    attn_init_low: float | None = None
    calib_batches: int = field(default=8, metadata={'min': 1})
    threshold: float = 0.5
    min_keep: int = 1
    fill: bool = True
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
        _check_target_value(self.target)
        if self.attn_init_low is not None and not 0 < self.attn_init_low <= 1:
            raise ConfigError(f'attn_init_low must be in (0, 1] or null, got {self.attn_init_low}')
        if not 0 <= self.attn_init_spread < 1:
            raise ConfigError(f'attn_init_spread must be in [0, 1), got {self.attn_init_spread}')
        if self.channel_multiple < 1:
            raise ConfigError(f'channel_multiple must be >= 1, got {self.channel_multiple}')
        if not self.head_balance and self.criterion != 'amap':
            raise ConfigError('head_balance=False is an ablation of the amap criterion only')

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
